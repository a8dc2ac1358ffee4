-- begin: look a record up and, if it is free, take a lease on it. One round trip.
--
-- KEYS[1]  the record key
-- ARGV[1]  the request fingerprint, 32 bytes
-- ARGV[2]  the lease, in milliseconds
-- ARGV[3]  the key's TTL while in flight, in milliseconds (longer than the lease, see mod.rs)
--
-- Returns {1, token, attempt, recovery point} acquired (the point as stored after the attempt:
-- '' for none, else name length u8, name, data), {2} in flight, {3} fingerprint mismatch,
-- {4, value, pttl} completed with the same fingerprint (the whole value: the client drops the
-- header; the milliseconds the key has left),
-- {0, header} the stored header is not one this script understands (the client says why).
--
-- Value layout (see mod.rs): version u8 = 1, state u8 (1 in flight, 2 completed, 3 in flight
-- and watched),
-- fingerprint [32], token u64 BE, lease deadline u64 BE (server microseconds), then in flight the
-- attempt u32 BE and the recovery point, completed the response.
local key = KEYS[1]
local fingerprint = ARGV[1]
local lease_ms = tonumber(ARGV[2])
local key_ttl_ms = ARGV[3]
if #fingerprint ~= 32 then
  return redis.error_reply('ERR tower-idempotency: the fingerprint must be 32 bytes')
end

-- Server time, never the client's: every process sharing the store agrees on lease deadlines.
local time = redis.call('TIME')
local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
local token = now_us
local new_state = 1
local attempt = 1
local recovery_point = ''

-- Only the fixed-size header is read first, so an in-flight or mismatched answer never copies a
-- stored response. GETRANGE of a missing key is the empty string.
local header = redis.call('GETRANGE', key, 0, 49)
if header ~= '' then
  if #header < 50 or string.byte(header, 1) ~= 1 then
    return {0, header}
  end
  local state = string.byte(header, 2)
  -- State 3 is "in flight, and a process waits for it" (see watch.lua).
  local same = string.sub(header, 3, 34) == fingerprint
  if state == 2 then
    -- A completed record lives exactly as long as its key: Redis never returns an expired key.
    if same then
      return {4, redis.call('GET', key), redis.call('PTTL', key)}
    end
    return {3}
  elseif state ~= 1 and state ~= 3 then
    return {0, header}
  end
  local held, lease_until = struct.unpack('>I8I8', header, 35)
  if lease_until > now_us then
    if same then
      return {2}
    end
    return {3}
  end
  -- The lease expired: take it over, whatever our fingerprint, with a token larger than the
  -- old one even if the server clock stepped back since it was issued.
  if held >= token then
    token = held + 1
  end
  -- Whoever waited for the lapsed lease waits for the takeover now.
  new_state = state
  -- The same request's next attempt resumes where the lapsed one got to. (A value written before
  -- attempts were counted ends at the header: its run was the first.)
  if same then
    local tail = redis.call('GETRANGE', key, 50, -1)
    local previous = 1
    if #tail >= 4 then
      previous = struct.unpack('>I4', tail)
      recovery_point = string.sub(tail, 5)
    end
    attempt = previous + 1
  end
end

redis.call('SET', key,
  string.char(1, new_state) .. fingerprint .. struct.pack('>I8I8', token, now_us + lease_ms * 1000)
    .. struct.pack('>I4', attempt) .. recovery_point,
  'PX', key_ttl_ms)
return {1, token, attempt, recovery_point}
