--[[
budget.lua: a client key's token and spend limits, reserved before a request's upstream call and
settled when its answer ends, atomically and in one round trip each. Redis' own clock (TIME) is
the only clock: days and months are UTC days and months of Redis time, on every host alike.

KEYS[1]  the key's budget, a hash                       "<prefix>:{<key name>}:budget"
         tpm, tpm_at   the tokens-per-minute bucket: tokens left (negative: a debt) and when
         day, day_tok, day_usd   the UTC day (days since 1970-01-01), its tokens and ticks
         mon, mon_usd            the UTC month (months since 1970-01), its ticks
         (1 USD = 10^10 ticks, as xAI counts cost_in_usd_ticks.)
ARGV[1]  "reserve" or "settle"
ARGV[2]  tokens per minute   ARGV[3] tokens per day   (0: no such limit)
ARGV[4]  ticks per day       ARGV[5] ticks per month  (0: no such limit)
ARGV[6]  tokens, ARGV[7] ticks: reserve: the request's worst case; settle: the truth minus
         what was reserved (negative: a refund)
ARGV[8]  settle: the day, ARGV[9] the month the reservation was made in. A day or a month that
         is over takes no refund and no extra debit: its count is gone.

A reservation is taken whole or not at all: every limit must cover it. Settling never refuses:
an answer that cost more than reserved puts the bucket into debt (the key waits it off).

Returns 12 integers (Redis truncates Lua numbers in replies):
  allowed      1, or 0 refused            refused_by   0, or which limit refused (see below)
  retry_ms     when refused: milliseconds until a retry could pass (-1: never)
  tpm_left     whole tokens in the bucket (-1: no such limit); tpm_reset_ms until it is full
  tpd_left     tokens left today, usd_day_left ticks left today, usd_mon_left this month (-1)
  day, mon     the day and month of this call
  left_tokens  before this reservation: the fewest tokens any token limit had left (-1: none);
  left_ticks   likewise the fewest ticks any dollar limit had left (-1: none)
refused_by: 1 tokens per minute, 2 tokens per day, 3 USD per day, 4 USD per month, 5 the
request alone is larger than a token limit, 6 its cost alone is larger than a dollar limit.
]]

local key = KEYS[1]
local tpm, tpd = tonumber(ARGV[2]), tonumber(ARGV[3])
local usd_day, usd_mon = tonumber(ARGV[4]), tonumber(ARGV[5])
local tokens, ticks = tonumber(ARGV[6]), tonumber(ARGV[7])

local t = redis.call('TIME')
local secs = tonumber(t[1])
local now = secs + tonumber(t[2]) / 1e6
local day = math.floor(secs / 86400)

-- Howard Hinnant's civil-from-days and days-from-civil, for the UTC month of a day number.
local function civil(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end
local function first_day(y, m)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + math.floor((153 * mp + 2) / 5)
  return era * 146097 + doe - 719468
end
local y, m = civil(day)
local mon = (y - 1970) * 12 + (m - 1)

local h = redis.call('HMGET', key, 'tpm', 'tpm_at', 'day', 'day_tok', 'day_usd', 'mon', 'mon_usd')
local bucket = tpm
if tpm > 0 and h[1] then
  bucket = math.min(tpm, tonumber(h[1]) + math.max(0, now - tonumber(h[2])) * tpm / 60)
end
local day_tok, day_usd, mon_usd = 0, 0, 0
if tonumber(h[3]) == day then day_tok, day_usd = tonumber(h[4]), tonumber(h[5]) end
if tonumber(h[6]) == mon then mon_usd = tonumber(h[7]) end

local function fewest(a, b) if a < 0 then return b elseif b < 0 then return a end return math.min(a, b) end
local left_tokens = fewest(tpm > 0 and bucket or -1, tpd > 0 and tpd - day_tok or -1)
local left_ticks = fewest(usd_day > 0 and usd_day - day_usd or -1,
                          usd_mon > 0 and usd_mon - mon_usd or -1)

local allowed, refused, retry = 1, 0, 0
if ARGV[1] == 'reserve' then
  local next_day = (day + 1) * 86400 - now
  local next_mon = first_day(m == 12 and y + 1 or y, m == 12 and 1 or m + 1) * 86400 - now
  if (tpm > 0 and tokens > tpm) or (tpd > 0 and tokens > tpd) then
    refused, retry = 5, -1
  elseif (usd_day > 0 and ticks > usd_day) or (usd_mon > 0 and ticks > usd_mon) then
    refused, retry = 6, -1
  elseif tpm > 0 and bucket < tokens then
    refused, retry = 1, (tokens - bucket) * 60 / tpm
  elseif tpd > 0 and day_tok + tokens > tpd then
    refused, retry = 2, next_day
  elseif usd_day > 0 and day_usd + ticks > usd_day then
    refused, retry = 3, next_day
  elseif usd_mon > 0 and mon_usd + ticks > usd_mon then
    refused, retry = 4, next_mon
  end
  if refused > 0 then allowed = 0 end
end

if allowed == 1 then
  local same_day = ARGV[1] == 'reserve' or tonumber(ARGV[8]) == day
  local same_mon = ARGV[1] == 'reserve' or tonumber(ARGV[9]) == mon
  if tpm > 0 then bucket = math.min(tpm, bucket - tokens) end
  if same_day then
    day_tok = math.max(0, day_tok + tokens)
    day_usd = math.max(0, day_usd + ticks)
  end
  if same_mon then mon_usd = math.max(0, mon_usd + ticks) end
  local function n(x) return string.format('%.17g', x) end  -- every digit (Lua's own: 14)
  redis.call('HSET', key, 'tpm', n(bucket), 'tpm_at', n(now), 'day', day, 'day_tok', n(day_tok),
             'day_usd', n(day_usd), 'mon', mon, 'mon_usd', n(mon_usd))
  redis.call('EXPIRE', key, 35 * 86400)  -- past any month: a key unused that long owes nothing
end

local function left(limit, used) if limit > 0 then return math.max(0, limit - used) end return -1 end
local tpm_left, tpm_reset = -1, 0
if tpm > 0 then
  tpm_left = math.max(0, math.floor(bucket))
  tpm_reset = (tpm - bucket) * 60 / tpm * 1000
end
if retry > 0 then retry = math.ceil(retry * 1000) end
return {allowed, refused, retry, tpm_left, math.ceil(tpm_reset), left(tpd, day_tok),
        left(usd_day, day_usd), left(usd_mon, mon_usd), day, mon, math.floor(left_tokens),
        math.floor(left_ticks)}
