-- complete: store the response if the token holds the in-flight lease, then tell the waiters.
--
-- KEYS[1]  the record key
-- ARGV[1]  the lease token, 8 bytes big-endian (compared as bytes: no float rounding)
-- ARGV[2]  the record's TTL, in milliseconds
-- ARGV[3]  the encoded response
-- ARGV[4]  the completion channel
-- ARGV[5]  the message: the record key in hex
--
-- Returns 1 stored, 0 the token does not hold the lease (nothing changed).
local key = KEYS[1]
local header = redis.call('GETRANGE', key, 0, 49)
local state = string.byte(header, 2)
if #header ~= 50 or string.byte(header, 1) ~= 1 or (state ~= 1 and state ~= 3)
    or string.sub(header, 35, 42) ~= ARGV[1] then
  return 0
end
-- The completed header keeps fingerprint and token; the lease deadline no longer applies (the
-- key's TTL is the record's expiry), so it is zeroed.
redis.call('SET', key,
  string.char(1, 2) .. string.sub(header, 3, 42) .. struct.pack('>I8', 0) .. ARGV[3],
  'PX', ARGV[2])
-- Only a watched record (state 3) has waiters in other processes to tell.
if state == 3 then
  redis.call('PUBLISH', ARGV[4], ARGV[5])
end
return 1
