"""The server-side scripts of :mod:`fastcheckpoint.stores.redis`, one per store operation.

Calling convention (every script)
---------------------------------
``KEYS`` are the run's eight fixed keys, all under the hash tag ``{<run key>}`` so that a script
touches one slot (checkpoint keys ``<base>c:<sequence>`` are built inside the script and share
the tag)::

    KEYS[1] run  hash: rid inc st ct ut ls exp v d m tk   (the run record)
    KEYS[2] seq  zset: sequence -> sequence                (the checkpoint log)
    KEYS[3] exp  zset: sequence -> expires_at              (checkpoints that expire)
    KEYS[4] due  hash: s (score) m (member)                (what the global due index holds)
    KEYS[5] ik   zset: item key, score 0                   (item keys in byte order)
    KEYS[6] iv   hash: item key -> value
    KEYS[7] io   zset: item key -> owner sequence
    KEYS[8] ie   zset: item key -> expires_at
    KEYS[9]      the checkpoint key the operation names, where it names one

``ARGV[1]`` is the run's key base (``<ns>{<run key>}:``), ``ARGV[2]`` the manager's ``now``
(epoch seconds; ``''`` for the delete calls, which get no clock), ``ARGV[3]`` the grace in ms
that run-level keys outlive their data,
``ARGV[4]`` the base of the global index keys when the script may update them itself (plain
Redis) or ``''`` on Redis Cluster, where they live in another slot: the script then returns the
index operations for the client to apply. Operation arguments start at ``ARGV[5]``.

Every script returns ``{result, ops}``; ``ops`` is a flat list of quadruples for :data:`INDEX`.

Floats travel as the decimal strings Python wrote (``repr``) or Redis formats (scores); the
scripts compare them with ``tonumber`` and store the strings unchanged, so no precision is lost
to Lua's ``tostring``. ``''`` stands for "never expires".

Every script reads and checks before its first write, so an error it raises leaves nothing
half-done, and the write scripts carry a ``#!lua`` shebang so that Redis refuses them up front
when it is out of memory instead of failing between two writes.
"""

from __future__ import annotations

__all__ = ["INDEX", "SCRIPTS", "WRITE_SCRIPTS", "without_flags"]

# Index operations on the global keys, shared by the run scripts (plain Redis) and INDEX.
_APPLY_OP = r"""
-- Index operations on the global keys (all under one hash tag of their own).
--   add    member status   a new run
--   move   member old new  a status change
--   forget member          a run that is gone: out of every index
--   due    old new score   (re)schedule the run for purging; new '' = unschedule
local function apply_op(g, kind, a, b, c)
  if kind == 'add' then
    redis.call('ZADD', g .. 'all', 0, a)
    redis.call('ZADD', g .. 's:' .. b, 0, a)
    redis.call('SADD', g .. 'statuses', b)
  elseif kind == 'move' then
    redis.call('ZREM', g .. 's:' .. b, a)
    redis.call('ZADD', g .. 's:' .. c, 0, a)
    redis.call('SADD', g .. 'statuses', c)
  elseif kind == 'forget' then
    redis.call('ZREM', g .. 'all', a)
    redis.call('ZREM', g .. 'due', a)
    for _, status in ipairs(redis.call('SMEMBERS', g .. 'statuses')) do
      redis.call('ZREM', g .. 's:' .. status, a)
    end
  elseif kind == 'due' then
    if a ~= '' and a ~= b then redis.call('ZREM', g .. 'due', a) end
    if b ~= '' then redis.call('ZADD', g .. 'due', c, b) end
  end
end

"""

