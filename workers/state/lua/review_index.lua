-- Put one alert summary into the review worklist index (see workers/state/review_index.py).
-- KEYS[1] summary key of the alert, KEYS[2] snoozed sorted set, KEYS[3] seen hash (alert id -> alert_index score
-- the summary was built from)
-- ARGV[1] new summary json (has id, rule_id, status, buckets, revision, seen), ARGV[2] prefix of the order sets
-- ("<prefix>:{review}:z:"), ARGV[3] score in the severity order, ARGV[4] score in the time order,
-- ARGV[5] epoch the snooze ends ('' when not snoozed)
-- A summary with a lower revision than the stored one is ignored (two syncs racing cannot go back in time).
-- Returns 1 when written, 0 when ignored.
local new = cjson.decode(ARGV[1])
local zprefix = ARGV[2]

-- The buckets a summary is in: the list Python computed (workers/state/statuses.py), or for a summary written
-- before summaries carried it, what that older layout used (its index format is dropped on upgrade anyway).
local function buckets(summary)
  if type(summary.buckets) == 'table' and #summary.buckets > 0 then return summary.buckets end
  local list = {summary.status, 'all'}
  if summary.status == 'active' or summary.status == 'acknowledged' then list[#list + 1] = 'open' end
  return list
end

local raw = redis.call('GET', KEYS[1])
if raw then
  local old = cjson.decode(raw)
  if (old.revision or 0) > (new.revision or 0) then return 0 end
  if (old.revision or 0) == (new.revision or 0) and tonumber(old.seen or '0') > tonumber(new.seen or '0') then
    new.seen = old.seen
  end
  for _, bucket in ipairs(buckets(old)) do
    for _, order in ipairs({'sev', 'time'}) do
      redis.call('ZREM', zprefix .. bucket .. ':' .. order, new.id)
      redis.call('ZREM', zprefix .. bucket .. ':' .. order .. ':' .. old.rule_id, new.id)
    end
  end
end
for _, bucket in ipairs(buckets(new)) do
  redis.call('ZADD', zprefix .. bucket .. ':sev', ARGV[3], new.id)
  redis.call('ZADD', zprefix .. bucket .. ':sev:' .. new.rule_id, ARGV[3], new.id)
  redis.call('ZADD', zprefix .. bucket .. ':time', ARGV[4], new.id)
  redis.call('ZADD', zprefix .. bucket .. ':time:' .. new.rule_id, ARGV[4], new.id)
end
if ARGV[5] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[5], new.id)
else
  redis.call('ZREM', KEYS[2], new.id)
end
redis.call('SET', KEYS[1], cjson.encode(new))
redis.call('HSET', KEYS[3], new.id, new.seen)
return 1
