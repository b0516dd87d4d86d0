//! The campaign service's operations, independent of HTTP: create, fund, grab, cancel, claims,
//! stats. The API module turns DTOs into these calls and their errors into problems.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redpacket_common::Currency;
use redpacket_common::ids::SnowflakeGenerator;
use redpacket_common::lease::LeaseManager;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

mod repair;

pub use repair::{
    CursorStage, DEFAULT_REPAIR_ITEMS, Finding, MAX_COMPARED_ROWS, MAX_INSPECTED_POOL_ITEMS,
    MAX_MENDS_PER_CALL, MAX_REPAIR_CAMPAIGNS, MAX_REPAIR_ITEMS, REPAIR_TIME_BUDGET, RepairCursor,
    RepairOptions, RepairReport, mends_of,
};

use crate::entity::{campaign, claim, stats};
use crate::pool::{CancelOutcome, GrabOutcome, PacketPool, PendingClaim, PoolCampaign, PoolError};
use crate::split::{SplitError, SplitMode, SplitSpec};
use crate::store::{
    ClaimRecord, Created, Store, StoreError, claim_status, event_kind, pool_state, status,
};

/// Longest title, in characters.
pub const MAX_TITLE_CHARS: usize = 200;
/// Highest per-user limit.
pub const MAX_PER_USER_LIMIT: u32 = 100;
/// Longest campaign.
pub const MAX_DURATION_MS: i64 = 30 * 24 * 3_600_000;
/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;
/// How long a cached "this campaign's pool is not loaded" status is trusted, so a crowd
/// hammering a campaign before its start does not reach the database on every request.
const STATUS_CACHE_TTL: Duration = Duration::from_secs(1);
/// Cached campaigns at most; the cache is dropped whole when full.
const MAX_CACHED_CAMPAIGNS: usize = 10_000;
/// How long a lost pool waits, with no claim of the campaign newly recorded, before it is
/// rebuilt from the database: the grabs it answered before it was lost reach the database
/// through the saga first (longer than the saga's last retry level, 25.6 s, and a call), so
/// their packets are not handed out again. One recorded later still is caught at its record.
pub const DEFAULT_REBUILD_QUIET: Duration = Duration::from_secs(60);
/// A rebuild claimed this long ago and not finished (its process died) is taken over.
const REBUILD_STALE_MS: i64 = 60_000;

/// Everything the campaign service can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum CampaignError {
    #[error("{message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error(transparent)]
    Split(#[from] SplitError),
    #[error("campaign `{0}` does not exist")]
    UnknownCampaign(String),
    #[error("claim `{0}` does not exist")]
    UnknownClaim(String),
    #[error("the idempotency key was already used with another request")]
    IdempotencyConflict,
    #[error("the campaign is not funded yet")]
    NotFunded,
    #[error("the campaign has not started")]
    NotStarted,
    #[error("the campaign was rejected: {0}")]
    Rejected(String),
    #[error("the campaign was cancelled")]
    Cancelled,
    #[error("the campaign has ended")]
    Ended,
    #[error("the campaign's packet pool was lost and is being rebuilt; try again shortly")]
    PoolRebuilding,
    #[error("every packet has been taken")]
    SoldOut,
    #[error("the user already holds {} claim(s), the campaign's limit", .0.len())]
    LimitReached(Vec<(String, i64)>),
    #[error("the campaign is {0}; this needs it to be {1}")]
    WrongState(String, &'static str),
    #[error("the campaign has already started; it can no longer be cancelled")]
    AlreadyStarted,
    #[error("{0}")]
    ClaimState(String),
    #[error("the packet pool is unavailable")]
    PoolUnavailable(#[source] PoolError),
    #[error("the database is unavailable")]
    Store(#[source] StoreError),
    #[error("id generation failed: {0}")]
    Ids(String),
    #[error("a repair is already running; try again when it is done")]
    RepairBusy,
}

impl From<StoreError> for CampaignError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::IdempotencyConflict(_) => CampaignError::IdempotencyConflict,
            StoreError::ClaimState(..) | StoreError::ClaimMismatch(_) => {
                CampaignError::ClaimState(err.to_string())
            }
            StoreError::UnknownCampaign(id) => CampaignError::UnknownCampaign(id.to_string()),
            other => CampaignError::Store(other),
        }
    }
}

impl From<PoolError> for CampaignError {
    fn from(err: PoolError) -> Self {
        CampaignError::PoolUnavailable(err)
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> CampaignError {
    CampaignError::Invalid {
        field,
        message: message.into(),
    }
}

/// A create request, as received (the API maps its DTO to this).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CreateRequest {
    pub merchant_id: String,
    pub title: String,
    pub currency: String,
    pub total_amount: i64,
    pub packet_count: i64,
    pub split_mode: String,
    pub min_amount: Option<i64>,
    pub max_amount: Option<i64>,
    pub per_user_limit: Option<i64>,
    pub starts_at_ms: i64,
    pub ends_at_ms: i64,
    pub seed: Option<u64>,
}

/// A granted grab.
#[derive(Debug, Clone)]
pub struct Grabbed {
    pub claim_id: String,
    pub campaign_id: i64,
    pub amount: i64,
    pub currency: String,
}

/// A claim, recorded or still only in the pool.
#[derive(Debug, Clone)]
pub enum ClaimView {
    Recorded(claim::Model),
    Pending {
        campaign_id: i64,
        currency: String,
        pending: PendingClaim,
    },
}

/// Campaign statistics, from counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    pub status: String,
    pub packets_total: i64,
    pub packets_remaining: i64,
    pub packets_credited: i64,
    pub packets_compensated: i64,
    pub packets_returned: i64,
    pub amount_total: i64,
    pub amount_remaining: i64,
    pub amount_credited: i64,
    pub amount_compensated: i64,
    pub amount_returned: i64,
    pub amount_refunded: i64,
}

