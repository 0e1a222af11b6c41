"""The server-side scripts of :mod:`fastcheckpoint.stores.redis`, one per store operation.

Calling convention (every script)
---------------------------------
``KEYS`` are the run's ten fixed keys, all under the hash tag ``{<run key>}`` so that a script
touches one slot (checkpoint keys ``<base>c:<sequence>`` and operation memos ``<base>op:<token>``
are built inside the script and share the tag)::

    KEYS[1] run  hash: rid inc st ct ut ls v d m lb       (the run record; lb: labels)
    KEYS[2] seq  zset: sequence -> sequence                (the checkpoint log)
    KEYS[3] exp  zset: sequence -> expires_at              (checkpoints that expire)
    KEYS[4] due  hash: s (score) m (member)                (what the global due index holds)
    KEYS[5] ik   zset: item key, score 0                   (item keys in byte order)
    KEYS[6] iv   hash: item key -> value
    KEYS[7] io   zset: item key -> owner sequence
    KEYS[8] ie   zset: item key -> expires_at
    KEYS[9] ir   hash: item key -> how many held checkpoints name it in their refs
    KEYS[10] cr  hash: sequence -> the refs of that checkpoint (a JSON list, as the client sent)
    KEYS[11]     the checkpoint key the operation names, where it names one

``ARGV[1]`` is the run's key base (``<ns>{<run key>}:``), ``ARGV[2]`` the manager's ``now``
(epoch seconds; ``''`` for the delete calls, which get no clock), ``ARGV[3]`` the grace in ms
that run-level keys outlive their data,
``ARGV[4]`` the base of the global index keys when the script may update them itself (plain
Redis) or ``''`` on Redis Cluster, where they live in another slot: the script then returns the
index operations for the client to apply. Operation arguments start at ``ARGV[5]``.

Every script returns ``{result, ops}``; ``ops`` is a flat list of quadruples for :data:`INDEX`.

The log is the truth. The run's expiry and its latest sequence are derived from the log on
every call (the latest expiry in ``exp``, or never when a logged checkpoint does not expire;
the larger of ``ls`` and the newest logged sequence), so a replayed or damaged run hash can
neither hide live checkpoints nor make an append overwrite one; appends are also create-only
at their slot. A run hash that cannot be used while its log holds live checkpoints is
*damaged* (see ``load_run``): reads still return the checkpoints (status ``active``), writes
answer ``{'damaged', problem}`` and change nothing. A checkpoint whose id names another run (its
hash swapped in from that run) is damage of that checkpoint alone: the record is judged by the
run's own newest checkpoint, and a rebuild takes its incarnation from it.

Shared items. A checkpoint's refs (item keys) are kept in ``cr`` rather than in the checkpoint
hash, because that hash may expire natively before its log entry is dropped: every removal of a
checkpoint (pruning, ``delete``, purging, a log entry whose key vanished) reads its refs there
and lowers the counts in ``ir``; an item no held checkpoint names any more is removed at once,
unless a held checkpoint owns it. A referenced loose item carries no expiry of its own, and the
item keys live as long as the run (plus the grace), so it never expires while a held checkpoint
names it; an owned one keeps its owner's expiry and goes with its owner. An append with items
counts its refs before anything it replaces is pruned, and first checks, after the sequence
check and before its first write, that every ref it does not write itself names a live item of
the run (for a new run, one that outlives the old incarnation): otherwise it
answers ``{'gone', keys...}`` and writes nothing, since another process may have removed the last
holder of an item this writer still believes held.

Nested items. An item whose key starts with ``K .. '/'`` is nested under the shared item ``K``
(the bounds come from :func:`~fastcheckpoint.stores.nested_prefix`; see ``nested_range``).
``read_with_items`` returns them with each ref's item (one ``ZRANGEBYLEX`` of ``ik`` per
distinct ref); ``unreference`` and ``drop_run(true)`` remove them when they release the last
ref to ``K`` (``drop_nested``), whoever holds ``K``'s item (an owned one goes with its owner,
``drop_owned_items``, even while named), and ``drop_run(false)`` removes every item key anyway.

Lost replies. redis-py retries a call whose reply was lost, with the same arguments. Appends,
run updates, the counting deletes, owned-item writes, item writes and the purge
remember their reply (and the index operations it carried) for five minutes under
``<base>op:<token>`` and answer a retry with it (a run update with the record as it is then:
another change may have followed). An append's retry is acknowledged so also when its
checkpoint or its run went in between (a conflict would make the manager write it again at
the next sequence), with its index operations only while the run is still its incarnation; the
token is also in the checkpoint the append wrote, for a retry that finds no memo.

Late first tries. When a connection drops, the first send of a call may still reach the
server after redis-py's retry was answered and the caller went on. The memo makes it a no-op
when it comes within the five minutes: ``delete_run``, ``delete_items`` and ``put_items``
remember their reply also when they removed nothing or wrote an upsert (else a late
``delete_run`` would remove a life of the run started after it, a late ``delete_items`` an
item written after it, a late ``put_items`` overwrite a newer value). ``delete`` names the
checkpoint id and ``update_run`` the incarnation and version, which later changes move on.

Floats travel as the decimal strings Python wrote (``repr``) or Redis formats (scores); the
scripts compare them with ``tonumber`` and store the strings unchanged, so no precision is lost
to Lua's ``tostring``. ``''`` stands for "never expires".

Every script reads and checks before its first write, so an error it raises leaves nothing
half-done: Redis does not undo the writes of a script that fails later. So the creates,
deletes, item writes, the purge of a live run, the rebuild and the reads that drop a vanished
checkpoint's log entry first check that the run-level keys hold the types the layout says
(``foreign_key``; else ``{'corrupt', key, type}``, nothing written, except that the purge
moves the run's entry in the global due index later), and a ref count in ``ir``
edited into something that is not a number is counted again from ``cr`` (``recounted``).

Flags: reads carry ``no-writes``; scripts whose writes only remove or re-index
(deletes, purging, :data:`INDEX`, reads that drop dangling log entries) carry ``allow-oom``, so
they keep working, and keep freeing memory, when Redis is at ``maxmemory``; the scripts that add
data, and :data:`INTENT` that precedes them on Redis Cluster, carry none, so a full server
refuses them before their first write.
"""

from __future__ import annotations

from fastcheckpoint.stores._base import key_successor, nested_prefix

__all__ = ["INDEX", "INTENT", "SCRIPTS", "without_flags"]


def _nested_bounds() -> str:
    """The Lua constants of :func:`~fastcheckpoint.stores.nested_prefix`: the keys of the items
    nested under ``K`` run from ``K .. NESTED_FROM`` up to, not including, ``K .. NESTED_TO``.
    That holds for every ``K`` because the prefix is one character below U+10FFFF, whose
    ``key_successor`` is the next character."""
    low = nested_prefix("")
    high = key_successor(low)
    if len(low) != 1 or not (low + high).isascii() or {"'", "\\"} & set(low + high):
        raise AssertionError(f"the nested prefix {low!r} cannot be a Lua constant")
    return f"local NESTED_FROM, NESTED_TO = '{low}', '{high}'\n"


