-- Apply one patient's rule decisions to the alert store atomically.
-- KEYS[1] alerts hash   alert id -> alert json
-- KEYS[2] open hash     rule id -> open alert id (one open alert per rule and patient)
-- KEYS[3] applied hash  rule id -> timeline version the last applied decision was computed from
-- KEYS[4] closed hash   rule id -> fingerprint of an alert a user resolved by hand (same evidence: no re-fire)
-- ARGV[1] timeline version these decisions were computed from
-- ARGV[2] event clock (text), ARGV[3] decisions json, ARGV[4] retracted resources json ["Type/id", ...]
-- ARGV[5] wall-clock time of this write (text): an alert's created_at, for time-to-action figures
-- A decision computed from an older timeline version than one already applied is ignored (stale), so
-- two workers racing on one patient cannot leave an alert that newer facts have cleared.
local alerts, open, applied, closed = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local version = tonumber(ARGV[1])
local now = ARGV[2]
local decisions = cjson.decode(ARGV[3])
local retracted = {}
for _, ref in ipairs(cjson.decode(ARGV[4])) do retracted[ref] = true end

local function history(alert, action, why)
  alert.history[#alert.history + 1] = {action = action, by = 'system', at = now, why = why}
  alert.updated_at = now
  alert.revision = (alert.revision or 0) + 1
end

local function cites_retracted(alert)
  for _, e in ipairs(alert.evidence or {}) do
    if retracted[e.resource_type .. '/' .. e.resource_id] then return true end
  end
  return false
end

local results = {}
for _, d in ipairs(decisions) do
  local last = tonumber(redis.call('HGET', applied, d.rule_id) or '-1')
  local action = 'none'
  local open_id = redis.call('HGET', open, d.rule_id)
  if last > version then
    action = 'stale'
  else
    redis.call('HSET', applied, d.rule_id, version)
    if d.outcome == 'fires' then
      if open_id then
        local alert = cjson.decode(redis.call('HGET', alerts, open_id))
        if alert.fingerprint ~= d.alert.fingerprint then
          for _, k in ipairs({'severity', 'card', 'evidence', 'explanation', 'fingerprint', 'rule_version', 'as_of'}) do
            alert[k] = d.alert[k]
          end
          if alert.status == 'snoozed' then alert.status = 'active'; alert.snoozed_until = nil end
          history(alert, 'updated', 'new evidence: ' .. d.alert.explanation)
          redis.call('HSET', alerts, open_id, cjson.encode(alert))
          action = 'updated'
        end
      elseif redis.call('HGET', closed, d.rule_id) == d.alert.fingerprint then
        action = 'suppressed'
      else
        redis.call('HDEL', closed, d.rule_id)
        local alert = d.alert
        alert.status = 'active'
        alert.opened_at = now
        alert.created_at = ARGV[5]
        alert.history = {}
        history(alert, 'opened', d.alert.explanation)
        redis.call('HSET', alerts, alert.id, cjson.encode(alert))
        redis.call('HSET', open, d.rule_id, alert.id)
        open_id = alert.id
        action = 'opened'
      end
    elseif d.outcome == 'not-fires' and not open_id then
      if d.resolves then redis.call('HDEL', closed, d.rule_id) end
    elseif open_id and d.outcome == 'not-fires' then
      local alert = cjson.decode(redis.call('HGET', alerts, open_id))
      if cites_retracted(alert) then
        alert.status = 'retracted'
        history(alert, 'retracted', 'source data entered in error: ' .. d.explanation)
        action = 'retracted'
      elseif d.resolves then
        alert.status = 'resolved'
        history(alert, 'resolved', d.explanation)
        action = 'resolved'
      end
      if action ~= 'none' then
        alert.closed_at = now
        redis.call('HSET', alerts, open_id, cjson.encode(alert))
        redis.call('HDEL', open, d.rule_id)
      end
    end
  end
  results[#results + 1] = {d.rule_id, action, open_id or ''}
end
return results
