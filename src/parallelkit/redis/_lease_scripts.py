"""The Lua scripts of a lease (:class:`~._lease.Lease`): take it, renew it, give it
back, each one atomic step in Redis; registered once per primitive."""

from __future__ import annotations

from redis.asyncio import Redis
from typing_extensions import final

__all__ = ["LeaseScripts"]

# KEYS[1] the lease, KEYS[2] (optional) the fencing counter; ARGV[1] token, ARGV[2]
# ttl (ms). Returns the new fencing token (or 1) when acquired, else minus the
# holder's remaining ttl (ms). The token is one more than the last, and never below
# the server's clock in ms: a Redis that lost the counter (a restart without
# persistence, a failover to a replica that missed the last write) starts it again
# above every token it gave before, not at 1.
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if #KEYS > 1 then
    local now = redis.call('TIME')
    local floor = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
    local last = tonumber(redis.call('GET', KEYS[2]) or '0')
    if last < floor then return redis.call('INCRBY', KEYS[2], floor - last) end
    return redis.call('INCR', KEYS[2])
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


@final
class LeaseScripts:
    """The three Lua scripts of a lease, registered once per primitive."""

    __slots__ = ("acquire", "release", "renew")

    def __init__(self, redis: Redis) -> None:
        self.acquire = redis.register_script(_ACQUIRE)
        self.renew = redis.register_script(_RENEW)
        self.release = redis.register_script(_RELEASE)
