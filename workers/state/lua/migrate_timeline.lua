-- Index a timeline stored by a release without the time and expiry indexes (idempotent).
-- KEYS[1] facts hash, KEYS[2] meta hash, KEYS[3] tl zset, KEYS[4] exp zset (see store_events.lua)
-- ARGV[1] epoch of the stored clock ('' if none); ARGV[2..] triples: field, tl score, exp score
local facts, meta, tl, exp = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
for i = 2, #ARGV, 3 do
  if redis.call('HEXISTS', facts, ARGV[i]) == 1 then
    redis.call('ZADD', tl, ARGV[i + 1], ARGV[i])
    redis.call('ZADD', exp, ARGV[i + 2], ARGV[i])
  end
end
if ARGV[1] ~= '' then redis.call('HSET', meta, 'clock_s', ARGV[1]) end
redis.call('HSET', meta, 'layout', '2')
return 'ok'