# Index operations on the global keys, shared by the run scripts (plain Redis) and INDEX.
_APPLY_OP = r"""
-- Index operations on the global keys (all under one hash tag of their own).
--   add    member status stamp   a new run
--   sync   member status stamp   make the indexes say what the run record says
--   forget member '' stamp       a run that is gone: out of every index (its labels too);
--                                with a stamp (on Redis Cluster) for good; stamp 'now': the
--                                index server's clock (a listing dropping a stale entry)
--   bury   member                the cleanup loop: a tombstone's time is up
--   label  member labels         a new run's labels (a JSON list): into each label's index
--   damaged member               a run whose record is damaged: counts skip it until repaired
--   due    old new score         (re)schedule the run for purging; new '' = unschedule
--   defer  member '' score       the cleanup loop could not purge the run (a damaged key):
--                                due again at score; only moves an entry still there later
--   intend intent score          Redis Cluster: a run script is about to change the indexes
--   done   intent                ... and its index operations were applied
-- On Redis Cluster the index calls of two status changes, or of a status change and the
-- cleanup loop's repair, can land out of order. `stamp` is when the run script read the
-- record (the run slot's server clock, in microseconds); `ver` keeps the newest stamp applied
-- per member, and older ones are ignored. '' (plain Redis, where a script updates record and
-- indexes at once) skips the check. A member names one incarnation: once its run is deleted,
-- `ver` keeps a tombstone ('-' .. stamp) that refuses every later call for it, such as a
-- status change's index call landing after the delete's. It is due for the cleanup loop
-- (member '-' .. member in `due`) TOMBSTONE_S after the delete, long after any call of that
-- incarnation could land.
local TOMBSTONE_S = 3600

-- This server's clock in microseconds: the stamp of an index operation.
local function server_stamp()
  local now = redis.call('TIME')
  return now[1] .. string.format('%06d', tonumber(now[2]))
end

local function tombstoned(g, member)
  local known = redis.call('HGET', g .. 'ver', member)
  return known and string.sub(known, 1, 1) == '-'
end

local function newer(g, member, stamp)
  if stamp == '' then return true end
  local known = redis.call('HGET', g .. 'ver', member)
  if known and string.sub(known, 1, 1) == '-' then return false end
  known = tonumber(known)
  if known and known > tonumber(stamp) then return false end
  redis.call('HSET', g .. 'ver', member, stamp)
  return true
end

-- The strings of a JSON list as a Lua table; {} for anything else. What is not text (an
-- edited value) is skipped: handed to a command, it would fail a script after its writes.
local function decode_list(blob)
  if not blob or blob == '' then return {} end
  local ok, list = pcall(cjson.decode, blob)
  if not ok or type(list) ~= 'table' then return {} end
  local strings = {}
  for _, value in ipairs(list) do
    if type(value) == 'string' then strings[#strings + 1] = value end
  end
  return strings
end

-- The run leaves the index of each label `lab` says it carries.
local function unlabel(g, member)
  local labels = redis.call('HGET', g .. 'lab', member)
  if not labels then return end
  for _, label in ipairs(decode_list(labels)) do redis.call('ZREM', g .. 'l:' .. label, member) end
  redis.call('HDEL', g .. 'lab', member)
end

local function sync(g, member, status, stamp)
  if not newer(g, member, stamp) then return end
  for _, other in ipairs(redis.call('SMEMBERS', g .. 'statuses')) do
    if other ~= status then redis.call('ZREM', g .. 's:' .. other, member) end
  end
  redis.call('ZREM', g .. 'damaged', member)
  redis.call('ZADD', g .. 'all', 0, member)
  redis.call('ZADD', g .. 's:' .. status, 0, member)
  redis.call('SADD', g .. 'statuses', status)
end

local function apply_op(g, kind, a, b, c)
  if kind == 'add' then
    if not newer(g, a, c) then return end
    redis.call('ZADD', g .. 'all', 0, a)
    redis.call('ZADD', g .. 's:' .. b, 0, a)
    redis.call('SADD', g .. 'statuses', b)
  elseif kind == 'sync' then
    sync(g, a, b, c)
  elseif kind == 'forget' then
    redis.call('ZREM', g .. 'all', a)
    redis.call('ZREM', g .. 'due', a)
    redis.call('ZREM', g .. 'damaged', a)
    if c == 'now' then c = server_stamp() end
    if c ~= '' then
      redis.call('HSET', g .. 'ver', a, '-' .. c)
      redis.call('ZADD', g .. 'due', string.format('%.6f', tonumber(c) / 1e6 + TOMBSTONE_S),
        '-' .. a)
    elseif not tombstoned(g, a) then
      redis.call('HDEL', g .. 'ver', a)
    end
    for _, status in ipairs(redis.call('SMEMBERS', g .. 'statuses')) do
      redis.call('ZREM', g .. 's:' .. status, a)
    end
    unlabel(g, a)
  elseif kind == 'bury' then
    if tombstoned(g, a) then redis.call('HDEL', g .. 'ver', a) end
    redis.call('ZREM', g .. 'due', '-' .. a)
  elseif kind == 'label' then
    -- A member names one incarnation, whose labels never change: no stamp needed.
    redis.call('HSET', g .. 'lab', a, b)
    for _, label in ipairs(decode_list(b)) do redis.call('ZADD', g .. 'l:' .. label, 0, a) end
  elseif kind == 'due' then
    if a ~= '' and a ~= b then redis.call('ZREM', g .. 'due', a) end
    if b ~= '' then redis.call('ZADD', g .. 'due', c, b) end
  elseif kind == 'defer' then
    redis.call('ZADD', g .. 'due', 'XX', 'GT', c, a)
  elseif kind == 'damaged' then
    redis.call('ZADD', g .. 'damaged', 0, a)
  elseif kind == 'intend' then
    redis.call('ZADD', g .. 'fix', b, a)
  elseif kind == 'done' then
    redis.call('ZREM', g .. 'fix', a)
  end
end

"""

