//! The verdict: after the saga drained, the invariants the system promises, checked through
//! its public API only. A pure function of what was collected, so every rule is unit-tested.
//!
//! | check | from |
//! |---|---|
//! | drained | stats: no grab in flight |
//! | grants ≤ packets | our 200 answers and stats, per campaign |
//! | per-user limit | our 200 answers, and every user's `GET /v1/me/claims` |
//! | every 200 recorded | each granted `claim_id` is in the campaign's claims, same user and amount |
//! | claims settled once | every claim credited or compensated, no claim listed twice |
//! | credited sums | credited claims' amounts and counts equal the stats' |
//! | reconciliation | `GET /v1/admin/reconciliation`: `ok` and each of its checks |
//! | reads within the retry bound | every read above answered before the harness gave up |
//!
//! A read the system kept pushing back on (429, 503, 504, no answer) past the harness's retry
//! bound tells nothing of the item: the checks leave that item out and the last row lists it,
//! so the verdict is INCOMPLETE, not FAIL, unless a check fails on what was read. Any other
//! failed read (a 500, a refusal) fails its check.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use super::api::{ClaimView, GaveUp, Reconciliation, StatsView};

/// The name of the row that lists the reads given up.
pub const READS_CHECK: &str = "reads within the retry bound";

/// Why something the verdict needs was not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unread {
    /// The system kept pushing back past the harness's retry bound
    /// ([`super::api::READ_RETRY`]): overloaded for longer than the harness waits.
    GaveUp(String),
    /// Any other failure: an error status such as 500 or 403, a body the harness cannot read.
    Failed(String),
}

impl Unread {
    /// Sorts a failed read.
    pub fn of(err: &anyhow::Error) -> Unread {
        match err.downcast_ref::<GaveUp>() {
            Some(gave_up) => Unread::GaveUp(gave_up.to_string()),
            None => Unread::Failed(format!("{err:#}")),
        }
    }

    pub fn text(&self) -> &str {
        match self {
            Unread::GaveUp(text) | Unread::Failed(text) => text,
        }
    }
}

/// A grab answered 200 during the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Granted {
    pub claim_id: String,
    pub user_id: String,
    pub amount: i64,
}

/// What was learnt about one campaign of the run.
#[derive(Debug, Clone)]
pub struct CampaignFacts {
    pub id: String,
    pub per_user_limit: i64,
    /// Stats after the drain wait; `None` when they could not be read (`stats_unread` says why).
    pub stats: Option<StatsView>,
    pub stats_unread: Option<Unread>,
    /// Every claim; empty when they could not be read (`claims_unread` says why).
    pub claims: Vec<ClaimView>,
    pub claims_unread: Option<Unread>,
    pub granted: Vec<Granted>,
}

/// Everything the verdict looks at.
#[derive(Debug, Clone, Default)]
pub struct RunFacts {
    pub campaigns: Vec<CampaignFacts>,
    /// Claims per campaign of each user who grabbed, from `GET /v1/me/claims` (only the run's
    /// campaigns). A user whose claims could not be read is in `unreadable_users`, with why.
    pub user_claims: BTreeMap<String, BTreeMap<String, i64>>,
    pub unreadable_users: Vec<(String, Unread)>,
    /// `None` when the endpoint could not be read.
    pub reconciliation: Option<Reconciliation>,
    /// Why the reconciliation could not be read, shown in the verdict.
    pub reconciliation_error: Option<Unread>,
}

/// One row of the verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// What the verdict concludes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every check passed on everything.
    Pass,
    /// A check failed.
    Fail,
    /// No check failed, but some reads gave up after the retry bound: what they would have
    /// shown is unknown.
    Incomplete,
}

/// The rows of the verdict, whether all passed, and the conclusion.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub ok: bool,
    pub outcome: Outcome,
    pub checks: Vec<Check>,
}

