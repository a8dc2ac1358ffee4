-- checkpoint: store the recovery point if the token holds the in-flight lease.
--
-- KEYS[1]  the record key
-- ARGV[1]  the lease token, 8 bytes big-endian
-- ARGV[2]  the recovery point: name length u8, name, data
--
-- Returns 1 stored, 0 the token does not hold the lease (nothing changed). The lease deadline and
-- the key's TTL stay as they are.
local key = KEYS[1]
local header = redis.call('GETRANGE', key, 0, 49)
local state = string.byte(header, 2)
if #header ~= 50 or string.byte(header, 1) ~= 1 or (state ~= 1 and state ~= 3)
    or string.sub(header, 35, 42) ~= ARGV[1] then
  return 0
end
-- The attempt follows the header; a value written before attempts were counted has none.
local attempt = redis.call('GETRANGE', key, 50, 53)
if #attempt ~= 4 then
  attempt = struct.pack('>I4', 1)
end
redis.call('SET', key, header .. attempt .. ARGV[2], 'KEEPTTL')
return 1
