//! The campaign side of an operator's repair: what the pool and the campaign database can put
//! right on their own, and what the saga worker must re-drive.
//!
//! Per campaign not settled, oldest first:
//!
//! 1. a claim the pool granted (pending in Redis) that the database does not know, older than
//!    the age bound, is recorded from the pool, with the checks a rebuilt pool's claims get
//!    (a packet another claim holds, or a user over the limit, is recorded `compensated`);
//! 2. a live campaign's pool is compared with the database and mended: a packet no claim holds
//!    that is in no bucket goes back, a packet a claim holds that is still in a bucket leaves,
//!    a duplicate or a foreign item leaves, and the counters are set to what the buckets hold;
//!    a pool that is gone goes through the lost-pool rebuild;
//! 3. claims still `pending` past the age bound and ended campaigns not settled are answered
//!    for the saga worker, which owns their sagas and decides whether to re-drive them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::{CampaignError, CampaignService, invalid, now_ms, pool_campaign};
use crate::entity::{campaign, claim};
use crate::pool::{Inventory, Mend, MendOutcome, PoolError, PoolInventory};
use crate::store::{ClaimRecord, Conflicts, StoreError, pool_state, status};
use redpacket_common::lease::{Lease, LeaseError};

/// The most items (findings and candidates for the saga worker) one repair call answers.
pub const MAX_REPAIR_ITEMS: usize = 500;
/// Items per call unless the caller says otherwise.
pub const DEFAULT_REPAIR_ITEMS: usize = 100;
/// Campaigns not settled looked at per call, from the cursor on, oldest first.
pub const MAX_REPAIR_CAMPAIGNS: u64 = 1_000;
/// The largest pool (packets, pending claims and returns) a repair reads whole in one Redis
/// script; a larger one is left alone (reading it would stall every grab behind the script).
pub const MAX_INSPECTED_POOL_ITEMS: usize = 100_000;
/// The most packets, and the most claims, of one campaign a repair reads from the database to
/// compare with its pool; a larger campaign's pool is not compared.
pub const MAX_COMPARED_ROWS: u64 = 200_000;
/// The most corrections one mend applies: the rest is left for the next call (`more`), so one
/// script stays bounded whatever the pool's state.
pub const MAX_MENDS_PER_CALL: usize = 1_000;
/// Time one repair call may spend before it answers what it did (`more` then says so).
pub const REPAIR_TIME_BUDGET: Duration = Duration::from_secs(5);
/// The repair lease's time to live, renewed while the repair runs: a replica that dies
/// mid-repair frees it within this time.
const REPAIR_LEASE_TTL: Duration = Duration::from_secs(30);
/// Ids named at most in one finding's text.
const IDS_SHOWN: usize = 20;

/// What a repair call is asked to do.
#[derive(Debug, Clone)]
pub struct RepairOptions {
    /// The most items answered (1 to [`MAX_REPAIR_ITEMS`]).
    pub limit: usize,
    /// Only claims grabbed, and campaigns ended, longer ago than this are taken: younger ones
    /// are still moving on the normal path. At least the service's floor
    /// ([`CampaignService::repair_min_age`]).
    pub min_age_ms: i64,
    /// Where to resume: the cursor the previous call answered, or `None` to start at the
    /// oldest campaign not settled.
    pub cursor: Option<RepairCursor>,
}

/// Where a repair call stopped, for the next call to resume: a campaign, and within it the
/// stage and the last claim done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairCursor {
    pub campaign_id: i64,
    pub stage: CursorStage,
}

/// The stage of a campaign's repair a cursor resumes at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CursorStage {
    /// From the start: the pool's unrecorded claims, the mend, the pending claims.
    Start,
    /// The pool's unrecorded claims after this claim id, then the rest.
    Unrecorded { after: String },
    /// The mend (the unrecorded claims are done, those left unrepaired passed), then the rest.
    Mend,
    /// The claims still `pending` (after this claim id when given; the pool is done), then the
    /// ended campaign's refund.
    Pending { after: Option<String> },
    /// Only the ended campaign's refund is left.
    End,
}

