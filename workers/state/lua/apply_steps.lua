-- Apply one patient's evaluation steps (in order) to the alert store atomically.
-- KEYS[1] alerts hash   alert id -> alert json (history: the latest entries only, see KEYS[6])
-- KEYS[2] open hash     rule id -> open alert id (one open alert per rule and patient)
-- KEYS[3] closed hash   rule id -> fingerprint of an alert a user resolved by hand (same evidence: no re-fire)
-- KEYS[4] meta hash     applied (timeline version of the last applied steps), clock, clock_s, due
-- ARGV[1] timeline version the steps were computed from; ARGV[2] wall-clock time of this write (text)
-- ARGV[3] steps json [{as_of, retracted: ["Type/id"], decisions: [...]}]; ARGV[4] clock text, ARGV[5] clock epoch,
-- ARGV[6] due text ('' = none); ARGV[7] history entries kept in the alert record; ARGV[8] history key prefix
-- An alert is open exactly while its rule fires (an indeterminate decision keeps an open alert open, flagged):
-- when the rule stops firing the alert closes as `resolved` (resolve condition met), `retracted` (it cites
-- data entered in error or deleted), `expired` (its evidence aged out) or `withdrawn` (the facts changed).
-- Escalation (a higher severity, or escalating evidence not present when a person last acted) makes an
-- acknowledged, accepted, overridden or snoozed alert active again; nothing else wakes a snooze.
-- Steps computed from an older timeline version than one already applied are ignored (stale), so two
-- workers racing on one patient cannot leave an alert that newer facts have cleared.
-- Returns one {rule id, action, alert id} per applied decision, or {{'', 'stale', ''}}.
local alerts, open, closed, meta = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local version = tonumber(ARGV[1])
local wall = ARGV[2]
local steps = cjson.decode(ARGV[3])
local keep = tonumber(ARGV[7])
local history_prefix = ARGV[8]

local applied = tonumber(redis.call('HGET', meta, 'applied') or '-1')
if applied > version then return {{'', 'stale', ''}} end
redis.call('HSET', meta, 'applied', version)
if ARGV[4] ~= '' then
  local clock = redis.call('HGET', meta, 'clock')
  if (not clock) or ARGV[4] > clock then redis.call('HSET', meta, 'clock', ARGV[4], 'clock_s', ARGV[5]) end
end
if ARGV[6] ~= '' then redis.call('HSET', meta, 'due', ARGV[6]) else redis.call('HDEL', meta, 'due') end

local RANK = {info = 1, warning = 2, critical = 3}
local USER_ACTED = {acknowledged = true, accepted = true, overridden = true, snoozed = true}

local function array(value)
  if type(value) ~= 'table' or next(value) == nil then return {} end
  return value
end

