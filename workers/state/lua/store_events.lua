-- Store one patient's batch of events atomically; return what the worker needs to replay them one by one.
-- KEYS[1] facts hash   field "Type/id" -> rank \t expires \t payload-json (the resource's newest version)
-- KEYS[2] meta hash    version (bumped when anything changed), clock (text), clock_s (epoch), due (text),
--                      layout ('2': the tl / exp indexes exist)
-- KEYS[3] tl zset      field -> epoch up to which its facts can be read (a point's time, an interval's end,
--                      +inf while open): a window [t, ...) is every member scored >= t
-- KEYS[4] exp zset     field -> epoch when the resource may be pruned (retention)
-- KEYS[5] open hash    rule id -> open alert id (read only here)
-- ARGV[1] window pad (seconds, the longest look-back of any rule input, or 'inf'), ARGV[2] prune limit,
-- ARGV[3] epoch of the first event's clock time ('' if none; used for a patient without a clock),
-- ARGV[4] wall-clock epoch of this write when the batch holds a resource or a delete ('' for ticks alone): kept as
--         meta 'seen', what retire_patient.lua checks before forgetting an inactive patient,
-- ARGV[5..] per event, 6 values: field, rank, expires \t payload, tl score, exp score, clock text \t clock epoch
--           (a tick has field ''; an event that does not move the clock has clock '')
-- A lower rank (older version) never replaces a higher one; an identical value is a duplicate. The window is
-- read BEFORE the batch is written: the worker replays the events on top of it in arrival order.
-- Returns {'ok', version, clock before, due, window, statuses, open rule->alert pairs, pruned fields}
-- or {'migrate'} when the patient's facts were stored by a release without the indexes.
local facts, meta, tl, exp = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if redis.call('HGET', meta, 'layout') ~= '2' then
  if redis.call('EXISTS', facts) == 1 then return {'migrate'} end
  redis.call('HSET', meta, 'layout', '2')
end
local pad, prune_limit, first_s = ARGV[1], tonumber(ARGV[2]), ARGV[3]
if ARGV[4] ~= '' then redis.call('HSET', meta, 'seen', ARGV[4]) end
local clock = redis.call('HGET', meta, 'clock')
local clock_s = redis.call('HGET', meta, 'clock_s')
local previous_clock = clock or ''

-- 1. the window before this batch
local window = {}
local from = clock_s or (first_s ~= '' and first_s) or nil
if from then
  local fields
  if pad == 'inf' then
    fields = redis.call('HKEYS', facts)
  else
    fields = redis.call('ZRANGEBYSCORE', tl, tonumber(from) - tonumber(pad) - 1, '+inf')
  end
  if #fields > 0 then
    local values = redis.call('HMGET', facts, unpack(fields))
    for i, field in ipairs(fields) do
      if values[i] then window[#window + 1] = field .. '\31' .. values[i] end
    end
  end
end

-- 2. store the events in arrival order
local statuses = {}
local changed = false
for i = 5, #ARGV, 6 do
  local field, rank, body, tl_score, exp_score, at = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  local status = 'tick'
  if field ~= '' then
    local value = rank .. '\t' .. body
    local old = redis.call('HGET', facts, field)
    if not old then
      status = 'stored'
    else
      local old_rank = string.match(old, '^([^\t]*)\t')
      if old == value then status = 'duplicate' elseif rank < old_rank then status = 'stale' else status = 'stored' end
    end
    if status == 'stored' then
      redis.call('HSET', facts, field, value)
      redis.call('ZADD', tl, tl_score, field)
      redis.call('ZADD', exp, exp_score, field)
      changed = true
    end
  end
  if at ~= '' then
    local text, epoch = string.match(at, '^([^\t]*)\t(.*)$')
    if (not clock) or text > clock then
      clock, clock_s = text, epoch
      redis.call('HSET', meta, 'clock', clock, 'clock_s', clock_s)
    end
  end
  statuses[#statuses + 1] = status
end

-- 3. bounded retention: at most prune_limit resources whose expiry is before the clock
local pruned = {}
if clock_s then
  pruned = redis.call('ZRANGEBYSCORE', exp, '-inf', '(' .. clock_s, 'LIMIT', 0, prune_limit)
  for _, field in ipairs(pruned) do
    redis.call('HDEL', facts, field)
    redis.call('ZREM', tl, field)
    redis.call('ZREM', exp, field)
  end
  if #pruned > 0 then changed = true end
end

local version
if changed then
  version = redis.call('HINCRBY', meta, 'version', 1)
else
  version = tonumber(redis.call('HGET', meta, 'version') or '0')
end
-- The window travels as one string (payloads are compact JSON, which never holds a raw control character):
-- one bulk string is much cheaper for the client to parse than one per resource.
return {'ok', version, previous_clock, redis.call('HGET', meta, 'due') or '', table.concat(window, '\30'),
  statuses, redis.call('HGETALL', KEYS[5]), pruned}