impl std::fmt::Display for RepairCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.stage {
            CursorStage::Start => write!(f, "{}", self.campaign_id),
            CursorStage::Unrecorded { after } => write!(f, "{}:u:{after}", self.campaign_id),
            CursorStage::Mend => write!(f, "{}:m", self.campaign_id),
            CursorStage::Pending { after: None } => write!(f, "{}:p", self.campaign_id),
            CursorStage::Pending { after: Some(after) } => {
                write!(f, "{}:p:{after}", self.campaign_id)
            }
            CursorStage::End => write!(f, "{}:e", self.campaign_id),
        }
    }
}

impl std::str::FromStr for RepairCursor {
    type Err = CampaignError;

    /// The text a report's cursor was shown as: `CAMPAIGN`, `CAMPAIGN:u:CLAIM`, `CAMPAIGN:m`,
    /// `CAMPAIGN:p`, `CAMPAIGN:p:CLAIM` or `CAMPAIGN:e`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let refused = || invalid("cursor", "not a cursor a repair answered");
        let mut parts = text.splitn(3, ':');
        let campaign_id: i64 = parts
            .next()
            .and_then(|id| id.parse().ok())
            .filter(|id| *id >= 0)
            .ok_or_else(refused)?;
        let stage = match (parts.next(), parts.next()) {
            (None, None) => CursorStage::Start,
            (Some("m"), None) => CursorStage::Mend,
            (Some("p"), None) => CursorStage::Pending { after: None },
            (Some("e"), None) => CursorStage::End,
            (Some(kind), Some(after))
                if !after.is_empty()
                    && after.len() <= 64
                    && after
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-') =>
            {
                match kind {
                    "u" => CursorStage::Unrecorded {
                        after: after.to_owned(),
                    },
                    "p" => CursorStage::Pending {
                        after: Some(after.to_owned()),
                    },
                    _ => return Err(refused()),
                }
            }
            _ => return Err(refused()),
        };
        Ok(RepairCursor { campaign_id, stage })
    }
}

/// One thing found wrong, and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// `claim_unrecorded`, `pool_mismatch`, `pool_lost`, `packet_granted_twice` or
    /// `repair_failed`.
    pub kind: &'static str,
    /// The claim or campaign.
    pub id: String,
    pub repaired: bool,
    /// What was done, or why it could not be.
    pub action: String,
}

/// What a repair call did, and what it leaves to the saga worker.
#[derive(Debug, Clone, Default)]
pub struct RepairReport {
    pub findings: Vec<Finding>,
    /// Claims still `pending` past the age bound (their saga may be lost).
    pub pending_claims: Vec<claim::Model>,
    /// Campaigns ended past the age bound and not settled (their refund may be lost).
    pub ended_campaigns: Vec<campaign::Model>,
    /// Whether the call stopped at its item or time bound before looking at everything.
    pub more: bool,
    /// Where the next call resumes when `more` is true.
    pub cursor: Option<RepairCursor>,
}

/// A repair call's bounds: its items, its time, and its lease (a call that lost it stops, so
/// that two replicas do not repair at once).
#[derive(Debug, Clone, Copy)]
struct Bound<'a> {
    started: Instant,
    limit: usize,
    lease: &'a Lease,
}

impl Bound<'_> {
    fn reached(self, report: &RepairReport) -> bool {
        report.items() >= self.limit
            || self.started.elapsed() >= REPAIR_TIME_BUDGET
            || self.lease.is_lost()
    }
}

impl RepairReport {
    fn items(&self) -> usize {
        self.findings.len() + self.pending_claims.len() + self.ended_campaigns.len()
    }
}