# Helpers shared by every script. Lua locals only: scripts must not create globals.
_PRELUDE = r"""
local BASE, NOW_S, GRACE, GLOBAL = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local NOW = tonumber(NOW_S)
local OPS = {}
""" + _APPLY_OP + r"""
local function is_live(expires_at)
  return expires_at == '' or NOW < tonumber(expires_at)
end

local function ckey(sequence)
  return BASE .. 'c:' .. sequence
end

local function op(kind, a, b, c)
  if GLOBAL ~= '' then
    apply_op(GLOBAL, kind, a, b or '', c or '')
  else
    OPS[#OPS + 1] = kind
    OPS[#OPS + 1] = a
    OPS[#OPS + 1] = b or ''
    OPS[#OPS + 1] = c or ''
  end
end

local function drop_item(key)
  if redis.call('HDEL', KEYS[6], key) == 0 then return 0 end
  redis.call('ZREM', KEYS[5], key)
  redis.call('ZREM', KEYS[7], key)
  redis.call('ZREM', KEYS[8], key)
  return 1
end

local function drop_owned_items(sequence)
  for _, key in ipairs(redis.call('ZRANGEBYSCORE', KEYS[7], sequence, sequence)) do
    drop_item(key)
  end
end

-- Removes one checkpoint from the log with its owned items; 1 if it was held.
local function drop_checkpoint(sequence)
  if redis.call('ZREM', KEYS[2], sequence) == 0 then return 0 end
  redis.call('ZREM', KEYS[3], sequence)
  redis.call('UNLINK', ckey(sequence))
  drop_owned_items(sequence)
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

-- Native expiry of the run-level keys: the run's expiry (or, with no run record, the latest
-- item expiry) plus a grace, so they never vanish before the data they index; PERSIST when
-- something in them never expires.
local function touch_run_keys()
  -- Without the manager's clock (delete calls) there is nothing to anchor a TTL at: keep the
  -- longer lifetime the keys have; liveness follows the exp field, and purging removes them.
  if not NOW then return end
  local expires_at = redis.call('HGET', KEYS[1], 'exp')
  if not expires_at then
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
  for index = 1, 8 do
    if ttl then redis.call('PEXPIRE', KEYS[index], ttl) else redis.call('PERSIST', KEYS[index]) end
  end
end

-- The earliest moment something of this run may expire (checkpoint, item or the run itself).
local function next_due()
  local due = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')[2]
  due = earlier(due, redis.call('ZRANGE', KEYS[8], 0, 0, 'WITHSCORES')[2])
  local expires_at = redis.call('HGET', KEYS[1], 'exp')
  if expires_at then due = earlier(due, expires_at) end
  return due
end

local function due_member(run_key)
  return redis.call('HGET', KEYS[1], 'm') or ('~' .. run_key)
end

-- Keep the global due index at or before the next expiry. Only ever moves it earlier, so a
-- steady stream of appends with the same TTL never touches the global index; purging moves it
-- later (exact = true).
local function schedule(run_key, exact)
  local due = next_due()
  local current = redis.call('HMGET', KEYS[4], 's', 'm')
  if not due then
    if exact and current[2] then
      redis.call('DEL', KEYS[4])
      op('due', current[2], '', '')
    end
    return
  end
  local member = due_member(run_key)
  if current[2] == member and not exact and tonumber(current[1]) <= tonumber(due) then return end
  if current[2] == member and current[1] == due then return end
  redis.call('HSET', KEYS[4], 's', due, 'm', member)
  if not current[2] then
    -- A new key: it lives as long as the run record, like every run-level key.
    local ttl = redis.call('PTTL', KEYS[1])
    if ttl > 0 then redis.call('PEXPIRE', KEYS[4], ttl) end
  end
  op('due', current[2] or '', member, due)
end

-- After checkpoints were removed: the run's expiry follows what it still holds.
local function settle_run(old_expiry)
  if not old_expiry then return end
  local expires_at = held_expiry()
  if expires_at ~= old_expiry then
    redis.call('HSET', KEYS[1], 'exp', expires_at)
    touch_run_keys()
  end
end

-- Drops index entries of checkpoints whose key Redis expired (or evicted).
local function drop_stale(stale, old_expiry, run_key)
  if #stale == 0 then return end
  for _, sequence in ipairs(stale) do drop_checkpoint(sequence) end
  settle_run(old_expiry)
  schedule(run_key, false)
end

local function run_fields()
  local f = redis.call('HMGET', KEYS[1], 'rid', 'inc', 'st', 'ct', 'ut', 'ls', 'exp', 'v', 'd')
  f[10] = redis.call('ZCARD', KEYS[2])
  return f
end

-- Everything of the run: checkpoints, owned items, record; unowned items unless kept.
local function drop_run(keep_unowned_items)
  local member = redis.call('HGET', KEYS[1], 'm')
  local scheduled = redis.call('HGET', KEYS[4], 'm')
  local sequences = redis.call('ZRANGE', KEYS[2], 0, -1)
  for _, sequence in ipairs(sequences) do
    redis.call('UNLINK', ckey(sequence))
    if keep_unowned_items then drop_owned_items(sequence) end
  end
  if keep_unowned_items then
    redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
  else
    redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8])
  end
  if member then op('forget', member) end
  if scheduled and scheduled ~= member then op('forget', scheduled) end
  return #sequences
end
"""

