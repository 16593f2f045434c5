-- Resolve or reopen one data-problem item, atomically, with a revision check (see workers/state/data_problems.py).
-- KEYS[1] items hash, KEYS[2] open set, KEYS[3] resolved set
-- ARGV[1] item id, ARGV[2] action (resolve | reopen), ARGV[3] actor, ARGV[4] time (text)
-- ARGV[5] expected revision ('' = any), ARGV[6] comment ('' = none)
-- Returns {'ok', item json} or {error code, message}; codes: not-found, illegal, conflict.
local items, open, resolved = KEYS[1], KEYS[2], KEYS[3]
local id, action, actor, at, expected, comment = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]

local raw = redis.call('HGET', items, id)
if not raw then return {'not-found', 'no data problem ' .. id} end
local item = cjson.decode(raw)
if type(item.history) ~= 'table' or next(item.history) == nil then item.history = {} end
if expected ~= '' and tonumber(expected) ~= (item.revision or 0) then
  return {'conflict', 'data problem ' .. id .. ' changed since revision ' .. expected .. ' (now revision '
    .. tostring(item.revision or 0) .. ', ' .. item.status .. '); reload and try again'}
end
local from = item.status
local target = ({resolve = 'resolved', reopen = 'open'})[action]
if target == nil then return {'illegal', 'unknown action ' .. action} end
if from == target then return {'illegal', 'cannot ' .. action .. ' a data problem that is ' .. from} end

local entry = {action = action, by = actor, at = at, from = from, to = target, source = 'review'}
if comment ~= '' then
  entry.comment = comment
  entry.why = comment
end
item.history[#item.history + 1] = entry
item.status = target
item.revision = (item.revision or 0) + 1
if target == 'resolved' then
  item.resolved_at = at
  item.resolved_by = actor
else
  item.resolved_at = nil
  item.resolved_by = nil
end
local score = redis.call('ZSCORE', target == 'resolved' and open or resolved, id) or '0'
redis.call('ZREM', target == 'resolved' and open or resolved, id)
redis.call('ZADD', target == 'resolved' and resolved or open, score, id)
local encoded = cjson.encode(item)
redis.call('HSET', items, id, encoded)
return {'ok', encoded}
