"""The Lua scripts behind RedisStore's writes, and the token a load carries.

Every write publishes an invalidation for the near caches in the same script
(:mod:`._near`), and every stored value starts with a version byte and a 16-byte
*generation*: ``set`` writes a new one, ``delete`` and ``clear`` remove the key,
and a load stores its value only if the generation it saw when it started is
still there (``WRITE_IF``), so no invalidation is undone by an older load.
"""

from __future__ import annotations

from typing_extensions import final

__all__ = ["TOKEN", "TOKEN_TTL_MS", "WRITE", "WRITE_IF", "Token"]

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


@final
class Token:
    """What :meth:```RedisStore.load_token``` hands out: the generation, or the local epoch."""

    __slots__ = ("epoch", "head")

    def __init__(self, head: bytes | None, epoch: int) -> None:
        self.head = head  # None: taken while Redis was down
        self.epoch = epoch
