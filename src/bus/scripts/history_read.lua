-- Reads a channel's position and some of its publications, as one snapshot.
-- KEYS[1] the history stream, KEYS[2] the channel's meta hash.
-- ARGV[1] most entries, ARGV[2] the bound: for mode 'before', the newest
--   entry id to include ('+' for the newest, '(N-0' for those before
--   offset N); for mode 'after', the oldest ('(N-0': those after offset N),
-- ARGV[3] meta TTL (ms), ARGV[4] a fresh random epoch (8 bytes),
-- ARGV[5] the mode: 'before' (newest first) or 'after' (oldest first).
-- Returns {epoch (8 bytes), latest offset, entries}.
-- No position, or one a failover may have cut short (epoch.lua, prepended
-- to this script): an epoch starts here, so that a later publication
-- continues the position this read reports.
local e = current_epoch(KEYS[1], KEYS[2], ARGV[4])
local top = tonumber(redis.call('HGET', KEYS[2], 's') or '0')
redis.call('PEXPIRE', KEYS[2], ARGV[3])
local entries
if ARGV[5] == 'after' then
  entries = redis.call('XRANGE', KEYS[1], ARGV[2], '+', 'COUNT', ARGV[1])
else
  entries = redis.call('XREVRANGE', KEYS[1], ARGV[2], '-', 'COUNT', ARGV[1])
end
return {e, top, entries}
