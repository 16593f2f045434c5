-- The worklist's patient context index: one entry per patient, "<timeline version>\t<json>" (json empty: the
-- patient has no context any more, kept as a tombstone so an older write cannot bring it back).
-- KEYS[1] context hash; ARGV: patient, timeline version, json. A write computed from an older timeline version
-- than the stored one is ignored (two workers of one patient cannot leave the older context).
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local version = tonumber(string.match(old, '^(%d+)\t'))
  if version and version > tonumber(ARGV[2]) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '\t' .. ARGV[3])
return 1
