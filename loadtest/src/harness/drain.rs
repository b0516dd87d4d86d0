//! After the load: wait (bounded) until the saga worker has credited or compensated every
//! grab, then read what the verification needs through the public API.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::api::{Api, StatsView, Tokens};
use super::progress::Progress;
use super::verify::{CampaignFacts, RunFacts, Unread};
use super::workload::{Ctx, LiveCampaign, Population};

/// How often the stats are polled while draining.
const POLL_EVERY: Duration = Duration::from_millis(500);

/// The drain wait's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Drain {
    pub drained: bool,
    pub waited_ms: u64,
    /// Grabs still in flight when the wait ended.
    pub in_flight: i64,
}

/// Campaigns the verification and the drain look at: those that got a grab (a campaign
/// nobody grabbed has nothing in flight), plus the first (the scenario's own) always.
pub fn campaigns_to_check(ctx: &Ctx) -> Vec<LiveCampaign> {
    let tried: std::collections::HashSet<String> = ctx.grabs.campaigns_tried();
    ctx.campaigns
        .all()
        .into_iter()
        .enumerate()
        .filter(|(index, campaign)| *index == 0 || tried.contains(&campaign.id))
        .map(|(_, campaign)| campaign)
        .collect()
}

/// Polls every campaign's stats until none has a grab in flight or `timeout` passes.
pub async fn wait_drained(
    api: &Api,
    tokens: &Tokens,
    campaigns: &[LiveCampaign],
    timeout: Duration,
    concurrency: usize,
) -> Drain {
    let progress = Progress::new("draining");
    let started = Instant::now();
    let mut pending: Vec<LiveCampaign> = campaigns.to_vec();
    let mut settled: i64 = 0;
    loop {
        let polled: Vec<(LiveCampaign, Option<StatsView>)> =
            futures::stream::iter(pending.iter().cloned())
                .map(|campaign| async move {
                    let stats = api.stats(tokens.reader(), &campaign.id).await.ok();
                    (campaign, stats)
                })
                .buffer_unordered(concurrency.max(1))
                .collect()
                .await;
        let mut in_flight = 0;
        let mut still = Vec::new();
        let mut settled_now = settled;
        for (campaign, stats) in polled {
            match stats {
                Some(stats) if stats.in_flight() == 0 => {
                    settled_now += stats.packets_credited + stats.packets_compensated;
                }
                Some(stats) => {
                    in_flight += stats.in_flight();
                    still.push(campaign);
                }
                None => still.push(campaign),
            }
        }
        settled = settled_now;
        pending = still;
        if pending.is_empty() {
            progress.finish(&format!(
                "drained: {} campaign(s), {settled} grabs credited or compensated",
                campaigns.len()
            ));
            return Drain {
                drained: true,
                waited_ms: millis(started.elapsed()),
                in_flight: 0,
            };
        }
        if started.elapsed() >= timeout {
            progress.finish(&format!(
                "gave up after {}s: {in_flight} grabs still in flight in {} campaign(s)",
                timeout.as_secs(),
                pending.len()
            ));
            return Drain {
                drained: false,
                waited_ms: millis(started.elapsed()),
                in_flight,
            };
        }
        progress.update(&format!(
            "{in_flight} grabs in flight in {} of {} campaign(s)",
            pending.len(),
            campaigns.len()
        ));
        tokio::time::sleep(POLL_EVERY).await;
    }
}

fn millis(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
}

/// Reads stats, claims, every grabbing user's claims and the reconciliation.
pub async fn collect_facts(
    api: &Api,
    ctx: &Arc<Ctx>,
    campaigns: &[LiveCampaign],
    tokens: &Tokens,
    concurrency: usize,
) -> RunFacts {
    let progress = Progress::new("verifying");
    progress.update(&format!("reading {} campaign(s)", campaigns.len()));
    let run_campaigns: std::collections::HashSet<String> =
        campaigns.iter().map(|c| c.id.clone()).collect();
    let facts: Vec<CampaignFacts> = futures::stream::iter(campaigns.iter().cloned())
        .map(|campaign| async move {
            let (stats, stats_unread) = split(api.stats(tokens.reader(), &campaign.id).await);
            let (claims, claims_unread) =
                split(api.campaign_claims(tokens.reader(), &campaign.id).await);
            if let Some(unread) = &claims_unread {
                eprintln!("claims of campaign {}: {}", campaign.id, unread.text());
            }
            CampaignFacts {
                granted: ctx.grabs.granted(&campaign.id),
                id: campaign.id,
                per_user_limit: campaign.per_user_limit,
                stats,
                stats_unread,
                claims: claims.unwrap_or_default(),
                claims_unread,
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;

    let users = ctx.grabs.users();
    let total = users.len();
    let mut user_claims = BTreeMap::new();
    let mut unreadable_users = Vec::new();
    let mut read = futures::stream::iter(users)
        .map(|user| {
            let population: &Population = &ctx.users;
            async move {
                let token = population_token(population, &user);
                let claims = match token {
                    Some(token) => api.my_claims(&token).await.map_err(|err| Unread::of(&err)),
                    None => Err(Unread::Failed("not a user of this run".to_owned())),
                };
                (user, claims)
            }
        })
        .buffer_unordered(concurrency.max(1));
    let mut done = 0;
    while let Some((user, claims)) = read.next().await {
        done += 1;
        if done % 200 == 0 {
            progress.update(&format!("claims of {done} / {total} users"));
        }
        match claims {
            Ok(claims) => {
                let mut per_campaign: BTreeMap<String, i64> = BTreeMap::new();
                for claim in claims {
                    if run_campaigns.contains(&claim.campaign_id) {
                        *per_campaign.entry(claim.campaign_id).or_default() += 1;
                    }
                }
                user_claims.insert(user, per_campaign);
            }
            Err(unread) => unreadable_users.push((user, unread)),
        }
    }
    let (reconciliation, reconciliation_error) = split(api.reconciliation(tokens.operator()).await);
    progress.finish(&format!(
        "read {} campaign(s), claims of {total} users, the reconciliation",
        facts.len()
    ));
    let mut facts = facts;
    facts.sort_by(|a, b| a.id.cmp(&b.id));
    RunFacts {
        campaigns: facts,
        user_claims,
        unreadable_users,
        reconciliation,
        reconciliation_error,
    }
}

/// A read's value, or why there is none.
fn split<T>(read: anyhow::Result<T>) -> (Option<T>, Option<Unread>) {
    match read {
        Ok(value) => (Some(value), None),
        Err(err) => (None, Some(Unread::of(&err))),
    }
}

/// The token of a user of the run, from their id.
fn population_token(population: &Population, user: &str) -> Option<String> {
    let n: u64 = user.rsplit_once("-u")?.1.parse().ok()?;
    (population.id(n) == user).then(|| population.token(n).into_owned())
}
