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

use super::{CampaignError, CampaignService, now_ms, pool_campaign};
use crate::entity::{campaign, claim};
use crate::pool::{Inventory, Mend, MendOutcome, PoolError, PoolInventory};
use crate::store::{ClaimRecord, pool_state, status};

/// The most items (findings and candidates for the saga worker) one repair call answers.
pub const MAX_REPAIR_ITEMS: usize = 500;
/// Items per call unless the caller says otherwise.
pub const DEFAULT_REPAIR_ITEMS: usize = 100;
/// Campaigns not settled looked at per call, oldest first.
pub const MAX_REPAIR_CAMPAIGNS: u64 = 1_000;
/// The largest pool (packets plus pending claims) a repair reads whole in one Redis script; a
/// larger one is left alone (reading it would stall every grab behind the script).
pub const MAX_INSPECTED_POOL_ITEMS: usize = 100_000;
/// Time one repair call may spend before it answers what it did (`more` then says so).
pub const REPAIR_TIME_BUDGET: Duration = Duration::from_secs(5);
/// Ids named at most in one finding's text.
const IDS_SHOWN: usize = 20;

/// What a repair call is asked to do.
#[derive(Debug, Clone, Copy)]
pub struct RepairOptions {
    /// The most items answered (1 to [`MAX_REPAIR_ITEMS`]).
    pub limit: usize,
    /// Only claims grabbed, and campaigns ended, longer ago than this are taken: younger ones
    /// are still moving on the normal path.
    pub min_age_ms: i64,
}

/// One thing found wrong, and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// `claim_unrecorded`, `pool_mismatch` or `pool_lost`.
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
}

/// A repair call's bounds: its items and its time.
#[derive(Debug, Clone, Copy)]
struct Bound {
    started: Instant,
    limit: usize,
}

