-- Claim the inbox batches whose redelivery is due, so that exactly one sweeper re-publishes each.
-- KEYS[1] due zset      batch id -> epoch seconds when its doorbell is re-published if still unfinished
-- KEYS[2] batches hash  batch id -> events json
-- ARGV[1] now, ARGV[2] next due time for the claimed batches, ARGV[3] most batches to claim
local due, batches = KEYS[1], KEYS[2]
local ids = redis.call('ZRANGEBYSCORE', due, '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local claimed = {}
for _, id in ipairs(ids) do
  if redis.call('HEXISTS', batches, id) == 1 then
    redis.call('ZADD', due, ARGV[2], id)
    claimed[#claimed + 1] = id
  else
    redis.call('ZREM', due, id)  -- finished between the two writes of finish(): nothing to deliver
  end
end
return claimed
