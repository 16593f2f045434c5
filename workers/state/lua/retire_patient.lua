-- Forget an inactive patient (see Store.retire_inactive_patients), a bounded number of resources per call.
-- KEYS[1] facts hash, KEYS[2] meta hash, KEYS[3] tl zset, KEYS[4] exp zset, KEYS[5] alerts hash, KEYS[6] open hash,
-- KEYS[7] applied, KEYS[8] closed hash (the patient's keys, workers/state/keys.py)
-- ARGV[1] most resources removed by this call, ARGV[2] cutoff: the patient must not have been written since
-- (meta 'seen', set by store_events.lua, is the wall-clock epoch of the patient's latest resource or delete)
-- A patient with an alert still stored (open, or closed and not yet past its retention) is kept.
-- Returns {'kept' | 'more' | 'retired', removed resource names}: 'more' when resources remain (call again).
local facts, meta, tl, exp = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local limit, cutoff = tonumber(ARGV[1]), tonumber(ARGV[2])
if tonumber(redis.call('HGET', meta, 'seen') or '0') > cutoff then return {'kept', {}} end
if redis.call('HLEN', KEYS[6]) > 0 or redis.call('HLEN', KEYS[5]) > 0 then return {'kept', {}} end
local fields = redis.call('ZRANGE', exp, 0, limit - 1)
if #fields == 0 then  -- stored by a release without the expiry index
  local scan = redis.call('HSCAN', facts, 0, 'COUNT', limit)
  for i = 1, #scan[2], 2 do fields[#fields + 1] = scan[2][i] end
end
for _, field in ipairs(fields) do
  redis.call('HDEL', facts, field)
  redis.call('ZREM', tl, field)
  redis.call('ZREM', exp, field)
end
if redis.call('EXISTS', facts) == 1 then return {'more', fields} end
redis.call('DEL', meta, tl, exp, KEYS[7], KEYS[8])
return {'retired', fields}
