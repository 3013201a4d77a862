-- Stores a direct message for a session that waits for a resume
-- (CLUSTER.md "Sessions"); run from the sending node's write queue, so one
-- sender's messages are stored in the order it sent them.
-- KEYS: 1 session record, 2 its inbox, 3 the routing index.
-- ARGV: 1 the encoded message, 2 most messages, 3 most bytes, 4 liveness
-- key prefix of nodes ('' on a Redis Cluster: not checked here), 5 resume window (ms), 6 client id.
-- Returns {0} gone, {1, ms left} stored, {2} full, {3, node} attached to a
-- live node.
local s = redis.call('HMGET', KEYS[1], 'n', 'b')
if not s[1] then
  -- A routing entry left by a session that ended is removed here.
  if redis.call('HGET', KEYS[3], ARGV[6]) == '~' then
    redis.call('HDEL', KEYS[3], ARGV[6])
  end
  return {0}
end
local n = s[1]
if n ~= '' then
  -- On a Redis Cluster (ARGV[4] empty) the node's liveness key is in
  -- another slot: the caller finds out whether it lives.
  if ARGV[4] == '' or redis.call('EXISTS', ARGV[4] .. n) == 1 then
    return {3, n}
  end
  -- Its node died without detaching it: it waits for a resume from now.
  redis.call('HSET', KEYS[1], 'n', '')
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  redis.call('HSET', KEYS[3], ARGV[6], '~')
end
if redis.call('LLEN', KEYS[2]) >= tonumber(ARGV[2])
  or tonumber(s[2] or '0') + #ARGV[1] > tonumber(ARGV[3]) then
  return {2}
end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'b', #ARGV[1])
local left = redis.call('PTTL', KEYS[1])
redis.call('PEXPIRE', KEYS[2], left)
return {1, left}
