//! Lease locks with renewal and fencing tokens, in Redis or (embedded mode) in memory.
//!
//! A lease is `SET key token NX PX ttl`: held by whoever set it, until it expires or its
//! holder releases it. Release and extension are scripts that act only when the key still holds
//! the caller's token, so nobody can release or extend a lease that is not theirs.
//!
//! A watchdog renews a held lease every `ttl / 3`. When a renewal fails (the lease expired, was
//! taken over, or Redis did not answer in time), the watchdog cancels the lease's
//! [`CancellationToken`] at once, so the holder can stop working.
//!
//! A lease alone cannot give mutual exclusion: a holder paused longer than the ttl (a GC pause,
//! a stalled VM) wakes up believing it still holds the lease. So every grant carries a fencing
//! token, a counter incremented atomically with the grant (one counter for every lease of a
//! manager, so no key is left behind per lease); the resources a holder writes keep
//! the highest token they have seen and refuse writes with an older one ([`fenced_set`] is such
//! a resource in Redis; saga rows in the database are another).
//!
//! Fencing tokens never go backwards, even when Redis loses the counter (a restart without
//! persistence, a failover to a replica that lagged, a `FLUSHDB`): every grant is at least the
//! server's clock in milliseconds × 1024 (so tokens follow the clock while fewer than 1,024 are
//! granted a millisecond) and at least one more than the highest token this manager has seen or
//! been told of ([`LeaseManager::raise_floor`]: the saga worker raises it to the highest fence
//! its saga rows carry when it starts).

use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionManager;
use tokio_util::sync::CancellationToken;

/// The shortest lease accepted: renewals every third of it must be realistic.
pub const MIN_TTL: Duration = Duration::from_millis(30);

/// The next fencing token, in Lua: the counter's next value, raised to the clock floor and the
/// caller's floor when the counter is behind them (it was lost). A token is below 2^53, so Lua's
/// numbers hold it exactly; `%.0f` writes it back without an exponent.
const NEXT_FENCE: &str = r"
local function next_fence(counter, floor)
  local now = redis.call('TIME')
  local clock = (tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)) * 1024
  local fence = redis.call('INCR', counter)
  local least = math.max(clock, tonumber(floor) + 1)
  if fence < least then
    redis.call('SET', counter, string.format('%.0f', least))
    fence = least
  end
  return fence
end
";

const ACQUIRE: &str = r"
-- KEYS: lease, fence counter; ARGV: token, ttl_ms, fence floor
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return next_fence(KEYS[2], ARGV[3])
end
return false
";

const EXTEND: &str = r"
-- KEYS: lease; ARGV: token, ttl_ms
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

const RELEASE: &str = r"
-- KEYS: lease; ARGV: token
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

const ACQUIRE_MANY: &str = r"
-- KEYS: fence counter, then the leases; ARGV: token, ttl_ms, fence floor
-- Answers {fence, granted...}: one fence for every lease granted, 0 when none was.
local answer = {0}
local any = false
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[2]) then
    answer[i] = 1
    any = true
  else
    answer[i] = 0
  end
end
if any then answer[1] = next_fence(KEYS[1], ARGV[3]) end
return answer
";

const EXTEND_MANY: &str = r"
-- KEYS: leases; ARGV: token, ttl_ms. Answers how many were still held and are extended.
local held = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
    held = held + 1
  end
end
return held
";

const RELEASE_MANY: &str = r"
-- KEYS: leases; ARGV: token
local released = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    released = released + redis.call('DEL', KEYS[i])
  end
end
return released
";

const FENCED_SET: &str = r"
-- KEYS: value, highest fence seen; ARGV: fence, value
local seen = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[1]) < seen then return 0 end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('SET', KEYS[1], ARGV[2])
return 1
";

/// A failure to talk to Redis about a lease.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("a lease ttl must be at least {MIN_TTL:?}")]
    TtlTooShort,
}

