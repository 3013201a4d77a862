-- A connection with a session left its node (CLUSTER.md "Sessions").
-- KEYS: 1 session record, 2 its inbox, 3 the routing index.
-- ARGV: 1 client id, 2 this node, 3 'detach' or 'end', 4 the connection's
-- generation, 5 resume window (ms).
-- Only a connection still holding the session's current generation, on the
-- node the session is attached to, detaches or ends it: one that was taken
-- over (the session resumed elsewhere) leaves the session alone, and
-- removes the routing entry only if it is still its own.
local s = redis.call('HMGET', KEYS[1], 'g', 'n')
if s[1] == ARGV[4] and s[2] == ARGV[2] then
  if ARGV[3] == 'detach' then
    redis.call('HSET', KEYS[1], 'n', '')
    redis.call('PEXPIRE', KEYS[1], ARGV[5])
    redis.call('PEXPIRE', KEYS[2], ARGV[5])
    redis.call('HSET', KEYS[3], ARGV[1], '~')
    return 1
  end
  redis.call('DEL', KEYS[1], KEYS[2])
end
if redis.call('HGET', KEYS[3], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[3], ARGV[1])
end
return 0