impl Stats {
    /// Packets taken out of the pool and still held (pending, credited, or compensated after
    /// the end).
    pub fn packets_grabbed(&self) -> i64 {
        self.packets_total - self.packets_remaining
    }

    pub fn amount_grabbed(&self) -> i64 {
        self.amount_total - self.amount_remaining
    }

    /// Taken from the pool, not credited, not compensated: what the sagas still have to finish.
    pub fn packets_in_flight(&self) -> i64 {
        self.packets_grabbed()
            - self.packets_credited
            - (self.packets_compensated - self.packets_returned)
    }

    /// The money of [`Stats::packets_in_flight`]; the escrow holds `amount_remaining` plus this.
    pub fn amount_in_flight(&self) -> i64 {
        self.amount_grabbed()
            - self.amount_credited
            - (self.amount_compensated - self.amount_returned)
    }
}

#[derive(Debug)]
struct CachedCampaign {
    pool: Arc<PoolCampaign>,
    status: String,
    read_at: Instant,
}

/// Formats a claim id: the claim's snowflake and its campaign's id, 16 hex digits each, so
/// ids sort by time and name their campaign.
pub fn claim_id(snowflake: u64, campaign_id: i64) -> String {
    format!("{snowflake:016x}{:016x}", campaign_id.cast_unsigned())
}

/// The campaign a claim id names.
pub fn campaign_of_claim(claim_id: &str) -> Option<i64> {
    if claim_id.len() != 32 || !claim_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(&claim_id[16..], 16)
        .ok()
        .map(u64::cast_signed)
}

/// Parses a campaign id from a path.
pub fn parse_campaign_id(text: &str) -> Result<i64, CampaignError> {
    text.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| CampaignError::UnknownCampaign(text.to_owned()))
}

/// Checks a user or merchant id (the same alphabet as account names).
pub fn parse_owner_id(field: &'static str, id: &str) -> Result<String, CampaignError> {
    if redpacket_common::accounts::is_owner_id(id) {
        Ok(id.to_owned())
    } else {
        Err(invalid(
            field,
            format!("`{field}` must be 1-64 letters, digits, `-` or `_`"),
        ))
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The campaign service.
#[derive(Clone)]
pub struct CampaignService {
    store: Store,
    pool: Arc<dyn PacketPool>,
    ids: Arc<SnowflakeGenerator>,
    buckets: u32,
    cache: Arc<RwLock<HashMap<i64, CachedCampaign>>>,
    lifecycle_wakeup: Arc<Notify>,
    rebuild_quiet: Duration,
    /// The youngest age a repair may take claims and campaigns at (its `min_age_ms` floor).
    repair_min_age: Duration,
    /// Lost pools waiting for their quiet period: the recorded claims last seen, and since when
    /// (epoch ms) that count has not moved.
    quiet_since: Arc<std::sync::Mutex<HashMap<i64, (i64, i64)>>>,
    /// One operator repair at a time per process.
    repair_gate: Arc<tokio::sync::Semaphore>,
    /// One operator repair at a time across the replicas: a lease on `repair_lease_key`.
    repair_leases: LeaseManager,
    repair_lease_key: String,
}

impl std::fmt::Debug for CampaignService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CampaignService")
            .field("pool", &self.pool)
            .field("buckets", &self.buckets)
            .finish_non_exhaustive()
    }
}

impl CampaignService {
    pub fn new(
        store: Store,
        pool: Arc<dyn PacketPool>,
        ids: Arc<SnowflakeGenerator>,
        buckets: u32,
    ) -> Self {
        CampaignService {
            store,
            pool,
            ids,
            buckets: buckets.max(1),
            cache: Arc::default(),
            lifecycle_wakeup: Arc::new(Notify::new()),
            rebuild_quiet: DEFAULT_REBUILD_QUIET,
            repair_min_age: DEFAULT_REBUILD_QUIET,
            quiet_since: Arc::default(),
            repair_gate: Arc::new(tokio::sync::Semaphore::new(1)),
            repair_leases: LeaseManager::local(),
            repair_lease_key: "campaign:repair".to_owned(),
        }
    }

    /// The service with the repair's lease (one repair at a time across every replica that
    /// shares `leases`) on `key`; by default the lease lives in this process only.
    #[must_use]
    pub fn with_repair_leases(mut self, leases: LeaseManager, key: impl Into<String>) -> Self {
        self.repair_leases = leases;
        self.repair_lease_key = key.into();
        self
    }