/// Where leases live: Redis for the distributed system, this process's memory for the
/// embedded one. Both grant `key` to `token` only when nobody holds it, with a fencing token
/// from a counter that only grows.
#[async_trait::async_trait]
pub trait LeaseStore: Send + Sync {
    /// Grants the lease and answers its fencing token, or `None` when it is held.
    async fn grant(&self, key: &str, token: &str, ttl: Duration)
    -> Result<Option<u64>, LeaseError>;
    /// Extends the lease if `token` holds it.
    async fn extend(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, LeaseError>;
    /// Releases the lease if `token` holds it.
    async fn release(&self, key: &str, token: &str) -> Result<bool, LeaseError>;

    /// Makes every later fencing token higher than `fence` (a token known to have been used,
    /// say the highest one written to a resource), whatever the store has lost.
    fn raise_floor(&self, fence: u64);

    /// Grants every free lease of `keys` to `token` at once, under one fencing token higher
    /// than any earlier grant of each of them: the fence (`None` when nothing was granted) and,
    /// per key, whether it was granted.
    async fn grant_many(
        &self,
        keys: &[String],
        token: &str,
        ttl: Duration,
    ) -> Result<(Option<u64>, Vec<bool>), LeaseError> {
        let mut fence = None;
        let mut granted = Vec::with_capacity(keys.len());
        for key in keys {
            let got = self.grant(key, token, ttl).await?;
            granted.push(got.is_some());
            fence = fence.max(got);
        }
        Ok((fence, granted))
    }

    /// Extends every lease of `keys` that `token` holds; true when it held them all.
    async fn extend_many(
        &self,
        keys: &[String],
        token: &str,
        ttl: Duration,
    ) -> Result<bool, LeaseError> {
        let mut all = true;
        for key in keys {
            all &= self.extend(key, token, ttl).await?;
        }
        Ok(all)
    }

    /// Releases every lease of `keys` that `token` holds.
    async fn release_many(&self, keys: &[String], token: &str) -> Result<(), LeaseError> {
        for key in keys {
            self.release(key, token).await?;
        }
        Ok(())
    }
}

/// Leases in one Redis: atomic scripts over `SET NX PX` and a counter.
struct RedisLeases {
    connection: ConnectionManager,
    fence_key: String,
    /// The highest fencing token granted or known: the next is always higher.
    floor: std::sync::atomic::AtomicU64,
    acquire: Script,
    extend: Script,
    release: Script,
    acquire_many: Script,
    extend_many: Script,
    release_many: Script,
}

impl RedisLeases {
    fn floor(&self) -> u64 {
        self.floor.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn raise(&self, fence: u64) {
        self.floor
            .fetch_max(fence, std::sync::atomic::Ordering::SeqCst);
    }
}

fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

#[async_trait::async_trait]
impl LeaseStore for RedisLeases {
    fn raise_floor(&self, fence: u64) {
        self.raise(fence);
    }

    async fn grant(
        &self,
        key: &str,
        token: &str,
        ttl: Duration,
    ) -> Result<Option<u64>, LeaseError> {
        let fence: Option<u64> = self
            .acquire
            .key(key)
            .key(&self.fence_key)
            .arg(token)
            .arg(millis(ttl))
            .arg(self.floor())
            .invoke_async(&mut self.connection.clone())
            .await?;
        if let Some(fence) = fence {
            self.raise(fence);
        }
        Ok(fence)
    }

