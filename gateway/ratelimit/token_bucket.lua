--[[
token_bucket.lua: take one token from a client key's bucket and, for a stream, one concurrency
lease, atomically and in one round trip. Redis' own clock (TIME) is the only clock, so gateway
hosts whose clocks disagree still share one exact limit.

KEYS[1]  the bucket, a hash {tokens, at}                "<prefix>:{<key name>}:bucket"
KEYS[2]  open streams, a sorted set lease id -> expiry  "<prefix>:{<key name>}:streams"
         (expiry in milliseconds of Redis time). Both keys carry one hash tag (the key name),
         so they sit in one Redis Cluster slot and this script may touch both.
ARGV[1]  refill rate, tokens per second (requests_per_minute / 60)
ARGV[2]  capacity, tokens (burst)
ARGV[3]  "1" when the request is a stream and needs a lease, "0" otherwise
ARGV[4]  maximum simultaneous streams (max_concurrent_streams)
ARGV[5]  lease time, milliseconds; a lease not renewed within it expires
ARGV[6]  the id of the lease to add when a stream is admitted (unique per process and stream).
         A stream whose lease is in the set already is admitted again and takes nothing: its
         check ran, and its reply was lost (a reset connection), so the gateway sent it again.

Returns {allowed, remaining, reset_us, retry_us, refused_by}, all integers (Redis truncates Lua
numbers in replies, hence microseconds):
  allowed     1 admitted, 0 refused
  remaining   whole tokens left
  reset_us    microseconds until the bucket is full again
  retry_us    when refused: microseconds until a retry can succeed
  refused_by  0 admitted, 1 refused by the request rate, 2 refused by the concurrency cap

The concurrency cap is checked first, so a refusal by the cap takes no token. State expires by
itself: the bucket when it would be full again (a missing bucket is a full one), the streams set
one lease time after its newest lease or renewal.

Needs Redis >= 5 (effects replication: TIME before a write is allowed in a script).
]]

local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local is_stream = ARGV[3] == '1'
local max_streams = tonumber(ARGV[4])
local lease_ms = tonumber(ARGV[5])

local time = redis.call('TIME')
local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
local now_ms = math.floor(now_us / 1000)

local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = capacity
else
  tokens = math.min(capacity, tokens + math.max(0, now_us - at) / 1000000 * rate)
end

local function until_full_us(left)
  return math.ceil((capacity - left) / rate * 1000000)
end

if is_stream then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)
  if redis.call('ZSCORE', KEYS[2], ARGV[6]) then
    redis.call('ZADD', KEYS[2], now_ms + lease_ms, ARGV[6])
    return {1, math.floor(tokens), until_full_us(tokens), 0, 0}
  end
  if redis.call('ZCARD', KEYS[2]) >= max_streams then
    -- A slot frees when a stream ends, which no clock predicts: suggest a short wait.
    return {0, math.floor(tokens), until_full_us(tokens), 1000000, 2}
  end
end

if tokens < 1 then
  return {0, 0, until_full_us(tokens), math.ceil((1 - tokens) / rate * 1000000), 1}
end

tokens = tokens - 1
-- %.17g: Lua's default number format keeps 14 digits, too few for a microsecond timestamp.
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'at', string.format('%.17g', now_us))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) / rate * 1000) + 1)
if is_stream then
  redis.call('ZADD', KEYS[2], now_ms + lease_ms, ARGV[6])
  if redis.call('PTTL', KEYS[2]) < lease_ms then
    redis.call('PEXPIRE', KEYS[2], lease_ms)
  end
end
return {1, math.floor(tokens), until_full_us(tokens), 0, 0}