# Helpers shared by every script. Lua locals only: scripts must not create globals.
_PRELUDE = r"""
local BASE, NOW_S, GRACE, GLOBAL = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local NOW = tonumber(NOW_S)
local RUN_KEY = string.match(BASE, '{([a-z2-7]+)}:$')
local MEMBER = '^' .. string.rep('[0-9a-f]', 16) .. RUN_KEY .. '%.[a-z2-7]+$'
local MEMO_MS = 300000
local OPS = {}
""" + _nested_bounds() + _APPLY_OP + r"""
-- Unparseable expiries count as live, so a corrupt record is reported, never silently hidden.
-- Without the manager's clock (delete calls) everything counts as live.
local function is_live(expires_at)
  if expires_at == '' or not NOW then return true end
  local at = tonumber(expires_at)
  return not at or NOW < at
end

-- The stamp of an index operation that adds or moves a run: only on Redis Cluster, where
-- the client applies it later (see apply_op).
local function stamp()
  if GLOBAL ~= '' then return '' end
  return server_stamp()
end

local function ckey(sequence)
  return BASE .. 'c:' .. sequence
end

-- Plain Redis: the script updates the indexes itself, after the run's writes. A global key
-- of another type (a foreign application under the prefix) must not fail it then, halfway:
-- the run's change is the operation, as on Redis Cluster when the index call fails. The
-- first failure goes back as a 'failed' operation, which the client logs.
local function op(kind, a, b, c)
  if GLOBAL ~= '' then
    local ok, err = pcall(apply_op, GLOBAL, kind, a, b or '', c or '')
    if not ok and #OPS == 0 then
      OPS = {'failed', type(err) == 'table' and err.err or tostring(err), '', ''}
    end
  else
    OPS[#OPS + 1] = kind
    OPS[#OPS + 1] = a
    OPS[#OPS + 1] = b or ''
    OPS[#OPS + 1] = c or ''
  end
end

-- A field of a run-level hash, or false; never an error when a foreign value of another type
-- sits at the key (that is damage to report, not a reason to fail).
local function field(key, name)
  local value = redis.pcall('HGET', key, name)
  if type(value) == 'table' then return false end
  return value
end

-- The types of KEYS[2..10] (see the layout above); an absent key is fine.
local KEY_TYPES = {'zset', 'zset', 'hash', 'zset', 'hash', 'zset', 'zset', 'hash', 'hash'}

-- {key, type expected} for the first run-level key that holds a value of another type, or
-- nil. Redis does not undo a script's writes when a later command fails (WRONGTYPE), so a
-- script that writes checks this before its first write. (A read of the expected type that
-- fails tells: TYPE is not among the commands the store's ACL grants.)
local function foreign_key()
  for index = 2, 10 do
    local expected = KEY_TYPES[index - 1]
    local probe
    if expected == 'zset' then
      probe = redis.pcall('ZCARD', KEYS[index])
    else
      probe = redis.pcall('HEXISTS', KEYS[index], '')
    end
    if type(probe) == 'table' and probe.err then return {KEYS[index], expected} end
  end
  return nil
end

-- HMGET of a checkpoint hash. A value of another type at its key (an editor, a foreign
-- writer) reads as a checkpoint whose id is '' and whose other fields are absent: reads report
-- it as corrupt, never take it for a vanished key whose log entry they drop.
local function checkpoint_fields(key, ...)
  local f = redis.pcall('HMGET', key, ...)
  if not f.err then return f end
  local marker = {''}
  for index = 2, select('#', ...) do marker[index] = false end
  return marker
end

-- The reply a retried call (same token) gets again, or nil.
local function recall(token)
  if token == '' then return nil end
  local saved = redis.call('GET', BASE .. 'op:' .. token)
  if saved then return cjson.decode(saved) end
  return nil
end

-- Reply {result, OPS}, remembered under the token when a retry would otherwise get another
-- answer: when the call changed something (keep) or carries index operations.
local function answer(token, result, keep)
  if token ~= '' and (keep or #OPS > 0) then
    redis.call('SET', BASE .. 'op:' .. token, cjson.encode({result, OPS}), 'PX', MEMO_MS)
  end
  return {result, OPS}
end

-- Removes one item; 1 if it was there. Its index entries go also when its value is gone (an
-- edited hash): a stale owner or expiry would otherwise pass to the next write of the key.
local function drop_item(key)
  local removed = redis.call('HDEL', KEYS[6], key) + redis.call('ZREM', KEYS[5], key)
  redis.call('ZREM', KEYS[7], key)
  redis.call('ZREM', KEYS[8], key)
  if removed > 0 then return 1 end
  return 0
end

-- The bounds (ZRANGEBYLEX syntax) of the keys of the items nested under `key`: those that
-- start with key .. NESTED_FROM, in byte order (= code point order).
local function nested_range(key)
  return '[' .. key .. NESTED_FROM, '(' .. key .. NESTED_TO
end

-- Removes every item nested under `key`, a page of the key index at a time (a few commands
-- per page, so O(log n) per item and no Lua table of them all); their values, owners and
-- expiries go with them.
local function drop_nested(key)
  local low, high = nested_range(key)
  while true do
    local page = redis.call('ZRANGEBYLEX', KEYS[5], low, high, 'LIMIT', 0, 256)
    if #page == 0 then return end
    redis.call('HDEL', KEYS[6], unpack(page))
    redis.call('ZREM', KEYS[5], unpack(page))
    redis.call('ZREM', KEYS[7], unpack(page))
    redis.call('ZREM', KEYS[8], unpack(page))
  end
end

-- Whether a held checkpoint names `key`, or a key `key` is nested under, from byte `from` on
-- (the keys ending before it are known not to be named).
local function named(key, from)
  if redis.call('HEXISTS', KEYS[9], key) == 1 then return true end
  local cut = string.find(key, NESTED_FROM, from, true)
  while cut do
    if redis.call('HEXISTS', KEYS[9], string.sub(key, 1, cut - 1)) == 1 then return true end
    cut = string.find(key, NESTED_FROM, cut + 1, true)
  end
  return false
end

-- drop_nested(key) keeping what a held checkpoint names or is nested under a key one names
-- (an item key nested under another one's is that checkpoint's item all the same), and owned
-- items (they go with their owner): one HEXISTS per '/' of each key more.
local function drop_unnamed_nested(key)
  local low, high = nested_range(key)
  local from = #key + 2
  while true do
    local page = redis.call('ZRANGEBYLEX', KEYS[5], low, high, 'LIMIT', 0, 256)
    if #page == 0 then return end
    low = '(' .. page[#page]
    for _, nested in ipairs(page) do
      if not redis.call('ZSCORE', KEYS[7], nested) and not named(nested, from) then
        drop_item(nested)
      end
    end
  end
end

-- A live item the key index lists whose value is gone (the hash field was edited away; no
-- script removes one without the other): damaged, never read as absent. Asked only of keys
-- HMGET found no value for, so an intact read pays nothing for it.
local function value_lost(key, expires_at)
  return is_live(expires_at or '') and redis.call('ZSCORE', KEYS[5], key) ~= false
end

local function item_live(key)
  if redis.call('HEXISTS', KEYS[6], key) == 0 then return false end
  local expires_at = redis.call('ZSCORE', KEYS[8], key)
  return not expires_at or is_live(expires_at)
end

-- Writes (replaces) one item. A loose key a held checkpoint names gets no expiry: the
-- checkpoints naming it decide its life. An owned one keeps its owner's, named or not.
local function write_item(key, value, owner, expires_at)
  drop_item(key)
  redis.call('HSET', KEYS[6], key, value)
  redis.call('ZADD', KEYS[5], 0, key)
  if owner ~= '' then redis.call('ZADD', KEYS[7], owner, key) end
  if expires_at ~= '' and (owner ~= '' or redis.call('HEXISTS', KEYS[9], key) == 0) then
    redis.call('ZADD', KEYS[8], expires_at, key)
  end
end

-- Which of the item keys exist ('1'/'0' each): a script that creates one gives it the run's
-- lifetime (see touch_run_keys).
local function item_keys()
  local found = ''
  for index = 5, 10 do found = found .. redis.call('EXISTS', KEYS[index]) end
  return found
end

-- How many held checkpoints name `key`, counted from their refs in cr: what ir says when its
-- count was edited into something that is not a number (O(held checkpoints): only then).
local function recount(key)
  local count = 0
  for _, sequence in ipairs(redis.call('HKEYS', KEYS[10])) do
    for _, named in ipairs(decode_list(redis.call('HGET', KEYS[10], sequence))) do
      if named == key then
        count = count + 1
        break
      end
    end
  end
  return count
end

-- ir's count of `key` changed by `step`, or, when it is not a number, counted again from cr
-- (which the caller has already changed): never a failing HINCRBY after a script's first write.
local function recounted(key, step)
  local count = redis.call('HGET', KEYS[9], key)
  if not count or (#count < 16 and string.match(count, '^%-?%d+$')) then
    return redis.call('HINCRBY', KEYS[9], key, step)
  end
  count = recount(key)
  redis.call('HSET', KEYS[9], key, string.format('%d', count))
  return count
end

-- One more held checkpoint names each of `keys` (distinct; the checkpoint's refs are in cr
-- already); a loose key named for the first time loses any expiry of its own (an owned one
-- keeps its owner's: it goes with it). An item whose own expiry passed is absent: it goes first
-- (the append writes the key anew, or was refused for naming what the run does not hold).
local function reference(keys)
  for _, key in ipairs(keys) do
    if recounted(key, 1) == 1 then
      if not item_live(key) then drop_item(key) end
      if not redis.call('ZSCORE', KEYS[7], key) then redis.call('ZREM', KEYS[8], key) end
    end
  end
end

-- Checkpoint `sequence` no longer names its refs: an item no held checkpoint names any more
-- is removed, unless a held checkpoint owns it (it goes with its owner), and so is what is
-- nested under its key, whoever holds the item; but not what a held checkpoint names, or is
-- nested under a key one names.
local function unreference(sequence)
  local refs = redis.call('HGET', KEYS[10], sequence)
  if not refs then return end
  redis.call('HDEL', KEYS[10], sequence)
  local seen = {}
  for _, key in ipairs(decode_list(refs)) do
    if not seen[key] then
      seen[key] = true
      if recounted(key, -1) <= 0 then
        redis.call('HDEL', KEYS[9], key)
        -- Nested under a key still named: it stays, with what is nested under it.
        if not named(key, 1) then
          if not redis.call('ZSCORE', KEYS[7], key) then drop_item(key) end
          drop_unnamed_nested(key)
        end
      end
    end
  end
end

-- Owned items go with their owner, also those a held checkpoint names.
local function drop_owned_items(sequence)
  -- Owners are sequences: an edited log entry (not a decimal integer) owns nothing, and is
  -- no valid bound of ZRANGEBYSCORE (an error after the caller's writes).
  if not string.match(sequence, '^%d+$') then return end
  for _, key in ipairs(redis.call('ZRANGEBYSCORE', KEYS[7], sequence, sequence)) do
    drop_item(key)
  end
end

-- Removes one checkpoint from the log with its owned items and its references; 1 if it was
-- held.
local function drop_checkpoint(sequence)
  if redis.call('ZREM', KEYS[2], sequence) == 0 then return 0 end
  redis.call('ZREM', KEYS[3], sequence)
  redis.call('UNLINK', ckey(sequence))
  drop_owned_items(sequence)
  unreference(sequence)
  return 1
end

-- The run's expiry from the checkpoints it holds: '' if one never expires, '0' (EMPTY_RUN)
-- if it holds none, else the latest expires_at.
local function held_expiry()
  local held = redis.call('ZCARD', KEYS[2])
  if held == 0 then return '0' end
  if held > redis.call('ZCARD', KEYS[3]) then return '' end
  return redis.call('ZREVRANGE', KEYS[3], 0, 0, 'WITHSCORES')[2]
end

local function later(first, second)
  if first == '' or second == '' then return '' end
  if tonumber(first) >= tonumber(second) then return first end
  return second
end

-- The earlier of two expiries, where nil and '' (never) lose.
local function earlier(first, second)
  if first == '' then first = nil end
  if second == '' then second = nil end
  if not first then return second end
  if not second then return first end
  if tonumber(second) < tonumber(first) then return second end
  return first
end

-- Whether s is UTF-8 as Python decodes it strictly (no overlongs, no surrogates): the client
-- reads run ids and statuses as text. ASCII, the usual case, costs one string.find.
local function is_utf8(s)
  if not string.find(s, '[\128-\255]') then return true end
  local index, size = 1, #s
  while index <= size do
    local first, length = string.byte(s, index), 1
    if first >= 0xF0 and first <= 0xF4 then length = 4
    elseif first >= 0xE0 and first <= 0xEF then length = 3
    elseif first >= 0xC2 and first <= 0xDF then length = 2
    elseif first >= 0x80 then return false end
    for next = index + 1, index + length - 1 do
      local byte = string.byte(s, next)
      if not byte or byte < 0x80 or byte > 0xBF then return false end
    end
    local second = string.byte(s, index + 1)
    if (first == 0xE0 and second < 0xA0) or (first == 0xED and second > 0x9F)
        or (first == 0xF0 and second < 0x90) or (first == 0xF4 and second > 0x8F) then
      return false
    end
    index = index + length
  end
  return true
end

-- Whether s is a decimal number as Python writes one (repr of a float: 1700000000.5, 1.7e+09).
-- The rule the client's float() is sure to read, where Lua's tonumber also takes 0x10 or ' 5'.
local function is_decimal(s)
  if not s then return false end
  local mantissa = string.match(s, '^%-?%d+%.?%d*$')
    or string.match(s, '^%-?%d+%.?%d*[eE][-+]?%d+$')
  return mantissa ~= nil
end

-- Whether blob is labels as the client reads them: '' (none) or a JSON list of UTF-8 strings.
local function is_label_list(blob)
  if not blob or blob == '' then return true end
  if not is_utf8(blob) then return false end
  local ok, list = pcall(cjson.decode, blob)
  if not ok or type(list) ~= 'table' or string.sub(blob, 1, 1) ~= '[' then return false end
  local count = 0
  for index, label in pairs(list) do
    if type(index) ~= 'number' or type(label) ~= 'string' then return false end
    count = count + 1
  end
  return count == #list
end

-- The incarnation a checkpoint id of this run names, or nil: an edited id names none, and one
-- of another run (its hash swapped in from that run) says nothing of this run. Such a
-- checkpoint is damage of its own, which reads refuse; the run goes on from its own ones.
local function own_incarnation(id)
  return id and string.match(id, '^ck%-' .. RUN_KEY .. '%-([a-z2-7]+)%-%d+$')
end

-- How many of the newest logged checkpoints load_run looks through for the run's own newest
-- one. Beyond the first only when the newest is not the run's own (another run's swapped in,
-- an edited id, a vanished key): a fixed bound keeps every call O(1). A run whose newest
-- checkpoints are all not its own within the bound is not judged by its log, as when its
-- log names no incarnation; its record is still judged by everything else.
local OWN_PROBE = 16

-- The incarnation of the run's newest own checkpoint among the OWN_PROBE newest, or nil.
local function newest_own_incarnation(top)
  local incarnation = own_incarnation(field(ckey(top), 'i'))
  if incarnation then return incarnation end
  for _, sequence in ipairs(redis.call('ZREVRANGE', KEYS[2], 1, OWN_PROBE - 1)) do
    incarnation = own_incarnation(field(ckey(sequence), 'i'))
    if incarnation then return incarnation end
  end
  return nil
end

-- Why the record r cannot be used, or nil. `top` is the newest logged sequence. What it
-- accepts, RedisStore._run_record reads: the two judge a record by one rule.
local function record_problem(r, top)
  if not r.rid or r.rid == '' then return 'has no run id' end
  if not is_utf8(r.rid) then return 'has a run id that is not UTF-8 text' end
  if not r.inc or not string.match(r.inc, '^[a-z2-7]+$') then return 'has no valid incarnation' end
  if not r.st or r.st == '' then return 'has no status' end
  if not is_utf8(r.st) then return 'has a status that is not UTF-8 text' end
  if not is_decimal(r.ct) or not is_decimal(r.ut) then return 'has unreadable times' end
  if not is_label_list(r.lb) then return 'has unreadable labels' end
  if not r.ls or not string.match(r.ls, '^%d+$') then return 'has no valid latest sequence' end
  if not r.v or not string.match(r.v, '^%d+$') then return 'has no valid version' end
  if not r.m or not string.match(r.m, MEMBER) or string.sub(r.m, -#r.inc - 1) ~= '.' .. r.inc then
    return 'has no valid index member'
  end
  if not top then return nil end
  local logged = newest_own_incarnation(top)
  if logged and logged ~= r.inc then
    return 'names incarnation ' .. r.inc .. ' but its newest checkpoint belongs to ' .. logged
  end
  return nil
end

-- The run as the scripts judge it. present: the hash exists; problem: why it cannot be used;
-- expiry/live: from the log; damaged: unusable while the log holds live checkpoints; latest:
-- the newest sequence ever appended as far as record and log tell.
local function load_run()
  local r = {expiry = held_expiry()}
  r.live = r.expiry ~= '0' and is_live(r.expiry)
  local top = redis.call('ZREVRANGE', KEYS[2], 0, 0)[1]
  local f = redis.pcall('HMGET', KEYS[1], 'rid', 'inc', 'st', 'ct', 'ut', 'ls', 'v', 'd', 'm',
    'lb')
  if f.err then
    r.present, r.problem = true, 'is not a hash'
  else
    r.rid, r.inc, r.st, r.ct, r.ut, r.ls, r.v, r.d, r.m, r.lb = unpack(f, 1, 10)
    r.present = (r.rid or r.inc or r.st or r.ls) and true or redis.call('EXISTS', KEYS[1]) == 1
    if r.present then
      r.problem = record_problem(r, top)
    elseif r.live then
      r.problem = 'is missing while its log holds live checkpoints'
    end
  end
  r.damaged = r.problem ~= nil and r.live
  r.latest = tonumber(top) or -1
  if r.present and not r.problem and tonumber(r.ls) > r.latest then r.latest = tonumber(r.ls) end
  return r
end

-- The status reads report: the record's, or 'active' when the record is damaged.
local function status_of(r)
  if r.problem then return 'active' end
  return r.st
end

-- Native expiry of the run-level keys: the run's expiry (or, with no run, the latest item
-- expiry) plus a grace, so they never vanish before the data they index; PERSIST when
-- something in them never expires.
local function touch_run_keys()
  -- Without the manager's clock (delete calls) there is nothing to anchor a TTL at: keep the
  -- longer lifetime the keys have; liveness follows the log, and purging removes them.
  if not NOW then return end
  local expires_at
  if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then
    expires_at = held_expiry()
  else
    local items = redis.call('ZCARD', KEYS[5])
    if items == 0 then return end
    if items > redis.call('ZCARD', KEYS[8]) then
      expires_at = ''
    else
      expires_at = redis.call('ZREVRANGE', KEYS[8], 0, 0, 'WITHSCORES')[2]
    end
  end
  local ttl = nil
  if expires_at ~= '' then
    ttl = string.format('%d', math.ceil(math.max(tonumber(expires_at) - NOW, 0) * 1000) + GRACE)
  end
  for index = 1, 10 do
    if ttl then redis.call('PEXPIRE', KEYS[index], ttl) else redis.call('PERSIST', KEYS[index]) end
  end
end

-- The earliest moment something of this run may expire (checkpoint, item or the run itself).
local function next_due()
  local due = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')[2]
  due = earlier(due, redis.call('ZRANGE', KEYS[8], 0, 0, 'WITHSCORES')[2])
  if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then
    due = earlier(due, held_expiry())
  end
  return due
end

-- The run's member of the global indexes; '~<run key>' when it has no usable record.
local function due_member()
  local member = field(KEYS[1], 'm')
  if member and string.match(member, MEMBER) then return member end
  return '~' .. RUN_KEY
end

-- Keep the global due index at or before the next expiry. Only ever moves it earlier, so a
-- steady stream of appends with the same TTL never touches the global index; purging moves it
-- later (exact = true) and always states it, even when KEYS[4] says the index holds it
-- already: on Redis Cluster an index call that failed after a purge leaves the run due there
-- for good otherwise, and every cleanup pass would meet it again.
local function schedule(exact)
  local due = next_due()
  local current = {field(KEYS[4], 's'), field(KEYS[4], 'm')}
  if not due then
    if exact and current[2] then
      redis.call('DEL', KEYS[4])
      op('due', current[2], '', '')
    end
    return
  end
  local member = due_member()
  -- An unreadable time there (an edited hash) is restated, never compared: this runs after
  -- the caller's writes, and an error here would leave them half done.
  local at = tonumber(current[1] or '')
  if current[2] == member and not exact and at and at <= tonumber(due) then return end
  redis.call('HSET', KEYS[4], 's', due, 'm', member)
  if not current[2] then
    -- A new key: it lives as long as the other run-level keys (touch_run_keys gave them one
    -- lifetime): the record's, or for a run of items only, the item keys'.
    for _, index in ipairs({1, 2, 5}) do
      local ttl = redis.call('PTTL', KEYS[index])
      if ttl > 0 then redis.call('PEXPIRE', KEYS[4], ttl) end
      if ttl ~= -2 then break end
    end
  end
  op('due', current[2] or '', member, due)
end

-- After checkpoints were removed: the run-level keys live as long as what they still hold.
local function settle_run(old_expiry)
  if held_expiry() ~= old_expiry then touch_run_keys() end
end

-- Drops log entries of checkpoints whose key Redis expired (or evicted). Returns
-- foreign_key()'s answer, and drops nothing, when a run-level key holds another type.
local function drop_stale(stale, old_expiry)
  if #stale == 0 then return nil end
  local foreign = foreign_key()
  if foreign then return foreign end
  for _, sequence in ipairs(stale) do drop_checkpoint(sequence) end
  settle_run(old_expiry)
  schedule(false)
  return nil
end

-- rid inc st ct ut ls exp v d count labels, as RedisStore._run_record reads them.
local function run_fields(r)
  return {r.rid, r.inc, r.st, r.ct, r.ut, string.format('%d', r.latest), r.expiry, r.v, r.d,
          redis.call('ZCARD', KEYS[2]), r.lb or ''}
end

-- Everything of the run: checkpoints, owned and shared items, record; with
-- keep_unowned_items, items no checkpoint named stay.
local function drop_run(keep_unowned_items)
  local member = field(KEYS[1], 'm')
  local scheduled = field(KEYS[4], 'm')
  local sequences = redis.call('ZRANGE', KEYS[2], 0, -1)
  for _, sequence in ipairs(sequences) do
    redis.call('UNLINK', ckey(sequence))
    if keep_unowned_items then drop_owned_items(sequence) end
  end
  if keep_unowned_items then
    for _, key in ipairs(redis.call('HKEYS', KEYS[9])) do
      drop_item(key)
      drop_nested(key)
    end
    redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[9], KEYS[10])
  else
    redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8],
      KEYS[9], KEYS[10])
  end
  -- The record's member names this incarnation, gone for good: forgotten with a tombstone.
  if member then op('forget', member, '', stamp()) end
  if scheduled and scheduled ~= member then op('forget', scheduled) end
  return #sequences
end

-- Whether the header fields f = {id, created, expires, stored sequence} of checkpoint
-- `sequence` are what RedisStore._header reads (by a rule no looser than the client's), and
-- its id is the run's own: a rebuilt record is seeded from such a checkpoint.
local function readable_header(sequence, f)
  return string.match(sequence, '^%d+$') ~= nil and own_incarnation(f[1]) ~= nil
    and is_decimal(f[2]) and (not f[3] or f[3] == '' or is_decimal(f[3]))
    and (not f[4] or f[4] == sequence)
end

-- Checkpoints of the log whose keys still hold an id, newest first: count, newest sequence
-- (whoever's: the next append takes the one after it), oldest created_at of the run's own
-- ('' when none is readable), the incarnation of the newest of the run's own, and the newest
-- sequence whose header fields are readable (readable_header). A checkpoint of another run
-- swapped in is counted (it is held) but names neither. Log entries whose key is gone are
-- collected in `stale`. An edited created_at is passed over: a rebuilt record must be
-- readable.
local function intact(stale)
  local count, newest, oldest, incarnation, readable = 0, nil, '', nil, nil
  for _, sequence in ipairs(redis.call('ZREVRANGE', KEYS[2], 0, -1)) do
    local f = checkpoint_fields(ckey(sequence), 'i', 't', 'e', 'q')
    if f[1] == '' then
      -- Another type at its key: neither intact nor vanished.
    elseif not f[1] then
      stale[#stale + 1] = sequence
    else
      count = count + 1
      newest = newest or sequence
      local own = own_incarnation(f[1])
      incarnation = incarnation or own
      if not readable and readable_header(sequence, f) then readable = sequence end
      if own and is_decimal(f[2]) then oldest = f[2] end
    end
  end
  return count, newest, oldest, incarnation, readable
end

-- What a read returns for one checkpoint: {1, status, sequence, id, created, expires, header,
-- payload, stored sequence, problem, refs}.
local function checkpoint_reply(run, sequence, f)
  return {1, status_of(run), sequence, f[1], f[2], f[3], f[4], f[5], f[6], run.problem or '',
    redis.call('HGET', KEYS[10], sequence) or ''}
end

-- The live checkpoint at KEYS[11], or nil.
local function find_one(run, sequence)
  local f = checkpoint_fields(KEYS[11], 'i', 't', 'e', 'h', 'p', 'q')
  if not f[1] or not is_live(f[3]) then return nil end
  return checkpoint_reply(run, sequence, f)
end

-- Up to `limit` log entries below `upper` (ZRANGEBYSCORE syntax), newest first, as (sequence,
-- score) pairs: the next page starts below the last score, never at a member, which an edited
-- log entry may have made something no bound can be.
local function log_page(upper, limit)
  return redis.call('ZREVRANGEBYSCORE', KEYS[2], upper, '-inf', 'WITHSCORES', 'LIMIT', 0, limit)
end

-- The newest live checkpoint, or nil; drops log entries whose key vanished on the way. Its
-- second result is drop_stale's.
local function find_latest(run)
  local upper, stale, found = '+inf', {}, nil
  while not found do
    local page = log_page(upper, 16)
    if #page == 0 then break end
    for index = 1, #page, 2 do
      local sequence = page[index]
      local f = checkpoint_fields(ckey(sequence), 'i', 't', 'e', 'h', 'p', 'q')
      if not f[1] then
        stale[#stale + 1] = sequence
      elseif is_live(f[3]) then
        found = checkpoint_reply(run, sequence, f)
        break
      end
    end
    upper = '(' .. page[#page]
  end
  return found, drop_stale(stale, run.expiry)
end
"""

