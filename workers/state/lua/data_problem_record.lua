-- Record one data problem (an indeterminate decision's cause) in the data-problems queue, atomically.
-- See workers/state/data_problems.py for the item shape.
-- KEYS[1] items hash (id -> item json), KEYS[2] open set, KEYS[3] resolved set, KEYS[4] all set
--   (sorted sets of ids by the epoch the problem was last seen)
-- ARGV[1] item id, ARGV[2] problem json (patient, reason, detail, resources, as_of, rule_id, concept, reported)
-- ARGV[3] wall-clock time (text), ARGV[4] the same as epoch seconds
-- A new id opens an item with a 'recorded' history entry. A known id only counts the occurrence, adds the rule
-- and keeps the latest as_of: its status is left alone (a resolved item stays resolved; the same resource
-- version can only repeat the same problem, a corrected resource version is a new item).
-- Returns 1 when an item was opened, 0 when an existing one was counted.
local items, open, resolved, all = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, at, score = ARGV[1], ARGV[3], ARGV[4]
local problem = cjson.decode(ARGV[2])
local rule = problem.rule_id

local function add_rule(item, rule)
  if type(item.rules) ~= 'table' or next(item.rules) == nil then item.rules = {} end
  if rule == nil or rule == cjson.null or rule == '' then return end
  for _, known in ipairs(item.rules) do
    if known == rule then return end
  end
  item.rules[#item.rules + 1] = rule
  table.sort(item.rules)
end

local raw = redis.call('HGET', items, id)
local created = 0
local item
if raw then
  item = cjson.decode(raw)
  item.occurrences = (item.occurrences or 1) + 1
  item.last_seen = at
  if (problem.as_of or '') > (item.as_of or '') then item.as_of = problem.as_of end
else
  item = problem
  item.id = id
  item.rule_id = nil
  item.status = 'open'
  item.revision = 1
  item.occurrences = 1
  item.first_seen = at
  item.last_seen = at
  item.history = {{action = 'recorded', by = 'system', at = at, to = 'open', why = problem.detail}}
  created = 1
end
add_rule(item, rule)
if type(item.history) ~= 'table' or next(item.history) == nil then item.history = {} end
redis.call('HSET', items, id, cjson.encode(item))
redis.call('ZADD', all, score, id)
redis.call('ZADD', item.status == 'resolved' and resolved or open, score, id)
return created
