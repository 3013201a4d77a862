-- Resumes a session on this node (CLUSTER.md "Sessions"): compare the
-- generation and user, move the session and its routing entry here, and
-- take its stored messages, in one step. Of two connections presenting the
-- same token, the first to run this wins; the other finds the generation
-- moved on.
-- KEYS: 1 session record, 2 its inbox, 3 the routing index.
-- ARGV: 1 client id, 2 the token's generation, 3 the user ('' anonymous),
-- 4 this node, 5 record lifetime while attached (ms).
-- Returns {0} gone, {1} used, {2} wrong user, or
-- {3, new generation, previous node or '', stored messages}.
local s = redis.call('HMGET', KEYS[1], 'u', 'g', 'n')
if not s[2] then
  return {0}
end
if s[1] ~= ARGV[3] then
  return {2}
end
if s[2] ~= ARGV[2] then
  return {1}
end
local g = redis.call('HINCRBY', KEYS[1], 'g', 1)
redis.call('HSET', KEYS[1], 'n', ARGV[4], 'b', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
local stored = redis.call('LRANGE', KEYS[2], 0, -1)
redis.call('DEL', KEYS[2])
return {3, g, s[3] or '', stored}