    async fn extend(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, LeaseError> {
        let extended: i64 = self
            .extend
            .key(key)
            .arg(token)
            .arg(millis(ttl))
            .invoke_async(&mut self.connection.clone())
            .await?;
        Ok(extended == 1)
    }

    async fn release(&self, key: &str, token: &str) -> Result<bool, LeaseError> {
        let released: i64 = self
            .release
            .key(key)
            .arg(token)
            .invoke_async(&mut self.connection.clone())
            .await?;
        Ok(released == 1)
    }

    async fn grant_many(
        &self,
        keys: &[String],
        token: &str,
        ttl: Duration,
    ) -> Result<(Option<u64>, Vec<bool>), LeaseError> {
        let mut invocation = self.acquire_many.key(&self.fence_key);
        invocation
            .key(keys)
            .arg(token)
            .arg(millis(ttl))
            .arg(self.floor());
        let answer: Vec<u64> = invocation
            .invoke_async(&mut self.connection.clone())
            .await?;
        let fence = answer.first().copied().filter(|fence| *fence > 0);
        if let Some(fence) = fence {
            self.raise(fence);
        }
        Ok((
            fence,
            answer.iter().skip(1).map(|flag| *flag == 1).collect(),
        ))
    }

    async fn extend_many(
        &self,
        keys: &[String],
        token: &str,
        ttl: Duration,
    ) -> Result<bool, LeaseError> {
        let held: usize = self
            .extend_many
            .key(keys)
            .arg(token)
            .arg(millis(ttl))
            .invoke_async(&mut self.connection.clone())
            .await?;
        Ok(held == keys.len())
    }

    async fn release_many(&self, keys: &[String], token: &str) -> Result<(), LeaseError> {
        let _: i64 = self
            .release_many
            .key(keys)
            .arg(token)
            .invoke_async(&mut self.connection.clone())
            .await?;
        Ok(())
    }
}

/// Leases in this process's memory, for the embedded mode (one process: memory is the whole
/// world). The fencing counter starts from the wall clock (milliseconds × 1024), so tokens keep
/// growing across restarts and rows fenced before a restart do not refuse every later write.
struct LocalLeases {
    held: std::sync::Mutex<std::collections::HashMap<String, (String, std::time::Instant)>>,
    fence: std::sync::atomic::AtomicU64,
}

impl LocalLeases {
    fn new() -> Self {
        let now_ms = u64::try_from(crate::time::now_ms()).unwrap_or(0);
        LocalLeases {
            held: std::sync::Mutex::default(),
            fence: std::sync::atomic::AtomicU64::new(now_ms.saturating_mul(1024)),
        }
    }

    fn with_held<T>(
        &self,
        f: impl FnOnce(&mut std::collections::HashMap<String, (String, std::time::Instant)>) -> T,
    ) -> T {
        // The map is consistent after every statement; a poisoned lock is still usable.
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        held.retain(|_, (_, until)| *until > now);
        f(&mut held)
    }
}

#[async_trait::async_trait]
impl LeaseStore for LocalLeases {
    fn raise_floor(&self, fence: u64) {
        self.fence
            .fetch_max(fence, std::sync::atomic::Ordering::SeqCst);
    }

    async fn grant(
        &self,
        key: &str,
        token: &str,
        ttl: Duration,
    ) -> Result<Option<u64>, LeaseError> {
        Ok(self.with_held(|held| {
            if held.contains_key(key) {
                return None;
            }
            held.insert(
                key.to_owned(),
                (token.to_owned(), std::time::Instant::now() + ttl),
            );
            Some(
                self.fence
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                    .saturating_add(1),
            )
        }))
    }

    async fn extend(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, LeaseError> {
        Ok(self.with_held(|held| match held.get_mut(key) {
            Some((holder, until)) if holder == token => {
                *until = std::time::Instant::now() + ttl;
                true
            }
            _ => false,
        }))
    }

    async fn release(&self, key: &str, token: &str) -> Result<bool, LeaseError> {
        Ok(self.with_held(|held| match held.get(key) {
            Some((holder, _)) if holder == token => held.remove(key).is_some(),
            _ => false,
        }))
    }
}

/// Grants leases, with renewal and fencing, over a [`LeaseStore`].
#[derive(Clone)]
pub struct LeaseManager {
    store: std::sync::Arc<dyn LeaseStore>,
}

impl std::fmt::Debug for LeaseManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseManager").finish_non_exhaustive()
    }
}

/// A held lease. Dropping it stops the watchdog but does not release the key (it expires after
/// the ttl), which is exactly what a crashed holder looks like; call [`Lease::release`] to free
/// it at once.
#[derive(Debug)]
pub struct Lease {
    key: String,
    token: String,
    fence: u64,
    lost: CancellationToken,
    stop_watchdog: CancellationToken,
    manager: LeaseManager,
}

impl LeaseManager {
    /// Leases whose fencing tokens come from the counter `rp:lease:fence`.
    pub fn new(connection: ConnectionManager) -> Self {
        Self::with_fence_key(connection, "rp:lease:fence")
    }

