-- inspect: read a record for an operator, with the server's clock and the key's remaining TTL.
--
-- KEYS[1]  the record key
--
-- Returns {} when the key does not exist, else {value, pttl in ms, server time in microseconds}.
local key = KEYS[1]
local value = redis.call('GET', key)
if not value then
  return {}
end
local time = redis.call('TIME')
local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
return {value, redis.call('PTTL', key), now_us}