# ARGV[5..]: sequence, checkpoint id, created_at, expires_at, header, payload, data TTL ms,
# keep_latest, write token, then the seed run: run_id, incarnation, status, created_at,
# version, data, index member, run key.
_APPEND = r"""
local sequence, expires_at, token = ARGV[5], ARGV[8], ARGV[13]
local incarnation, run_key = ARGV[15], ARGV[22]
local head = redis.call('HMGET', KEYS[1], 'inc', 'ls', 'exp', 'st')
local status, old_expiry = head[4], head[3]
local created = false
if head[1] and is_live(head[3]) then
  if incarnation ~= head[1] or tonumber(sequence) ~= tonumber(head[2]) + 1 then
    -- A redis-py retry of this very append after a lost reply: it was applied.
    if incarnation == head[1] and sequence == head[2]
        and redis.call('HGET', KEYS[9], 'w') == token then
      return {{'ok', status}, OPS}
    end
    return {{'conflict', head[2], head[1]}, OPS}
  end
else
  if sequence ~= '0' then return {{'conflict', '', ''}, OPS} end
  if head[1] then drop_run(true) end
  redis.call('HSET', KEYS[1], 'rid', ARGV[14], 'inc', incarnation, 'st', ARGV[16],
    'ct', ARGV[17], 'v', ARGV[18], 'd', ARGV[19], 'm', ARGV[20], 'exp', expires_at)
  op('add', ARGV[20], ARGV[16])
  status, old_expiry, created = ARGV[16], nil, true
end

redis.call('DEL', KEYS[9])
redis.call('HSET', KEYS[9], 'i', ARGV[6], 't', ARGV[7], 'e', expires_at, 'h', ARGV[9],
  'p', ARGV[10], 'w', token)
if ARGV[11] ~= '' then redis.call('PEXPIRE', KEYS[9], ARGV[11]) end
redis.call('ZADD', KEYS[2], sequence, sequence)
if expires_at ~= '' then redis.call('ZADD', KEYS[3], expires_at, sequence) end
local run_expiry = expires_at
if not created then run_expiry = later(old_expiry, expires_at) end
redis.call('HSET', KEYS[1], 'ls', sequence, 'ut', NOW_S, 'exp', run_expiry)

-- Pruning: expired checkpoints first, then the oldest beyond keep_latest.
local removed = 0
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', NOW_S)) do
  removed = removed + drop_checkpoint(gone)
end
if ARGV[12] ~= '' then
  local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[12])
  if excess > 0 then
    for _, gone in ipairs(redis.call('ZRANGE', KEYS[2], 0, excess - 1)) do
      removed = removed + drop_checkpoint(gone)
    end
  end
end
if removed > 0 then
  run_expiry = held_expiry()
  redis.call('HSET', KEYS[1], 'exp', run_expiry)
end
if created or run_expiry ~= old_expiry then touch_run_keys() end
schedule(run_key, false)
return {{'ok', status}, OPS}
"""

# ARGV[5]: sequence (KEYS[9] is its key).
_GET = r"""
local head = redis.call('HMGET', KEYS[1], 'inc', 'exp', 'st')
if not head[1] or not is_live(head[2]) then return {{0}, OPS} end
local f = redis.call('HMGET', KEYS[9], 'i', 't', 'e', 'h', 'p')
if not f[1] or not is_live(f[3]) then return {{0}, OPS} end
return {{1, head[3], ARGV[5], f[1], f[2], f[3], f[4], f[5]}, OPS}
"""

# ARGV[5]: run key.
_LATEST = r"""
local head = redis.call('HMGET', KEYS[1], 'inc', 'exp', 'st')
if not head[1] or not is_live(head[2]) then return {{0}, OPS} end
local upper, stale, found = '+inf', {}, nil
while not found do
  local page = redis.call('ZREVRANGEBYSCORE', KEYS[2], upper, '-inf', 'LIMIT', 0, 16)
  if #page == 0 then break end
  for _, sequence in ipairs(page) do
    local f = redis.call('HMGET', ckey(sequence), 'i', 't', 'e', 'h', 'p')
    if not f[1] then
      stale[#stale + 1] = sequence
    elseif is_live(f[3]) then
      found = {1, head[3], sequence, f[1], f[2], f[3], f[4], f[5]}
      break
    end
  end
  upper = '(' .. page[#page]
end
drop_stale(stale, head[2], ARGV[5])
return {found or {0}, OPS}
"""