# ARGV[5..]: sequence, checkpoint id, created_at, expires_at, header, payload, data TTL ms,
# keep_latest, write token, then the seed run: run_id, incarnation, status, created_at,
# version, data, index member, labels (JSON, '' for none); then the refs (JSON, '' for none),
# the number n of distinct refs, those n keys, and (key, value, owned '1'/'') per item.
# Returns {'ok', status}, {'conflict', latest, incarnation}, {'damaged', problem} or
# {'gone', keys...}: refs naming items the run does not hold (nothing written).
_APPEND = r"""
local sequence, expires_at, token = ARGV[5], ARGV[8], ARGV[13]
local incarnation = ARGV[15]
local saved = recall(token)
if saved then
  -- A redis-py retry of this very append after a lost reply: it was applied, whatever became
  -- of its checkpoint since (deleted, pruned, its run deleted or started again). Its index
  -- changes go again only while the run is the incarnation it wrote to: those of a run that
  -- went would put it back in the index.
  if field(KEYS[1], 'inc') ~= incarnation then saved[2] = {} end
  return saved
end
local run = load_run()
-- The same, when the memo is gone (written by an earlier release, evicted) but the checkpoint
-- is not: it holds the token. With the run record evicted too, the status the append wrote.
if field(KEYS[11], 'w') == token then return {{'ok', status_of(run) or ARGV[16]}, OPS} end
if run.damaged then return {{'damaged', run.problem}, OPS} end
local foreign = foreign_key()
if foreign then return {{'corrupt', unpack(foreign)}, OPS} end
local slot = checkpoint_fields(KEYS[11], 'i', 'e')
if slot[1] == '' then return {{'corrupt', KEYS[11], 'hash'}, OPS} end
local taken = slot[1] and is_live(slot[2])
local status, created = run.st, false
local continues, replaced = run.present and run.live, false
if continues then
  if incarnation ~= run.inc or tonumber(sequence) ~= run.latest + 1 or taken then
    local latest = run.latest
    if taken and tonumber(sequence) > latest then latest = tonumber(sequence) end
    return {{'conflict', string.format('%d', latest), run.inc}, OPS}
  end
else
  if sequence ~= '0' or taken then return {{'conflict', '', ''}, OPS} end
  replaced = run.present or redis.call('EXISTS', KEYS[2], KEYS[10]) > 0
end

-- Refs the append does not write must name items the run holds now: a writer that names an
-- item without its value (believing it held) may have lost a race with a removal of its last
-- holder in another process. A new run holds only what outlives the old one (drop_run(true)):
-- no item a checkpoint of it names or owns.
local distinct = tonumber(ARGV[23])
local written, missing = {}, {'gone'}
for index = 24 + distinct, #ARGV, 3 do written[ARGV[index]] = true end
for index = 24, 23 + distinct do
  local key = ARGV[index]
  if not written[key] then
    local held = item_live(key)
    if held and replaced then
      local owner = redis.call('ZSCORE', KEYS[7], key)
      held = redis.call('HEXISTS', KEYS[9], key) == 0
        and not (owner and redis.call('ZSCORE', KEYS[2], owner))
    end
    if not held then missing[#missing + 1] = key end
  end
end
if #missing > 1 then return {missing, OPS} end

if not continues then
  if replaced then drop_run(true) end
  redis.call('HSET', KEYS[1], 'rid', ARGV[14], 'inc', incarnation, 'st', ARGV[16],
    'ct', ARGV[17], 'v', ARGV[18], 'd', ARGV[19], 'm', ARGV[20])
  op('add', ARGV[20], ARGV[16], stamp())
  if ARGV[21] ~= '' then
    redis.call('HSET', KEYS[1], 'lb', ARGV[21])
    op('label', ARGV[20], ARGV[21])
  end
  status, created = ARGV[16], true
end
local keys_before = item_keys()

redis.call('DEL', KEYS[11])
redis.call('HSET', KEYS[11], 'i', ARGV[6], 't', ARGV[7], 'e', expires_at, 'h', ARGV[9],
  'p', ARGV[10], 'w', token, 'q', sequence)
if ARGV[11] ~= '' then redis.call('PEXPIRE', KEYS[11], ARGV[11]) end
redis.call('ZADD', KEYS[2], sequence, sequence)
if expires_at ~= '' then redis.call('ZADD', KEYS[3], expires_at, sequence) end
redis.call('HSET', KEYS[1], 'ls', sequence, 'ut', NOW_S)

-- Its refs count before pruning can remove what they name; then its items, if absent.
if ARGV[22] ~= '' then
  redis.call('HSET', KEYS[10], sequence, ARGV[22])
  local refs = {}
  for index = 24, 23 + distinct do refs[#refs + 1] = ARGV[index] end
  reference(refs)
end
for index = 24 + distinct, #ARGV, 3 do
  local key = ARGV[index]
  if not item_live(key) then
    if ARGV[index + 2] == '1' then
      write_item(key, ARGV[index + 1], sequence, expires_at)
    else
      write_item(key, ARGV[index + 1], '', '')
    end
  end
end

-- Pruning: expired checkpoints first, then the oldest beyond keep_latest.
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', NOW_S)) do
  drop_checkpoint(gone)
end
if ARGV[12] ~= '' then
  local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[12])
  if excess > 0 then
    -- Never the one just written (an edited log entry may sort above it).
    for _, gone in ipairs(redis.call('ZRANGE', KEYS[2], 0, excess - 1)) do
      if gone ~= sequence then drop_checkpoint(gone) end
    end
  end
end
if created or held_expiry() ~= run.expiry or item_keys() ~= keys_before then
  touch_run_keys()
end
schedule(false)
-- Remembered for a retry (see above): its checkpoint may be gone by then.
return answer(token, {'ok', status}, true)
"""

