-- Remove one closed alert of a patient (retention of closed alerts, see Store.prune_closed_alerts).
-- KEYS[1] alerts hash (alert id -> alert json), KEYS[2] the alert's history list
-- ARGV[1] alert id, ARGV[2..] the closed statuses
-- An alert that is open again (reopened by a person since it was listed) is left alone.
-- Returns 1 when the alert is gone (removed now, or already), 0 when it is open and kept.
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if raw then
  local status = cjson.decode(raw).status
  local closed = false
  for i = 2, #ARGV do
    if status == ARGV[i] then closed = true end
  end
  if not closed then return 0 end
  redis.call('HDEL', KEYS[1], ARGV[1])
end
redis.call('DEL', KEYS[2])
return 1
