"""The Lua scripts of :class:`~parallelkit.redis.RedisLimiter`: slots (leases in a
sorted set) and the start rate (GCRA), each one atomic step in Redis."""

from __future__ import annotations

__all__ = ["ACQUIRE", "RENEW", "RESERVE", "UNRESERVE", "VOID", "VOID_TURN"]

# `now` in ms: the caller's clock when it passes one (the last ARGV), else Redis TIME
NOW_MS = """
local now = tonumber(ARGV[#ARGV])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
"""
# KEYS[1] holders zset (token -> lease expiry, ms), KEYS[2] the token's tombstone
# (``void_key``); ARGV[1] token, ARGV[2] limit, ARGV[3] lease (ms). Returns 0 when
# the slot is taken, else ms until a lease ends, or until the tombstone does: VOID
# left one for this token (its caller gave it up: it takes nothing). Held with
# this very token already, the slot is taken (redis-py sent it again after a
# reset, and Redis had run the first). Leases end by their scores; the key itself
# expires a minute after the last one (its garbage collection, independent of the
# clock the scores use).
ACQUIRE = (
    NOW_MS
    + """
local void = redis.call('PTTL', KEYS[2])
if void > 0 then return void end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local lease = tonumber(ARGV[3])
local free = redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2])
if free or redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], math.ceil(lease) + 60000)
  return 0
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = math.ceil(tonumber(first[2]) - now)
if wait < 1 then wait = 1 end
return wait
"""
)
# KEYS[1] holders; ARGV[1] token, ARGV[2] lease (ms). 1 if the lease was still held.
RENEW = (
    NOW_MS
    + """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local lease = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(lease) + 60000)
return 1
"""
)
# KEYS[1] holders, KEYS[2] the token's tombstone; ARGV[1] token, ARGV[2] lease (ms).
# Gives back the slot an acquire whose reply never came may have taken (1 if it
# ran and took it, else 0), and leaves a tombstone that makes it take nothing if
# it runs later (or again: redis-py sends a command again after a reset), for as
# long as its lease would have lasted.
VOID = """
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
return removed
"""
# KEYS[1] the GCRA "theoretical arrival time" (ms), KEYS[2] the caller's turn (its
# token's record, or its tombstone), KEYS[3] the holes (UNRESERVE's); ARGV[1]
# interval (ms), ARGV[2] burst. Reserves the next start; returns how long to wait
# for it (ms), and the time before and after this reservation (what UNRESERVE
# needs), all strings. A start given back while later ones stand (a hole) is taken
# first, the earliest, if its time has not come yet (a later start would be closer
# to the reservation after it than the rate allows): the turn a caller gave up goes
# to the next one. KEYS[2] keeps "before after" of this reservation until its start
# has passed: a caller whose reply never came (cancelled with it on its way) gives
# back what VOID_TURN finds there, and a copy of this script that redis-py sends
# again after a reset (Redis had run the first) gets the same start, not a second
# one. A tombstone there (VOID_TURN's: its caller gave up before this ran) makes it
# take nothing (its reply, empty, goes to nobody).
RESERVE = (
    NOW_MS
    + """
local interval = tonumber(ARGV[1])
local window = (tonumber(ARGV[2]) - 1) * interval
local mine = redis.call('GET', KEYS[2])
if mine == 'void' then return {} end
if mine then
  local before, after = string.match(mine, '^(%S*) (%S+)$')
  local start = tonumber(after) - interval - window
  if start < now then start = now end
  return {string.format('%.3f', start - now), before, after}
end
local holes = redis.call('HGETALL', KEYS[3])
local hole
for i = 1, #holes, 2 do
  local tat = tonumber(holes[i]) - interval
  if tat >= now and (not hole or tat < tonumber(holes[hole]) - interval) then hole = i end
end
if hole then
  local after, earlier = holes[hole], holes[hole + 1]
  redis.call('HDEL', KEYS[3], after)
  local start = tonumber(after) - interval - window
  if start < now then start = now end
  local ttl = math.ceil(tonumber(after) - now) + 1000
  redis.call('SET', KEYS[2], earlier .. ' ' .. after, 'PX', ttl)
  return {string.format('%.3f', start - now), earlier, after}
end
local before = redis.call('GET', KEYS[1]) or ''
local tat = tonumber(before) or 0
if tat < now then tat = now end
local start = tat - window
if start < now then start = now end
local new_tat = tat + interval
local after = string.format('%.3f', new_tat)
local ttl = math.ceil(new_tat - now) + 1000
redis.call('SET', KEYS[1], after, 'PX', ttl)
redis.call('SET', KEYS[2], before .. ' ' .. after, 'PX', ttl)
return {string.format('%.3f', start - now), before, after}
"""
)
# Gives back the start `before` .. `after` (locals), as the in-process Limiter
# does: the last reservation (at `tat_key`) is undone at once (with any given back
# before it that it was waiting behind, kept at `holes_key`); one with later
# reservations still standing is kept as a hole until those are given back too.
# 1 if undone, 0 if kept as a hole.
_UNDO = """
if redis.call('GET', tat_key) == after then
  local tat = before
  while tat ~= '' do
    local earlier = redis.call('HGET', holes_key, tat)
    if not earlier then break end
    redis.call('HDEL', holes_key, tat)
    tat = earlier
  end
  if tat == '' or tonumber(tat) <= now then
    redis.call('DEL', tat_key)
  else
    redis.call('SET', tat_key, tat, 'PX', math.ceil(tonumber(tat) - now) + 1000)
  end
  return 1
end
redis.call('HSET', holes_key, after, before)
if redis.call('HLEN', holes_key) > 64 then
  local holes = redis.call('HGETALL', holes_key)
  for i = 1, #holes, 2 do
    if tonumber(holes[i]) <= now then redis.call('HDEL', holes_key, holes[i]) end
  end
end
local left = redis.call('PTTL', tat_key)
if left > 0 then redis.call('PEXPIRE', holes_key, left) end
return 0
"""
# KEYS[1] the arrival time, KEYS[2] the holes (after -> before); ARGV[1] before,
# ARGV[2] after (as RESERVE returned them). Gives back a start that will not happen
# (its caller was cancelled while it waited): see _UNDO.
UNRESERVE = (
    NOW_MS
    + """
local tat_key, holes_key, before, after = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
"""
    + _UNDO
)
# KEYS as RESERVE's; ARGV[1] the tombstone's life (ms). Gives back the start a
# RESERVE whose reply never came may have reserved (found in its turn's record:
# as UNRESERVE, 1 or 0; 2 if it has not run), and leaves a tombstone there that
# makes it take nothing if it runs later (or again: redis-py sends a command again
# after a reset).
VOID_TURN = (
    NOW_MS
    + """
local mine = redis.call('GET', KEYS[2])
redis.call('SET', KEYS[2], 'void', 'PX', ARGV[1])
if not mine or mine == 'void' then return 2 end
local tat_key, holes_key = KEYS[1], KEYS[3]
local before, after = string.match(mine, '^(%S*) (%S+)$')
"""
    + _UNDO
)