# ARGV[5]: sequence (KEYS[11] is its key). Returns checkpoint_reply() or {0}.
_GET = r"""
local run = load_run()
if not run.live then return {{0}, OPS} end
return {find_one(run, ARGV[5]) or {0}, OPS}
"""

# Returns like _GET, or {'corrupt', key, type} (nothing written) when a log entry whose key
# vanished was to be dropped and a run-level key holds another type.
_LATEST = r"""
local run = load_run()
if not run.live then return {{0}, OPS} end
local found, foreign = find_latest(run)
if foreign then return {{'corrupt', unpack(foreign)}, OPS} end
return {found or {0}, OPS}
"""

# ARGV[5]: sequence ('' = the newest live one; KEYS[11] is its key when given). Returns
# checkpoint_reply() followed by (key, value) of the live items it owns, its refs name and
# are nested under what its refs name (a range of the key index per ref), or {0}, or
# {'corrupt', key, type} like _LATEST.
_READ_WITH_ITEMS = r"""
local run = load_run()
if not run.live then return {{0}, OPS} end
local found, foreign
if ARGV[5] == '' then found, foreign = find_latest(run) else found = find_one(run, ARGV[5]) end
if foreign then return {{'corrupt', unpack(foreign)}, OPS} end
if not found then return {{0}, OPS} end
local keys, seen = {}, {}
local function want(key)
  if seen[key] then return end
  seen[key] = true
  keys[#keys + 1] = key
end
for _, key in ipairs(redis.call('ZRANGEBYSCORE', KEYS[7], found[3], found[3])) do want(key) end
local refs = decode_list(found[11])
for _, key in ipairs(refs) do want(key) end
local ranged = {}
for _, key in ipairs(refs) do
  if not ranged[key] then
    ranged[key] = true
    local low, high = nested_range(key)
    for _, nested in ipairs(redis.call('ZRANGEBYLEX', KEYS[5], low, high)) do
      -- Another checkpoint's owned item is not this one's, whatever its key.
      local owner = redis.call('ZSCORE', KEYS[7], nested)
      if not owner or tonumber(owner) == tonumber(found[3]) then want(nested) end
    end
  end
end
local lost = {'lost'}
for first = 1, #keys, 256 do
  local chunk = {unpack(keys, first, math.min(first + 255, #keys))}
  local values = redis.call('HMGET', KEYS[6], unpack(chunk))
  local expiries = redis.call('ZMSCORE', KEYS[8], unpack(chunk))
  for index, key in ipairs(chunk) do
    if values[index] and is_live(expiries[index] or '') then
      found[#found + 1] = key
      found[#found + 1] = values[index]
    elseif not values[index] and value_lost(key, expiries[index]) then
      lost[#lost + 1] = key
    end
  end
end
-- Never a checkpoint without an item it is read with: that would be wrong state, silently.
if #lost > 1 then return {lost, OPS} end
return {found, OPS}
"""

