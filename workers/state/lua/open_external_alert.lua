-- Store an alert raised outside the stream (a CDS Hooks card an EHR user acted on before the stream had an
-- alert for that episode) atomically.
-- KEYS[1] alerts hash   alert id -> alert json
-- KEYS[2] open hash     rule id -> open alert id
-- KEYS[3] history list  every history entry of this alert
-- ARGV[1] alert json (id, rule_id, history), ARGV[2] '1' = make it the open alert of its rule
-- Returns {1, alert json} when stored; {0, json} of the alert already stored under that id, or of the rule's
-- open alert when it has one (that alert is the episode: nothing is stored).
local alerts, open, history_key = KEYS[1], KEYS[2], KEYS[3]
local alert = cjson.decode(ARGV[1])
local existing = redis.call('HGET', alerts, alert.id)
if existing then return {0, existing} end
if ARGV[2] == '1' then
  local open_id = redis.call('HGET', open, alert.rule_id)
  local current = open_id and redis.call('HGET', alerts, open_id)
  if current then return {0, current} end
  redis.call('HSET', open, alert.rule_id, alert.id)
end
redis.call('HSET', alerts, alert.id, ARGV[1])
for _, entry in ipairs(alert.history) do redis.call('RPUSH', history_key, cjson.encode(entry)) end
return {1, ARGV[1]}
