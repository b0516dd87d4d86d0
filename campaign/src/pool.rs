//! The packet pool: where a live campaign's packets wait to be grabbed, and the grab's commit
//! point.
//!
//! [`PacketPool`] is the port; [`RedisPool`] implements it with one atomic Lua script per grab.
//! All keys of a campaign share the hash tag `{c:ID}`, so every script touches one slot.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:{c:ID}:meta` | hash | `state`, `starts`, `ends`, `limit`, `currency`, `cid`, `left`, `left_amount`, `rv` (the load's mark), `mv` (mends applied) |
//! | `P:{c:ID}:b:K` | list | bucket K's packets as `seq:amount` (packet `seq` is in bucket `seq % buckets`) |
//! | `P:{c:ID}:u:K` | hash | user → `claim:amount[,claim:amount…]` for users whose home bucket is K |
//! | `P:{c:ID}:pending` | hash | claim → `user:seq:amount:grabbed_at_ms`, until the claim is recorded in the database |
//! | `P:{c:ID}:h:K` | stream | the hand-off: one entry per grab from bucket K, read by the relay |
//! | `P:{c:ID}:ret` | hash | claim → `1`/`0`: whether a compensated claim's packet went back to the pool |
//! | `P:handoff:streams` | set | every hand-off stream, for the relay to find |
//! | `P:pool:loads` | counter | loads and rebuilds, part of each pool's `rv` |
//!
//! A user's home bucket is `fnv1a(user) % buckets`; the grab pops from it first and moves on
//! to the next buckets when it is empty. The user's claims are always recorded in the home
//! bucket's hash, so the per-user limit is exact whichever bucket the packet came from.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script, Value};
use redpacket_common::redis_settings::Durability;

/// Packets pushed per command when loading a pool.
const LOAD_CHUNK: usize = 10_000;
/// Packets pushed per round trip when loading a pool (a few milliseconds of Redis's time).
const LOAD_TRIP: usize = 50_000;

/// What the pool needs to know about a campaign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolCampaign {
    pub id: i64,
    pub currency: String,
    pub starts_at_ms: i64,
    pub ends_at_ms: i64,
    pub per_user_limit: u32,
    pub buckets: u32,
}

/// The answer of the commit point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrabOutcome {
    /// A packet is the user's; the claim is in the hand-off.
    Granted {
        seq: u32,
        amount: i64,
        currency: String,
        /// This grab took the last packet: the campaign is exhausted.
        last: bool,
    },
    /// The pool has not been loaded (not funded, or not yet near its start).
    NotLoaded,
    NotStarted,
    Ended,
    SoldOut,
    Cancelled,
    /// The user already holds `per_user_limit` claims: `(claim id, amount)` of each.
    LimitReached {
        claims: Vec<(String, i64)>,
    },
}

/// The pool's view of a campaign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSnapshot {
    pub state: String,
    pub packets_left: i64,
    pub amount_left: i64,
}

/// The outcome of cancelling in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Not loaded: the database alone decides.
    NotLoaded,
    Cancelled,
    /// The start has passed: too late to cancel.
    AlreadyStarted,
}

/// A claim granted by the pool and not yet recorded in the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingClaim {
    pub claim_id: String,
    pub user_id: String,
    pub seq: u32,
    pub amount: i64,
    pub grabbed_at_ms: i64,
}

/// What a pool holds of one campaign, read in one atomic step, for a repair to compare with
/// the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolInventory {
    /// The meta hash's `state`.
    pub state: String,
    /// The meta hash's counters.
    pub left: i64,
    pub left_amount: i64,
    /// Every item of every bucket as `(seq, amount)`, duplicates kept; an item that is not
    /// `seq:amount` is kept as its text in `unreadable`.
    pub packets: Vec<(u32, i64)>,
    pub unreadable: Vec<String>,
    /// The claims granted and not yet recorded in the database (or whose pending copy was
    /// not dropped yet).
    pub pending: Vec<PendingClaim>,
    /// The compensated claims whose packet went back to a bucket (`ret` = `1`): such a claim
    /// no longer holds its packet, whatever the database says yet.
    pub returned: std::collections::HashSet<String>,
    /// What a mend checks has not moved since: see [`PacketPool::mend`].
    pub version: PoolVersion,
}

/// The marks of a pool that move whenever a packet may have come back to it by another path
/// than a grab's pop: a return of a compensated claim (the `ret` hash only grows), a mend
/// (`mv`, counted), a new load or rebuild (`rv`, the load's clock and a load counter, new with
/// the meta hash). `mends` holds `rv/mv`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolVersion {
    pub returns: i64,
    pub mends: String,
}

/// What [`PacketPool::inventory`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inventory {
    /// No meta hash: never loaded, or lost.
    NotLoaded,
    /// The pool was not read, with the reason (too large to read at once, or a pool whose
    /// packets and claims live in the database's own transactions).
    NotInspected(String),
    Held(PoolInventory),
}

