-- Prepended to the scripts that read or extend a channel's history
-- (CLUSTER.md "History across failovers").
--
-- Which epoch a channel's history goes on in, on this server. The meta
-- hash keeps, beside the epoch (e) and the latest offset (s), the
-- replication id of the server that last wrote it (r). When that is not
-- this server's and this server was promoted since (it has a previous
-- replication id: it was a replica), the history may have lost its last
-- entries with the old master (asynchronous replication, or writes the
-- old master took after the promotion), and reusing their offsets would
-- make subscribers drop new publications as already seen: a new epoch
-- starts instead, so that whoever follows the old one is told. A server
-- restarted from its own disk has a new id but no previous one: its
-- history goes on.
-- Returns the epoch; a new one starts with offset 0 and an empty stream.
local function current_epoch(stream, meta, fresh)
  local info = redis.call('INFO', 'replication')
  local id = string.match(info, 'master_replid:(%x+)') or ''
  local before = string.match(info, 'master_replid2:(%x+)') or ''
  local m = redis.call('HMGET', meta, 'e', 'r')
  local e, r = m[1], m[2]
  -- (A meta from before this check has no r: on a promoted server it
  -- counts as another server's.)
  if e and r ~= id and not string.match(before, '^0*$') then
    e = nil
  end
  if not e then
    redis.call('DEL', stream)
    redis.call('HSET', meta, 'e', fresh, 's', 0, 'r', id)
    return fresh
  end
  if r ~= id then
    redis.call('HSET', meta, 'r', id)
  end
  return e
end

