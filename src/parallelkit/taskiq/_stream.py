"""What the producer and the workers ask a Redis stream about its messages.

Lua scripts (one round trip each, atomic) and a scan:

* :data:`WHERE`: where a message is for a consumer group: gone, queued, taken
  (pending) or passed (delivered and acknowledged, or skipped by a group created
  after it). ``map`` asks it for every item in flight once a second.
* :data:`TRIM`: trim what every consumer group acknowledged once it is older
  than the results' TTL; a worker runs it at each pass of its read loop.
* :data:`RECALL`: take a message back from the stream if no consumer group has
  delivered it yet; an item that ends without its result (its call cancelled or
  failed, its timeout, a kick cut short) runs it once. If a worker has taken it,
  the item's :func:`retry_key` is marked gone, and a retry already queued is
  taken back.
* :data:`KICK_RETRY`: a worker sends a retry only if that key is not marked gone,
  and keeps the retry's id in it.
* :func:`moved`: the worker's retry of a message (a later message, same task id):
  the id :data:`KICK_RETRY` kept (:data:`MOVED`), else a scan.
* :func:`abandoned`: which items' callers have left (a worker's retry backoff
  checks it while it waits).
* :data:`CLAIM`: a worker takes over a dead worker's message unless its item's
  caller has left (then acknowledges it unrun), in one atomic step with
  :data:`RECALL`: :func:`take_over`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError
from taskiq.abc.formatter import TaskiqFormatter
from taskiq.message import BrokerMessage

__all__ = ["CLAIM", "KICK_RETRY", "MOVED", "RECALL", "RETRY_KEY_MS", "TRIM", "WHERE", "abandoned",
           "kick_retry", "moved", "recall", "retry_key", "take_over"]  # fmt: skip

logger = logging.getLogger("parallelkit.taskiq")

#: ms a :func:`retry_key` lives, by default (a day: ``redis_broker``'s results)
RETRY_KEY_MS = 86_400_000

#: where a message is for a consumer group (``_pk_where``); KEYS[1] the stream,
#: ARGV[1] the group, ARGV[2] the message id. Ids compare as (ms, seq) numbers.
WHERE = """
if #redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2], 'COUNT', 1) == 0 then
  return 'gone'
end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local fields = {}
  for i = 1, #group, 2 do fields[group[i]] = group[i + 1] end
  if fields['name'] == ARGV[1] then
    if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1) > 0 then
      return 'taken'
    end
    local ms, seq = parse(ARGV[2])
    local last_ms, last_seq = parse(fields['last-delivered-id'])
    if last_ms > ms or (last_ms == ms and last_seq >= seq) then
      return 'passed'
    end
    return 'queued'
  end
end
return 'queued'
"""
#: take back what is left queued of an item that ended without its result.
#: KEYS[1] the stream, KEYS[2] the item's :func:`retry_key`; ARGV[1] the item's
#: message id ('' when its kick was cut short: not known), ARGV[2] its task id,
#: ARGV[3] the key's life in ms. A message is queued while its id is past the last
#: one every consumer group delivered; deleted then, no worker reads it (atomic).
#: 1: the item's message was deleted (no attempt ran: nothing more to do). Else the
#: retry key says 'gone' (a worker's retry of the attempt running is not sent:
#: :data:`KICK_RETRY`), and a queued message of the item is deleted: the retry a
#: worker sent last (its id in the retry key), or, without ARGV[1], the newest one
#: carrying the task id among the newest 1000 messages: 2 if one was, 0 if none.
RECALL = """
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local floor_ms, floor_seq = -1, -1
if redis.call('EXISTS', KEYS[1]) == 1 then
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local fields = {}
    for i = 1, #group, 2 do fields[group[i]] = group[i + 1] end
    local ms, seq = parse(fields['last-delivered-id'])
    if ms > floor_ms or (ms == floor_ms and seq > floor_seq) then
      floor_ms, floor_seq = ms, seq
    end
  end