impl Bound {
    fn reached(self, report: &RepairReport) -> bool {
        report.items() >= self.limit || self.started.elapsed() >= REPAIR_TIME_BUDGET
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

impl CampaignService {
    /// Finds and repairs what the campaign service owns (see the module's documentation). One
    /// repair at a time per process: a second call meanwhile is refused with
    /// [`CampaignError::RepairBusy`].
    pub async fn repair(&self, options: RepairOptions) -> Result<RepairReport, CampaignError> {
        let _permit = self
            .repair_gate
            .try_acquire()
            .map_err(|_| CampaignError::RepairBusy)?;
        let started = Instant::now();
        let limit = options.limit.clamp(1, MAX_REPAIR_ITEMS);
        let before_ms = now_ms() - options.min_age_ms.max(0);
        let mut report = RepairReport::default();
        for campaign in self.store.unsettled_campaigns(MAX_REPAIR_CAMPAIGNS).await? {
            let bound = Bound { started, limit };
            if bound.reached(&report) {
                report.more = true;
                break;
            }
            match self
                .repair_campaign(&campaign, before_ms, bound, &mut report)
                .await
            {
                // A pool holding what no script of ours writes is one campaign's problem, for
                // an operator: the other campaigns are still repaired.
                Err(CampaignError::PoolUnavailable(PoolError::Protocol(text))) => {
                    report.findings.push(Finding {
                        kind: "pool_mismatch",
                        id: campaign.id.to_string(),
                        repaired: false,
                        action: format!("the pool holds something unreadable, left alone: {text}"),
                    });
                }
                other => other?,
            }
            let room = u64::try_from(limit.saturating_sub(report.items())).unwrap_or(0);
            if room > 0 {
                let pending = self
                    .store
                    .stale_pending_claims(campaign.id, before_ms, room)
                    .await?;
                report.more |= pending.len() as u64 == room;
                report.pending_claims.extend(pending);
            }
            if [status::EXHAUSTED, status::EXPIRED, status::CANCELLED]
                .contains(&campaign.status.as_str())
                && campaign.updated_at_ms < before_ms
            {
                report.ended_campaigns.push(campaign);
            }
        }
        Ok(report)
    }

    async fn repair_campaign(
        &self,
        campaign: &campaign::Model,
        before_ms: i64,
        bound: Bound,
        report: &mut RepairReport,
    ) -> Result<(), CampaignError> {
        let pool = pool_campaign(campaign);
        let live = [status::SCHEDULED, status::ACTIVE].contains(&campaign.status.as_str());
        let now = now_ms();
        match campaign.pool_state.as_str() {
            pool_state::LOST | pool_state::REBUILDING if live && now < campaign.ends_at_ms => {
                return self.repair_lost_pool(campaign, report).await;
            }
            pool_state::LOADED | pool_state::CLOSED => {}
            // Not loaded yet (or being loaded): nothing in the pool to compare.
            _ => return Ok(()),
        }
        let inventory = match self.pool.inventory(&pool, MAX_INSPECTED_POOL_ITEMS).await? {
            Inventory::Held(inventory) => inventory,
            Inventory::NotLoaded => {
                if live && now < campaign.ends_at_ms {
                    return self.repair_lost_pool(campaign, report).await;
                }
                return Ok(());
            }
            Inventory::NotInspected(reason) => {
                tracing::info!(
                    campaign = campaign.id,
                    reason,
                    "pool not inspected by the repair"
                );
                return Ok(());
            }
        };
        self.record_unrecorded(campaign, &inventory, before_ms, bound, report)
            .await?;
        if report.more {
            return Ok(());
        }
        if !live || campaign.pool_state != pool_state::LOADED {
            // An ended campaign's pool only answers stats; its packets are the refund's.
            return Ok(());
        }
        // Read again: the claims just recorded are the database's now, their pending copies
        // gone. The database is read after the pool, so a packet the pool holds in no bucket
        // and no pending claim is either held by a recorded claim or truly missing.
        let Inventory::Held(inventory) =
            self.pool.inventory(&pool, MAX_INSPECTED_POOL_ITEMS).await?
        else {
            return Ok(());
        };
        let (packets, holders) = self.store.packet_holders(campaign.id).await?;
        let (mends, drift) = mends_of(&inventory, &packets, &holders);
        if mends.is_empty() && drift == (0, 0) {
            return Ok(());
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
        };
        report.findings.push(finding);
        Ok(())
    }

    /// Records the claims the pool granted that the database does not know, older than the age
    /// bound: a grab answered whose hand-off entry was lost (a Redis failover, an entry
    /// deleted) would otherwise never be recorded nor credited. The checked record keeps every
    /// packet and every user's limit exact; the saga worker then credits the claim once, by its
    /// transfer id `grab:{claim}`.
    async fn record_unrecorded(
        &self,
        campaign: &campaign::Model,
        inventory: &PoolInventory,
        before_ms: i64,
        bound: Bound,
        report: &mut RepairReport,
    ) -> Result<(), CampaignError> {
        for pending in inventory
            .pending
            .iter()
            .filter(|pending| pending.grabbed_at_ms < before_ms)
        {
            if bound.reached(report) {
                report.more = true;
                return Ok(());
            }
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
                .record_claim_checked(&record, i64::from(campaign.per_user_limit), true)
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
                Err(err) => Finding {
                    kind: "claim_unrecorded",
                    id: pending.claim_id.clone(),
                    repaired: false,
                    action: format!(
                        "granted by the pool, unknown to the database: not recorded: {err}"
                    ),
                },
            };
            report.findings.push(finding);
        }
        Ok(())
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
/// claim holding each held packet), and the counters' drift from the buckets.
fn mends_of(
    inventory: &PoolInventory,
    packets: &[i64],
    holders: &HashMap<u32, String>,
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
        } else if let Some(claim) = holders.get(&seq) {
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
            mends.push(Mend::Duplicate { seq, amount });
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
    fn a_pool_that_agrees_with_the_database_needs_no_mend() {
        let packets = [10, 20, 30, 40];
        let holders = HashMap::from([(1, "c1".to_owned())]);
        let pool = inventory(vec![(0, 10), (3, 40)], vec![(2, "c2")]);
        assert_eq!(mends_of(&pool, &packets, &holders), (Vec::new(), (0, 0)));
    }

    #[test]
    fn missing_held_duplicated_and_foreign_packets_are_each_mended() {
        let packets = [10, 20, 30, 40, 50];
        let holders = HashMap::from([(1, "c1".to_owned())]);
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
                Mend::Duplicate { seq: 3, amount: 40 },
                Mend::Foreign { seq: 4, amount: 99 },
                Mend::Foreign { seq: 9, amount: 1 },
            ]
        );
        assert_eq!(drift, (1, 0));
    }
}