# ARGV[5..]: before ('' = from the newest), limit, include_expired ('1'/'0').
# Returns {1, status, problem, then (sequence, id, created, expires, header, stored sequence)
# per checkpoint}, or {'corrupt', key, type} like _LATEST.
_HEADERS = r"""
local run = load_run()
local include_expired = ARGV[7] == '1'
if not run.live and not (include_expired and run.present) then return {{0}, OPS} end
local limit = tonumber(ARGV[6])
local upper = '+inf'
if ARGV[5] ~= '' then upper = '(' .. ARGV[5] end
local out, stale, count = {1, status_of(run), run.problem or ''}, {}, 0
while count < limit do
  local page = log_page(upper, limit - count)
  if #page == 0 then break end
  for index = 1, #page, 2 do
    local sequence = page[index]
    local f = checkpoint_fields(ckey(sequence), 'i', 't', 'e', 'h', 'q')
    if not f[1] then
      stale[#stale + 1] = sequence
    elseif include_expired or is_live(f[3]) then
      out[#out + 1] = sequence
      for index = 1, 5 do out[#out + 1] = f[index] end
      count = count + 1
      if count >= limit then break end
    end
  end
  upper = '(' .. page[#page]
end
local foreign = drop_stale(stale, run.expiry)
if foreign then return {{'corrupt', unpack(foreign)}, OPS} end
return {out, OPS}
"""

