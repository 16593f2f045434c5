-- Append one AuditEvent and index it under each patient, atomically (all keys share the {audit} hash tag).
-- KEYS[1] = the event stream; KEYS[2..] = the per-patient index sorted sets.
-- ARGV[1] = the AuditEvent JSON; ARGV[2] = recorded time (ms); ARGV[3] = oldest time kept (ms);
-- ARGV[4] = retention (ms, the index keys' TTL).
local id = redis.call('XADD', KEYS[1], 'MINID', '~', ARGV[3], '*', 'e', ARGV[1])
local score = tonumber(ARGV[2])
for i = 2, #KEYS do
  redis.call('ZADD', KEYS[i], score, id)
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', '(' .. ARGV[3])
  redis.call('PEXPIRE', KEYS[i], ARGV[4])
end
return id
