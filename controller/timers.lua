-- Fire the due timers of one partition: each due member of the timer set is removed
-- and written to the partition's TimerFired stream in the same atomic step, so a
-- timer fires once however many controllers poll.  Deadlines use the server clock.
-- KEYS[1] = ss:{p}:timers, KEYS[2] = ss:{p}:msg:TimerFired; ARGV[1] = most to fire.
-- A member is "<workflow id>|<timer name>|<generation>|<definition>|<version>".

local function iso(ms)
  -- civil date from days since 1970-01-01 (H. Hinnant's algorithm)
  local s = math.floor(ms / 1000)
  local days = math.floor(s / 86400)
  local rem = s - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  return string.format('%04d-%02d-%02dT%02d:%02d:%02d.%03dZ', y, m, d,
    math.floor(rem / 3600), math.floor((rem % 3600) / 60), rem % 60, ms % 1000)
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[1]))
local fired = 0
for i = 1, #due, 2 do
  local member, score = due[i], tonumber(due[i + 1])
  redis.call('ZREM', KEYS[1], member)
  local wf, name, gen, wname, wver = string.match(member, '^([^|]+)|([^|]+)|(%d+)|([^|]+)|(%d+)$')
  if wf then
    local id = 'timer:' .. member
    local envelope = cjson.encode({
      message_id = id, type = 'TimerFired', schema_version = 1, correlation_id = wf,
      workflow = {name = wname, version = tonumber(wver)}, producer = 'controller',
      occurred_at = iso(now), attempt = 1,
      payload = {timer = name, generation = tonumber(gen), due_ms = score},
    })
    redis.call('XADD', KEYS[2], '*', 'type', 'TimerFired', 'correlation_id', wf, 'message_id', id,
      'envelope', envelope)
    fired = fired + 1
  end
end
return fired
