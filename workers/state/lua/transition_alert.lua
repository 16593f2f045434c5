-- Move one alert through a human (or EHR feedback) transition atomically.
-- KEYS[1] alerts hash   alert id -> alert json (history: the latest entries only)
-- KEYS[2] open hash     rule id -> open alert id
-- KEYS[3] closed hash   rule id -> fingerprint of a manually resolved alert (not re-fired on the same evidence)
-- KEYS[4] history list  every history entry of this alert
-- ARGV[1] alert id, ARGV[2] action, ARGV[3] actor, ARGV[4] time (fixed-width UTC text)
-- ARGV[5] expected revision ('' = any), ARGV[6] extra fields json (reason, comment, until, source, ...)
-- ARGV[7] idempotency key ('' = none), ARGV[8] history entries kept in the alert record
-- A person acting records what they saw (severity, escalating evidence): only something beyond it escalates
-- the alert back to active later (apply_steps.lua).
-- Returns {'ok', alert json} or {error code, message}; codes: not-found, illegal, conflict.
local alerts, open, closed, history_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, action, actor, at = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local expected = ARGV[5]
local extra = cjson.decode(ARGV[6])
local key = ARGV[7]
local keep = tonumber(ARGV[8])

local raw = redis.call('HGET', alerts, id)
if not raw then return {'not-found', 'no alert ' .. id} end
local alert = cjson.decode(raw)
if type(alert.history) ~= 'table' or next(alert.history) == nil then alert.history = {} end

if key ~= '' then
  local entries = alert.history
  if alert.history_count ~= nil and alert.history_count > #alert.history then
    entries = {}
    for _, item in ipairs(redis.call('LRANGE', history_key, 0, -1)) do entries[#entries + 1] = cjson.decode(item) end
  end
  for _, h in ipairs(entries) do
    if h.key == key then return {'ok', raw} end
  end
end
if expected ~= '' and tonumber(expected) ~= (alert.revision or 0) then
  return {'conflict', 'alert ' .. id .. ' changed since revision ' .. expected .. ' (now revision '
    .. tostring(alert.revision or 0) .. ', status ' .. alert.status .. '); reload and try again'}
end

-- A snooze that has run out counts as active.
local status = alert.status
if status == 'snoozed' and alert.snoozed_until and alert.snoozed_until <= at then status = 'active' end

local CLOSED = {resolved = true, retracted = true, expired = true, withdrawn = true}
local allowed = {
  acknowledge = {active = true},
  override = {active = true, acknowledged = true, snoozed = true},
  snooze = {active = true, acknowledged = true, snoozed = true},
  accept = {active = true, acknowledged = true, snoozed = true},
  resolve = {active = true, acknowledged = true, snoozed = true, overridden = true, accepted = true},
  reopen = {acknowledged = true, snoozed = true, overridden = true, accepted = true, resolved = true},
}
local target = {acknowledge = 'acknowledged', override = 'overridden', snooze = 'snoozed', accept = 'accepted',
  resolve = 'resolved', reopen = 'active'}
if not allowed[action] then return {'illegal', 'unknown action ' .. action} end
if not allowed[action][status] then
  return {'illegal', 'cannot ' .. action .. ' an alert that is ' .. status}
end

local open_id = redis.call('HGET', open, alert.rule_id)
if action == 'reopen' and CLOSED[status] then
  if open_id and open_id ~= id then
    return {'illegal', 'cannot reopen: a newer alert ' .. open_id .. ' for this rule and patient is open'}
  end
  redis.call('HSET', open, alert.rule_id, id)
  redis.call('HDEL', closed, alert.rule_id)
  alert.closed_at = nil
elseif action == 'resolve' then
  if open_id == id then redis.call('HDEL', open, alert.rule_id) end
  redis.call('HSET', closed, alert.rule_id, alert.fingerprint or '')
  alert.closed_at = at
end

alert.status = target[action]
if action == 'snooze' then alert.snoozed_until = extra['until'] else alert.snoozed_until = nil end
if action == 'reopen' then
  alert.acted_severity = nil
  alert.acted_escalators = nil
elseif action ~= 'resolve' then
  alert.acted_severity = alert.severity
  local ids = {}
  if type(alert.escalators) == 'table' then
    for _, e in ipairs(alert.escalators) do ids[#ids + 1] = e.id end
  end
  alert.acted_escalators = ids
end

local entry = {action = action, by = actor, at = at, from = status, to = alert.status}
for k, v in pairs(extra) do entry[k] = v end
if key ~= '' then entry.key = key end
if alert.history_count == nil then  -- written by a release that kept the whole history in the record
  for _, old in ipairs(alert.history) do redis.call('RPUSH', history_key, cjson.encode(old)) end
  alert.history_count = #alert.history
end
alert.history[#alert.history + 1] = entry
while #alert.history > keep do table.remove(alert.history, 1) end
alert.history_count = alert.history_count + 1
redis.call('RPUSH', history_key, cjson.encode(entry))
alert.revision = (alert.revision or 0) + 1
alert.updated_at = at
local encoded = cjson.encode(alert)
redis.call('HSET', alerts, id, encoded)
return {'ok', encoded}
