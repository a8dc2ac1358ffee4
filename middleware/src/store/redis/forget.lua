-- forget: delete a completed record, or (with force) end a live lease, then tell every process.
--
-- KEYS[1]  the record key
-- ARGV[1]  '1' to end a live lease too, '0' to leave it
-- ARGV[2]  the completion channel
-- ARGV[3]  the message: 'forget:' then the record key in hex
--
-- Returns {0} nothing live, {1} completed record deleted, {2, token, attempt} lease ended,
-- {3, token, attempt} in flight and left as it is (no force), or an error for a header this
-- script does not understand.
local key = KEYS[1]
local header = redis.call('GETRANGE', key, 0, 49)
if header == '' then
  return {0}
end
if #header < 50 or string.byte(header, 1) ~= 1 then
  return redis.error_reply('ERR tower-idempotency: unknown record header')
end
local state = string.byte(header, 2)
if state == 2 then
  redis.call('DEL', key)
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return {1}
elseif state ~= 1 and state ~= 3 then
  return redis.error_reply('ERR tower-idempotency: unknown record state')
end
local time = redis.call('TIME')
local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
local held, lease_until = struct.unpack('>I8I8', header, 35)
if lease_until <= now_us then
  -- A lapsed lease is not live: the next begin takes it over anyway.
  return {0}
end
local attempt = 1
local tail = redis.call('GETRANGE', key, 50, 53)
if #tail == 4 then
  attempt = struct.unpack('>I4', tail)
end
if ARGV[1] ~= '1' then
  return {3, held, attempt}
end
redis.call('DEL', key)
-- Every process hears of it, watched or not: caches and waiters elsewhere must look again.
redis.call('PUBLISH', ARGV[2], ARGV[3])
return {2, held, attempt}
