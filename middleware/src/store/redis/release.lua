-- release: give the in-flight lease up if the token holds it, then tell the waiters.
--
-- KEYS[1]  the record key
-- ARGV[1]  the lease token, 8 bytes big-endian
-- ARGV[2]  the completion channel
-- ARGV[3]  the message: the record key in hex
--
-- Returns 1 released, 0 the token does not hold the lease (nothing changed).
local key = KEYS[1]
local header = redis.call('GETRANGE', key, 0, 49)
local state = string.byte(header, 2)
if #header ~= 50 or string.byte(header, 1) ~= 1 or (state ~= 1 and state ~= 3)
    or string.sub(header, 35, 42) ~= ARGV[1] then
  return 0
end
redis.call('DEL', key)
-- Only a watched record (state 3) has waiters in other processes to tell.
if state == 3 then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return 1
