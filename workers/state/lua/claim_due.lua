-- Claim the patients whose alerts are due for re-evaluation by time alone, so one sweeper ticks each.
-- KEYS[1] due zset   patient -> epoch seconds when the patient's decisions can next change by time alone
-- ARGV[1] now (epoch), ARGV[2] lease: the claimed patients' score until their tick rewrites it,
-- ARGV[3] most patients to claim
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