    /// Leases in Redis whose fencing tokens come from the counter at `fence_key`.
    pub fn with_fence_key(connection: ConnectionManager, fence_key: &str) -> Self {
        LeaseManager {
            store: std::sync::Arc::new(RedisLeases {
                connection,
                fence_key: fence_key.to_owned(),
                floor: std::sync::atomic::AtomicU64::new(0),
                acquire: Script::new(&format!("{NEXT_FENCE}{ACQUIRE}")),
                extend: Script::new(EXTEND),
                release: Script::new(RELEASE),
                acquire_many: Script::new(&format!("{NEXT_FENCE}{ACQUIRE_MANY}")),
                extend_many: Script::new(EXTEND_MANY),
                release_many: Script::new(RELEASE_MANY),
            }),
        }
    }

    /// Leases in this process's memory (the embedded mode).
    pub fn local() -> Self {
        LeaseManager {
            store: std::sync::Arc::new(LocalLeases::new()),
        }
    }

    /// Leases over any [`LeaseStore`] (a simulation's, which plays expiries and takeovers).
    pub fn with_store(store: std::sync::Arc<dyn LeaseStore>) -> Self {
        LeaseManager { store }
    }

    /// Makes every later fencing token higher than `fence`: call it with the highest token a
    /// resource holds, so that a store that lost its counter cannot hand out older ones.
    pub fn raise_floor(&self, fence: u64) {
        self.store.raise_floor(fence);
    }

    /// Tries once to take the lease on `key` for `ttl`; `None` when someone else holds it.
    /// A held lease is renewed by a watchdog every `ttl / 3` until released or dropped.
    pub async fn try_acquire(&self, key: &str, ttl: Duration) -> Result<Option<Lease>, LeaseError> {
        if ttl < MIN_TTL {
            return Err(LeaseError::TtlTooShort);
        }
        let token = uuid::Uuid::new_v4().simple().to_string();
        let Some(fence) = self.store.grant(key, &token, ttl).await? else {
            return Ok(None);
        };
        let lease = Lease {
            key: key.to_owned(),
            token,
            fence,
            lost: CancellationToken::new(),
            stop_watchdog: CancellationToken::new(),
            manager: self.clone(),
        };
        tokio::spawn(watchdog(
            self.clone(),
            vec![lease.key.clone()],
            lease.token.clone(),
            ttl,
            lease.lost.clone(),
            lease.stop_watchdog.clone(),
        ));
        Ok(Some(lease))
    }

