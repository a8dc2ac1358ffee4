-- watch: mark an in-flight record as waited for, so that its completion or release is published
-- to other processes (complete.lua and release.lua publish only for marked records: a request
-- nobody waits for costs no message).
--
-- KEYS[1]  the record key
--
-- Returns 1 if the record is in flight (now marked), 0 if it is not (completed, released, absent):
-- the caller then looks again at once.
local key = KEYS[1]
local header = redis.call('GETRANGE', key, 0, 49)
if #header ~= 50 or string.byte(header, 1) ~= 1 then
  return 0
end
local state = string.byte(header, 2)
if state == 1 then
  -- Byte 1 (0-based) is the state: patch it in place.
  redis.call('SETRANGE', key, 1, string.char(3))
  return 1
end
if state == 3 then
  return 1
end
return 0