# ARGV[5..]: sequence, checkpoint id, token (KEYS[11] is the checkpoint's key).
_DELETE = r"""
local saved = recall(ARGV[7])
if saved then return saved end
if field(KEYS[11], 'i') ~= ARGV[6] then return {{0}, OPS} end
local run = load_run()
if run.damaged then return {{'damaged', run.problem}, OPS} end
local foreign = foreign_key()
if foreign then return {{'corrupt', unpack(foreign)}, OPS} end
local removed = drop_checkpoint(ARGV[5])
if removed == 0 then
  -- A checkpoint key the log does not hold (left over by a crashed client): remove it.
  redis.call('UNLINK', KEYS[11])
  return {{0}, OPS}
end
settle_run(run.expiry)
schedule(false)
return answer(ARGV[7], {removed}, true)
"""

# ARGV[5]: token.
_DELETE_RUN = r"""
local saved = recall(ARGV[5])
if saved then return saved end
local removed = drop_run(false)
-- Remembered also when nothing was removed: a first try delivered late, after its retry
-- answered and the run started again, must find the memo, not delete the new life.
return answer(ARGV[5], {removed}, true)
"""

# Returns {rid, inc, st, ct, ut, latest, expiry, v, d, count, labels, problem, index member};
# rid false: no usable run (problem set when it is damaged).
_GET_RUN = r"""
local run = load_run()
if run.damaged then
  return {{false, false, false, false, false, false, false, false, false, 0, '', run.problem},
    OPS}
end
if not run.present or run.problem then return {{false}, OPS} end
local fields = run_fields(run)
fields[12], fields[13] = '', run.m
return {fields, OPS}
"""

# ARGV[5..]: incarnation, version, status, data, write token, and the latest sequence the
# update needs the run at ('' for none; answered {'newer', latest} when the run is past it).
_UPDATE_RUN = r"""
local saved = recall(ARGV[9])
local run = load_run()
if run.damaged then return {{'damaged', run.problem}, OPS} end
if not run.present or not run.live or run.problem then return {{'missing'}, OPS} end
if saved and run.inc == ARGV[5] then
  -- A redis-py retry of this very update after a lost reply: it was applied, and other
  -- changes may have followed. The record as it is now, and the index changes once more.
  OPS = saved[2]
  local fields = run_fields(run)
  table.insert(fields, 1, 'ok')
  return {fields, OPS}
end
if run.inc ~= ARGV[5] or run.v ~= ARGV[6] then return {{'conflict', run.inc, run.v}, OPS} end
if ARGV[10] ~= '' and run.latest ~= tonumber(ARGV[10]) then
  return {{'newer', string.format('%d', run.latest)}, OPS}
end
local version = string.format('%d', tonumber(ARGV[6]) + 1)
redis.call('HSET', KEYS[1], 'st', ARGV[7], 'd', ARGV[8], 'ut', NOW_S, 'v', version)
if run.st ~= ARGV[7] then op('sync', run.m, ARGV[7], stamp()) end
answer(ARGV[9], {'ok'}, true)
run.st, run.d, run.ut, run.v = ARGV[7], ARGV[8], NOW_S, version
local fields = run_fields(run)
table.insert(fields, 1, 'ok')
return {fields, OPS}
"""

# ARGV[5..]: create_only ('1'/'0'), token, then (key, value, owner, expires_at) per item. The
# memo answers a retry of a create-only write (which would find its own items taken), and
# makes a first try delivered late, after its retry and a newer write of a key, a no-op.
_PUT_ITEMS = r"""
local saved = recall(ARGV[6])
if saved then return saved end
local foreign = foreign_key()
if foreign then return {{'corrupt', unpack(foreign)}, OPS} end
if ARGV[5] == '1' then
  for index = 7, #ARGV, 4 do
    if item_live(ARGV[index]) then return {{'conflict', ARGV[index]}, OPS} end
  end
end
for index = 7, #ARGV, 4 do
  write_item(ARGV[index], ARGV[index + 1], ARGV[index + 2], ARGV[index + 3])
end
touch_run_keys()
schedule(false)
return answer(ARGV[6], {'ok'}, true)
"""

# ARGV[5..]: owner sequence (KEYS[11] is its key), its checkpoint id, if_absent ('1'/'0'),
# token, then (key, value) per item. Returns {1} when written, {0} when the checkpoint is not
# held and live with that id (nothing written).
_PUT_OWNED_ITEMS = r"""
local saved = recall(ARGV[8])
if saved then return saved end
local f = checkpoint_fields(KEYS[11], 'i', 'e')
if f[1] ~= ARGV[6] or not is_live(f[2] or '') or not redis.call('ZSCORE', KEYS[2], ARGV[5]) then
  return {{0}, OPS}
end
local foreign = foreign_key()
if foreign then return {{'corrupt', unpack(foreign)}, OPS} end
local keys_before = item_keys()
for index = 9, #ARGV, 2 do
  if ARGV[7] ~= '1' or not item_live(ARGV[index]) then
    write_item(ARGV[index], ARGV[index + 1], ARGV[5], f[2] or '')
  end
end
if item_keys() ~= keys_before then touch_run_keys() end
return answer(ARGV[8], {1}, true)
"""

# ARGV[5..]: item keys. Returns (value, expiry, lost) per key, in key order: lost is 1 for a
# live key whose value is gone (value_lost), else 0; liveness is decided by the caller.
_GET_ITEMS = r"""
local keys = {}
for index = 5, #ARGV do keys[#keys + 1] = ARGV[index] end
local values = redis.call('HMGET', KEYS[6], unpack(keys))
local expiries = redis.call('ZMSCORE', KEYS[8], unpack(keys))
local out = {}
for index = 1, #keys do
  out[#out + 1] = values[index]
  out[#out + 1] = expiries[index]
  out[#out + 1] = (not values[index] and value_lost(keys[index], expiries[index])) and 1 or 0
end
return {out, OPS}
"""

# ARGV[5..]: lower bound, upper bound (ZRANGEBYLEX syntax), limit, reverse ('1'/'0').
# Returns (key, value) pairs: limit of them with a value, and damaged entries with none.
_SCAN_ITEMS = r"""
local low, high, limit, reverse = ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8] == '1'
local out, count = {}, 0
while count < limit do
  local keys
  if reverse then
    keys = redis.call('ZREVRANGEBYLEX', KEYS[5], high, low, 'LIMIT', 0, limit - count)
  else
    keys = redis.call('ZRANGEBYLEX', KEYS[5], low, high, 'LIMIT', 0, limit - count)
  end
  if #keys == 0 then break end
  local expiries = redis.call('ZMSCORE', KEYS[8], unpack(keys))
  for index, key in ipairs(keys) do
    if not expiries[index] or NOW < tonumber(expiries[index]) then
      -- Damaged (a key no client writes, a value gone): flagged with no value, not counted.
      local value = is_utf8(key) and redis.call('HGET', KEYS[6], key)
      out[#out + 1] = key
      out[#out + 1] = value
      if value then count = count + 1 end
    end
  end
  if reverse then high = '(' .. keys[#keys] else low = '(' .. keys[#keys] end
end
return {out, OPS}
"""

# ARGV[5..]: token, then item keys.
_DELETE_ITEMS = r"""
local saved = recall(ARGV[5])
if saved then return saved end
local foreign = foreign_key()
if foreign then return {{'corrupt', unpack(foreign)}, OPS} end
local removed = 0
for index = 6, #ARGV do removed = removed + drop_item(ARGV[index]) end
-- Remembered also when nothing was removed, for a first try delivered late (see delete_run).
return answer(ARGV[5], {removed}, true)
"""

