"""The Lua scripts of a lease (:class:`~._lease.Lease`): take it, renew it, give it
back, each one atomic step in Redis; registered once per primitive. A give-back
after an acquire whose reply never came (``VOID``) also works when it reaches
Redis before the acquire: it leaves a tombstone for the token (see
:func:`~._give_back.void_key`), and the acquire takes nothing. An acquire sent
again (redis-py's retry after a reset) that finds the lease held with its own
token has it."""

from __future__ import annotations

from redis.asyncio import Redis
from typing_extensions import final

__all__ = ["LeaseScripts"]

# KEYS[1] the lease, KEYS[2] the token's tombstone (``void_key``), KEYS[3]
# (optional) the fencing counter; ARGV[1] token, ARGV[2] ttl (ms). Returns the new
# fencing token (or 1) when acquired, else minus the holder's remaining ttl (ms):
# the tombstone's when VOID left one for this token (its caller gave it up: it
# takes nothing). Held with this very token already, it is acquired (redis-py
# sent it again after a reset, and Redis had run the first). The fencing token is
# one more than the last, and never below the server's clock in ms: a Redis that
# lost the counter (a restart without persistence, a failover to a replica that
# missed the last write) starts it again above every token it gave before, not at 1.
_ACQUIRE = """
local void = redis.call('PTTL', KEYS[2])
if void > 0 then return -void end
local taken = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
if not taken and redis.call('GET', KEYS[1]) == ARGV[1] then
  taken = redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if taken then
  if #KEYS > 2 then
    local now = redis.call('TIME')
    local floor = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
    local last = tonumber(redis.call('GET', KEYS[3]) or '0')
    if last < floor then return redis.call('INCRBY', KEYS[3], floor - last) end
    return redis.call('INCR', KEYS[3])
  end
  return 1
end
local left = redis.call('PTTL', KEYS[1])
if left < 1 then left = 1 end
return -left
"""
# KEYS[1] the lease; ARGV[1] token, ARGV[2] ttl (ms). 1 if still ours and extended.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS[1] the lease; ARGV[1] token. 1 if it was ours and is now released.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# KEYS[1] the lease, KEYS[2] the token's tombstone; ARGV[1] token, ARGV[2] ttl (ms).
# Gives back what an acquire whose reply never came may have taken: as RELEASE if
# it ran (1, else 0), and leaves a tombstone that makes it take nothing if it runs
# later (or runs again: redis-py sends a command again after a reset), for as long
# as it would have held the lease.
_VOID = """
local released = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then
  released = redis.call('DEL', KEYS[1])
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
return released
"""


@final
class LeaseScripts:
    """The Lua scripts of a lease, registered once per primitive."""

    __slots__ = ("acquire", "release", "renew", "void")

    def __init__(self, redis: Redis) -> None:
        self.acquire = redis.register_script(_ACQUIRE)
        self.renew = redis.register_script(_RENEW)
        self.release = redis.register_script(_RELEASE)
        self.void = redis.register_script(_VOID)