impl Verdict {
    pub fn new(checks: Vec<Check>) -> Self {
        let failed: Vec<&str> = checks
            .iter()
            .filter(|check| !check.ok)
            .map(|check| check.name.as_str())
            .collect();
        let outcome = match failed.as_slice() {
            [] => Outcome::Pass,
            [only] if *only == READS_CHECK => Outcome::Incomplete,
            _ => Outcome::Fail,
        };
        Verdict {
            ok: failed.is_empty(),
            outcome,
            checks,
        }
    }
}

/// At most this many offenders are named in a row's detail.
const SHOWN: usize = 5;

fn row(name: &str, offenders: Vec<String>, ok_detail: String) -> Check {
    if offenders.is_empty() {
        return Check {
            name: name.to_owned(),
            ok: true,
            detail: ok_detail,
        };
    }
    let more = offenders.len().saturating_sub(SHOWN);
    let mut detail = offenders
        .into_iter()
        .take(SHOWN)
        .collect::<Vec<_>>()
        .join("; ");
    if more > 0 {
        detail.push_str(&format!("; and {more} more"));
    }
    Check {
        name: name.to_owned(),
        ok: false,
        detail,
    }
}

/// Evaluates every check.
pub fn evaluate(facts: &RunFacts) -> Verdict {
    let campaigns = &facts.campaigns;
    let mut checks = Vec::new();

    // Stats readable and drained.
    let mut offenders = Vec::new();
    for campaign in campaigns {
        match (&campaign.stats, &campaign.stats_unread) {
            (Some(stats), _) if stats.in_flight() != 0 => offenders.push(format!(
                "{}: {} grabs still in flight",
                campaign.id,
                stats.in_flight()
            )),
            (Some(_), _) | (None, Some(Unread::GaveUp(_))) => {}
            (None, Some(Unread::Failed(why))) => {
                offenders.push(format!("{}: stats unreadable: {why}", campaign.id));
            }
            (None, None) => offenders.push(format!("{}: stats unreadable", campaign.id)),
        }
    }
    checks.push(row(
        "saga drained",
        offenders,
        format!("{} campaign(s), no grab in flight", campaigns.len()),
    ));

    // Grants never exceed packets. A compensated claim may put its packet back in the pool
    // once, so each compensation allows one more grant of the same packet.
    let mut offenders = Vec::new();
    let mut granted_total = 0;
    for campaign in campaigns {
        let granted = i64::try_from(distinct(campaign.granted.iter().map(|g| &g.claim_id)))
            .unwrap_or(i64::MAX);
        granted_total += granted;
        if let Some(stats) = &campaign.stats {
            let allowed = stats.packets_total + stats.packets_compensated;
            if granted > allowed {
                offenders.push(format!(
                    "{}: {granted} grabs answered 200 for {} packets ({} compensated)",
                    campaign.id, stats.packets_total, stats.packets_compensated
                ));
            }
            if stats.packets_grabbed > stats.packets_total {
                offenders.push(format!(
                    "{}: stats show {} grabbed of {} packets",
                    campaign.id, stats.packets_grabbed, stats.packets_total
                ));
            }
        }
    }
    checks.push(row(
        "grants <= packets",
        offenders,
        format!("{granted_total} grabs answered 200"),
    ));

    // The per-user limit, by our own answers and by every user's claims.
    let limits: HashMap<&str, i64> = campaigns
        .iter()
        .map(|c| (c.id.as_str(), c.per_user_limit))
        .collect();
    let mut offenders = Vec::new();
    for campaign in campaigns {
        let mut per_user: HashMap<&str, i64> = HashMap::new();
        for granted in &campaign.granted {
            *per_user.entry(granted.user_id.as_str()).or_default() += 1;
        }
        let mut over: Vec<_> = per_user
            .into_iter()
            .filter(|(_, count)| *count > campaign.per_user_limit)
            .collect();
        over.sort();
        for (user, count) in over {
            offenders.push(format!(
                "{}: {user} was answered 200 {count} times (limit {})",
                campaign.id, campaign.per_user_limit
            ));
        }
    }
    for (user, per_campaign) in &facts.user_claims {
        for (campaign, count) in per_campaign {
            let limit = limits.get(campaign.as_str()).copied().unwrap_or(i64::MAX);
            if *count > limit {
                offenders.push(format!(
                    "{campaign}: {user} holds {count} claims (limit {limit})"
                ));
            }
        }
    }
    for (user, unread) in &facts.unreadable_users {
        if let Unread::Failed(why) = unread {
            offenders.push(format!("{user}: GET /v1/me/claims failed: {why}"));
        }
    }
    checks.push(row(
        "per-user limit",
        offenders,
        format!("{} users' claims read", facts.user_claims.len()),
    ));

    // Every 200 is a recorded claim of the same user and amount. Campaigns whose claims were
    // not read are left out of this row and the next two.
    let mut offenders = Vec::new();
    for campaign in campaigns {
        match &campaign.claims_unread {
            Some(Unread::Failed(why)) => {
                offenders.push(format!("{}: claims unreadable: {why}", campaign.id));
                continue;
            }
            Some(Unread::GaveUp(_)) => continue,
            None => {}
        }
        let listed: HashMap<&str, &ClaimView> = campaign
            .claims
            .iter()
            .map(|claim| (claim.id.as_str(), claim))
            .collect();
        for granted in &campaign.granted {
            match listed.get(granted.claim_id.as_str()) {
                None => offenders.push(format!(
                    "{}: claim {} (answered 200) is not recorded",
                    campaign.id, granted.claim_id
                )),
                Some(claim)
                    if claim.user_id != granted.user_id || claim.amount != granted.amount =>
                {
                    offenders.push(format!(
                        "{}: claim {} answered {} to {} but recorded {} to {}",
                        campaign.id,
                        granted.claim_id,
                        granted.amount,
                        granted.user_id,
                        claim.amount,
                        claim.user_id
                    ));
                }
                Some(_) => {}
            }
        }
    }
    checks.push(row(
        "every 200 recorded",
        offenders,
        format!("{granted_total} claims found with their user and amount"),
    ));

    // Each claim settled exactly once.
    let mut offenders = Vec::new();
    let mut settled = 0;
    for campaign in campaigns.iter().filter(|c| c.claims_unread.is_none()) {
        let mut seen = HashSet::new();
        for claim in &campaign.claims {
            if !seen.insert(claim.id.as_str()) {
                offenders.push(format!("{}: claim {} listed twice", campaign.id, claim.id));
            }
            match claim.status.as_str() {
                "credited" | "compensated" => settled += 1,
                other => offenders.push(format!("{}: claim {} is {other}", campaign.id, claim.id)),
            }
        }
    }
    checks.push(row(
        "claims credited or compensated once",
        offenders,
        format!("{settled} claims settled"),
    ));

    // Credited claims add up to the stats.
    let mut offenders = Vec::new();
    let mut credited_amount = 0;
    for campaign in campaigns.iter().filter(|c| c.claims_unread.is_none()) {
        let Some(stats) = &campaign.stats else {
            continue;
        };
        let credited: Vec<&ClaimView> = campaign
            .claims
            .iter()
            .filter(|claim| claim.status == "credited")
            .collect();
        let amount: i64 = credited.iter().map(|claim| claim.amount).sum();
        let compensated = campaign
            .claims
            .iter()
            .filter(|claim| claim.status == "compensated")
            .count();
        credited_amount += amount;
        if amount != stats.amount_credited {
            offenders.push(format!(
                "{}: credited claims sum to {amount}, stats say {}",
                campaign.id, stats.amount_credited
            ));
        }
        if i64::try_from(credited.len()).ok() != Some(stats.packets_credited) {
            offenders.push(format!(
                "{}: {} credited claims, stats say {}",
                campaign.id,
                credited.len(),
                stats.packets_credited
            ));
        }
        if i64::try_from(compensated).ok() != Some(stats.packets_compensated) {
            offenders.push(format!(
                "{}: {compensated} compensated claims, stats say {}",
                campaign.id, stats.packets_compensated
            ));
        }
    }
    checks.push(row(
        "credited sums match stats",
        offenders,
        format!("{credited_amount} minor units credited"),
    ));

    // The ledger and the escrows, as the system reconciles them.
    match (&facts.reconciliation, &facts.reconciliation_error) {
        (Some(reconciliation), _) => {
            checks.push(Check {
                name: "reconciliation ok".to_owned(),
                ok: reconciliation.ok,
                detail: format!("{} checks", reconciliation.checks.len()),
            });
            for check in &reconciliation.checks {
                checks.push(Check {
                    name: format!("reconciliation: {}", check.name),
                    ok: check.ok,
                    detail: match &check.detail {
                        serde_json::Value::String(text) => text.clone(),
                        serde_json::Value::Null => String::new(),
                        other => other.to_string(),
                    },
                });
            }
        }
        (None, Some(Unread::GaveUp(_))) => {}
        (None, error) => checks.push(Check {
            name: "reconciliation ok".to_owned(),
            ok: false,
            detail: error
                .as_ref()
                .map_or_else(|| "not read".to_owned(), |error| error.text().to_owned()),
        }),
    }

    // The reads the system kept pushing back on: what they would have shown is unknown.
    let mut gave_up = Vec::new();
    for campaign in campaigns {
        for (what, unread) in [
            ("stats", &campaign.stats_unread),
            ("claims", &campaign.claims_unread),
        ] {
            if let Some(Unread::GaveUp(why)) = unread {
                gave_up.push(format!("{} {what}: {why}", campaign.id));
            }
        }
    }
    for (user, unread) in &facts.unreadable_users {
        if let Unread::GaveUp(why) = unread {
            gave_up.push(format!("{user}: {why}"));
        }
    }
    if let Some(Unread::GaveUp(why)) = &facts.reconciliation_error {
        gave_up.push(why.clone());
    }
    checks.push(row(READS_CHECK, gave_up, "every read answered".to_owned()));

    Verdict::new(checks)
}

