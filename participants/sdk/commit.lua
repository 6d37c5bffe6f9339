-- streamsaga generic commit: every write of one decision, all or nothing.
-- KEYS: every key touched (all in one hash slot).  ARGV, flat (no JSON to decode):
--   ARGV[1] = A, then A acks as (key index, group, entry id) triples;
--   then the checks, each a name and fixed arguments (key references are 1-based
--   indexes into KEYS), in this order when present:
--     dedupe k member   skip the whole commit if member is in set k
--     once k value      skip the whole commit if k exists (returns its value)
--     guard k expected token  hash field 'v' of k must equal expected (0 = absent), and
--                       field 'c' (the token of the commit that wrote k) must equal token
--                       when token is not '' and 'c' exists
--     requires k member member must already be in set k (an earlier commit applied)
--     pending k group consumer id  skip the whole commit unless entry id of stream k is
--                       pending in group for consumer (a dead letter run again after it
--                       landed, or of an entry a peer took over, is not written)
--   then the writes, each a name, a count n and n arguments, applied in order:
--     hset k f v ...   rpush k v ...   xadd k maxlen|'' f v ...   xdel k id
--     zadd k score member   zrem k member   zaddin k delay_ms member (score = the
--     server's clock in ms + delay_ms)   hincrby k field n   sadd k member ttl|''
--     set k value ttl|''   expire k ttl   persist k
-- A duplicate still acks: its work was done by the commit that recorded it.
-- Returns {'ok', '', id, ...} (the ids the xadds appended, in order; just {'ok'}
-- when there were none) | {'dup', value?} | {'conflict', current_version}.  A dedupe
-- duplicate of a guarded commit answers {'dupof', c} with the guarded hash's field 'c',
-- where a guarded commit's hset writes its token: this commit's own when it is this
-- commit, run again after its reply was lost.
local argv = ARGV
local acks = tonumber(argv[1])
local i = 2 + 3 * acks

local function ack()
  for j = 2, 1 + 3 * acks, 3 do
    redis.call('XACK', KEYS[tonumber(argv[j])], argv[j + 1], argv[j + 2])
  end
end

-- a dedupe duplicate's answer: with the token of the hash a later guard check names, if
-- any (the checks from j on)
local function duplicate(j)
  while argv[j] == 'once' or argv[j] == 'guard' or argv[j] == 'requires' or argv[j] == 'pending' do
    if argv[j] == 'guard' then
      return {'dupof', redis.call('HGET', KEYS[tonumber(argv[j + 1])], 'c') or ''}
    end
    j = j + (argv[j] == 'pending' and 5 or argv[j] == 'guard' and 4 or 3)
  end
  return {'dup'}
end

local guarded
while true do
  local op = argv[i]
  if op == 'dedupe' then
    if redis.call('SISMEMBER', KEYS[tonumber(argv[i + 1])], argv[i + 2]) == 1 then
      ack()
      return duplicate(i + 3)
    end
    i = i + 3
  elseif op == 'once' then
    local existing = redis.call('GET', KEYS[tonumber(argv[i + 1])])
    if existing then
      ack()
      return {'dup', existing}
    end
    i = i + 3
  elseif op == 'guard' then
    guarded = KEYS[tonumber(argv[i + 1])]
    local state = redis.call('HMGET', guarded, 'v', 'c')
    local current = state[1] or '0'
    if tonumber(current) ~= tonumber(argv[i + 2]) then
      return {'conflict', current}
    end
    if argv[i + 3] ~= '' and state[2] and state[2] ~= argv[i + 3] then
      return {'conflict', current}
    end
    i = i + 4
  elseif op == 'requires' then
    local set = KEYS[tonumber(argv[i + 1])]
    if redis.call('SISMEMBER', set, argv[i + 2]) == 0 then
      return {'conflict', guarded and (redis.call('HGET', guarded, 'v') or '0') or '0'}
    end
    i = i + 3
  elseif op == 'pending' then
    local id = argv[i + 4]
    local found = redis.pcall('XPENDING', KEYS[tonumber(argv[i + 1])], argv[i + 2], id, id, 1, argv[i + 3])
    if found.err then
      if not string.find(found.err, 'NOGROUP', 1, true) then return found end
      found = {} -- no such group: nothing is pending in it either
    end
    if #found == 0 then
      ack()
      return {'dup'}
    end
    i = i + 5
  else
    break
  end
end

local added = {}
local now_ms
local last = #argv
while i <= last do
  local op, n = argv[i], tonumber(argv[i + 1])
  local key = KEYS[tonumber(argv[i + 2])]
  local a, b = i + 3, i + 1 + n -- this op's arguments after the key
  if op == 'hset' then
    redis.call('HSET', key, unpack(argv, a, b))
  elseif op == 'rpush' then
    redis.call('RPUSH', key, unpack(argv, a, b))
  elseif op == 'xadd' then
    if argv[a] ~= '' then
      added[#added + 1] = redis.call('XADD', key, 'MAXLEN', '~', argv[a], '*', unpack(argv, a + 1, b))
    else
      added[#added + 1] = redis.call('XADD', key, '*', unpack(argv, a + 1, b))
    end
  elseif op == 'xdel' then
    redis.call('XDEL', key, argv[a])
  elseif op == 'zadd' then
    redis.call('ZADD', key, argv[a], argv[a + 1])
  elseif op == 'zrem' then
    redis.call('ZREM', key, argv[a])
  elseif op == 'zaddin' then
    if not now_ms then
      local t = redis.call('TIME')
      now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    end
    redis.call('ZADD', key, now_ms + tonumber(argv[a]), argv[a + 1])
  elseif op == 'hincrby' then
    redis.call('HINCRBY', key, argv[a], argv[a + 1])
  elseif op == 'sadd' then
    redis.call('SADD', key, argv[a])
    if argv[a + 1] ~= '' then redis.call('EXPIRE', key, argv[a + 1]) end
  elseif op == 'set' then
    if argv[a + 1] ~= '' then
      redis.call('SET', key, argv[a], 'EX', argv[a + 1])
    else
      redis.call('SET', key, argv[a])
    end
  elseif op == 'expire' then
    redis.call('EXPIRE', key, argv[a])
  elseif op == 'persist' then
    redis.call('PERSIST', key)
  else
    return redis.error_reply('commit: unknown op ' .. tostring(op))
  end
  i = b + 1
end
ack()
if #added == 0 then return {'ok'} end
return {'ok', '', unpack(added)}