end
local function queued(id)
  local ms, seq = parse(id)
  if ms == nil or not (ms > floor_ms or (ms == floor_ms and seq > floor_seq)) then
    return false
  end
  return #redis.call('XRANGE', KEYS[1], id, id, 'COUNT', 1) > 0
end
if ARGV[1] ~= '' and queued(ARGV[1]) then
  return redis.call('XDEL', KEYS[1], ARGV[1])
end
local retry = redis.call('GET', KEYS[2])
redis.call('SET', KEYS[2], 'gone', 'PX', ARGV[3])
if retry and queued(retry) then
  redis.call('XDEL', KEYS[1], retry)
  return 2
end
if ARGV[1] ~= '' then return 0 end
for _, entry in ipairs(redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1000)) do
  local ms, seq = parse(entry[1])
  if ms < floor_ms or (ms == floor_ms and seq <= floor_seq) then return 0 end
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'data' and string.find(fields[i + 1], ARGV[2], 1, true) then
      redis.call('XDEL', KEYS[1], entry[1])
      return 2
    end
  end
end
return 0
"""
#: append a worker's retry to its stream unless its item's caller has left. KEYS[1]
#: the stream, KEYS[2] the item's :func:`retry_key`; ARGV[1] the message, ARGV[2]
#: the stream's MAXLEN ('' for none), ARGV[3] '~' (approximate) or '=', ARGV[4] the
#: key's life in ms. The new message's id, kept in the retry key (:data:`RECALL`
#: takes it back while it is queued); nil if the key says 'gone' (not sent). Atomic
#: with :data:`RECALL`: a retry is sent before the caller leaves, or not at all.
KICK_RETRY = """
if redis.call('GET', KEYS[2]) == 'gone' then return false end
local id
if ARGV[2] == '' then
  id = redis.call('XADD', KEYS[1], '*', 'data', ARGV[1])
else
  id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[3], ARGV[2], '*', 'data', ARGV[1])
end
redis.call('SET', KEYS[2], id, 'PX', ARGV[4])
return id
"""
#: the worker's retry of a message, from its item's :func:`retry_key`. KEYS[1] the
#: stream, KEYS[2] that key; ARGV[1] the message's id. The id the key keeps if it
#: is after ARGV[1] and still in the stream (the newest retry: each one sent
#: replaces it), else nil: no retry was sent through :data:`KICK_RETRY` after it.
MOVED = """
local id = redis.call('GET', KEYS[2])
if not id then return false end
local ms, seq = string.match(id, '^(%d+)-(%d+)$')
local low_ms, low_seq = string.match(ARGV[1], '^(%d+)-(%d+)$')
if ms == nil or low_ms == nil then return false end
ms, seq, low_ms, low_seq = tonumber(ms), tonumber(seq), tonumber(low_ms), tonumber(low_seq)
if ms < low_ms or (ms == low_ms and seq <= low_seq) then return false end
if #redis.call('XRANGE', KEYS[1], id, id, 'COUNT', 1) == 0 then return false end
return id
"""
#: take over a dead worker's message unless its item's caller has left. KEYS[1] the
#: stream, KEYS[2] the item's :func:`retry_key`; ARGV[1] the group, ARGV[2] the
#: consumer, ARGV[3] the least idle time (ms), ARGV[4] the message id. The message's
#: fields (a flat list) once claimed; 'left' if the key says gone: acknowledged, not
#: run; nil if not claimed (another worker took it meanwhile, or it was trimmed).
#: Atomic with :data:`RECALL`: a caller leaves before the take-over (not run) or
#: after it (it runs, as a message a worker took does).
CLAIM = """
local entry = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4])[1]
if type(entry) ~= 'table' or type(entry[2]) ~= 'table' then return false end
if redis.call('GET', KEYS[2]) == 'gone' then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[4])
  return 'left'