/// One correction of a pool, decided from an inventory and the database read after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mend {
    /// A packet no claim holds is in no bucket: it goes back, unless it is in a bucket or a
    /// pending claim holds it by the time of the mend.
    Add { seq: u32, amount: i64 },
    /// A packet a claim holds is in a bucket: it leaves, unless that claim's packet was
    /// returned meanwhile (a compensation racing the repair).
    Held {
        seq: u32,
        amount: i64,
        claim: String,
    },
    /// An item that is no packet of the campaign (unknown seq or another amount): it leaves.
    Foreign { seq: u32, amount: i64 },
    /// A packet no claim holds is in the buckets more than once (`copies` times in the
    /// inventory): one copy stays, unless a grab took a copy since the inventory or a pending
    /// claim holds the packet at the moment of the mend, when every copy leaves.
    Duplicate { seq: u32, amount: i64, copies: u32 },
    /// An item that is not `seq:amount`: it leaves.
    Unreadable { item: String },
}

/// What a mend did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MendOutcome {
    /// Applied: packets added and items removed; the counters are exact again.
    Mended { added: u32, removed: u32 },
    /// The pool moved since the inventory (a return, another mend, a rebuild): nothing done.
    Moved,
    /// The pool is no longer live (exhausted, expired or cancelled, with its state): nothing
    /// done, since a mend never reopens an ended pool.
    NotLive(String),
}

/// A failure of the pool's backing store.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("the pool answered something unexpected: {0}")]
    Protocol(String),
    #[error("local pool: {0}")]
    Local(String),
    /// Redis is set to lose what the pool keeps (see `redpacket_common::redis_settings`).
    #[error("{0}")]
    Settings(String),
}

/// Where live packets are kept and grabbed. The campaign service does not know which
/// implementation it runs on.
#[async_trait::async_trait]
pub trait PacketPool: Send + Sync + std::fmt::Debug {
    /// Loads the packets (`packets[seq]` is packet `seq`'s amount) unless the pool is already
    /// loaded; returns whether it loaded them now.
    async fn load(&self, campaign: &PoolCampaign, packets: &[i64]) -> Result<bool, PoolError>;

    /// Rebuilds a pool its store lost (a Redis restarted without persistence, failed over or
    /// flushed) from the database's view: the packets no claim holds, and every user's claims
    /// for the per-user limit. Writes nothing and answers false when the pool is there.
    async fn rebuild(
        &self,
        campaign: &PoolCampaign,
        contents: &crate::store::PoolContents,
    ) -> Result<bool, PoolError>;

    /// The atomic grab: window, state, per-user limit, pop, claim record and hand-off entry.
    async fn grab(
        &self,
        campaign: &PoolCampaign,
        user_id: &str,
        claim_id: &str,
        now_ms: i64,
        request_id: &str,
    ) -> Result<GrabOutcome, PoolError>;

    /// The pool's counters, or `None` when not loaded.
    async fn snapshot(&self, campaign_id: i64) -> Result<Option<PoolSnapshot>, PoolError>;

    /// Cancels before the start, atomically with respect to grabs.
    async fn cancel(
        &self,
        campaign: &PoolCampaign,
        now_ms: i64,
    ) -> Result<CancelOutcome, PoolError>;

    /// Stops grabs for good (the end passed) and returns the final counters.
    async fn close(&self, campaign_id: i64) -> Result<Option<PoolSnapshot>, PoolError>;

    /// Puts a compensated claim's packet back while the campaign is live; once it ended the
    /// packet stays out (the refund returns its money). Idempotent per claim: a retry answers
    /// what the first call did. Returns whether the packet went back to the pool.
    async fn return_packet(
        &self,
        campaign: &PoolCampaign,
        claim_id: &str,
        seq: u32,
        amount: i64,
    ) -> Result<bool, PoolError>;

    /// A granted claim not yet recorded in the database.
    async fn pending_claim(
        &self,
        campaign_id: i64,
        claim_id: &str,
    ) -> Result<Option<PendingClaim>, PoolError>;

    /// Drops the pending copies of claims of one campaign once they are in the database.
    async fn forget_pending(&self, campaign_id: i64, claim_ids: &[&str]) -> Result<(), PoolError>;

    /// Forgets a settled campaign's pool: every key of it, the hand-off streams and their
    /// registry entries included. Only once no grab can happen and the hand-off is relayed.
    async fn purge(&self, campaign: &PoolCampaign) -> Result<(), PoolError>;

    /// Reads the whole pool of a campaign in one atomic step, unless it holds more than
    /// `max_items` packets or pending claims (a repair reads it whole).
    async fn inventory(
        &self,
        campaign: &PoolCampaign,
        max_items: usize,
    ) -> Result<Inventory, PoolError>;

    /// Applies corrections decided from an inventory, in one atomic step, only if the pool's
    /// `version` is still the inventory's; sets the counters to what the buckets hold (the
    /// inventory's drift of the counters from the buckets, `drift`, is taken out). Each
    /// correction checks again what it needs, so no packet can be given twice.
    async fn mend(
        &self,
        campaign: &PoolCampaign,
        version: &PoolVersion,
        drift: (i64, i64),
        mends: &[Mend],
    ) -> Result<MendOutcome, PoolError>;

    /// Whether the store answers.
    /// Whether the pool answers, and what an operator should know about its store.
    async fn ping(&self) -> Result<String, PoolError>;
}

/// FNV-1a: a stable hash for a user's home bucket (the same in every process and version).
pub fn home_bucket(user_id: &str, buckets: u32) -> u32 {
    u32::try_from(fnv1a(user_id) % u64::from(buckets.max(1))).unwrap_or(0)
}

/// FNV-1a of a string: stable across processes and versions, unlike the standard hasher.
pub fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

