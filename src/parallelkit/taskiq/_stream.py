"""What the producer and the workers ask a Redis stream about its messages.

Two Lua scripts (one round trip each, atomic) and a scan:

* :data:`WHERE`: where a message is for a consumer group: gone, queued, taken
  (pending) or passed (delivered and acknowledged, or skipped by a group created
  after it). ``map`` asks it for every item in flight once a second.
* :data:`TRIM`: trim what every consumer group acknowledged once it is older
  than the results' TTL; a worker runs it at each pass of its read loop.
* :data:`RECALL`: take a message back from the stream if no consumer group has
  delivered it yet; an item that ends without its result (its call cancelled or
  failed, its timeout) runs it once.
* :data:`RECALL_TASK`: the same, for a kick cut short, found by its task id.
* :func:`moved`: the worker's retry of a message (a later message, same task id).
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

__all__ = ["RECALL", "RECALL_TASK", "TRIM", "WHERE", "moved"]

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
#: delete the message ARGV[1] from the stream KEYS[1] unless a consumer group has
#: delivered it (its last delivered id is at or past it): 1 if deleted. Atomic, so
#: no worker reads it in between; one a worker took is left to finish.
RECALL = """
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1], 'COUNT', 1) == 0 then
  return 0
end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local ms, seq = parse(ARGV[1])
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local fields = {}
  for i = 1, #group, 2 do fields[group[i]] = group[i + 1] end
  local last_ms, last_seq = parse(fields['last-delivered-id'])
  if last_ms > ms or (last_ms == ms and last_seq >= seq) then
    return 0
  end
end
return redis.call('XDEL', KEYS[1], ARGV[1])
"""
#: delete the message carrying the task id ARGV[1] from the stream KEYS[1] unless a
#: consumer group has delivered it: 1 if deleted. For a kick cut short (its message id
#: never came back): it is among the newest messages, so only the newest 1000 are
#: looked at, back to the first one a group delivered.
RECALL_TASK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local floor_ms, floor_seq = -1, -1
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local fields = {}
  for i = 1, #group, 2 do fields[group[i]] = group[i + 1] end
  local ms, seq = parse(fields['last-delivered-id'])
  if ms > floor_ms or (ms == floor_ms and seq > floor_seq) then
    floor_ms, floor_seq = ms, seq
  end
end
for _, entry in ipairs(redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1000)) do
  local ms, seq = parse(entry[1])
  if ms < floor_ms or (ms == floor_ms and seq <= floor_seq) then return 0 end
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'data' and string.find(fields[i + 1], ARGV[1], 1, true) then
      return redis.call('XDEL', KEYS[1], entry[1])
    end
  end
end
return 0
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
    result follows it. Read from the end of the stream (a retry is recent), 100
    messages at a time, and only for such an item. The task id (32 hex digits) is
    looked for in the message's bytes, whatever the broker's formatter.
    """
    needle = task_id.encode()
    low = f"({msg_id.decode() if isinstance(msg_id, bytes) else msg_id}"
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
