-- Appends a channel publication to the channel's history and publishes it,
-- atomically: the offset order is the pub/sub order on every node.
-- KEYS[1] the history stream, KEYS[2] the channel's meta hash
--   (e = epoch, 8 raw bytes; s = latest offset; r = see epoch.lua, which
--   is prepended to this script).
-- ARGV[1] the encoded Wire::Positioned without its last 16 bytes
--   (the position, appended here as epoch ‖ offset, both u64 LE)
-- ARGV[2] history size, ARGV[3] history TTL (ms), ARGV[4] meta TTL (ms),
-- ARGV[5] a fresh random epoch (8 bytes), used when the channel has none,
-- ARGV[6] the pub/sub channel, ARGV[7] the command that publishes on it
--   (PUBLISH, or SPUBLISH on a Redis Cluster; PUBLISH when absent).
-- Returns {position (16 bytes), subscribers that received it}.
local function le64(n)
  local b = {}
  for i = 1, 8 do
    b[i] = n % 256
    n = (n - b[i]) / 256
  end
  return string.char(unpack(b))
end

local e = current_epoch(KEYS[1], KEYS[2], ARGV[5])
local off = redis.call('HINCRBY', KEYS[2], 's', 1)
if off == 1 then
  -- A new epoch: a stream left from a lost one must never be served in it.
  redis.call('DEL', KEYS[1])
end
local msg = ARGV[1] .. e .. le64(off)
local added = redis.pcall('XADD', KEYS[1], 'MAXLEN', ARGV[2], string.format('%d-0', off), 'm', msg)
if type(added) == 'table' and added.err then
  -- The stream is ahead of the meta (restored from older data): the
  -- history cannot continue in this epoch, so a new one starts.
  e = ARGV[5]
  off = 1
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', e, 's', off)
  msg = ARGV[1] .. e .. le64(off)
  redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[2], '1-0', 'm', msg)
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
local n = redis.call(ARGV[7] or 'PUBLISH', ARGV[6], msg)
return {e .. le64(off), n}
