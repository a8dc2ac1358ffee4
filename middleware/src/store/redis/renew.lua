-- renew: push the lease deadline to now + lease if the token holds the in-flight lease.
--
-- KEYS[1]  the record key
-- ARGV[1]  the lease token, 8 bytes big-endian
-- ARGV[2]  the lease, in milliseconds
-- ARGV[3]  the key's TTL while in flight, in milliseconds
--
-- Returns 1 renewed, 0 the token does not hold the lease (nothing changed).
local key = KEYS[1]
local header = redis.call('GETRANGE', key, 0, 49)
local state = string.byte(header, 2)
if #header ~= 50 or string.byte(header, 1) ~= 1 or (state ~= 1 and state ~= 3)
    or string.sub(header, 35, 42) ~= ARGV[1] then
  return 0
end
local time = redis.call('TIME')
local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
-- Only the 8-byte deadline changes: patch it in place (byte offset 42) rather than rewrite.
redis.call('SETRANGE', key, 42, struct.pack('>I8', now_us + tonumber(ARGV[2]) * 1000))
redis.call('PEXPIRE', key, ARGV[3])
return 1