end
return entry[2]
"""
#: trim from a stream what every consumer group has acknowledged and is older than
#: ARGV[1] ms (by the server's clock, as message ids are): ``XTRIM MINID`` to the
#: lowest of that age, the id after each group's last delivered one and each
#: group's oldest pending id (ids below all three were delivered, and acknowledged).
#: Nothing is trimmed from a stream no group reads yet.
TRIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then return 0 end
local now = redis.call('TIME')
local floor_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[1])
local floor_seq = 0
local function lower(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  ms, seq = tonumber(ms), tonumber(seq)
  if ms < floor_ms or (ms == floor_ms and seq < floor_seq) then
    floor_ms, floor_seq = ms, seq
  end
end
for _, group in ipairs(groups) do
  local fields = {}
  for i = 1, #group, 2 do fields[group[i]] = group[i + 1] end
  local last_ms, last_seq = string.match(fields['last-delivered-id'], '^(%d+)-(%d+)$')
  lower(last_ms .. '-' .. (tonumber(last_seq) + 1))
  if tonumber(fields['pending']) > 0 then
    lower(redis.call('XPENDING', KEYS[1], fields['name'])[2])
  end
end
if floor_ms <= 0 then return 0 end
return redis.call('XTRIM', KEYS[1], 'MINID', string.format('%.0f-%.0f', floor_ms, floor_seq))
"""


async def moved(client: Redis, stream: str, msg_id: Any, task_id: str) -> Any | None:
    """The id of the newest message after ``msg_id`` in ``stream`` that carries
    ``task_id``, or ``None``.

    A worker's retry is a new message under the same task id, kicked before the
    failed one is acknowledged: an item whose message the group passed without a
    result follows it. The id :data:`KICK_RETRY` kept in the item's
    :func:`retry_key` answers in one step (:data:`MOVED`). Without it (a retry
    appended unchecked: scripts refused, a worker of an older version; the key
    expired), the stream is read from its end (a retry is recent), 100 messages
    at a time; the task id (32 hex digits) is looked for in the message's bytes,
    whatever the broker's formatter. Only for an item passed without a result.
    """
    low_id = msg_id.decode() if isinstance(msg_id, bytes) else str(msg_id)
    script: Any = client.register_script(MOVED)
    try:
        kept: Any = await script(keys=[stream, retry_key(stream, task_id)], args=[low_id])
    except ResponseError:  # scripts refused (an ACL, a proxy): read the stream
        kept = None
    if kept is not None:
        return kept
    needle = task_id.encode()
    low = f"({low_id}"
    high: Any = "+"
    while True:
        batch: Any = await client.xrevrange(stream, max=high, min=low, count=100)
        for entry_id, fields in batch:
            if needle in fields.get(b"data", b""):
                return entry_id
        if len(batch) < 100:
            return None
        last = batch[-1][0]
        high = f"({last.decode() if isinstance(last, bytes) else last}"


def retry_key(stream: str, task_id: str) -> str:
    """The key of an item's retries: the id of the last retry a worker sent of
    ``task_id`` on ``stream`` (:data:`KICK_RETRY`), or ``'gone'`` once the item
    ended without its result (:data:`RECALL`): its retries are not sent then. It
    lives as long as a result (``redis_broker``'s ``result_ttl``)."""
    return f"{stream}:retry:{task_id}"


async def recall(client: Redis, stream: str, msg_id: Any, task_id: str, life: int) -> bool:
    """Take back what is left queued of the item of ``task_id`` (:data:`RECALL`):
    its message ``msg_id`` (``None``: not known) if no worker has taken it; else
    mark its :func:`retry_key` gone for ``life`` ms and take back the retry a
    worker sent, if still queued. ``True`` if a message was deleted. One round
    trip (a rare path: the script is not kept)."""
    script: Any = client.register_script(RECALL)
    args = [b"" if msg_id is None else msg_id, task_id, life]
    deleted: Any = await script(keys=[stream, retry_key(stream, task_id)], args=args, client=client)
    return bool(deleted)