# ARGV[5..]: budget, the member the global due index listed, token, seconds until a damaged
# run is tried again.
# Returns {checkpoints removed, things removed}, or {'corrupt', key, type} when a run-level key
# holds another type and the run is not removed whole (an expired run is: its keys are unlinked
# whatever their type; a log, seq or exp, of another type cannot tell that it expired). Then
# nothing of the run is written; only its entry in the global due index moves later, so the
# cleanup loop goes on with the other runs and meets this one again after the back-off (from
# the later of the server's clock and the manager's, so the pass that skipped it never meets
# it again), not at every pass and not never.
_PURGE_RUN = r"""
local budget, listed, token, retry = tonumber(ARGV[5]), ARGV[6], ARGV[7], tonumber(ARGV[8])
local saved = recall(token)
if saved then return saved end
local foreign = foreign_key()
local function skip()
  local at = math.max(NOW, tonumber(server_stamp()) / 1e6) + retry
  op('defer', listed, '', string.format('%.6f', at))
  return {{'corrupt', unpack(foreign)}, OPS}
end
-- A log (seq, exp) of another type: load_run cannot read it, nor tell whether the run expired.
if foreign and (foreign[1] == KEYS[2] or foreign[1] == KEYS[3]) then return skip() end
local run = load_run()
local member = field(KEYS[1], 'm')
local scheduled = field(KEYS[4], 'm')
local logged = redis.call('EXISTS', KEYS[2]) == 1
if foreign and not ((run.present or logged) and not run.live) then return skip() end
if listed ~= scheduled and listed ~= member then
  -- The due index names a run incarnation this slot no longer holds (its keys expired
  -- natively, or a client died before updating the index): forget it everywhere.
  op('forget', listed)
end
if (run.present or logged) and not run.live then
  local removed = drop_run(false)
  return answer(token, {removed, removed + 1}, true)
end
local removed, items = 0, 0
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', NOW_S, 'LIMIT', 0, budget)) do
  removed = removed + drop_checkpoint(gone)
end
if removed < budget then
  local expired = redis.call('ZRANGEBYSCORE', KEYS[8], '-inf', NOW_S, 'LIMIT', 0, budget - removed)
  for _, key in ipairs(expired) do items = items + drop_item(key) end
end
if removed > 0 then settle_run(run.expiry) end
if run.present or logged or redis.call('EXISTS', KEYS[5]) == 1 then
  schedule(true)
elseif scheduled then
  redis.call('DEL', KEYS[4])
  op('forget', scheduled)
end
return answer(token, {removed, removed + items}, removed + items > 0)
"""

# Redis Cluster: make the global indexes say what the run says, after a client may have died
# between a run script and its index call. ARGV[5]: the intent the client recorded first.
# A run-level key of another type: {'corrupt', key, type}, nothing of the run written and the
# intent dropped (else every cleanup pass would fail at it; damaged_runs reports the run).
_REINDEX = r"""
local foreign = foreign_key()
if foreign then
  op('done', ARGV[5])
  return {{'corrupt', unpack(foreign)}, OPS}
end
local run = load_run()
if run.present and run.live and not run.problem then
  op('sync', run.m, run.st, stamp())
  if run.lb and run.lb ~= '' then op('label', run.m, run.lb) end
  schedule(true)
end
op('done', ARGV[5])
return {{1}, OPS}
"""

# What repairing the run needs to know, read only. Returns {problem ('' = not damaged),
# intact count, newest sequence, its id, created, expires, header, stored sequence, oldest
# created_at, the incarnation to rebuild ('' when no id names one), then the newest readable
# checkpoint (intact's readable; '' when none): its sequence, id, created, expires, header,
# stored sequence}. The client reads the newest checkpoint's header, and falls back to the
# newest readable one when that one is corrupt. A run-level key of another type leaves
# nothing to rebuild: {problem, 0, nine '', key, type}, also for a live run whose record is
# fine and for a log (seq, exp) of another type, which load_run cannot read (problem '': the
# cleanup loop skips such a run, so it must be reported here).
_INSPECT = r"""
local foreign = foreign_key()
local unreadable = foreign and (foreign[1] == KEYS[2] or foreign[1] == KEYS[3])
local run = unreadable and {live = true, damaged = false} or load_run()
if foreign and run.live then
  return {{run.problem or '', 0, '', '', '', '', '', '', '', '', '', unpack(foreign)}, OPS}
end
if not run.damaged then return {{''}, OPS} end
local count, newest, oldest, incarnation, readable = intact({})
if not newest then return {{run.problem, 0}, OPS} end
local f = redis.call('HMGET', ckey(newest), 'i', 't', 'e', 'h', 'q')
local reply = {run.problem, count, newest, f[1], f[2], f[3], f[4], f[5], oldest,
  incarnation or '', readable or ''}
if readable and readable ~= newest then
  for _, value in ipairs(redis.call('HMGET', ckey(readable), 'i', 't', 'e', 'h', 'q')) do
    reply[#reply + 1] = value
  end
end
return {reply, OPS}
"""

# Replace a damaged record by one derived from the log. ARGV[5..]: run id, status, data,
# incarnation, newest sequence, oldest created_at and index member the client derived from
# _INSPECT's answer (the script checks they still hold), the seed's labels (JSON or '').
# Returns {'ok', fields...}, {'fine'} when the record is not damaged, {'changed'} when the log
# moved on, {'empty'}, {'corrupt', key, type} (nothing written).
_REBUILD = r"""
local run = load_run()
if not run.damaged then return {{'fine'}, OPS} end
local foreign = foreign_key()
if foreign then return {{'corrupt', unpack(foreign)}, OPS} end
local stale = {}
local count, newest, oldest, incarnation, readable = intact(stale)
if not newest then return {{'empty'}, OPS} end
if not readable or incarnation ~= ARGV[8] or newest ~= ARGV[9] or oldest ~= ARGV[10] then
  return {{'changed'}, OPS}
end
for _, sequence in ipairs(stale) do drop_checkpoint(sequence) end
local old_member = field(KEYS[1], 'm')
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'rid', ARGV[5], 'inc', incarnation, 'st', ARGV[6], 'ct', oldest,
  'ut', NOW_S, 'ls', newest, 'v', '0', 'd', ARGV[7], 'm', ARGV[11])
if old_member and old_member ~= ARGV[11] then op('forget', old_member) end
op('sync', ARGV[11], ARGV[6], stamp())
if ARGV[12] ~= '' then
  redis.call('HSET', KEYS[1], 'lb', ARGV[12])
  op('label', ARGV[11], ARGV[12])
end
touch_run_keys()
schedule(true)
local fresh = load_run()
local fields = run_fields(fresh)
table.insert(fields, 1, 'ok')
return {fields, OPS}
"""

# Applies index operations on the global keys (KEYS[1] = <global base>all names the slot).
# ARGV[1]: global base; ARGV[2..]: quadruples as the run scripts return them.
_INDEX_BODY = _APPLY_OP + r"""
for index = 2, #ARGV, 4 do
  apply_op(ARGV[1], ARGV[index], ARGV[index + 1], ARGV[index + 2], ARGV[index + 3])
end
return #ARGV
"""

INDEX = "#!lua flags=allow-oom\n" + _INDEX_BODY
"""Redis Cluster: applies the index operations a run script returned, and drops stale entries;
kept working at ``maxmemory``, as it completes changes already made."""

INTENT = "#!lua\n" + _INDEX_BODY
"""Redis Cluster: records an intent before a script that adds data; refused at ``maxmemory``
like that script, so a refused create writes nothing."""

_READS = {"get": _GET, "get_run": _GET_RUN, "get_items": _GET_ITEMS,
          "scan_items": _SCAN_ITEMS, "inspect": _INSPECT}
_FREEING = {"latest": _LATEST, "read_with_items": _READ_WITH_ITEMS, "headers": _HEADERS,
            "delete": _DELETE, "delete_run": _DELETE_RUN, "delete_items": _DELETE_ITEMS,
            "purge_run": _PURGE_RUN, "reindex": _REINDEX}
_ADDING = {"append": _APPEND, "update_run": _UPDATE_RUN, "put_items": _PUT_ITEMS,
           "put_owned_items": _PUT_OWNED_ITEMS, "rebuild": _REBUILD}

SCRIPTS = {
    **{name: "#!lua flags=no-writes\n" + _PRELUDE + body for name, body in _READS.items()},
    **{name: "#!lua flags=allow-oom\n" + _PRELUDE + body for name, body in _FREEING.items()},
    **{name: "#!lua\n" + _PRELUDE + body for name, body in _ADDING.items()},
}
"""Every run script by operation name."""


def without_flags(script: str) -> str:
    """``script`` without its ``#!lua`` line, for servers that do not parse script flags.

    fakeredis (the tests' last resort when no redis-server exists) is one. Redis 7 itself
    always gets the flags: they make it refuse a script that adds data before its first write
    when it is out of memory, and let reads and deletes run then.
    """
    first, _, rest = script.partition("\n")
    return rest if first.startswith("#!lua") else script