    /// Waits for the lease, retrying every `retry` until `deadline` has passed.
    pub async fn acquire(
        &self,
        key: &str,
        ttl: Duration,
        retry: Duration,
        deadline: Duration,
    ) -> Result<Option<Lease>, LeaseError> {
        let started = tokio::time::Instant::now();
        loop {
            if let Some(lease) = self.try_acquire(key, ttl).await? {
                return Ok(Some(lease));
            }
            if started.elapsed() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Tries once to take the leases on every key of `keys` together, under one token and one
    /// fencing token; the keys held by others are left out (see [`LeaseSet::granted`]). The
    /// granted ones are renewed together by one watchdog, and the set counts as lost as soon as
    /// any of them is.
    pub async fn try_acquire_many(
        &self,
        keys: &[String],
        ttl: Duration,
    ) -> Result<LeaseSet, LeaseError> {
        if ttl < MIN_TTL {
            return Err(LeaseError::TtlTooShort);
        }
        let token = uuid::Uuid::new_v4().simple().to_string();
        let (fence, granted) = if keys.is_empty() {
            (None, Vec::new())
        } else {
            self.store.grant_many(keys, &token, ttl).await?
        };
        let held: Vec<String> = keys
            .iter()
            .zip(&granted)
            .filter(|(_, granted)| **granted)
            .map(|(key, _)| key.clone())
            .collect();
        let set = LeaseSet {
            held,
            granted,
            token,
            fence: fence.unwrap_or(0),
            lost: CancellationToken::new(),
            stop_watchdog: CancellationToken::new(),
            manager: self.clone(),
        };
        if !set.held.is_empty() {
            tokio::spawn(watchdog(
                self.clone(),
                set.held.clone(),
                set.token.clone(),
                ttl,
                set.lost.clone(),
                set.stop_watchdog.clone(),
            ));
        }
        Ok(set)
    }

    /// Extends `key` for `ttl` if `token` still holds it.
    pub async fn extend(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, LeaseError> {
        self.store.extend(key, token, ttl).await
    }

    /// Releases `key` if `token` still holds it.
    pub async fn release(&self, key: &str, token: &str) -> Result<bool, LeaseError> {
        self.store.release(key, token).await
    }
}

async fn watchdog(
    manager: LeaseManager,
    keys: Vec<String>,
    token: String,
    ttl: Duration,
    lost: CancellationToken,
    stop: CancellationToken,
) {
    let period = ttl / 3;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
        // A renewal slower than what is left of the lease is as good as a failed one.
        let renewal =
            tokio::time::timeout(period, manager.store.extend_many(&keys, &token, ttl)).await;
        if !matches!(renewal, Ok(Ok(true))) {
            tracing::warn!(
                key = keys.first().map(String::as_str),
                leases = keys.len(),
                "lease lost: renewal failed"
            );
            lost.cancel();
            return;
        }
    }
}

impl Lease {
    /// The fencing token of this grant: higher than any earlier grant of the same key.
    pub fn fence(&self) -> u64 {
        self.fence
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// Cancelled the moment the lease is known to be lost.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Stops renewing without releasing: the lease expires after its ttl (tests use this to
    /// play a holder that stalls).
    pub fn stop_renewing(&self) {
        self.stop_watchdog.cancel();
    }

    /// Releases the lease now; false when it was no longer ours.
    pub async fn release(self) -> Result<bool, LeaseError> {
        self.stop_watchdog.cancel();
        self.manager.release(&self.key, &self.token).await
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop_watchdog.cancel();
    }
}

/// Leases on many keys granted together: one token, one fencing token, one watchdog. Batches
/// of work items use it to hold every item's lease for one round trip instead of one each.
#[derive(Debug)]
pub struct LeaseSet {
    held: Vec<String>,
    granted: Vec<bool>,
    token: String,
    fence: u64,
    lost: CancellationToken,
    stop_watchdog: CancellationToken,
    manager: LeaseManager,
}

impl LeaseSet {
    /// The fencing token of the grant (0 when nothing was granted).
    pub fn fence(&self) -> u64 {
        self.fence
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// Per key asked for, in order: whether this set holds it.
    pub fn granted(&self) -> &[bool] {
        &self.granted
    }

    /// Cancelled the moment any lease of the set is known to be lost.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Stops renewing without releasing (tests play a stalled holder with it).
    pub fn stop_renewing(&self) {
        self.stop_watchdog.cancel();
    }

    /// Releases every lease the set still holds.
    pub async fn release(self) -> Result<(), LeaseError> {
        self.stop_watchdog.cancel();
        if self.held.is_empty() {
            return Ok(());
        }
        self.manager
            .store
            .release_many(&self.held, &self.token)
            .await
    }
}

impl Drop for LeaseSet {
    fn drop(&mut self) {
        self.stop_watchdog.cancel();
    }
}

/// A fenced write: sets `key` to `value` unless a write with a higher fence came first.
/// Returns false when the write was rejected as stale.
pub async fn fenced_set(
    connection: &mut ConnectionManager,
    key: &str,
    fence: u64,
    value: &str,
) -> Result<bool, LeaseError> {
    let written: i64 = Script::new(FENCED_SET)
        .key(key)
        .key(format!("{key}:fence"))
        .arg(fence)
        .arg(value)
        .invoke_async(connection)
        .await?;
    Ok(written == 1)
}
