-- streamsaga generic commit: every write of one decision, all or nothing.
-- KEYS: every key touched (all in one hash slot).  ARGV[1]: JSON spec whose key
-- references are 1-based indexes into KEYS:
--   dedupe = [k, member, ttl]   skip the whole commit if member is in set k
--   once   = [k, value, ttl]    skip the whole commit if k exists (returns its value)
--   requires = [k, member]      member must already be in set k (an earlier commit applied)
--   guard  = [k, expected]      hash field 'v' of k must equal expected (0 = absent)
--   hset   = [[k, f1, v1, ...]], rpush = [[k, v, ...]], xadd = [[k, maxlen, f1, v1, ...]]
--   zadd   = [[k, score, member]], zrem = [[k, member]], hincrby = [[k, field, n]]
--   zaddin = [[k, delay_ms, member]]   score = the server's clock (ms) + delay_ms
--   expire = [[k, ttl]], persist = [[k]], ack = [[k, group, id]]
--   xdel   = [[k, id]]             delete one stream entry (after the xadds)
-- A value of hset, rpush or xadd may be {n}: the script argument ARGV[n] — large
-- values (state JSON, envelopes) travel as plain arguments, not escaped in the spec.
-- A duplicate still acks: its work was done by the commit that recorded it.
-- Returns {'ok', '', id, ...} (the ids the xadds appended, in order; just {'ok'}
-- when there were none) | {'dup', value?} | {'conflict', current_version}.
local spec = cjson.decode(ARGV[1])

local function val(x)
  if type(x) == 'table' then return ARGV[x[1]] end
  return x
end

local function ack()
  for _, a in ipairs(spec.ack or {}) do
    redis.call('XACK', KEYS[a[1]], a[2], a[3])
  end
end

if spec.dedupe then
  if redis.call('SISMEMBER', KEYS[spec.dedupe[1]], spec.dedupe[2]) == 1 then
    ack()
    return {'dup'}
  end
end
if spec.once then
  local existing = redis.call('GET', KEYS[spec.once[1]])
  if existing then
    ack()
    return {'dup', existing}
  end
end
if spec.requires then
  if redis.call('SISMEMBER', KEYS[spec.requires[1]], spec.requires[2]) == 0 then
    return {'conflict', tostring(redis.call('HGET', KEYS[spec.guard and spec.guard[1] or spec.requires[1]], 'v') or '0')}
  end
end
if spec.guard then
  local current = tonumber(redis.call('HGET', KEYS[spec.guard[1]], 'v') or '0')
  if current ~= tonumber(spec.guard[2]) then
    return {'conflict', tostring(current)}
  end
end

for _, h in ipairs(spec.hset or {}) do
  local args = {}
  for i = 2, #h do args[#args + 1] = val(h[i]) end
  redis.call('HSET', KEYS[h[1]], unpack(args))
end
for _, r in ipairs(spec.rpush or {}) do
  local args = {}
  for i = 2, #r do args[#args + 1] = val(r[i]) end
  redis.call('RPUSH', KEYS[r[1]], unpack(args))
end
local added = {}
for _, x in ipairs(spec.xadd or {}) do
  local args = {}
  for i = 3, #x do args[#args + 1] = val(x[i]) end
  if x[2] ~= '' then
    added[#added + 1] = redis.call('XADD', KEYS[x[1]], 'MAXLEN', '~', x[2], '*', unpack(args))
  else
    added[#added + 1] = redis.call('XADD', KEYS[x[1]], '*', unpack(args))
  end
end
for _, x in ipairs(spec.xdel or {}) do
  redis.call('XDEL', KEYS[x[1]], x[2])
end
for _, z in ipairs(spec.zadd or {}) do
  redis.call('ZADD', KEYS[z[1]], z[2], z[3])
end
for _, z in ipairs(spec.zrem or {}) do
  redis.call('ZREM', KEYS[z[1]], z[2])
end
if spec.zaddin then
  local t = redis.call('TIME')
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  for _, z in ipairs(spec.zaddin) do
    redis.call('ZADD', KEYS[z[1]], now_ms + tonumber(z[2]), z[3])
  end
end
for _, h in ipairs(spec.hincrby or {}) do
  redis.call('HINCRBY', KEYS[h[1]], h[2], h[3])
end
if spec.dedupe then
  redis.call('SADD', KEYS[spec.dedupe[1]], spec.dedupe[2])
  if spec.dedupe[3] ~= '' then redis.call('EXPIRE', KEYS[spec.dedupe[1]], spec.dedupe[3]) end
end
if spec.once then
  if spec.once[3] ~= '' then
    redis.call('SET', KEYS[spec.once[1]], spec.once[2], 'EX', spec.once[3])
  else
    redis.call('SET', KEYS[spec.once[1]], spec.once[2])
  end
end
for _, e in ipairs(spec.expire or {}) do
  redis.call('EXPIRE', KEYS[e[1]], e[2])
end
for _, e in ipairs(spec.persist or {}) do
  redis.call('PERSIST', KEYS[e[1]])
end
ack()
if #added == 0 then return {'ok'} end
return {'ok', '', unpack(added)}