# ARGV[5..]: before ('' = from the newest), limit, include_expired ('1'/'0'), run key.
_HEADERS = r"""
local head = redis.call('HMGET', KEYS[1], 'inc', 'exp', 'st')
local include_expired = ARGV[7] == '1'
if not head[1] or (not include_expired and not is_live(head[2])) then return {{0}, OPS} end
local limit = tonumber(ARGV[6])
local upper = '+inf'
if ARGV[5] ~= '' then upper = '(' .. ARGV[5] end
local out, stale, count = {1, head[3]}, {}, 0
while count < limit do
  local page = redis.call('ZREVRANGEBYSCORE', KEYS[2], upper, '-inf', 'LIMIT', 0, limit - count)
  if #page == 0 then break end
  for _, sequence in ipairs(page) do
    local f = redis.call('HMGET', ckey(sequence), 'i', 't', 'e', 'h')
    if not f[1] then
      stale[#stale + 1] = sequence
    elseif include_expired or is_live(f[3]) then
      out[#out + 1] = sequence
      out[#out + 1] = f[1]
      out[#out + 1] = f[2]
      out[#out + 1] = f[3]
      out[#out + 1] = f[4]
      count = count + 1
      if count >= limit then break end
    end
  end
  upper = '(' .. page[#page]
end
drop_stale(stale, head[2], ARGV[8])
return {out, OPS}
"""

# ARGV[5..]: sequence, checkpoint id, run key (KEYS[9] is the checkpoint's key).
_DELETE = r"""
if redis.call('HGET', KEYS[9], 'i') ~= ARGV[6] then return {{0}, OPS} end
local old_expiry = redis.call('HGET', KEYS[1], 'exp')
local removed = drop_checkpoint(ARGV[5])
if removed == 0 then
  -- A checkpoint key the log does not hold (left over by a crashed client): remove it.
  redis.call('UNLINK', KEYS[9])
  return {{0}, OPS}
end
settle_run(old_expiry)
schedule(ARGV[7], false)
return {{removed}, OPS}
"""

_DELETE_RUN = r"""
return {{drop_run(false)}, OPS}
"""

_GET_RUN = r"""
return {run_fields(), OPS}
"""

# ARGV[5..]: incarnation, version, status, data, write token.
_UPDATE_RUN = r"""
local h = redis.call('HMGET', KEYS[1], 'inc', 'v', 'st', 'exp', 'm', 'tk')
if not h[1] or not is_live(h[4]) then return {{'missing'}, OPS} end
if h[1] ~= ARGV[5] or h[2] ~= ARGV[6] then
  -- A redis-py retry of this very update after a lost reply: it was applied.
  if h[1] == ARGV[5] and h[6] == ARGV[9] and tonumber(h[2]) == tonumber(ARGV[6]) + 1 then
    local fields = run_fields()
    table.insert(fields, 1, 'ok')
    return {fields, OPS}
  end
  return {{'conflict', h[1], h[2]}, OPS}
end
redis.call('HSET', KEYS[1], 'st', ARGV[7], 'd', ARGV[8], 'ut', NOW_S, 'tk', ARGV[9],
  'v', string.format('%d', tonumber(ARGV[6]) + 1))
if h[3] ~= ARGV[7] then op('move', h[5], h[3], ARGV[7]) end
local fields = run_fields()
table.insert(fields, 1, 'ok')
return {fields, OPS}
"""

# ARGV[5..]: create_only ('1'/'0'), run key, then (key, value, owner, expires_at) per item.
_PUT_ITEMS = r"""
if ARGV[5] == '1' then
  for index = 7, #ARGV, 4 do
    local key = ARGV[index]
    if redis.call('HEXISTS', KEYS[6], key) == 1 then
      local expires_at = redis.call('ZSCORE', KEYS[8], key)
      if not expires_at or NOW < tonumber(expires_at) then return {{'conflict', key}, OPS} end
    end
  end
end
for index = 7, #ARGV, 4 do
  local key, owner, expires_at = ARGV[index], ARGV[index + 2], ARGV[index + 3]
  drop_item(key)
  redis.call('HSET', KEYS[6], key, ARGV[index + 1])
  redis.call('ZADD', KEYS[5], 0, key)
  if owner ~= '' then redis.call('ZADD', KEYS[7], owner, key) end
  if expires_at ~= '' then redis.call('ZADD', KEYS[8], expires_at, key) end
end
touch_run_keys()
schedule(ARGV[6], false)
return {{'ok'}, OPS}
"""