    /// The service with another quiet period before a lost pool is rebuilt.
    #[must_use]
    pub fn with_rebuild_quiet(mut self, quiet: Duration) -> Self {
        self.rebuild_quiet = quiet;
        self
    }

    /// The service with another floor on a repair's `min_age_ms` (by default the rebuild's
    /// quiet period, 60 s: a grab the pool answered that long ago has had its hand-off's
    /// retries to reach the database, so a repair does not judge it by a row that lags).
    #[must_use]
    pub fn with_repair_min_age(mut self, floor: Duration) -> Self {
        self.repair_min_age = floor;
        self
    }

    /// The floor on a repair's `min_age_ms`.
    pub fn repair_min_age(&self) -> Duration {
        self.repair_min_age
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn pool(&self) -> &Arc<dyn PacketPool> {
        &self.pool
    }

    /// Wakes the lifecycle loop (a campaign was funded or its last packet taken).
    pub fn lifecycle_wakeup(&self) -> Arc<Notify> {
        self.lifecycle_wakeup.clone()
    }

    pub fn next_id(&self) -> Result<i64, CampaignError> {
        self.ids
            .next_id()
            .map(u64::cast_signed)
            .map_err(|err| CampaignError::Ids(err.to_string()))
    }

    /// Validates, splits, and stores a new campaign in `funding`.
    pub async fn create(
        &self,
        request: CreateRequest,
        idempotency_key: Option<String>,
    ) -> Result<(campaign::Model, bool), CampaignError> {
        let request_hash = hex::encode(Sha256::digest(
            serde_json::to_vec(&request).unwrap_or_default(),
        ));
        let merchant_id = parse_owner_id("merchant_id", &request.merchant_id)?;
        if let Some(key) = &idempotency_key
            && (key.is_empty()
                || key.len() > MAX_IDEMPOTENCY_KEY_LEN
                || !key.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(invalid(
                "Idempotency-Key",
                format!(
                    "the Idempotency-Key header must be 1-{MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"
                ),
            ));
        }
        let title = request.title.trim();
        let title_chars = title.chars().count();
        if title_chars == 0 || title_chars > MAX_TITLE_CHARS {
            return Err(invalid(
                "title",
                format!("the title must have 1-{MAX_TITLE_CHARS} characters"),
            ));
        }
        let currency = Currency::parse(&request.currency)
            .map_err(|err| invalid("currency", err.to_string()))?;
        if request.total_amount <= 0
            || request.total_amount > redpacket_common::money::MAX_AMOUNT_MINOR
        {
            return Err(invalid(
                "total_amount",
                format!(
                    "total_amount must be between 1 and {} minor units",
                    redpacket_common::money::MAX_AMOUNT_MINOR
                ),
            ));
        }
        let count = u32::try_from(request.packet_count)
            .map_err(|_| SplitError::Count(0))
            .and_then(|count| {
                if count == 0 {
                    Err(SplitError::Count(0))
                } else {
                    Ok(count)
                }
            })
            .map_err(|_| {
                invalid(
                    "packet_count",
                    format!(
                        "packet_count must be between 1 and {}",
                        crate::split::MAX_PACKETS
                    ),
                )
            })?;
        let mode = SplitMode::parse(&request.split_mode).ok_or_else(|| {
            invalid(
                "split.mode",
                "split.mode must be `fixed`, `double_mean` or `bounded`",
            )
        })?;
        let limit = request.per_user_limit.unwrap_or(1);
        if !(1..=i64::from(MAX_PER_USER_LIMIT)).contains(&limit) {
            return Err(invalid(
                "per_user_limit",
                format!("per_user_limit must be between 1 and {MAX_PER_USER_LIMIT}"),
            ));
        }
        let now = now_ms();
        if request.ends_at_ms <= request.starts_at_ms {
            return Err(invalid("ends_at", "ends_at must be after starts_at"));
        }
        if request.ends_at_ms - request.starts_at_ms > MAX_DURATION_MS {
            return Err(invalid("ends_at", "a campaign lasts at most 30 days"));
        }
        if request.ends_at_ms <= now {
            return Err(invalid("ends_at", "ends_at is in the past"));
        }
        let seed = request.seed.unwrap_or_else(rand::random);
        let spec = SplitSpec::new(
            mode,
            request.total_amount,
            count,
            request.min_amount,
            request.max_amount,
            seed,
        )?;
        let packets = spec.split();
        assert_eq!(
            packets.iter().sum::<i64>(),
            request.total_amount,
            "a split must sum to its total"
        );
        let buckets = self.buckets.min(count);
        let model = campaign::Model {
            id: self.next_id()?,
            merchant_id,
            title: title.to_owned(),
            currency: currency.code().to_owned(),
            total_amount: request.total_amount,
            packet_count: i32::try_from(count).unwrap_or(i32::MAX),
            split_mode: mode.as_str().to_owned(),
            min_amount: spec.min,
            max_amount: spec.max,
            per_user_limit: i32::try_from(limit).unwrap_or(1),
            starts_at_ms: request.starts_at_ms,
            ends_at_ms: request.ends_at_ms,
            seed: seed.cast_signed(),
            buckets: i32::try_from(buckets).unwrap_or(1),
            status: status::FUNDING.to_owned(),
            status_reason: None,
            pool_state: pool_state::NONE.to_owned(),
            pool_claimed_at_ms: None,
            pool_rebuilt_at_ms: None,
            idempotency_key,
            request_hash,
            created_at_ms: now,
            updated_at_ms: now,
        };
        match self.store.create(model, &packets, self.next_id()?).await? {
            Created::New(model) => Ok((model, true)),
            Created::Existing(model) => Ok((model, false)),
        }
    }

    pub async fn campaign(&self, id: &str) -> Result<campaign::Model, CampaignError> {
        let parsed = parse_campaign_id(id)?;
        self.store
            .campaign(parsed)
            .await?
            .ok_or_else(|| CampaignError::UnknownCampaign(id.to_owned()))
    }

    /// Drops a campaign's cached status after this process changed it.
    fn forget_cached(&self, id: i64) {
        self.cache
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// The immutable part of a campaign, cached; the status with it is refreshed on demand.
    async fn cached(
        &self,
        id: i64,
        refresh_status: bool,
    ) -> Result<(Arc<PoolCampaign>, String), CampaignError> {
        if let Some(entry) = self
            .cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            && (!refresh_status || entry.read_at.elapsed() < STATUS_CACHE_TTL)
        {
            return Ok((entry.pool.clone(), entry.status.clone()));
        }
        // Boxed: the database read is the cold path, and keeping its large future out of this
        // one keeps every grab's future small (it is moved into boxes on the way through the
        // HTTP stack).
        let model = Box::pin(self.store.campaign(id))
            .await?
            .ok_or_else(|| CampaignError::UnknownCampaign(id.to_string()))?;
        let pool = Arc::new(pool_campaign(&model));
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED_CAMPAIGNS {
            cache.clear();
        }
        cache.insert(
            id,
            CachedCampaign {
                pool: pool.clone(),
                status: model.status.clone(),
                read_at: Instant::now(),
            },
        );
        Ok((pool, model.status))
    }

    /// The hot path: one call to the pool's atomic script.
    pub async fn grab(
        &self,
        campaign_id: &str,
        user_id: &str,
        request_id: &str,
    ) -> Result<Grabbed, CampaignError> {
        let id = parse_campaign_id(campaign_id)?;
        let user_id = parse_owner_id("user_id", user_id)?;
        let (campaign, _) = self.cached(id, false).await?;
        let snowflake = self
            .ids
            .next_id()
            .map_err(|err| CampaignError::Ids(err.to_string()))?;
        let claim_id = claim_id(snowflake, id);
        let outcome = self
            .pool
            .grab(&campaign, &user_id, &claim_id, now_ms(), request_id)
            .await?;
        match outcome {
            GrabOutcome::Granted {
                amount,
                currency,
                last,
                ..
            } => {
                if last {
                    self.lifecycle_wakeup.notify_one();
                }
                Ok(Grabbed {
                    claim_id,
                    campaign_id: id,
                    amount,
                    currency,
                })
            }
            GrabOutcome::NotStarted => {
                // A cancel can land while the pool is being loaded; the database has the last
                // word (read at most once a second per campaign while the crowd waits).
                let (_, current) = Box::pin(self.cached(id, true)).await?;
                Err(if current == status::CANCELLED {
                    CampaignError::Cancelled
                } else {
                    CampaignError::NotStarted
                })
            }
            GrabOutcome::Ended => Err(CampaignError::Ended),
            GrabOutcome::SoldOut => Err(CampaignError::SoldOut),
            GrabOutcome::Cancelled => Err(CampaignError::Cancelled),
            GrabOutcome::LimitReached { claims } => Err(CampaignError::LimitReached(claims)),
            GrabOutcome::NotLoaded => {
                // The pool knows nothing yet: the database says why.
                let (_, status) = Box::pin(self.cached(id, true)).await?;
                Err(match status.as_str() {
                    status::FUNDING => CampaignError::NotFunded,
                    status::SCHEDULED => CampaignError::NotStarted,
                    // Active means its pool was loaded: the pool's store lost it. The
                    // lifecycle notices and rebuilds it; until then, a fast 503.
                    status::ACTIVE => {
                        self.lifecycle_wakeup.notify_one();
                        CampaignError::PoolRebuilding
                    }
                    status::REJECTED => CampaignError::Rejected("funding failed".into()),
                    status::CANCELLED => CampaignError::Cancelled,
                    status::EXHAUSTED => CampaignError::SoldOut,
                    _ => CampaignError::Ended,
                })
            }
        }
    }

    /// `funding` → `scheduled`. Idempotent: a funded campaign answers as it is.
    pub async fn mark_funded(&self, id: &str) -> Result<campaign::Model, CampaignError> {
        let campaign = self.campaign(id).await?;
        if campaign.status == status::FUNDING {
            self.store
                .transition(
                    campaign.id,
                    &[status::FUNDING],
                    status::SCHEDULED,
                    None,
                    None,
                    now_ms(),
                )
                .await?;
            self.forget_cached(campaign.id);
            self.lifecycle_wakeup.notify_one();
        }
        let campaign = self.campaign(id).await?;
        match campaign.status.as_str() {
            status::FUNDING | status::REJECTED => {
                Err(CampaignError::WrongState(campaign.status, status::FUNDING))
            }
            // Cancelled while the funding saga ran: it must give the money back.
            status::CANCELLED => Err(CampaignError::Cancelled),
            _ => Ok(campaign),
        }
    }

    /// `funding` → `rejected` with the reason. Idempotent.
    pub async fn mark_rejected(
        &self,
        id: &str,
        reason: &str,
    ) -> Result<campaign::Model, CampaignError> {
        let campaign = self.campaign(id).await?;
        if campaign.status == status::FUNDING {
            self.store
                .transition(
                    campaign.id,
                    &[status::FUNDING],
                    status::REJECTED,
                    Some(reason.to_owned()),
                    None,
                    now_ms(),
                )
                .await?;
            self.forget_cached(campaign.id);
        }
        let campaign = self.campaign(id).await?;
        match campaign.status.as_str() {
            status::REJECTED => Ok(campaign),
            // Cancelled while its funding was being refused: the funding saga ends, nothing
            // having moved, and the refund settles the campaign.
            status::CANCELLED => Err(CampaignError::Cancelled),
            _ => Err(CampaignError::WrongState(campaign.status, status::FUNDING)),
        }
    }

    /// Cancels before the start (from `funding` or `scheduled`), atomically with the grabs.
    pub async fn cancel(
        &self,
        id: &str,
        merchant_id: Option<&str>,
    ) -> Result<campaign::Model, CampaignError> {
        let campaign = self.campaign(id).await?;
        if merchant_id.is_some_and(|m| m != campaign.merchant_id) {
            return Err(CampaignError::UnknownCampaign(id.to_owned()));
        }
        if campaign.status == status::CANCELLED {
            return Ok(campaign);
        }
        if ![status::FUNDING, status::SCHEDULED].contains(&campaign.status.as_str()) {
            return Err(CampaignError::WrongState(
                campaign.status,
                "funding or scheduled",
            ));
        }
        let now = now_ms();
        if now >= campaign.starts_at_ms {
            return Err(CampaignError::AlreadyStarted);
        }
        if self.pool.cancel(&pool_campaign(&campaign), now).await? == CancelOutcome::AlreadyStarted
        {
            return Err(CampaignError::AlreadyStarted);
        }
        let event_id = self.next_id()?;
        self.store
            .transition(
                campaign.id,
                &[status::FUNDING, status::SCHEDULED],
                status::CANCELLED,
                Some("cancelled by the merchant".into()),
                Some((event_id, event_kind::ENDED)),
                now,
            )
            .await?;
        self.forget_cached(campaign.id);
        let campaign = self.campaign(id).await?;
        if campaign.status == status::CANCELLED {
            Ok(campaign)
        } else {
            Err(CampaignError::WrongState(
                campaign.status,
                "funding or scheduled",
            ))
        }
    }

    /// Records a claim from the hand-off (idempotent) and drops its pending copy.
    pub async fn record_claim(&self, record: ClaimRecord) -> Result<claim::Model, CampaignError> {
        if campaign_of_claim(&record.id) != Some(record.campaign_id) {
            return Err(invalid(
                "claim_id",
                "the claim id does not belong to that campaign",
            ));
        }
        let rebuilt = self.store.rebuilt_limits(&[record.campaign_id]).await?;
        let claim = match rebuilt.get(&record.campaign_id) {
            Some(&limit) => self.record_checked(&record, limit).await?,
            None => self.store.record_claim(&record).await?,
        };
        self.pool
            .forget_pending(record.campaign_id, &[&record.id])
            .await?;
        Ok(claim)
    }

    /// Records many claims (distinct ids) from the hand-off, each as [`Self::record_claim`]
    /// would, with one transaction for the batch: each claim's own answer, in order.
    pub async fn record_claims(
        &self,
        records: Vec<ClaimRecord>,
    ) -> Result<Vec<Result<claim::Model, CampaignError>>, CampaignError> {
        let mut answers: Vec<Option<Result<claim::Model, CampaignError>>> = Vec::new();
        let mut valid = Vec::with_capacity(records.len());
        let mut campaigns: Vec<i64> = records.iter().map(|r| r.campaign_id).collect();
        campaigns.sort_unstable();
        campaigns.dedup();
        let rebuilt = self.store.rebuilt_limits(&campaigns).await?;
        for record in records {
            if let Some(&limit) = rebuilt.get(&record.campaign_id)
                && campaign_of_claim(&record.id) == Some(record.campaign_id)
            {
                // A rebuilt pool's claims, one by one with the checks (a rare path).
                let result = self.record_checked(&record, limit).await;
                if let Ok(claim) = &result {
                    self.pool
                        .forget_pending(claim.campaign_id, &[&claim.id])
                        .await?;
                }
                answers.push(Some(result));
            } else if campaign_of_claim(&record.id) == Some(record.campaign_id) {
                answers.push(None);
                valid.push(record);
            } else {
                answers.push(Some(Err(invalid(
                    "claims",
                    format!(
                        "claim id `{}` does not belong to campaign {}",
                        record.id, record.campaign_id
                    ),
                ))));
            }
        }
        let mut recorded = self.store.record_claims(&valid).await?.into_iter();
        let mut forget: BTreeMap<i64, Vec<&str>> = BTreeMap::new();
        for answer in answers.iter_mut().filter(|answer| answer.is_none()) {
            let result = recorded
                .next()
                .unwrap_or_else(|| Err(StoreError::ClaimMismatch("missing from the batch".into())));
            *answer = Some(result.map_err(CampaignError::from));
        }
        for claim in answers.iter().flatten().flatten() {
            forget.entry(claim.campaign_id).or_default().push(&claim.id);
        }
        for (campaign_id, ids) in forget {
            self.pool.forget_pending(campaign_id, &ids).await?;
        }
        Ok(answers.into_iter().flatten().collect())
    }

    /// A claim of a campaign whose pool was rebuilt, with the checks of
    /// [`Store::record_claim_checked`]; whether the rebuilt pool granted it is whether it still
    /// holds the claim as pending.
    async fn record_checked(
        &self,
        record: &ClaimRecord,
        per_user_limit: i64,
    ) -> Result<claim::Model, CampaignError> {
        let granted_by_rebuilt_pool = self
            .pool
            .pending_claim(record.campaign_id, &record.id)
            .await?
            .is_some();
        Ok(self
            .store
            .record_claim_checked(record, per_user_limit, granted_by_rebuilt_pool)
            .await?)
    }

    pub async fn mark_credited(&self, claim_id: &str) -> Result<claim::Model, CampaignError> {
        self.recorded_claim(claim_id).await?;
        Ok(self.store.mark_credited(claim_id, now_ms()).await?)
    }

    /// Marks many claims (distinct ids) credited, each as [`Self::mark_credited`] would, with
    /// one transaction for the batch: each claim's own answer, in order.
    pub async fn mark_claims_credited(
        &self,
        claim_ids: &[&str],
    ) -> Result<Vec<Result<claim::Model, CampaignError>>, CampaignError> {
        Ok(self
            .store
            .mark_claims_credited(claim_ids, now_ms())
            .await?
            .into_iter()
            .map(|result| {
                result.map_err(|err| match err {
                    StoreError::ClaimState(id, status, _) if status == "unrecorded" => {
                        CampaignError::UnknownClaim(id)
                    }
                    other => CampaignError::from(other),
                })
            })
            .collect())
    }

    /// Compensates a claim: its packet goes back to the pool while the campaign is live, and
    /// otherwise stays out for the refund.
    pub async fn mark_compensated(
        &self,
        claim_id: &str,
        reason: &str,
    ) -> Result<claim::Model, CampaignError> {
        let claim = self.recorded_claim(claim_id).await?;
        if claim.status == claim_status::COMPENSATED {
            return Ok(claim);
        }
        if claim.status != claim_status::PENDING {
            return Err(CampaignError::ClaimState(format!(
                "claim `{claim_id}` is {}; it cannot be compensated",
                claim.status
            )));
        }
        let (campaign, _) = self.cached(claim.campaign_id, false).await?;
        let returned = self
            .pool
            .return_packet(
                &campaign,
                claim_id,
                u32::try_from(claim.packet_seq).unwrap_or(0),
                claim.amount,
            )
            .await?;
        Ok(self
            .store
            .mark_compensated(claim_id, reason, returned, now_ms())
            .await?)
    }

    async fn recorded_claim(&self, claim_id: &str) -> Result<claim::Model, CampaignError> {
        self.store
            .claim(claim_id)
            .await?
            .ok_or_else(|| CampaignError::UnknownClaim(claim_id.to_owned()))
    }

    /// A claim from the database, or from the pool while it is not yet recorded.
    pub async fn claim(&self, claim_id: &str) -> Result<ClaimView, CampaignError> {
        if let Some(claim) = self.store.claim(claim_id).await? {
            return Ok(ClaimView::Recorded(claim));
        }
        let unknown = || CampaignError::UnknownClaim(claim_id.to_owned());
        let campaign_id = campaign_of_claim(claim_id).ok_or_else(unknown)?;
        let pending = self.pool.pending_claim(campaign_id, claim_id).await?;
        // The saga may have recorded it between the two reads.
        if let Some(claim) = self.store.claim(claim_id).await? {
            return Ok(ClaimView::Recorded(claim));
        }
        let pending = pending.ok_or_else(unknown)?;
        let (campaign, _) = self.cached(campaign_id, false).await?;
        Ok(ClaimView::Pending {
            campaign_id,
            currency: campaign.currency.clone(),
            pending,
        })
    }

    /// Marks an ended campaign settled with the amount its refund returned.
    pub async fn settle(
        &self,
        id: &str,
        amount_refunded: i64,
    ) -> Result<campaign::Model, CampaignError> {
        let campaign = self.campaign(id).await?;
        if campaign.status != status::SETTLED {
            let moved = self
                .store
                .settle(campaign.id, amount_refunded, now_ms())
                .await?;
            if !moved {
                return Err(CampaignError::WrongState(
                    campaign.status,
                    "exhausted, expired or cancelled",
                ));
            }
        }
        // Settled: no grab can come and every claim is finished, so the pool's keys go (the
        // final counters are in the database). A repeated settle purges again, harmlessly.
        self.pool.purge(&pool_campaign(&campaign)).await?;
        self.campaign(id).await
    }

    /// Statistics from the pool's counters and the claim counters.
    pub async fn stats(&self, id: &str) -> Result<Stats, CampaignError> {
        let campaign = self.campaign(id).await?;
        let counters = self
            .store
            .stats(campaign.id)
            .await?
            .unwrap_or_else(|| empty_stats(campaign.id));
        let (packets_remaining, amount_remaining) = match (
            counters.packets_remaining_final,
            counters.amount_remaining_final,
        ) {
            (Some(packets), Some(amount)) => (packets, amount),
            _ => match self.pool.snapshot(campaign.id).await? {
                Some(snapshot) => (snapshot.packets_left, snapshot.amount_left),
                None => (i64::from(campaign.packet_count), campaign.total_amount),
            },
        };
        Ok(Stats {
            status: campaign.status,
            packets_total: i64::from(campaign.packet_count),
            packets_remaining,
            packets_credited: counters.packets_credited,
            packets_compensated: counters.packets_compensated,
            packets_returned: counters.packets_returned,
            amount_total: campaign.total_amount,
            amount_remaining,
            amount_credited: counters.amount_credited,
            amount_compensated: counters.amount_compensated,
            amount_returned: counters.amount_returned,
            amount_refunded: counters.amount_refunded,
        })
    }

    /// One pass of the lifecycle: load pools near their start, start, end.
    pub async fn lifecycle_tick(&self) -> Result<(), CampaignError> {
        let now = now_ms();
        for campaign in self.store.live_campaigns().await? {
            if let Err(err) = self.advance(&campaign, now).await {
                tracing::warn!(campaign = campaign.id, error = %err, "lifecycle step failed");
            }
        }
        Ok(())
    }

    async fn advance(&self, campaign: &campaign::Model, now: i64) -> Result<(), CampaignError> {
        let pool = pool_campaign(campaign);
        if now < campaign.ends_at_ms && self.recover_lost_pool(campaign, &pool, now).await? {
            return Ok(());
        }
        if campaign.pool_state != pool_state::LOADED
            && campaign.pool_state != pool_state::CLOSED
            && now >= campaign.starts_at_ms - crate::LOAD_LEAD_MS
            && now < campaign.ends_at_ms
            && self
                .store
                .claim_pool_load(campaign.id, now, crate::LOAD_STALE_MS)
                .await?
        {
            let packets = self.store.packets(campaign.id).await?;
            let loaded_now = self.pool.load(&pool, &packets).await?;
            self.store
                .set_pool_state(campaign.id, pool_state::LOADED)
                .await?;
            tracing::info!(
                campaign = campaign.id,
                packets = packets.len(),
                loaded_now,
                "pool loaded"
            );
            // A cancel that found no pool may have landed while this one loaded: the
            // database's word wins, so the pool is cancelled too (time 0 passes the window).
            let current = self.store.campaign(campaign.id).await?;
            if current.is_some_and(|c| c.status == status::CANCELLED) {
                self.pool.cancel(&pool, 0).await?;
            }
            return Ok(());
        }
        let ended_by_time = now >= campaign.ends_at_ms;
        let snapshot = if ended_by_time {
            self.pool.close(campaign.id).await?
        } else {
            self.pool.snapshot(campaign.id).await?
        };
        let exhausted = snapshot.as_ref().is_some_and(|s| s.state == "exhausted");
        if exhausted || ended_by_time {
            let (packets_left, amount_left) = match &snapshot {
                Some(snapshot) => (snapshot.packets_left, snapshot.amount_left),
                // No pool (never loaded, or lost): what the database says no claim holds.
                None => {
                    let contents = self.store.pool_contents(campaign.id).await?;
                    (
                        i64::try_from(contents.available.len()).unwrap_or(i64::MAX),
                        contents.available.iter().map(|(_, amount)| amount).sum(),
                    )
                }
            };
            self.store
                .finalize_remaining(campaign.id, packets_left, amount_left)
                .await?;
            let to = if exhausted {
                status::EXHAUSTED
            } else {
                status::EXPIRED
            };
            let event_id = self.next_id()?;
            if self
                .store
                .transition(
                    campaign.id,
                    &[status::SCHEDULED, status::ACTIVE],
                    to,
                    None,
                    Some((event_id, event_kind::ENDED)),
                    now,
                )
                .await?
            {
                tracing::info!(
                    campaign = campaign.id,
                    status = to,
                    packets_left,
                    "campaign ended"
                );
            }
            if snapshot.is_some() {
                self.store
                    .set_pool_state(campaign.id, pool_state::CLOSED)
                    .await?;
            }
            return Ok(());
        }
        if campaign.status == status::SCHEDULED
            && campaign.pool_state == pool_state::LOADED
            && now >= campaign.starts_at_ms
        {
            self.store
                .transition(
                    campaign.id,
                    &[status::SCHEDULED],
                    status::ACTIVE,
                    None,
                    None,
                    now,
                )
                .await?;
        }
        Ok(())
    }

    /// Notices a live campaign's pool that its store lost, and rebuilds it from the database
    /// once no claim of the campaign was newly recorded for the quiet period. True when the
    /// campaign's pool is lost (nothing else to do for it this pass).
    async fn recover_lost_pool(
        &self,
        campaign: &campaign::Model,
        pool: &PoolCampaign,
        now: i64,
    ) -> Result<bool, CampaignError> {
        let live = [status::SCHEDULED, status::ACTIVE].contains(&campaign.status.as_str());
        match campaign.pool_state.as_str() {
            pool_state::LOADED if live => {
                if self.pool.snapshot(campaign.id).await?.is_some() {
                    return Ok(false);
                }
                if self.store.mark_pool_lost(campaign.id, now).await? {
                    tracing::error!(
                        campaign = campaign.id,
                        "the campaign's packet pool is gone from its store; it will be rebuilt from the database"
                    );
                }
                Ok(true)
            }
            pool_state::LOST | pool_state::REBUILDING if live => {
                let recorded = self
                    .store
                    .stats(campaign.id)
                    .await?
                    .map_or(0, |stats| stats.packets_recorded);
                let quiet_ms = i64::try_from(self.rebuild_quiet.as_millis()).unwrap_or(i64::MAX);
                let quiet_since = {
                    let mut watch = self.quiet_since.lock().unwrap_or_else(|p| p.into_inner());
                    let entry = watch.entry(campaign.id).or_insert((recorded, now));
                    if entry.0 != recorded {
                        *entry = (recorded, now);
                    }
                    entry.1
                };
                let lost_since = campaign.pool_claimed_at_ms.unwrap_or(now);
                if now - quiet_since < quiet_ms
                    || now - lost_since < quiet_ms
                    || !self
                        .store
                        .claim_pool_rebuild(campaign.id, now, REBUILD_STALE_MS)
                        .await?
                {
                    return Ok(true);
                }
                let contents = self.store.pool_contents(campaign.id).await?;
                let rebuilt = self.pool.rebuild(pool, &contents).await?;
                self.store.mark_pool_rebuilt(campaign.id).await?;
                // A cancel that found no pool may have landed while this one was rebuilt: the
                // database's word wins, as after a first load.
                let current = self.store.campaign(campaign.id).await?;
                if current.is_some_and(|c| c.status == status::CANCELLED) {
                    self.pool.cancel(pool, 0).await?;
                }
                self.quiet_since
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&campaign.id);
                tracing::warn!(
                    campaign = campaign.id,
                    packets = contents.available.len(),
                    users = contents.users.len(),
                    rebuilt,
                    "lost packet pool rebuilt from the database"
                );
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The claims of a user, newest first.
    pub async fn claims_of_user(
        &self,
        user_id: &str,
        before: Option<&str>,
        limit: u64,
    ) -> Result<Vec<claim::Model>, CampaignError> {
        let user_id = parse_owner_id("user_id", user_id)?;
        Ok(self.store.claims_of_user(&user_id, before, limit).await?)
    }

    /// The claims of a campaign, newest first.
    pub async fn claims_of_campaign(
        &self,
        id: &str,
        before: Option<&str>,
        limit: u64,
    ) -> Result<Vec<claim::Model>, CampaignError> {
        let campaign = self.campaign(id).await?;
        Ok(self
            .store
            .claims_of_campaign(campaign.id, before, limit)
            .await?)
    }
}

fn empty_stats(campaign_id: i64) -> stats::Model {
    stats::Model {
        campaign_id,
        shard: 0,
        packets_recorded: 0,
        amount_recorded: 0,
        packets_credited: 0,
        amount_credited: 0,
        packets_compensated: 0,
        amount_compensated: 0,
        packets_returned: 0,
        amount_returned: 0,
        packets_remaining_final: None,
        amount_remaining_final: None,
        amount_refunded: 0,
    }
}

/// What the pool needs of a campaign row.
pub fn pool_campaign(model: &campaign::Model) -> PoolCampaign {
    PoolCampaign {
        id: model.id,
        currency: model.currency.clone(),
        starts_at_ms: model.starts_at_ms,
        ends_at_ms: model.ends_at_ms,
        per_user_limit: u32::try_from(model.per_user_limit).unwrap_or(1),
        buckets: u32::try_from(model.buckets).unwrap_or(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_ids_name_their_campaign_and_sort_by_time() {
        let a = claim_id(1, 42);
        let b = claim_id(2, 7);
        assert!(a < b);
        assert_eq!(campaign_of_claim(&a), Some(42));
        assert_eq!(campaign_of_claim(&b), Some(7));
        assert_eq!(campaign_of_claim("nope"), None);
        assert_eq!(campaign_of_claim(&"z".repeat(32)), None);
    }
}
