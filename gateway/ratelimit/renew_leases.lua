--[[
renew_leases.lua: push back the expiry of the concurrency leases one process holds on one client
key's streams set (see token_bucket.lua), while their streams run. Redis' TIME is the clock.

KEYS[1]    open streams, a sorted set lease id -> expiry ms  "<prefix>:{<key name>}:streams"
ARGV[1]    lease time, milliseconds
ARGV[2..]  the ids of the leases this process holds there

Returns the ids of the leases that were gone (released, pruned, or lost with a restart).

ZADD XX only updates leases that are still there: a lease released (ZREM) while this call was on
its way, or already pruned after expiring, stays gone, so a renewal racing a release can never
bring a finished stream's slot back. The set's own expiry moves with its newest lease.
]]

local time = redis.call('TIME')
local expiry = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000) + tonumber(ARGV[1])
local gone = {}
for i = 2, #ARGV do
  if redis.call('ZADD', KEYS[1], 'XX', 'CH', expiry, ARGV[i]) == 0
      and not redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    gone[#gone + 1] = ARGV[i]
  end
end
-- Only ever lengthen the set's life: a process configured with a longer lease may share it.
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return gone