# ARGV[5..]: item keys. Returns values then expiries, in key order; liveness is decided by
# the caller.
_GET_ITEMS = r"""
local keys = {}
for index = 5, #ARGV do keys[#keys + 1] = ARGV[index] end
local values = redis.call('HMGET', KEYS[6], unpack(keys))
local expiries = redis.call('ZMSCORE', KEYS[8], unpack(keys))
local out = {}
for index = 1, #keys do
  out[#out + 1] = values[index]
  out[#out + 1] = expiries[index]
end
return {out, OPS}
"""

# ARGV[5..]: lower bound, upper bound (ZRANGEBYLEX syntax), limit, reverse ('1'/'0').
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
      out[#out + 1] = key
      out[#out + 1] = redis.call('HGET', KEYS[6], key)
      count = count + 1
    end
  end
  if reverse then high = '(' .. keys[#keys] else low = '(' .. keys[#keys] end
end
return {out, OPS}
"""

# ARGV[5..]: item keys.
_DELETE_ITEMS = r"""
local removed = 0
for index = 5, #ARGV do removed = removed + drop_item(ARGV[index]) end
return {{removed}, OPS}
"""

# ARGV[5..]: budget, run key, the member the global due index listed.
# Returns {checkpoints removed, things removed}.
_PURGE_RUN = r"""
local budget, run_key, listed = tonumber(ARGV[5]), ARGV[6], ARGV[7]
local head = redis.call('HMGET', KEYS[1], 'inc', 'exp', 'm')
local scheduled = redis.call('HGET', KEYS[4], 'm')
if listed ~= scheduled and listed ~= head[3] then
  -- The due index names a run incarnation this slot no longer holds (its keys expired
  -- natively, or a client died before updating the index): forget it everywhere.
  op('forget', listed)
end
if head[1] and not is_live(head[2]) then
  local removed = drop_run(false)
  return {{removed, removed + 1}, OPS}
end
local removed, items = 0, 0
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', NOW_S, 'LIMIT', 0, budget)) do
  removed = removed + drop_checkpoint(gone)
end
if removed < budget then
  local expired = redis.call('ZRANGEBYSCORE', KEYS[8], '-inf', NOW_S, 'LIMIT', 0, budget - removed)
  for _, key in ipairs(expired) do items = items + drop_item(key) end
end
if removed > 0 then settle_run(head[2]) end
if head[1] or redis.call('EXISTS', KEYS[5]) == 1 then
  schedule(run_key, true)
elseif scheduled then
  redis.call('DEL', KEYS[4])
  op('forget', scheduled)
end
return {{removed, removed + items}, OPS}
"""

# Applies index operations on the global keys (KEYS[1] = <global base>all names the slot).
# ARGV[1]: global base; ARGV[2..]: quadruples as the run scripts return them.
INDEX = "#!lua\n" + _APPLY_OP + r"""
for index = 2, #ARGV, 4 do
  apply_op(ARGV[1], ARGV[index], ARGV[index + 1], ARGV[index + 2], ARGV[index + 3])
end
return #ARGV
"""

_BODIES = {
    "append": _APPEND,
    "get": _GET,
    "latest": _LATEST,
    "headers": _HEADERS,
    "delete": _DELETE,
    "delete_run": _DELETE_RUN,
    "get_run": _GET_RUN,
    "update_run": _UPDATE_RUN,
    "put_items": _PUT_ITEMS,
    "get_items": _GET_ITEMS,
    "scan_items": _SCAN_ITEMS,
    "delete_items": _DELETE_ITEMS,
    "purge_run": _PURGE_RUN,
}

WRITE_SCRIPTS = frozenset(
    {"append", "latest", "headers", "delete", "delete_run", "update_run", "put_items",
     "delete_items", "purge_run"}
)
"""Scripts that may write. The others carry ``no-writes`` so they also run on a full server."""

SCRIPTS = {
    name: ("#!lua\n" if name in WRITE_SCRIPTS else "#!lua flags=no-writes\n") + _PRELUDE + body
    for name, body in _BODIES.items()
}


def without_flags(script: str) -> str:
    """``script`` without its ``#!lua`` line, for servers that do not parse script flags.

    fakeredis (the tests' last resort when no redis-server exists) is one. Redis 7 itself
    always gets the flags: they make it refuse a write script before its first write when it
    is out of memory, instead of failing half-way.
    """
    first, _, rest = script.partition("\n")
    return rest if first.startswith("#!lua") else script