const GRAB_SCRIPT: &str = r"
-- KEYS: meta, home users hash, pending, B buckets (home first), B streams (same order)
-- ARGV: user, now_ms, claim_id, request_id
local m = redis.call('HMGET', KEYS[1], 'state', 'starts', 'ends', 'limit', 'currency', 'cid')
local state = m[1]
if not state then return {'not_loaded'} end
if state == 'cancelled' then return {'cancelled'} end
if state == 'expired' then return {'ended'} end
local now = tonumber(ARGV[2])
if now < tonumber(m[2]) then return {'not_started'} end
if now >= tonumber(m[3]) then return {'ended'} end
local mine = redis.call('HGET', KEYS[2], ARGV[1])
if mine then
  local _, commas = string.gsub(mine, ',', ',')
  if commas + 1 >= tonumber(m[4]) then return {'limit', mine} end
end
if state == 'exhausted' then return {'sold_out'} end
local b = (#KEYS - 3) / 2
for i = 1, b do
  local packet = redis.call('LPOP', KEYS[3 + i])
  if packet then
    local sep = string.find(packet, ':', 1, true)
    local seq = string.sub(packet, 1, sep - 1)
    local amount = string.sub(packet, sep + 1)
    local entry = ARGV[3] .. ':' .. amount
    if mine then entry = mine .. ',' .. entry end
    redis.call('HSET', KEYS[2], ARGV[1], entry)
    redis.call('HSET', KEYS[3], ARGV[3], ARGV[1] .. ':' .. seq .. ':' .. amount .. ':' .. ARGV[2])
    redis.call('XADD', KEYS[3 + b + i], '*', 'claim', ARGV[3], 'campaign', m[6], 'user', ARGV[1],
      'seq', seq, 'amount', amount, 'currency', m[5], 'at', ARGV[2], 'rid', ARGV[4])
    local left = redis.call('HINCRBY', KEYS[1], 'left', -1)
    redis.call('HINCRBY', KEYS[1], 'left_amount', '-' .. amount)
    local last = '0'
    if left <= 0 then
      redis.call('HSET', KEYS[1], 'state', 'exhausted')
      last = '1'
    end
    return {'ok', seq, amount, m[5], last}
  end
end
redis.call('HSET', KEYS[1], 'state', 'exhausted')
return {'sold_out'}
";

const LOAD_META_SCRIPT: &str = r"
-- KEYS: meta, stream registry, load counter, streams...; ARGV: field/value pairs of meta, the
-- last one `rv` with the wall clock's microseconds
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
-- The mark of this load: the counter makes it differ from every earlier load's even when two
-- loads read the same clock (or a clock that went back); the clock makes it differ even when
-- the counter was lost with the Redis that held the earlier pool.
redis.call('HSET', KEYS[1], 'rv', ARGV[#ARGV] .. '-' .. redis.call('INCR', KEYS[3]))
for i = 4, #KEYS do redis.call('SADD', KEYS[2], KEYS[i]) end
return 1
";

const CANCEL_SCRIPT: &str = r"
-- KEYS: meta; ARGV: now_ms
local m = redis.call('HMGET', KEYS[1], 'state', 'starts')
if not m[1] then return 'not_loaded' end
if m[1] == 'cancelled' then return 'cancelled' end
if tonumber(ARGV[1]) >= tonumber(m[2]) or m[1] ~= 'scheduled' then return 'started' end
redis.call('HSET', KEYS[1], 'state', 'cancelled')
return 'cancelled'
";

const CLOSE_SCRIPT: &str = r"
-- KEYS: meta
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
if state == 'scheduled' or state == 'active' then
  redis.call('HSET', KEYS[1], 'state', 'expired')
end
return redis.call('HMGET', KEYS[1], 'state', 'left', 'left_amount')
";

const RETURN_SCRIPT: &str = r"
-- KEYS: meta, ret, bucket, pending; ARGV: claim, 'seq:amount', amount, now_ms
local done = redis.call('HGET', KEYS[2], ARGV[1])
if done then return done end
redis.call('HDEL', KEYS[4], ARGV[1])
local m = redis.call('HMGET', KEYS[1], 'state', 'ends')
local live = m[1] and (m[1] == 'scheduled' or m[1] == 'active') and tonumber(ARGV[4]) < tonumber(m[2])
if not live then
  redis.call('HSET', KEYS[2], ARGV[1], '0')
  return '0'
end
redis.call('RPUSH', KEYS[3], ARGV[2])
redis.call('HINCRBY', KEYS[1], 'left', 1)
redis.call('HINCRBY', KEYS[1], 'left_amount', ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], '1')
return '1'
";

const INVENTORY_SCRIPT: &str = r"
-- KEYS: meta, pending, ret, buckets...; ARGV: max_items
local m = redis.call('HMGET', KEYS[1], 'state', 'left', 'left_amount', 'rv', 'mv')
if not m[1] then return {'not_loaded'} end
local total = redis.call('HLEN', KEYS[2]) + redis.call('HLEN', KEYS[3])
for i = 4, #KEYS do total = total + redis.call('LLEN', KEYS[i]) end
if total > tonumber(ARGV[1]) then return {'too_large', tostring(total)} end
local packets = {}
for i = 4, #KEYS do
  for _, item in ipairs(redis.call('LRANGE', KEYS[i], 0, -1)) do packets[#packets + 1] = item end
end
return {'ok', m[1], m[2] or '0', m[3] or '0', (m[4] or '') .. '/' .. (m[5] or '0'),
  tostring(redis.call('HLEN', KEYS[3])),
  packets, redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[3])}
";

const MEND_SCRIPT: &str = r"
-- KEYS: meta, pending, ret, buckets...
-- ARGV: returns, rv, drift_count, drift_amount, then (op, seq, amount, bucket, extra)...
-- extra: the claim of a `held`, the copies the inventory saw of a `dup`, the item of an
-- `unreadable`.
local m = redis.call('HMGET', KEYS[1], 'state', 'rv', 'left', 'left_amount', 'mv')
if not m[1] then return {'moved'} end
local version = (m[2] or '') .. '/' .. (m[5] or '0')
if tostring(redis.call('HLEN', KEYS[3])) ~= ARGV[1] or version ~= ARGV[2] then
  return {'moved'}
end
-- Only a live pool is mended: an ended pool's packets are the refund's, and a mend never
-- reopens what the last grab, the close or a cancel ended.
if m[1] ~= 'scheduled' and m[1] ~= 'active' then return {'not_live', m[1]} end
local held = {}
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do
  local seq = string.match(v, '^[^:]*:([^:]*):')
  if seq then held[seq] = true end
end
-- Every bucket is read once (the pool was bounded by the inventory, and only a return, a
-- load or a mend, each of which moves the version, can grow it): the copies of each item now,
-- and the lists to filter.
local lists, copies = {}, {}
for j = 4, #KEYS do
  local items = redis.call('LRANGE', KEYS[j], 0, -1)
  lists[j] = items
  for _, item in ipairs(items) do copies[item] = (copies[item] or 0) + 1 end
end
local count = tonumber(m[3] or '0') - tonumber(ARGV[3])
local amount = tonumber(m[4] or '0') - tonumber(ARGV[4])
local added, removed = 0, 0
local keep, worth, adds = {}, {}, {}
for i = 5, #ARGV, 5 do
  local op, seq, amt, extra = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 4]
  local item = seq .. ':' .. ARGV[i + 2]
  if op == 'add' then
    if not held[seq] and not copies[item] then
      copies[item] = 1
      adds[#adds + 1] = {KEYS[4 + tonumber(ARGV[i + 3])], item, amt}
    end
  elseif op == 'held' then
    if redis.call('HGET', KEYS[3], extra) ~= '1' then keep[item] = 0; worth[item] = amt end
  elseif op == 'foreign' then
    keep[item] = 0; worth[item] = amt
  elseif op == 'dup' then
    -- One copy stays only if no grab took one since the inventory (as many copies as then)
    -- and no pending claim holds the packet: the copy left would otherwise be granted twice.
    if held[seq] or (copies[item] or 0) < tonumber(extra) then keep[item] = 0 else keep[item] = 1 end
    worth[item] = amt
  elseif op == 'unreadable' then
    keep[extra] = 0; worth[extra] = 0
  end
end
for j = 4, #KEYS do
  local kept, changed = {}, false
  for _, item in ipairs(lists[j]) do
    local k = keep[item]
    if k == nil then
      kept[#kept + 1] = item
    elseif k > 0 then
      keep[item] = k - 1
      kept[#kept + 1] = item
    else
      changed = true
      removed = removed + 1
      count = count - 1
      amount = amount - worth[item]
    end
  end
  if changed then
    redis.call('DEL', KEYS[j])
    for s = 1, #kept, 1000 do
      redis.call('RPUSH', KEYS[j], unpack(kept, s, math.min(s + 999, #kept)))
    end
  end
end
for _, add in ipairs(adds) do
  redis.call('RPUSH', add[1], add[2])
  added = added + 1
  count = count + 1
  amount = amount + add[3]
end
if count <= 0 then redis.call('HSET', KEYS[1], 'state', 'exhausted') end
redis.call('HSET', KEYS[1], 'left', count, 'left_amount', amount)
redis.call('HINCRBY', KEYS[1], 'mv', 1)
return {'mended', tostring(added), tostring(removed)}
";

/// The key names of one campaign, computed once.
#[derive(Debug)]
struct CampaignKeys {
    meta: String,
    pending: String,
    returned: String,
    users: Vec<String>,
    buckets: Vec<String>,
    streams: Vec<String>,
}

/// The packet pool on Redis.
#[derive(Clone)]
pub struct RedisPool {
    connection: ConnectionManager,
    prefix: Arc<str>,
    keys: Arc<RwLock<HashMap<i64, Arc<CampaignKeys>>>>,
    grab_script: Arc<Script>,
    load_meta_script: Arc<Script>,
    cancel_script: Arc<Script>,
    close_script: Arc<Script>,
    return_script: Arc<Script>,
    inventory_script: Arc<Script>,
    mend_script: Arc<Script>,
}

impl std::fmt::Debug for RedisPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPool")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisPool {
    /// Connects (the connection reconnects by itself) with every key under `prefix`.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, PoolError> {
        let client = redis::Client::open(url)?;
        let connection = client.get_connection_manager().await?;
        // A Redis that evicts keys would drop claims and answered grabs without a word.
        Durability::check(&mut connection.clone())
            .await
            .map_err(PoolError::Settings)?;
        Ok(RedisPool {
            connection,
            prefix: prefix.into(),
            keys: Arc::default(),
            grab_script: Arc::new(Script::new(GRAB_SCRIPT)),
            load_meta_script: Arc::new(Script::new(LOAD_META_SCRIPT)),
            cancel_script: Arc::new(Script::new(CANCEL_SCRIPT)),
            close_script: Arc::new(Script::new(CLOSE_SCRIPT)),
            return_script: Arc::new(Script::new(RETURN_SCRIPT)),
            inventory_script: Arc::new(Script::new(INVENTORY_SCRIPT)),
            mend_script: Arc::new(Script::new(MEND_SCRIPT)),
        })
    }

    /// Writes a pool's meta hash unless there is one, which opens it to grabs; registers its
    /// hand-off streams. True when it wrote it.
    async fn write_meta(
        &self,
        campaign: &PoolCampaign,
        keys: &CampaignKeys,
        state: &str,
        left: usize,
        left_amount: i64,
    ) -> Result<bool, PoolError> {
        let mut invocation = self.load_meta_script.key(&keys.meta);
        invocation
            .key(self.stream_registry_key())
            .key(format!("{}:pool:loads", self.prefix));
        for stream in &keys.streams {
            invocation.key(stream);
        }
        invocation
            .arg("state")
            .arg(state)
            .arg("starts")
            .arg(campaign.starts_at_ms)
            .arg("ends")
            .arg(campaign.ends_at_ms)
            .arg("limit")
            .arg(campaign.per_user_limit)
            .arg("currency")
            .arg(&campaign.currency)
            .arg("cid")
            .arg(campaign.id)
            .arg("left")
            .arg(left)
            .arg("left_amount")
            .arg(left_amount)
            // A new mark for every load or rebuild: a mend decided on the pool before cannot
            // apply to this one.
            .arg("rv")
            .arg(chrono::Utc::now().timestamp_micros());
        let written: i64 = invocation
            .invoke_async(&mut self.connection.clone())
            .await?;
        Ok(written == 1)
    }

    /// The key of the set listing every hand-off stream.
    pub fn stream_registry_key(&self) -> String {
        format!("{}:handoff:streams", self.prefix)
    }

    /// The hand-off stream of a campaign's bucket.
    pub fn stream_key(&self, campaign_id: i64, bucket: u32) -> String {
        format!("{}:{{c:{campaign_id}}}:h:{bucket}", self.prefix)
    }

    /// A connection for callers that read the pool's keys directly (relay, tests, benches).
    pub fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }

    /// The grab script's source, for measuring it alone.
    pub fn grab_script_source() -> &'static str {
        GRAB_SCRIPT
    }

    /// The keys a grab by `user_id` passes to the script, home bucket first.
    pub fn grab_keys(&self, campaign_id: i64, buckets: u32, user_id: &str) -> Vec<String> {
        let keys = self.keys_of(campaign_id, buckets);
        let home = usize::try_from(home_bucket(user_id, buckets)).unwrap_or(0);
        grab_key_order(&keys, home).map(str::to_owned).collect()
    }

    fn keys_of(&self, campaign_id: i64, buckets: u32) -> Arc<CampaignKeys> {
        if let Some(keys) = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&campaign_id)
        {
            return keys.clone();
        }
        let base = format!("{}:{{c:{campaign_id}}}", self.prefix);
        let per_bucket = |kind: &str| {
            (0..buckets.max(1))
                .map(|k| format!("{base}:{kind}:{k}"))
                .collect::<Vec<_>>()
        };
        let keys = Arc::new(CampaignKeys {
            meta: format!("{base}:meta"),
            pending: format!("{base}:pending"),
            returned: format!("{base}:ret"),
            users: per_bucket("u"),
            buckets: per_bucket("b"),
            streams: per_bucket("h"),
        });
        let mut cache = self.keys.write().unwrap_or_else(|p| p.into_inner());
        // Bounded: campaigns are few next to grabs; drop the cache rather than grow forever.
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(campaign_id, keys.clone());
        keys
    }

    fn meta_key(&self, campaign_id: i64) -> String {
        format!("{}:{{c:{campaign_id}}}:meta", self.prefix)
    }
}

/// The grab script's keys in order: meta, home users hash, pending, then the buckets and their
/// streams starting from the home bucket.
fn grab_key_order(keys: &CampaignKeys, home: usize) -> impl Iterator<Item = &str> {
    let count = keys.buckets.len();
    [
        keys.meta.as_str(),
        keys.users[home].as_str(),
        keys.pending.as_str(),
    ]
    .into_iter()
    .chain((0..count).map(move |i| keys.buckets[(home + i) % count].as_str()))
    .chain((0..count).map(move |i| keys.streams[(home + i) % count].as_str()))
}

fn protocol(err: impl std::fmt::Display) -> PoolError {
    PoolError::Protocol(err.to_string())
}

/// A pending claim's value: `user:seq:amount:grabbed_at_ms`.
fn parse_pending(claim_id: &str, value: &str) -> Result<PendingClaim, PoolError> {
    let parts: Vec<&str> = value.split(':').collect();
    if parts.len() != 4 {
        return Err(PoolError::Protocol(value.to_owned()));
    }
    Ok(PendingClaim {
        claim_id: claim_id.to_owned(),
        user_id: parts[0].to_owned(),
        seq: parts[1]
            .parse()
            .map_err(|_| PoolError::Protocol(value.to_owned()))?,
        amount: parse_i64(parts[2])?,
        grabbed_at_ms: parse_i64(parts[3])?,
    })
}

fn parse_i64(text: &str) -> Result<i64, PoolError> {
    text.parse()
        .map_err(|_| PoolError::Protocol(format!("`{text}` is not an integer")))
}

#[async_trait::async_trait]
impl PacketPool for RedisPool {
    async fn load(&self, campaign: &PoolCampaign, packets: &[i64]) -> Result<bool, PoolError> {
        let keys = self.keys_of(campaign.id, campaign.buckets);
        let mut connection = self.connection.clone();
        if connection.exists::<_, bool>(&keys.meta).await? {
            return Ok(false);
        }
        // Leftovers of a loader that died before writing the meta hash: no grab can have
        // touched them (grabs need the meta hash), so they are safe to drop.
        let _: () = connection.del(&keys.buckets).await?;
        let bucket_count = keys.buckets.len();
        for (first, bucket) in keys.buckets.iter().enumerate() {
            // Packet `seq` goes to bucket `seq % buckets`, in order. Written a round trip of
            // `LOAD_TRIP` packets at a time, formatted just before: the grabs of live campaigns
            // share this connection and wait behind each round trip, and a 10,000,000-packet
            // campaign is never held as strings all at once.
            let mut seqs = (first..packets.len()).step_by(bucket_count).peekable();
            while seqs.peek().is_some() {
                let items: Vec<String> = seqs
                    .by_ref()
                    .take(LOAD_TRIP)
                    .map(|seq| format!("{seq}:{}", packets[seq]))
                    .collect();
                let mut pipeline = redis::pipe();
                for chunk in items.chunks(LOAD_CHUNK) {
                    pipeline.rpush(bucket, chunk).ignore();
                }
                let _: () = pipeline.query_async(&mut connection).await?;
            }
        }
        let total: i64 = packets.iter().sum();
        self.write_meta(campaign, &keys, "scheduled", packets.len(), total)
            .await
    }

    async fn rebuild(
        &self,
        campaign: &PoolCampaign,
        contents: &crate::store::PoolContents,
    ) -> Result<bool, PoolError> {
        let keys = self.keys_of(campaign.id, campaign.buckets);
        let mut connection = self.connection.clone();
        if connection.exists::<_, bool>(&keys.meta).await? {
            return Ok(false);
        }
        // Whatever is left of the lost pool is dropped: no grab touches it without the meta
        // hash, which is written last.
        let mut stale = keys.buckets.clone();
        stale.extend(keys.users.iter().cloned());
        stale.push(keys.pending.clone());
        let _: () = connection.del(&stale).await?;
        let bucket_count = u32::try_from(keys.buckets.len()).unwrap_or(1);
        for run in contents.available.chunks(LOAD_TRIP) {
            let mut pipeline = redis::pipe();
            for &(seq, amount) in run {
                let bucket = &keys.buckets[usize::try_from(seq % bucket_count).unwrap_or(0)];
                pipeline.rpush(bucket, format!("{seq}:{amount}")).ignore();
            }
            let _: () = pipeline.query_async(&mut connection).await?;
        }
        for run in contents.users.chunks(LOAD_TRIP) {
            let mut pipeline = redis::pipe();
            for (user, claims) in run {
                let entry: Vec<String> = claims
                    .iter()
                    .map(|(claim, amount)| format!("{claim}:{amount}"))
                    .collect();
                let home = usize::try_from(home_bucket(user, bucket_count)).unwrap_or(0);
                pipeline
                    .hset(&keys.users[home], user, entry.join(","))
                    .ignore();
            }
            let _: () = pipeline.query_async(&mut connection).await?;
        }
        let left = contents.available.len();
        let left_amount: i64 = contents.available.iter().map(|(_, amount)| amount).sum();
        let state = if left == 0 { "exhausted" } else { "scheduled" };
        self.write_meta(campaign, &keys, state, left, left_amount)
            .await
    }

    async fn grab(
        &self,
        campaign: &PoolCampaign,
        user_id: &str,
        claim_id: &str,
        now_ms: i64,
        request_id: &str,
    ) -> Result<GrabOutcome, PoolError> {
        let keys = self.keys_of(campaign.id, campaign.buckets);
        let home = usize::try_from(home_bucket(user_id, campaign.buckets)).unwrap_or(0);
        // One EVALSHA command built in a single buffer (the generic script invocation copies
        // every key into its own allocation first); the hot path of every grab.
        let build = |verb: &str, script: &str| {
            let mut command = redis::cmd(verb);
            command.arg(script).arg(3 + 2 * keys.buckets.len());
            for key in grab_key_order(&keys, home) {
                command.arg(key);
            }
            command
                .arg(user_id)
                .arg(now_ms)
                .arg(claim_id)
                .arg(request_id);
            command
        };
        let mut connection = self.connection.clone();
        let reply: Vec<String> = match build("EVALSHA", self.grab_script.get_hash())
            .query_async(&mut connection)
            .await
        {
            Err(err)
                if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                // Redis restarted or flushed its script cache: send the source once.
                build("EVAL", GRAB_SCRIPT)
                    .query_async(&mut connection)
                    .await?
            }
            other => other?,
        };
        let word = reply.first().map(String::as_str).unwrap_or_default();
        Ok(match word {
            "ok" if reply.len() == 5 => GrabOutcome::Granted {
                seq: reply[1]
                    .parse()
                    .map_err(|_| PoolError::Protocol(reply.join(" ")))?,
                amount: parse_i64(&reply[2])?,
                currency: reply[3].clone(),
                last: reply[4] == "1",
            },
            "not_loaded" => GrabOutcome::NotLoaded,
            "not_started" => GrabOutcome::NotStarted,
            "ended" => GrabOutcome::Ended,
            "sold_out" => GrabOutcome::SoldOut,
            "cancelled" => GrabOutcome::Cancelled,
            "limit" if reply.len() == 2 => GrabOutcome::LimitReached {
                claims: reply[1]
                    .split(',')
                    .filter_map(|pair| {
                        let (claim, amount) = pair.split_once(':')?;
                        Some((claim.to_owned(), amount.parse().ok()?))
                    })
                    .collect(),
            },
            _ => return Err(PoolError::Protocol(reply.join(" "))),
        })
    }

    async fn snapshot(&self, campaign_id: i64) -> Result<Option<PoolSnapshot>, PoolError> {
        let fields: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.meta_key(campaign_id))
            .arg("state")
            .arg("left")
            .arg("left_amount")
            .query_async(&mut self.connection.clone())
            .await?;
        snapshot_of(&fields)
    }

    async fn cancel(
        &self,
        campaign: &PoolCampaign,
        now_ms: i64,
    ) -> Result<CancelOutcome, PoolError> {
        let reply: String = self
            .cancel_script
            .key(self.meta_key(campaign.id))
            .arg(now_ms)
            .invoke_async(&mut self.connection.clone())
            .await?;
        match reply.as_str() {
            "not_loaded" => Ok(CancelOutcome::NotLoaded),
            "cancelled" => Ok(CancelOutcome::Cancelled),
            "started" => Ok(CancelOutcome::AlreadyStarted),
            other => Err(PoolError::Protocol(other.to_owned())),
        }
    }

    async fn close(&self, campaign_id: i64) -> Result<Option<PoolSnapshot>, PoolError> {
        let reply: Option<Vec<Option<String>>> = self
            .close_script
            .key(self.meta_key(campaign_id))
            .invoke_async(&mut self.connection.clone())
            .await?;
        match reply {
            Some(fields) => snapshot_of(&fields),
            None => Ok(None),
        }
    }

    async fn return_packet(
        &self,
        campaign: &PoolCampaign,
        claim_id: &str,
        seq: u32,
        amount: i64,
    ) -> Result<bool, PoolError> {
        let keys = self.keys_of(campaign.id, campaign.buckets);
        let bucket = &keys.buckets[usize::try_from(seq).unwrap_or(0) % keys.buckets.len()];
        let now_ms = chrono::Utc::now().timestamp_millis();
        let reply: String = self
            .return_script
            .key(&keys.meta)
            .key(&keys.returned)
            .key(bucket)
            .key(&keys.pending)
            .arg(claim_id)
            .arg(format!("{seq}:{amount}"))
            .arg(amount)
            .arg(now_ms)
            .invoke_async(&mut self.connection.clone())
            .await?;
        Ok(reply == "1")
    }

    async fn pending_claim(
        &self,
        campaign_id: i64,
        claim_id: &str,
    ) -> Result<Option<PendingClaim>, PoolError> {
        let key = format!("{}:{{c:{campaign_id}}}:pending", self.prefix);
        let value: Option<String> = self.connection.clone().hget(key, claim_id).await?;
        value
            .map(|value| parse_pending(claim_id, &value))
            .transpose()
    }

    async fn forget_pending(&self, campaign_id: i64, claim_ids: &[&str]) -> Result<(), PoolError> {
        if claim_ids.is_empty() {
            return Ok(());
        }
        let key = format!("{}:{{c:{campaign_id}}}:pending", self.prefix);
        let _: () = self.connection.clone().hdel(key, claim_ids).await?;
        Ok(())
    }

    async fn purge(&self, campaign: &PoolCampaign) -> Result<(), PoolError> {
        let keys = self.keys_of(campaign.id, campaign.buckets);
        let mut connection = self.connection.clone();
        let _: () = connection
            .srem(self.stream_registry_key(), &keys.streams)
            .await?;
        let mut all: Vec<&str> = vec![&keys.meta, &keys.pending, &keys.returned];
        all.extend(keys.users.iter().map(String::as_str));
        all.extend(keys.buckets.iter().map(String::as_str));
        all.extend(keys.streams.iter().map(String::as_str));
        // UNLINK frees large hashes and streams off Redis's main thread.
        let _: () = redis::cmd("UNLINK")
            .arg(all)
            .query_async(&mut connection)
            .await?;
        self.keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&campaign.id);
        Ok(())
    }

    async fn inventory(
        &self,
        campaign: &PoolCampaign,
        max_items: usize,
    ) -> Result<Inventory, PoolError> {
        let keys = self.keys_of(campaign.id, campaign.buckets);
        let mut invocation = self.inventory_script.key(&keys.meta);
        invocation.key(&keys.pending).key(&keys.returned);
        for bucket in &keys.buckets {
            invocation.key(bucket);
        }
        let reply: Vec<Value> = invocation
            .arg(max_items)
            .invoke_async(&mut self.connection.clone())
            .await?;
        let text = |value: &Value| -> Result<String, PoolError> {
            redis::from_redis_value_ref(value).map_err(protocol)
        };
        let word = reply.first().map(text).transpose()?.unwrap_or_default();
        match (word.as_str(), reply.as_slice()) {
            ("not_loaded", _) => Ok(Inventory::NotLoaded),
            ("too_large", [_, total]) => Ok(Inventory::NotInspected(format!(
                "the pool holds {} packets, pending claims and returns, more than the {max_items} a repair reads at once",
                text(total)?
            ))),
            (
                "ok",
                [
                    _,
                    state,
                    left,
                    left_amount,
                    mends,
                    returns,
                    packets,
                    pending,
                    returned,
                ],
            ) => {
                let items: Vec<String> = redis::from_redis_value_ref(packets).map_err(protocol)?;
                let mut inventory = PoolInventory {
                    state: text(state)?,
                    left: parse_i64(&text(left)?)?,
                    left_amount: parse_i64(&text(left_amount)?)?,
                    packets: Vec::with_capacity(items.len()),
                    unreadable: Vec::new(),
                    pending: Vec::new(),
                    returned: std::collections::HashSet::new(),
                    version: PoolVersion {
                        returns: parse_i64(&text(returns)?)?,
                        mends: text(mends)?,
                    },
                };
                for item in items {
                    let parsed = item.split_once(':').and_then(|(seq, amount)| {
                        Some((seq.parse::<u32>().ok()?, amount.parse::<i64>().ok()?))
                    });
                    match parsed {
                        Some(packet) => inventory.packets.push(packet),
                        None => inventory.unreadable.push(item),
                    }
                }
                let pairs: Vec<String> = redis::from_redis_value_ref(pending).map_err(protocol)?;
                for pair in pairs.chunks(2) {
                    if let [claim_id, value] = pair {
                        inventory.pending.push(parse_pending(claim_id, value)?);
                    }
                }
                let pairs: Vec<String> = redis::from_redis_value_ref(returned).map_err(protocol)?;
                for pair in pairs.chunks(2) {
                    if let [claim_id, went_back] = pair
                        && went_back == "1"
                    {
                        inventory.returned.insert(claim_id.clone());
                    }
                }
                Ok(Inventory::Held(inventory))
            }
            _ => Err(PoolError::Protocol(format!("{reply:?}"))),
        }
    }

    async fn mend(
        &self,
        campaign: &PoolCampaign,
        version: &PoolVersion,
        drift: (i64, i64),
        mends: &[Mend],
    ) -> Result<MendOutcome, PoolError> {
        let keys = self.keys_of(campaign.id, campaign.buckets);
        let mut invocation = self.mend_script.key(&keys.meta);
        invocation.key(&keys.pending).key(&keys.returned);
        for bucket in &keys.buckets {
            invocation.key(bucket);
        }
        invocation
            .arg(version.returns)
            .arg(&version.mends)
            .arg(drift.0)
            .arg(drift.1);
        let buckets = u32::try_from(keys.buckets.len()).unwrap_or(1).max(1);
        for mend in mends {
            let (op, seq, amount, extra) = match mend {
                Mend::Add { seq, amount } => ("add", *seq, *amount, String::new()),
                Mend::Held { seq, amount, claim } => ("held", *seq, *amount, claim.clone()),
                Mend::Foreign { seq, amount } => ("foreign", *seq, *amount, String::new()),
                Mend::Duplicate {
                    seq,
                    amount,
                    copies,
                } => ("dup", *seq, *amount, copies.to_string()),
                Mend::Unreadable { item } => ("unreadable", 0, 0, item.clone()),
            };
            invocation
                .arg(op)
                .arg(seq)
                .arg(amount)
                .arg(seq % buckets)
                .arg(extra);
        }
        let reply: Vec<String> = invocation
            .invoke_async(&mut self.connection.clone())
            .await?;
        match reply.as_slice() {
            [word] if word == "moved" => Ok(MendOutcome::Moved),
            [word, state] if word == "not_live" => Ok(MendOutcome::NotLive(state.clone())),
            [word, added, removed] if word == "mended" => Ok(MendOutcome::Mended {
                added: added
                    .parse()
                    .map_err(|_| PoolError::Protocol(reply.join(" ")))?,
                removed: removed
                    .parse()
                    .map_err(|_| PoolError::Protocol(reply.join(" ")))?,
            }),
            _ => Err(PoolError::Protocol(reply.join(" "))),
        }
    }

    async fn ping(&self) -> Result<String, PoolError> {
        Durability::check(&mut self.connection.clone())
            .await
            .map_err(PoolError::Settings)
    }
}

fn snapshot_of(fields: &[Option<String>]) -> Result<Option<PoolSnapshot>, PoolError> {
    match fields {
        [Some(state), Some(left), Some(amount)] => Ok(Some(PoolSnapshot {
            state: state.clone(),
            packets_left: parse_i64(left)?,
            amount_left: parse_i64(amount)?,
        })),
        [None, ..] => Ok(None),
        other => Err(PoolError::Protocol(format!("{other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::home_bucket;

    #[test]
    fn home_buckets_are_stable_and_in_range() {
        assert_eq!(home_bucket("alice", 8), home_bucket("alice", 8));
        assert!((0..1000).all(|i| home_bucket(&format!("user-{i}"), 8) < 8));
        assert_eq!(home_bucket("anyone", 1), 0);
        let used: std::collections::HashSet<u32> =
            (0..1000).map(|i| home_bucket(&i.to_string(), 8)).collect();
        assert_eq!(used.len(), 8, "users spread over every bucket");
    }
}
