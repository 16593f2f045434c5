-- Store a batch of one patient's resources atomically and return the patient's whole timeline.
-- KEYS[1] facts hash   field "Type/id" -> rank \t expires \t payload-json
-- KEYS[2] meta hash    version (bumped when anything changed), clock (latest event time seen)
-- ARGV[1] event clock (fixed-width UTC text, compares as a string)
-- ARGV[2..] triples: field, rank, expires \t payload
-- A lower rank (older version) never replaces a higher one; an identical value is a duplicate.
-- Entries whose expiry is before the clock are pruned (bounded retention).
-- Returns {version, clock, statuses, payloads joined by newlines, the clock before this call or ''}.
local facts, meta = KEYS[1], KEYS[2]
local clock = redis.call('HGET', meta, 'clock')
local previous_clock = clock or ''
if (not clock) or ARGV[1] > clock then
  clock = ARGV[1]
  redis.call('HSET', meta, 'clock', clock)
end
local statuses = {}
local changed = false
for i = 2, #ARGV, 3 do
  local field, rank, body = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local value = rank .. '\t' .. body
  local old = redis.call('HGET', facts, field)
  local status
  if not old then
    status = 'stored'
  else
    local old_rank = string.match(old, '^([^\t]*)\t')
    if old == value then
      status = 'duplicate'
    elseif rank < old_rank then
      status = 'stale'
    else
      status = 'stored'
    end
  end
  if status == 'stored' then
    redis.call('HSET', facts, field, value)
    changed = true
  end
  statuses[#statuses + 1] = status
end
local all = redis.call('HGETALL', facts)
local payloads = {}
for i = 1, #all, 2 do
  local expires, payload = string.match(all[i + 1], '^[^\t]*\t([^\t]*)\t(.*)$')
  if expires < clock then
    redis.call('HDEL', facts, all[i])
    changed = true
  else
    payloads[#payloads + 1] = payload
  end
end
local version
if changed then
  version = redis.call('HINCRBY', meta, 'version', 1)
else
  version = tonumber(redis.call('HGET', meta, 'version') or '0')
end
-- One string (payloads are compact JSON, which never holds a raw newline): a reply of one bulk string
-- instead of one per resource is much cheaper for the client to parse.
return {version, clock, statuses, table.concat(payloads, "\n"), previous_clock}