fn distinct<'a>(ids: impl Iterator<Item = &'a String>) -> usize {
    ids.collect::<HashSet<_>>().len()
}

/// The verdict as a table for the terminal.
pub fn table(verdict: &Verdict) -> String {
    let width = verdict
        .checks
        .iter()
        .map(|check| check.name.chars().count())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut out = format!("{:<width$}  {:<4}  detail\n", "check", "ok");
    out.push_str(&format!("{}  ----  ------\n", "-".repeat(width)));
    for check in &verdict.checks {
        out.push_str(&format!(
            "{:<width$}  {:<4}  {}\n",
            check.name,
            if check.ok { "ok" } else { "FAIL" },
            check.detail
        ));
    }
    out.push_str(match verdict.outcome {
        Outcome::Pass => "verdict: PASS\n",
        Outcome::Fail => "verdict: FAIL\n",
        Outcome::Incomplete => {
            "verdict: INCOMPLETE (no check failed on what was read; the system kept pushing \
             back on some reads past the retry bound)\n"
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::api::ReconciliationCheck;

    fn claim(id: &str, user: &str, amount: i64, status: &str) -> ClaimView {
        ClaimView {
            id: id.to_owned(),
            campaign_id: "c1".to_owned(),
            user_id: user.to_owned(),
            amount,
            status: status.to_owned(),
            created_at: "2026-11-26T00:00:00.000Z".to_owned(),
            credited_at: None,
        }
    }

    fn granted(id: &str, user: &str, amount: i64) -> Granted {
        Granted {
            claim_id: id.to_owned(),
            user_id: user.to_owned(),
            amount,
        }
    }

    /// Two packets, both grabbed and credited; everything consistent.
    fn healthy() -> RunFacts {
        let stats = StatsView {
            packets_total: 2,
            packets_remaining: 0,
            packets_grabbed: 2,
            packets_credited: 2,
            packets_compensated: 0,
            packets_in_flight: Some(0),
            amount_total: 300,
            amount_remaining: 0,
            amount_grabbed: 300,
            amount_credited: 300,
            amount_refunded: 0,
        };
        RunFacts {
            campaigns: vec![CampaignFacts {
                id: "c1".to_owned(),
                per_user_limit: 1,
                stats: Some(stats),
                stats_unread: None,
                claims: vec![
                    claim("k1", "u1", 100, "credited"),
                    claim("k2", "u2", 200, "credited"),
                ],
                claims_unread: None,
                granted: vec![granted("k1", "u1", 100), granted("k2", "u2", 200)],
            }],
            user_claims: [
                ("u1".to_owned(), [("c1".to_owned(), 1)].into()),
                ("u2".to_owned(), [("c1".to_owned(), 1)].into()),
                ("u3".to_owned(), BTreeMap::new()),
            ]
            .into(),
            unreadable_users: Vec::new(),
            reconciliation: Some(Reconciliation {
                ok: true,
                checks: vec![ReconciliationCheck {
                    name: "ledger_sums_to_zero".to_owned(),
                    ok: true,
                    detail: serde_json::Value::Null,
                }],
            }),
            reconciliation_error: None,
        }
    }

    fn failed(verdict: &Verdict) -> Vec<&str> {
        verdict
            .checks
            .iter()
            .filter(|check| !check.ok)
            .map(|check| check.name.as_str())
            .collect()
    }

    #[test]
    fn a_consistent_run_passes_every_check() {
        let verdict = evaluate(&healthy());
        assert!(verdict.ok, "{}", table(&verdict));
        assert_eq!(verdict.checks.len(), 9);
        assert_eq!(verdict.outcome, Outcome::Pass);
        assert!(table(&verdict).ends_with("verdict: PASS\n"));
    }

    #[test]
    fn more_grants_than_packets_fail() {
        let mut facts = healthy();
        let campaign = &mut facts.campaigns[0];
        campaign.granted.push(granted("k3", "u3", 1));
        campaign.claims.push(claim("k3", "u3", 1, "credited"));
        let verdict = evaluate(&facts);
        assert!(failed(&verdict).contains(&"grants <= packets"));
        // A compensation allows the packet to be granted again.
        let campaign = &mut facts.campaigns[0];
        campaign.claims[0].status = "compensated".to_owned();
        let stats = campaign.stats.as_mut().unwrap();
        stats.packets_compensated = 1;
        stats.packets_credited = 2;
        stats.amount_credited = 201;
        let verdict = evaluate(&facts);
        assert!(!failed(&verdict).contains(&"grants <= packets"));
    }

    #[test]
    fn a_user_over_the_limit_fails_by_answers_or_by_claims() {
        let mut facts = healthy();
        facts.campaigns[0].granted[1].user_id = "u1".to_owned();
        let verdict = evaluate(&facts);
        assert!(failed(&verdict).contains(&"per-user limit"));
        // u1 was also recorded for claim k2: the recorded user differs.
        assert!(failed(&verdict).contains(&"every 200 recorded"));

        let mut facts = healthy();
        facts
            .user_claims
            .get_mut("u2")
            .unwrap()
            .insert("c1".to_owned(), 2);
        assert_eq!(failed(&evaluate(&facts)), vec!["per-user limit"]);

        let mut facts = healthy();
        facts.unreadable_users.push((
            "u9".to_owned(),
            Unread::Failed("status 500 internal".to_owned()),
        ));
        assert_eq!(failed(&evaluate(&facts)), vec!["per-user limit"]);
    }

    #[test]
    fn a_lost_or_unsettled_claim_fails() {
        let mut facts = healthy();
        facts.campaigns[0].claims.remove(1);
        let verdict = evaluate(&facts);
        let names = failed(&verdict);
        assert!(names.contains(&"every 200 recorded"));
        assert!(names.contains(&"credited sums match stats"));

        let mut facts = healthy();
        facts.campaigns[0].claims[0].status = "pending".to_owned();
        let verdict = evaluate(&facts);
        let names = failed(&verdict);
        assert!(names.contains(&"claims credited or compensated once"));

        let mut facts = healthy();
        let duplicate = facts.campaigns[0].claims[0].clone();
        facts.campaigns[0].claims.push(duplicate);
        let verdict = evaluate(&facts);
        let names = failed(&verdict);
        assert!(names.contains(&"claims credited or compensated once"));
    }

    #[test]
    fn in_flight_grabs_and_mismatched_sums_fail() {
        let mut facts = healthy();
        facts.campaigns[0].stats.as_mut().unwrap().packets_in_flight = Some(1);
        assert_eq!(failed(&evaluate(&facts)), vec!["saga drained"]);

        let mut facts = healthy();
        facts.campaigns[0].stats.as_mut().unwrap().amount_credited = 299;
        assert_eq!(failed(&evaluate(&facts)), vec!["credited sums match stats"]);

        let mut facts = healthy();
        facts.campaigns[0].stats = None;
        assert_eq!(failed(&evaluate(&facts)), vec!["saga drained"]);
    }

    #[test]
    fn the_reconciliation_must_be_read_and_ok() {
        let mut facts = healthy();
        let reconciliation = facts.reconciliation.as_mut().unwrap();
        reconciliation.ok = false;
        reconciliation.checks[0].ok = false;
        assert_eq!(
            failed(&evaluate(&facts)),
            vec!["reconciliation ok", "reconciliation: ledger_sums_to_zero"]
        );

        let mut facts = healthy();
        facts.reconciliation = None;
        facts.reconciliation_error = Some(Unread::Failed("status 403".to_owned()));
        let verdict = evaluate(&facts);
        assert_eq!(failed(&verdict), vec!["reconciliation ok"]);
        assert!(table(&verdict).contains("status 403"));
    }

    #[test]
    fn reads_given_up_after_the_retry_bound_leave_the_verdict_incomplete_not_failed() {
        let gave_up = |what: &str| {
            Unread::GaveUp(format!(
                "GET {what}: gave up after 10 attempts in 60.0 s, the last answered 503 overloaded"
            ))
        };
        let mut facts = healthy();
        let campaign = &mut facts.campaigns[0];
        campaign.stats = None;
        campaign.stats_unread = Some(gave_up("stats"));
        campaign.claims.clear();
        campaign.claims_unread = Some(gave_up("claims"));
        facts.user_claims.remove("u3");
        facts
            .unreadable_users
            .push(("u3".to_owned(), gave_up("/v1/me/claims")));
        facts.reconciliation = None;
        facts.reconciliation_error = Some(gave_up("/v1/admin/reconciliation"));
        let verdict = evaluate(&facts);
        assert_eq!(failed(&verdict), vec![READS_CHECK]);
        assert_eq!(verdict.outcome, Outcome::Incomplete);
        let reads = verdict.checks.last().unwrap();
        assert!(
            reads.detail.contains("c1 stats: GET stats: gave up"),
            "{}",
            reads.detail
        );
        assert!(
            reads.detail.contains("u3: GET /v1/me/claims"),
            "{}",
            reads.detail
        );
        assert!(table(&verdict).contains("verdict: INCOMPLETE"));

        // A check that fails on what was read still fails the verdict.
        facts.campaigns[0].granted[1].user_id = "u1".to_owned();
        let verdict = evaluate(&facts);
        assert!(failed(&verdict).contains(&"per-user limit"));
        assert_eq!(verdict.outcome, Outcome::Fail);
    }

    #[test]
    fn claims_that_failed_to_read_are_one_failure_not_a_missing_claim_each() {
        let mut facts = healthy();
        let campaign = &mut facts.campaigns[0];
        campaign.claims.clear();
        campaign.claims_unread = Some(Unread::Failed("status 500 internal".to_owned()));
        let verdict = evaluate(&facts);
        assert_eq!(failed(&verdict), vec!["every 200 recorded"]);
        let row = &verdict.checks[3];
        assert_eq!(row.detail, "c1: claims unreadable: status 500 internal");
        assert_eq!(verdict.outcome, Outcome::Fail);
    }

    #[test]
    fn offenders_are_capped_in_the_detail() {
        let check = row("x", (0..9).map(|i| i.to_string()).collect(), String::new());
        assert!(!check.ok);
        assert_eq!(check.detail, "0; 1; 2; 3; 4; and 4 more");
    }
}