local function history(alert, entry)
  local list = array(alert.history)
  local key = history_prefix .. alert.id
  if alert.history_count == nil then  -- written by a release that kept the whole history in the record
    for _, old in ipairs(list) do redis.call('RPUSH', key, cjson.encode(old)) end
    alert.history_count = #list
  end
  list[#list + 1] = entry
  while #list > keep do table.remove(list, 1) end
  alert.history = list
  alert.history_count = alert.history_count + 1
  redis.call('RPUSH', key, cjson.encode(entry))
  alert.updated_at = entry.at
  alert.revision = (alert.revision or 0) + 1
end

local function load(id) return cjson.decode(redis.call('HGET', alerts, id)) end
local function save(alert) redis.call('HSET', alerts, alert.id, cjson.encode(alert)) end

local function cites(alert, retracted)
  for _, e in ipairs(array(alert.evidence)) do
    if retracted[e.resource_type .. '/' .. e.resource_id] then return true end
  end
  return false
end

-- What escalates since a person last acted: a higher severity, or escalating evidence they had not seen.
local function escalation(alert, fresh)
  local seen_rank = RANK[alert.acted_severity or alert.severity] or 0
  local reasons = {}
  if (RANK[fresh.severity] or 0) > seen_rank then
    reasons[#reasons + 1] = 'severity ' .. tostring(alert.acted_severity or alert.severity) .. ' -> ' .. fresh.severity
  end
  local seen = {}
  for _, id in ipairs(array(alert.acted_escalators)) do seen[id] = true end
  for _, e in ipairs(array(fresh.escalators)) do
    if not seen[e.id] then reasons[#reasons + 1] = e.label end
  end
  return reasons
end

local results = {}
for _, step in ipairs(steps) do
  local at = step.as_of
  local retracted = {}
  for _, ref in ipairs(array(step.retracted)) do retracted[ref] = true end
  for _, d in ipairs(step.decisions) do
    local action = 'none'
    local open_id = redis.call('HGET', open, d.rule_id)
    if d.outcome == 'fires' then
      local fresh = d.alert
      if open_id then
        local alert = load(open_id)
        local reasons = {}
        if USER_ACTED[alert.status] then reasons = escalation(alert, fresh) end
        local raised = (RANK[fresh.severity] or 0) > (RANK[alert.severity] or 0)
        if alert.fingerprint ~= fresh.fingerprint or #reasons > 0 then
          local from = alert.severity
          for _, k in ipairs({'severity', 'card', 'evidence', 'explanation', 'fingerprint', 'rule_version',
                              'as_of', 'escalators', 'parameters'}) do
            alert[k] = fresh[k]
          end
          alert.indeterminate = nil
          if #reasons > 0 then
            local status = alert.status
            alert.status = 'active'
            alert.snoozed_until = nil
            alert.acted_severity = nil
            alert.acted_escalators = nil
            alert.escalated_at = at
            history(alert, {action = 'escalated', by = 'system', at = at, from = status, to = 'active',
              why = 'escalated: ' .. table.concat(reasons, '; ') .. '. ' .. fresh.explanation})
            action = 'escalated'
          else
            if raised then alert.escalated_at = at end
            local why = 'new evidence: ' .. fresh.explanation
            if raised then why = 'severity ' .. tostring(from) .. ' -> ' .. fresh.severity .. '; ' .. why end
            history(alert, {action = 'updated', by = 'system', at = at, why = why})
            action = 'updated'
          end
          save(alert)
        end
      elseif redis.call('HGET', closed, d.rule_id) == fresh.fingerprint then
        action = 'suppressed'
      else
        redis.call('HDEL', closed, d.rule_id)
        local alert = fresh
        alert.status = 'active'
        alert.opened_at = at
        alert.created_at = wall
        alert.history = {}
        alert.history_count = 0
        history(alert, {action = 'opened', by = 'system', at = at, why = fresh.explanation})
        save(alert)
        redis.call('HSET', open, d.rule_id, alert.id)
        open_id = alert.id
        action = 'opened'
      end
    elseif d.outcome == 'indeterminate' and open_id then
      local alert = load(open_id)
      if alert.indeterminate ~= d.explanation then
        alert.indeterminate = d.explanation
        history(alert, {action = 'indeterminate', by = 'system', at = at,
          why = 'kept open, the rule cannot be decided: ' .. d.explanation})
        save(alert)
        action = 'indeterminate'
      end
    elseif d.outcome == 'not-fires' then
      if open_id then
        local alert = load(open_id)
        local status = d.close or 'withdrawn'
        local why = d.explanation
        if cites(alert, retracted) then
          status = 'retracted'
          why = 'source data entered in error or deleted: ' .. d.explanation
        elseif status == 'expired' then
          why = 'evidence aged out of the look-back: ' .. d.explanation
        elseif status == 'withdrawn' then
          why = 'the data changed and the rule no longer fires: ' .. d.explanation
        end
        local from = alert.status
        alert.status = status
        alert.closed_at = at
        alert.snoozed_until = nil
        alert.indeterminate = nil
        history(alert, {action = status, by = 'system', at = at, from = from, to = status, why = why})
        save(alert)
        redis.call('HDEL', open, d.rule_id)
        action = status
      elseif d.resolves then
        redis.call('HDEL', closed, d.rule_id)
      end
    end
    results[#results + 1] = {d.rule_id, action, open_id or ''}
  end
end
return results
