-- The routing entry of a client of a dead node (swept by another node,
-- CLUSTER.md "Sessions"): a session still attached to the dead node waits
-- for a resume from now; anything else is removed.
-- KEYS: 1 session record, 2 the routing index.
-- ARGV: 1 client id, 2 the dead node, 3 resume window (ms).
if redis.call('HGET', KEYS[1], 'n') == ARGV[2] then
  redis.call('HSET', KEYS[1], 'n', '')
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('HSET', KEYS[2], ARGV[1], '~')
  return 1
end
if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[2], ARGV[1])
end
return 0
