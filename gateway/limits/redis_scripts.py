"""The Lua scripts the Redis store runs: each one round trip, atomic on the Redis server.

Times are Redis's own (`TIME`), so the gateways' clocks never matter. Keys, under the
configured prefix, by the SHA-256 of the API key's name (Redis never sees a name):

    <prefix>:<digest>:bucket     hash  t (tokens), u (when counted): the token bucket; gone
                                       61 s after its last use, when it would be full anyway
    <prefix>:<digest>:flight     hash  gateway instance -> its requests in flight for the key
    <prefix>:instances           zset  gateway instance -> when it last spoke (heartbeat)

A gateway instance that has not spoken for ``live`` seconds is taken for dead: its in-flight
counts are dropped by the next admit that reads them, so a gateway that died never leaks its
slots for longer than that. A living one beats every few seconds, slots held or not.
"""

from __future__ import annotations

# KEYS: bucket, flight, instances. ARGV: rpm (0: none), max_concurrent (0: none), this
# instance, seconds of silence after which an instance is dead.
# Returns {1} admitted with a slot, {2} admitted without one, {0, 'busy'} at max_concurrent,
# {0, tokens} over the rate (tokens as a string: Lua numbers become integers in replies).
# A refusal writes nothing: the bucket's tokens are a function of (t, u) and the time.
ADMIT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local rpm, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local me, live = ARGV[3], tonumber(ARGV[4])
if limit > 0 then
  redis.call('ZADD', KEYS[3], now, me)
  local counts = redis.call('HGETALL', KEYS[2])
  local total = 0
  for i = 1, #counts, 2 do
    local seen = redis.call('ZSCORE', KEYS[3], counts[i])
    if seen and tonumber(seen) >= now - live then
      total = total + tonumber(counts[i + 1])
    else
      redis.call('HDEL', KEYS[2], counts[i])
    end
  end
  if total >= limit then
    return {0, 'busy'}
  end
end
if rpm > 0 then
  local bucket = redis.call('HMGET', KEYS[1], 't', 'u')
  local tokens = rpm
  if bucket[1] then
    local elapsed = math.max(0, now - tonumber(bucket[2]))
    tokens = math.min(rpm, tonumber(bucket[1]) + elapsed * rpm / 60)
  end
  if tokens < 1 then
    return {0, string.format('%.17g', tokens)}
  end
  redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens - 1),
             'u', string.format('%.6f', now))
  redis.call('EXPIRE', KEYS[1], 61)
end
if limit > 0 then
  redis.call('HINCRBY', KEYS[2], me, 1)
  return {1}
end
return {2}
"""

# KEYS: flight. ARGV: this instance.
RELEASE = """
local left = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if left <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return left
"""

# KEYS: instances. ARGV: this instance, seconds after which a silent instance is forgotten.
HEARTBEAT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
return 1
"""

# After an outage, others may have dropped this instance's counts: they are written again.
# KEYS: flight hashes. ARGV: this instance, then each hash's count (0: none held).
REASSERT = """
for i = 1, #KEYS do
  local held = tonumber(ARGV[i + 1])
  if held > 0 then
    redis.call('HSET', KEYS[i], ARGV[1], held)
  else
    redis.call('HDEL', KEYS[i], ARGV[1])
  end
end
return #KEYS
"""
