"""The Lua scripts behind RedisStore's writes, and the token a load carries.

Every write publishes an invalidation for the near caches in the same script
(:mod:`._near`), and every stored value starts with a version byte and a 16-byte
*generation*: ``set`` writes a new one, ``delete`` and ``clear`` remove the key,
and a load stores its value only if the generation it saw when it started is
still there (``WRITE_IF``), so no invalidation is undone by an older load.
"""

from __future__ import annotations

from typing_extensions import final

from ._lease import Lease

__all__ = ["LOAD_START", "TOKEN", "TOKEN_TTL_MS", "WRITE", "WRITE_IF", "WRITE_IF_RELEASE", "Token"]

#: How long a load's generation outlives the key it was read from (10 minutes).
TOKEN_TTL_MS = 600_000

# KEYS[1] the entry; ARGV[1] the value (or "" to delete), ARGV[2] ttl (ms), ARGV[3]
# the channel, ARGV[4] the message. Writes (or deletes) and tells every near cache.
WRITE = """
if ARGV[1] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""
# KEYS[1] the entry; ARGV[1] a fresh placeholder (version + generation), ARGV[2] its
# ttl (ms). Returns the entry's current version + generation, creating one if absent.
TOKEN = """
local head = redis.call('GETRANGE', KEYS[1], 0, 16)
if string.len(head) == 17 and string.byte(head, 1) == string.byte(ARGV[1], 1) then
  if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
  end
  return head
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]
"""
# KEYS[1] the entry; ARGV[1] the expected version + generation, then as WRITE's
# ARGV[1..4] shifted by one. 1 if stored, 0 if the generation changed meanwhile.
WRITE_IF = """
if redis.call('GETRANGE', KEYS[1], 0, 16) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""

# A load under its lease, in two round trips instead of six (``RedisStore.load_lock``):
# LOAD_START takes the lease and, if taken, reads the entry and its generation (as
# TOKEN) in the same step; WRITE_IF_RELEASE stores the loaded value (as WRITE_IF)
# and gives the lease back (as the lease's release: only with its token).
#
# KEYS[1] the lease, KEYS[2] the entry, KEYS[3] the token's tombstone (``void_key``);
# ARGV[1] the lease's token, ARGV[2] its ttl (ms), ARGV[3] a fresh placeholder,
# ARGV[4] its ttl (ms). Returns {1, value or '', version + generation} when taken,
# else {minus the holder's remaining ttl (ms)}: the tombstone's when the lease's
# give-back (``VOID``: its caller gave up waiting for this reply) came first, and
# it takes nothing. Held with this very token already, the lease is taken
# (redis-py sent the script again after a reset, and Redis had run the first): not
# a wait for its own lease.
LOAD_START = """
local void = redis.call('PTTL', KEYS[3])
if void > 0 then return {-void} end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
  and not (redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('PEXPIRE', KEYS[1], ARGV[2]) == 1)
then
  local left = redis.call('PTTL', KEYS[1])
  if left < 1 then left = 1 end
  return {-left}
end
local value = redis.call('GET', KEYS[2])
if value and string.len(value) >= 17 and string.byte(value, 1) == string.byte(ARGV[3], 1) then
  if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[4]) then
    redis.call('PEXPIRE', KEYS[2], ARGV[4])
  end
  return {1, value, string.sub(value, 1, 17)}
end
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
return {1, '', ARGV[3]}
"""
# KEYS[1] the entry, KEYS[2] the load's lease; ARGV[1..5] as WRITE_IF's, ARGV[6] the
# lease's token. 1 if stored, 0 if the generation changed meanwhile; either way the
# lease is given back if it is still this holder's.
WRITE_IF_RELEASE = """
local stored = 0
if redis.call('GETRANGE', KEYS[1], 0, 16) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.call('PUBLISH', ARGV[4], ARGV[5])
  stored = 1
end
if redis.call('GET', KEYS[2]) == ARGV[6] then
  redis.call('DEL', KEYS[2])
end
return stored
"""


@final
class Token:
    """What :meth:```RedisStore.load_token``` hands out: the generation, or the local epoch."""

    __slots__ = ("epoch", "head", "lease", "refused")

    def __init__(
        self, head: bytes | None, epoch: int, lease: Lease | None = None, *, refused: bool = False
    ) -> None:
        self.head = head  # None: taken while Redis was down, or refused writes
        self.epoch = epoch
        self.lease = lease  # the load's lease, given back by the write (LOAD_START)
        self.refused = refused  # Redis refused writes when the load started: store nothing