fn named(ids: &[String]) -> String {
    let mut text = ids
        .iter()
        .take(IDS_SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if ids.len() > IDS_SHOWN {
        text.push_str(&format!(" and {} more", ids.len() - IDS_SHOWN));
    }
    text
}

fn is_live(campaign: &campaign::Model, now_ms: i64) -> bool {
    [status::SCHEDULED, status::ACTIVE].contains(&campaign.status.as_str())
        && now_ms < campaign.ends_at_ms
}

impl CampaignService {
    /// Finds and repairs what the campaign service owns (see the module's documentation). One
    /// repair at a time per process: a second call meanwhile is refused with
    /// [`CampaignError::RepairBusy`]. A `min_age_ms` below the service's floor is refused:
    /// younger grants may still be on their way to the database, and a repair racing them
    /// would judge a claim by a row that lags the pool.
    pub async fn repair(&self, options: RepairOptions) -> Result<RepairReport, CampaignError> {
        let floor_ms = i64::try_from(self.repair_min_age.as_millis()).unwrap_or(i64::MAX);
        if options.min_age_ms < floor_ms {
            return Err(invalid(
                "min_age_ms",
                format!("`min_age_ms` must be at least {floor_ms} (this service's floor)"),
            ));
        }
        let _permit = self
            .repair_gate
            .try_acquire()
            .map_err(|_| CampaignError::RepairBusy)?;
        let lease = self
            .repair_leases
            .try_acquire(&self.repair_lease_key, REPAIR_LEASE_TTL)
            .await
            .map_err(|err| match err {
                LeaseError::Redis(err) => CampaignError::PoolUnavailable(PoolError::Redis(err)),
                other => CampaignError::PoolUnavailable(PoolError::Protocol(other.to_string())),
            })?
            .ok_or(CampaignError::RepairBusy)?;
        let report = self.repair_leased(options, &lease).await;
        if let Err(err) = lease.release().await {
            // It expires by itself within its ttl.
            tracing::warn!(error = %err, "the repair lease was not released");
        }
        report
    }

    async fn repair_leased(
        &self,
        options: RepairOptions,
        lease: &Lease,
    ) -> Result<RepairReport, CampaignError> {
        let started = Instant::now();
        let limit = options.limit.clamp(1, MAX_REPAIR_ITEMS);
        let bound = Bound {
            started,
            limit,
            lease,
        };
        let before_ms = now_ms() - options.min_age_ms;
        let mut report = RepairReport::default();
        let from = options
            .cursor
            .as_ref()
            .map_or(0, |cursor| cursor.campaign_id);
        let campaigns = self
            .store
            .unsettled_campaigns(from, MAX_REPAIR_CAMPAIGNS)
            .await?;
        let whole_page = campaigns.len() as u64 == MAX_REPAIR_CAMPAIGNS;
        let last = campaigns.last().map(|campaign| campaign.id);
        for campaign in campaigns {
            let stage = match &options.cursor {
                Some(cursor) if cursor.campaign_id == campaign.id => cursor.stage.clone(),
                _ => CursorStage::Start,
            };
            if bound.reached(&report) {
                report.more = true;
                report.cursor = Some(RepairCursor {
                    campaign_id: campaign.id,
                    stage,
                });
                return Ok(report);
            }
            match self
                .repair_one(&campaign, stage, before_ms, bound, &mut report)
                .await
            {
                Ok(None) => {}
                Ok(Some(stage)) => {
                    report.more = true;
                    report.cursor = Some(RepairCursor {
                        campaign_id: campaign.id,
                        stage,
                    });
                    return Ok(report);
                }
                // One campaign's failure (its pool unreadable, a statement refused) is that
                // campaign's finding: the others are still repaired, and what was done is
                // still answered.
                Err(err) => {
                    tracing::warn!(campaign = campaign.id, error = %err, "repair of a campaign failed");
                    report.findings.push(Finding {
                        kind: "repair_failed",
                        id: campaign.id.to_string(),
                        repaired: false,
                        action: format!("the repair of this campaign failed, left alone: {err}"),
                    });
                }
            }
        }
        if whole_page && let Some(last) = last {
            report.more = true;
            report.cursor = Some(RepairCursor {
                campaign_id: last + 1,
                stage: CursorStage::Start,
            });
        }
        Ok(report)
    }

    /// One campaign's repair from `stage` on; answers the stage to resume at when it stopped
    /// at the call's bound.
    async fn repair_one(
        &self,
        campaign: &campaign::Model,
        stage: CursorStage,
        before_ms: i64,
        bound: Bound<'_>,
        report: &mut RepairReport,
    ) -> Result<Option<CursorStage>, CampaignError> {
        let after_pending = match stage {
            CursorStage::Start => {
                if let Some(stage) = self
                    .repair_campaign(campaign, None, before_ms, bound, report)
                    .await?
                {
                    return Ok(Some(stage));
                }
                None
            }
            CursorStage::Unrecorded { after } => {
                if let Some(stage) = self
                    .repair_campaign(campaign, Some(&after), before_ms, bound, report)
                    .await?
                {
                    return Ok(Some(stage));
                }
                None
            }
            CursorStage::Mend => {
                if let Some(stage) = self.mend_pool(campaign, bound, report).await? {
                    return Ok(Some(stage));
                }
                None
            }
            CursorStage::Pending { after } => after,
            CursorStage::End => return Ok(self.ended(campaign, before_ms, bound, report)),
        };
        let room = u64::try_from(bound.limit.saturating_sub(report.items())).unwrap_or(0);
        if room == 0 || bound.reached(report) {
            return Ok(Some(CursorStage::Pending {
                after: after_pending,
            }));
        }
        let pending = self
            .store
            .stale_pending_claims(campaign.id, before_ms, after_pending.as_deref(), room)
            .await?;
        let full = pending.len() as u64 == room;
        let last = pending.last().map(|claim| claim.id.clone());
        report.pending_claims.extend(pending);
        if full {
            return Ok(Some(CursorStage::Pending { after: last }));
        }
        Ok(self.ended(campaign, before_ms, bound, report))
    }

    /// Lists an ended campaign not settled past the age bound, for the saga worker to look at
    /// its refund; answers [`CursorStage::End`] when the call's bound leaves no room for it.
    fn ended(
        &self,
        campaign: &campaign::Model,
        before_ms: i64,
        bound: Bound<'_>,
        report: &mut RepairReport,
    ) -> Option<CursorStage> {
        if [status::EXHAUSTED, status::EXPIRED, status::CANCELLED]
            .contains(&campaign.status.as_str())
            && campaign.updated_at_ms < before_ms
        {
            if bound.reached(report) {
                return Some(CursorStage::End);
            }
            report.ended_campaigns.push(campaign.clone());
        }
        None
    }

    /// The pool's side of one campaign: its unrecorded claims (after the claim `after`), then
    /// its mend or rebuild. Answers the stage to resume at when it stopped at the bound.
    async fn repair_campaign(
        &self,
        campaign: &campaign::Model,
        after: Option<&str>,
        before_ms: i64,
        bound: Bound<'_>,
        report: &mut RepairReport,
    ) -> Result<Option<CursorStage>, CampaignError> {
        let pool = pool_campaign(campaign);
        let live = is_live(campaign, now_ms());
        match campaign.pool_state.as_str() {
            pool_state::LOST | pool_state::REBUILDING if live => {
                self.repair_lost_pool(campaign, report).await?;
                return Ok(None);
            }
            pool_state::LOADED | pool_state::CLOSED => {}
            // Not loaded yet (or being loaded): nothing in the pool to compare.
            _ => return Ok(None),
        }
        let inventory = match self.pool.inventory(&pool, MAX_INSPECTED_POOL_ITEMS).await? {
            Inventory::Held(inventory) => inventory,
            Inventory::NotLoaded => {
                if live {
                    self.repair_lost_pool(campaign, report).await?;
                }
                return Ok(None);
            }
            Inventory::NotInspected(reason) => {
                tracing::info!(
                    campaign = campaign.id,
                    reason,
                    "pool not inspected by the repair"
                );
                return Ok(None);
            }
        };
        if let Some(stage) = self
            .record_unrecorded(campaign, &inventory, after, before_ms, bound, report)
            .await?
        {
            return Ok(Some(stage));
        }
        if !live || campaign.pool_state != pool_state::LOADED {
            // An ended campaign's pool only answers stats; its packets are the refund's.
            return Ok(None);
        }
        self.mend_pool(campaign, bound, report).await
    }

    /// Compares a live pool with the database and mends it. Answers [`CursorStage::Mend`]
    /// when the call's bound leaves no room for it or the corrections were more than one mend
    /// applies: the next call mends first, so every call makes progress.
    async fn mend_pool(
        &self,
        campaign: &campaign::Model,
        bound: Bound<'_>,
        report: &mut RepairReport,
    ) -> Result<Option<CursorStage>, CampaignError> {
        let pool = pool_campaign(campaign);
        if !is_live(campaign, now_ms()) || campaign.pool_state != pool_state::LOADED {
            // An ended campaign's pool only answers stats; its packets are the refund's.
            return Ok(None);
        }
        if bound.reached(report) {
            return Ok(Some(CursorStage::Mend));
        }
        // Read again: the claims just recorded are the database's now, their pending copies
        // gone. The database is read after the pool, so a packet the pool holds in no bucket
        // and no pending claim is either held by a recorded claim or truly missing.
        let Inventory::Held(inventory) =
            self.pool.inventory(&pool, MAX_INSPECTED_POOL_ITEMS).await?
        else {
            return Ok(None);
        };
        if !["scheduled", "active"].contains(&inventory.state.as_str()) {
            // Ended in the pool (its last packet taken, closed or cancelled): a mend never
            // reopens it; the lifecycle ends the campaign and the refund takes the rest.
            return Ok(None);
        }
        let Some((packets, mut holders)) = self
            .store
            .packet_holders(campaign, MAX_COMPARED_ROWS)
            .await?
        else {
            tracing::info!(
                campaign = campaign.id,
                "pool not compared by the repair: more than {MAX_COMPARED_ROWS} packets or claims"
            );
            return Ok(None);
        };
        // A claim whose packet the pool took back (its compensation's return landed before its
        // row) holds nothing any more, whatever its row says yet.
        holders.retain(|_, claims| {
            claims.retain(|claim| !inventory.returned.contains(claim));
            !claims.is_empty()
        });
        let twice: Vec<String> = holders
            .iter()
            .filter(|(_, claims)| claims.len() > 1)
            .map(|(seq, claims)| format!("{seq} ({})", claims.join(", ")))
            .collect();
        if !twice.is_empty() {
            report.findings.push(Finding {
                kind: "packet_granted_twice",
                id: campaign.id.to_string(),
                repaired: false,
                action: format!(
                    "{} packet(s) held by more than one claim, left for an operator: seq {}",
                    twice.len(),
                    named(&twice)
                ),
            });
        }
        let (mut mends, drift) = mends_of(&inventory, &packets, &holders);
        if mends.is_empty() && drift == (0, 0) {
            return Ok(None);
        }
        // A packet granted and still in a bucket can be granted again: those removals (and the
        // duplicates' and strangers') go first, so a cap keeps them, and the campaign's later
        // records are checked from this call on even if some wait for the next one.
        mends.sort_by_key(|mend| matches!(mend, Mend::Add { .. }));
        let granted_in_bucket = mends.iter().any(|mend| matches!(mend, Mend::Held { .. }));
        let capped = mends.len() > MAX_MENDS_PER_CALL;
        mends.truncate(MAX_MENDS_PER_CALL);
        // The lifecycle may have ended the campaign since it was read: only a campaign still
        // live, with its pool loaded, is mended (the script checks the pool's own state too).
        let fresh = self
            .store
            .campaign(campaign.id)
            .await?
            .ok_or_else(|| CampaignError::UnknownCampaign(campaign.id.to_string()))?;
        if !is_live(&fresh, now_ms()) || fresh.pool_state != pool_state::LOADED {
            return Ok(None);
        }
        let describe = |kind: fn(&Mend) -> Option<u32>| -> Vec<String> {
            mends
                .iter()
                .filter_map(kind)
                .map(|seq| seq.to_string())
                .collect()
        };
        let missing = describe(|mend| match mend {
            Mend::Add { seq, .. } => Some(*seq),
            _ => None,
        });
        let extra = describe(|mend| match mend {
            Mend::Held { seq, .. } | Mend::Foreign { seq, .. } | Mend::Duplicate { seq, .. } => {
                Some(*seq)
            }
            _ => None,
        });
        let unreadable = mends
            .iter()
            .filter(|mend| matches!(mend, Mend::Unreadable { .. }))
            .count();
        let mut found = Vec::new();
        if !missing.is_empty() {
            found.push(format!(
                "{} packet(s) no claim holds were in no bucket (seq {})",
                missing.len(),
                named(&missing)
            ));
        }
        if !extra.is_empty() {
            found.push(format!(
                "{} packet(s) a claim holds, duplicated or unknown were in a bucket (seq {})",
                extra.len(),
                named(&extra)
            ));
        }
        if unreadable > 0 {
            found.push(format!("{unreadable} unreadable item(s) were in a bucket"));
        }
        if drift != (0, 0) {
            found.push(format!(
                "the counters were off the buckets by {} packet(s) and {} minor units",
                drift.0, drift.1
            ));
        }
        if capped {
            found.push(format!(
                "more than {MAX_MENDS_PER_CALL} corrections: the rest in the next call"
            ));
        }
        if granted_in_bucket {
            // A packet granted and still in a bucket may have been granted again already: from
            // now on the campaign's records are checked, as after a rebuild, so a second grant
            // is recorded `compensated` instead of credited twice.
            self.store
                .require_checked_records(campaign.id, now_ms())
                .await?;
        }
        let finding = match self
            .pool
            .mend(&pool, &inventory.version, drift, &mends)
            .await?
        {
            MendOutcome::Mended { added, removed } => {
                tracing::warn!(campaign = campaign.id, added, removed, "packet pool mended");
                Finding {
                    kind: "pool_mismatch",
                    id: campaign.id.to_string(),
                    repaired: true,
                    action: format!(
                        "{}; mended from the database: {added} packet(s) put back, {removed} item(s) taken out, counters set to the buckets",
                        found.join("; ")
                    ),
                }
            }
            MendOutcome::Moved => Finding {
                kind: "pool_mismatch",
                id: campaign.id.to_string(),
                repaired: false,
                action: format!(
                    "{}; not mended: the pool moved during the repair (a return, a rebuild or another repair); run the repair again",
                    found.join("; ")
                ),
            },
            MendOutcome::NotLive(state) => Finding {
                kind: "pool_mismatch",
                id: campaign.id.to_string(),
                repaired: false,
                action: format!(
                    "{}; not mended: the pool ended meanwhile ({state}), and an ended pool is never reopened",
                    found.join("; ")
                ),
            },
        };
        report.findings.push(finding);
        Ok(capped.then_some(CursorStage::Mend))
    }

    /// Records the claims the pool granted that the database does not know, older than the age
    /// bound, in claim id order after `after`: a grab answered whose hand-off entry was lost
    /// (a Redis failover, an entry deleted) would otherwise never be recorded nor credited.
    /// The checked record keeps every packet and every user's limit exact; the saga worker
    /// then credits the claim once, by its transfer id `grab:{claim}`. A claim that cannot be
    /// recorded is an unrepaired finding, and the cursor moves past it.
    async fn record_unrecorded(
        &self,
        campaign: &campaign::Model,
        inventory: &PoolInventory,
        after: Option<&str>,
        before_ms: i64,
        bound: Bound<'_>,
        report: &mut RepairReport,
    ) -> Result<Option<CursorStage>, CampaignError> {
        let mut unrecorded: Vec<_> = inventory
            .pending
            .iter()
            .filter(|pending| pending.grabbed_at_ms < before_ms)
            .filter(|pending| after.is_none_or(|after| pending.claim_id.as_str() > after))
            .collect();
        unrecorded.sort_by(|a, b| a.claim_id.cmp(&b.claim_id));
        // A pool never rebuilt granted each packet once at a time: a packet conflict there may
        // mean the database lags the pool (a compensation whose packet went back before its
        // row was written), so the claim is left for the next run rather than refused. A
        // rebuilt pool's rule stands.
        let conflicts = if campaign.pool_rebuilt_at_ms.is_some() {
            Conflicts::Compensate
        } else {
            Conflicts::RefuseTakenPacket
        };
        let mut done: Option<&str> = None;
        for pending in unrecorded {
            if bound.reached(report) {
                return Ok(Some(match done.or(after) {
                    Some(after) => CursorStage::Unrecorded {
                        after: after.to_owned(),
                    },
                    None => CursorStage::Start,
                }));
            }
            done = Some(&pending.claim_id);
            if self.store.claim(&pending.claim_id).await?.is_some() {
                // Recorded; only its pending copy was left behind.
                self.pool
                    .forget_pending(campaign.id, &[&pending.claim_id])
                    .await?;
                continue;
            }
            let record = ClaimRecord {
                id: pending.claim_id.clone(),
                campaign_id: campaign.id,
                user_id: pending.user_id.clone(),
                seq: pending.seq,
                amount: pending.amount,
                currency: campaign.currency.clone(),
                grabbed_at_ms: pending.grabbed_at_ms,
                request_id: None,
            };
            let finding = match self
                .store
                .record_claim_repaired(
                    &record,
                    i64::from(campaign.per_user_limit),
                    true,
                    &inventory.returned,
                    conflicts,
                )
                .await
            {
                Ok(claim) => {
                    self.pool.forget_pending(campaign.id, &[&claim.id]).await?;
                    Finding {
                        kind: "claim_unrecorded",
                        id: claim.id,
                        repaired: true,
                        action: match claim.reason {
                            Some(reason) => format!(
                                "granted by the pool, unknown to the database: recorded compensated ({reason})"
                            ),
                            None => "granted by the pool, unknown to the database: recorded pending; its saga is re-driven".to_owned(),
                        },
                    }
                }
                Err(StoreError::RecordConflict(_, code)) => Finding {
                    kind: "claim_unrecorded",
                    id: pending.claim_id.clone(),
                    repaired: false,
                    action: format!(
                        "granted by the pool, unknown to the database: not recorded ({code}: the database does not agree with a pool never rebuilt, it may lag); run the repair again later, or look at the packet's claims"
                    ),
                },
                Err(err @ (StoreError::ClaimMismatch(_) | StoreError::ClaimState(..))) => Finding {
                    kind: "claim_unrecorded",
                    id: pending.claim_id.clone(),
                    repaired: false,
                    action: format!(
                        "granted by the pool, unknown to the database: not recorded: {err}"
                    ),
                },
                Err(err) => return Err(err.into()),
            };
            report.findings.push(finding);
        }
        Ok(None)
    }

    /// A live campaign's pool that is gone: the lost-pool rebuild, with its rules (the quiet
    /// period, one rebuilder, the checked records afterwards).
    async fn repair_lost_pool(
        &self,
        campaign: &campaign::Model,
        report: &mut RepairReport,
    ) -> Result<(), CampaignError> {
        let pool = pool_campaign(campaign);
        let mut current = campaign.clone();
        // The first pass marks a loaded pool lost; the second rebuilds it if the campaign's
        // claims have been quiet long enough.
        for _ in 0..2 {
            self.recover_lost_pool(&current, &pool, now_ms()).await?;
            current = self
                .store
                .campaign(campaign.id)
                .await?
                .ok_or_else(|| CampaignError::UnknownCampaign(campaign.id.to_string()))?;
            if current.pool_state == pool_state::LOADED
                && self.pool.snapshot(campaign.id).await?.is_some()
            {
                report.findings.push(Finding {
                    kind: "pool_lost",
                    id: campaign.id.to_string(),
                    repaired: true,
                    action: "the packet pool was gone from Redis: rebuilt from the database"
                        .to_owned(),
                });
                return Ok(());
            }
        }
        report.findings.push(Finding {
            kind: "pool_lost",
            id: campaign.id.to_string(),
            repaired: false,
            action: format!(
                "the packet pool is gone from Redis ({}): it is rebuilt from the database once no claim of the campaign was recorded for {} s; run the repair again then",
                current.pool_state,
                self.rebuild_quiet.as_secs_f64()
            ),
        });
        Ok(())
    }
}

/// The corrections that make an inventory agree with the database (`packets[seq]`, and the
/// claims holding each held packet), and the counters' drift from the buckets. Public so a
/// test can put a grab between this decision and the mend.
pub fn mends_of(
    inventory: &PoolInventory,
    packets: &[i64],
    holders: &HashMap<u32, Vec<String>>,
) -> (Vec<Mend>, (i64, i64)) {
    let mut copies: HashMap<(u32, i64), usize> = HashMap::new();
    for &packet in &inventory.packets {
        *copies.entry(packet).or_default() += 1;
    }
    let pending: HashMap<u32, &str> = inventory
        .pending
        .iter()
        .map(|claim| (claim.seq, claim.claim_id.as_str()))
        .collect();
    let mut mends = Vec::new();
    for (&(seq, amount), &count) in &copies {
        let known = usize::try_from(seq)
            .ok()
            .and_then(|s| packets.get(s))
            .is_some_and(|&expected| expected == amount);
        if !known {
            mends.push(Mend::Foreign { seq, amount });
        } else if let Some(claims) = holders.get(&seq) {
            // The claim the mend checks for a return: one whose packet did not go back, if any.
            let claim = claims
                .iter()
                .find(|claim| !inventory.returned.contains(*claim))
                .unwrap_or(&claims[0]);
            mends.push(Mend::Held {
                seq,
                amount,
                claim: claim.clone(),
            });
        } else if let Some(claim) = pending.get(&seq) {
            // Granted (not recorded yet) and in a bucket too: it would be granted twice.
            mends.push(Mend::Held {
                seq,
                amount,
                claim: (*claim).to_owned(),
            });
        } else if count > 1 {
            mends.push(Mend::Duplicate {
                seq,
                amount,
                copies: u32::try_from(count).unwrap_or(u32::MAX),
            });
        }
    }
    for (seq, &amount) in packets.iter().enumerate() {
        let Ok(seq) = u32::try_from(seq) else {
            break;
        };
        let in_bucket = copies.contains_key(&(seq, amount));
        if !in_bucket && !holders.contains_key(&seq) && !pending.contains_key(&seq) {
            mends.push(Mend::Add { seq, amount });
        }
    }
    mends.extend(
        inventory
            .unreadable
            .iter()
            .map(|item| Mend::Unreadable { item: item.clone() }),
    );
    mends.sort_by_key(|mend| match mend {
        Mend::Add { seq, .. }
        | Mend::Held { seq, .. }
        | Mend::Foreign { seq, .. }
        | Mend::Duplicate { seq, .. } => i64::from(*seq),
        Mend::Unreadable { .. } => -1,
    });
    let items =
        i64::try_from(inventory.packets.len() + inventory.unreadable.len()).unwrap_or(i64::MAX);
    let amount: i64 = inventory.packets.iter().map(|(_, amount)| amount).sum();
    (
        mends,
        (inventory.left - items, inventory.left_amount - amount),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{PendingClaim, PoolVersion};

    fn inventory(packets: Vec<(u32, i64)>, pending: Vec<(u32, &str)>) -> PoolInventory {
        let left = i64::try_from(packets.len()).unwrap();
        let left_amount = packets.iter().map(|(_, amount)| amount).sum();
        PoolInventory {
            state: "scheduled".into(),
            left,
            left_amount,
            packets,
            unreadable: Vec::new(),
            returned: std::collections::HashSet::new(),
            pending: pending
                .into_iter()
                .map(|(seq, claim)| PendingClaim {
                    claim_id: claim.into(),
                    user_id: "u".into(),
                    seq,
                    amount: 0,
                    grabbed_at_ms: 0,
                })
                .collect(),
            version: PoolVersion {
                returns: 0,
                mends: String::new(),
            },
        }
    }

    #[test]
    fn a_repair_cursor_reads_back_as_it_was_shown_and_odd_ones_are_refused() {
        for stage in [
            CursorStage::Start,
            CursorStage::Unrecorded {
                after: "00ab".into(),
            },
            CursorStage::Mend,
            CursorStage::Pending { after: None },
            CursorStage::Pending {
                after: Some("00ab".into()),
            },
            CursorStage::End,
        ] {
            let cursor = RepairCursor {
                campaign_id: 42,
                stage,
            };
            assert_eq!(
                cursor.to_string().parse::<RepairCursor>().ok(),
                Some(cursor)
            );
        }
        for odd in [
            "", "-1", "x", "42:", "42:u", "42:u:", "42:q:1", "42:p:a b", "42:e:1",
        ] {
            assert!(odd.parse::<RepairCursor>().is_err(), "{odd:?}");
        }
    }

    #[test]
    fn a_pool_that_agrees_with_the_database_needs_no_mend() {
        let packets = [10, 20, 30, 40];
        let holders = HashMap::from([(1, vec!["c1".to_owned()])]);
        let pool = inventory(vec![(0, 10), (3, 40)], vec![(2, "c2")]);
        assert_eq!(mends_of(&pool, &packets, &holders), (Vec::new(), (0, 0)));
    }

    #[test]
    fn missing_held_duplicated_and_foreign_packets_are_each_mended() {
        let packets = [10, 20, 30, 40, 50];
        let holders = HashMap::from([(1, vec!["c1".to_owned()])]);
        // 0 is missing; 1 is held by c1 yet in a bucket; 2 is granted (pending) and in a
        // bucket; 3 is there twice; 9 and (4, 99) are no packets of the campaign.
        let mut pool = inventory(
            vec![(1, 20), (2, 30), (3, 40), (3, 40), (4, 50), (9, 1), (4, 99)],
            vec![(2, "c2")],
        );
        pool.left += 1;
        let (mends, drift) = mends_of(&pool, &packets, &holders);
        assert_eq!(
            mends,
            vec![
                Mend::Add { seq: 0, amount: 10 },
                Mend::Held {
                    seq: 1,
                    amount: 20,
                    claim: "c1".into()
                },
                Mend::Held {
                    seq: 2,
                    amount: 30,
                    claim: "c2".into()
                },
                Mend::Duplicate {
                    seq: 3,
                    amount: 40,
                    copies: 2
                },
                Mend::Foreign { seq: 4, amount: 99 },
                Mend::Foreign { seq: 9, amount: 1 },
            ]
        );
        assert_eq!(drift, (1, 0));
    }
}