async def kick_retry(
    client: Redis,
    stream: str,
    message: BrokerMessage,
    maxlen: int | None,
    approximate: bool,
    life: int,
) -> Any | None:
    """Append a worker's retry ``message`` to ``stream`` (capped at ``maxlen``, as
    ``XADD`` does) unless its item's :func:`retry_key` says its caller has left
    (:data:`KICK_RETRY`): the new message's id (kept in that key for ``life`` ms),
    or ``None`` (not sent). Where Redis refuses scripts (an ACL, a proxy), the
    retry is appended unchecked, as before."""
    script: Any = client.register_script(KICK_RETRY)
    cap = [b"", b""] if maxlen is None else [maxlen, "~" if approximate else "="]
    keys = [stream, retry_key(stream, message.task_id)]
    try:
        return await script(keys=keys, args=[message.message, *cap, life], client=client)
    except ResponseError:
        data: Any = {b"data": message.message}
        return await client.xadd(stream, data, maxlen=maxlen, approximate=approximate)


async def abandoned(client: Redis, stream: str, task_ids: list[str | None]) -> list[bool]:
    """For each of ``task_ids`` (``None``: not known), whether its item's caller
    has left: its :func:`retry_key` says ``'gone'`` (:data:`RECALL`). One ``MGET``."""
    keys = [retry_key(stream, task_id) for task_id in task_ids if task_id]
    if not keys:
        return [False] * len(task_ids)
    values: Any = iter(await client.mget(keys))
    return [bool(task_id) and next(values) in (b"gone", "gone") for task_id in task_ids]


async def take_over(
    client: Redis,
    stream: str,
    group: str,
    consumer: str,
    idle: int,
    msg_ids: list[Any],
    formatter: TaskiqFormatter,
) -> AsyncGenerator[tuple[Any, Any], None]:
    """Take over the messages ``msg_ids`` of a dead worker (idle for ``idle`` ms)
    for ``consumer``, one at a time as the worker asks for the next: ``(id,
    fields)`` of each to run. One whose item's caller has left is acknowledged
    unrun (logged at INFO), checked in the claim's atomic step (:data:`CLAIM`),
    when the worker asks for it; one another worker took meanwhile, or trimmed,
    is left out. Costs a pipelined read of the task ids, then a script each:
    only for messages taken over."""
    async with client.pipeline(transaction=False) as pipe:
        for msg_id in msg_ids:
            pipe.xrange(stream, msg_id, msg_id, count=1)
        found: Any = await pipe.execute()
    for msg_id, entries in zip(msg_ids, found, strict=True):
        task_id = _task_id(formatter, entries[0][1].get(b"data")) if entries else None
        fields = await _claim(client, stream, group, consumer, idle, msg_id, task_id)
        if fields is not None:
            yield msg_id, fields


_NOT_RUN = "task [%s] taken over from %r, not run: its caller has left"


async def _claim(
    client: Redis, stream: str, group: str, consumer: str, idle: int, msg_id: Any, task: str | None
) -> Any | None:
    """Claim ``msg_id`` unless its item's caller has left (:data:`CLAIM`): its
    fields, or ``None``. A message whose task id is not known (unreadable: the
    receiver reports it) is claimed unchecked; where Redis refuses scripts (an ACL,
    a proxy), it is claimed, then checked: the caller may leave in between."""
    if task is not None:
        script: Any = client.register_script(CLAIM)
        keys, args = [stream, retry_key(stream, task)], [group, consumer, idle, msg_id]
        try:
            got: Any = await script(keys=keys, args=args, client=client)
        except ResponseError:  # scripts refused (or no group: the XCLAIM below says so)
            pass
        else:
            if isinstance(got, list):
                return dict(zip(got[::2], got[1::2], strict=True))
            if got is not None:
                logger.info(_NOT_RUN, task, stream)
            return None
    reply: Any = await client.xclaim(stream, group, consumer, idle, [msg_id])
    fields = reply[0][1] if reply and reply[0] else None
    if not fields:  # taken by another worker meanwhile, or trimmed
        return None
    if task is not None and (await abandoned(client, stream, [task]))[0]:
        await client.xack(stream, group, msg_id)
        logger.info(_NOT_RUN, task, stream)
        return None
    return fields


def _task_id(formatter: TaskiqFormatter, data: Any) -> str | None:
    """The task id in a message's ``data`` (``None``: unreadable; the worker will
    say so when it reads the message)."""
    try:
        return formatter.loads(data).task_id
    except Exception:
        return None
