//! Set-up before the measured load: merchants topped up, the scenario's campaign created and
//! waited for until `active`, users' tokens minted, and (browse) a few grabs so that reads
//! find claims and wallets.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;

use super::api::{Api, CampaignSpec, GrabView, Tokens};
use super::cli::{CampaignArgs, Scenario};
use super::progress::Progress;
use super::workload::{LiveCampaign, Merchant, Population};

/// How often a campaign's status is polled while waiting for it to open.
const POLL_EVERY: Duration = Duration::from_millis(200);

/// Statuses from which a campaign never becomes active.
const DEAD_ENDS: &[&str] = &["rejected", "cancelled", "expired", "settled", "exhausted"];

/// What the set-up made.
#[derive(Debug)]
pub struct Prepared {
    pub merchants: Vec<Merchant>,
    /// The scenario's own campaign first.
    pub campaigns: Vec<LiveCampaign>,
    pub users: Population,
    /// Users the random picks choose from.
    pub population: u64,
    /// Campaigns created during the load (mixed, soak).
    pub created: Option<CampaignSpec>,
    /// Grabs made during set-up: `(campaign, user, claim)`.
    pub seed_grabs: Vec<(String, String, Option<GrabView>)>,
}

/// The spec of the scenario's campaign, opening `--opens-in` from now.
pub fn campaign_spec(
    args: &CampaignArgs,
    currency: &str,
    run: &str,
) -> anyhow::Result<CampaignSpec> {
    let (opens_in, lasts) = (args.opens_in, args.campaign_duration);
    let now = redpacket_common::time::now_ms();
    let starts_at_ms = now + i64::try_from(opens_in.as_millis())?;
    Ok(CampaignSpec {
        title: format!("loadtest {run}"),
        currency: currency.to_owned(),
        total_amount: args
            .total_amount
            .unwrap_or(args.packets.saturating_mul(100)),
        packet_count: args.packets,
        split: args.split.wire().to_owned(),
        min_amount: args.min_amount,
        max_amount: args.max_amount,
        per_user_limit: args.per_user_limit,
        starts_at_ms,
        ends_at_ms: starts_at_ms + i64::try_from(lasts.as_millis())?,
        seed: args.seed,
    })
}

/// Runs the scenario's set-up.
pub async fn prepare(
    scenario: &Scenario,
    api: &Api,
    tokens: &Tokens,
    run: &str,
    timeout: Duration,
) -> anyhow::Result<Prepared> {
    let progress = Progress::new("set-up");
    let currency = &scenario.run_args().currency;
    let campaign_args = scenario.campaign_args();
    let (merchant_count, funds, population, minted) = match scenario {
        Scenario::Seckill(args) => (1, 0, args.grabbers, args.grabbers),
        Scenario::Browse(args) => (1, 0, args.population, args.population),
        Scenario::Mixed(super::cli::MixedArgs { mix, .. })
        | Scenario::Soak(super::cli::SoakArgs { mix, .. }) => (
            mix.merchants.max(1),
            mix.merchant_funds,
            mix.population,
            mix.population,
        ),
    };

    // Tokens first: minting ten thousand takes a moment that should not eat into the few
    // seconds before the campaign opens.
    progress.update(&format!("minting {minted} user tokens"));
    let users = Population::new(run, minted, tokens.clone())?;

    let mut spec = campaign_spec(campaign_args, currency, run)?;
    let mut merchants = Vec::new();
    for index in 0..merchant_count {
        let id = format!("{run}-m{index}");
        let token = tokens.merchant(&id)?;
        let amount = funds + if index == 0 { spec.total_amount } else { 0 };
        progress.update(&format!("topping up merchant {id} with {amount}"));
        api.top_up(tokens.operator(), &id, amount, currency)
            .await
            .with_context(|| format!("topping up merchant {id}"))?;
        merchants.push(Merchant { id, token });
    }

    // The top-ups took time: the campaign still opens `--opens-in` from its creation.
    let fresh = campaign_spec(campaign_args, currency, run)?;
    spec.starts_at_ms = fresh.starts_at_ms;
    spec.ends_at_ms = fresh.ends_at_ms;
    progress.update(&format!(
        "creating a campaign of {} packets",
        spec.packet_count
    ));
    let created = api
        .create_campaign(&merchants[0].token, &spec)
        .await
        .context("creating the scenario's campaign")?;
    let campaign = LiveCampaign {
        id: created.id.clone(),
        merchant: 0,
        opens_at_ms: spec.starts_at_ms,
        per_user_limit: created.per_user_limit.unwrap_or(spec.per_user_limit),
    };
    wait_active(api, &merchants[0].token, &campaign, timeout, &progress).await?;

    let mut seed_grabs = Vec::new();
    if let Scenario::Browse(args) = scenario {
        let count = args.seed_grabs.min(population);
        progress.update(&format!("seeding {count} grabs"));
        seed_grabs = futures::stream::iter(0..count)
            .map(|n| {
                let (users, id) = (&users, &campaign.id);
                async move {
                    let user = users.id(n);
                    let answer = api.grab(&users.token(n), id).await;
                    (id.clone(), user, answer.ok().and_then(Result::ok))
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
    }

    let created = match scenario {
        Scenario::Mixed(super::cli::MixedArgs { mix, .. })
        | Scenario::Soak(super::cli::SoakArgs { mix, .. }) => {
            let lasts = campaign_args.campaign_duration;
            Some(CampaignSpec {
                title: format!("loadtest {run} (created under load)"),
                currency: currency.clone(),
                total_amount: mix.created_packets.saturating_mul(100),
                packet_count: mix.created_packets,
                split: "double_mean".to_owned(),
                min_amount: None,
                max_amount: None,
                per_user_limit: campaign_args.per_user_limit,
                // Offsets from the moment of creation.
                starts_at_ms: 2_000,
                ends_at_ms: 2_000 + i64::try_from(lasts.as_millis())?,
                seed: None,
            })
        }
        _ => None,
    };
    progress.finish(&format!(
        "campaign {} is active; {} merchant(s), {population} users",
        campaign.id,
        merchants.len()
    ));
    Ok(Prepared {
        merchants,
        campaigns: vec![campaign],
        users,
        population,
        created,
        seed_grabs,
    })
}

/// Polls the campaign until it is `active`, showing its status and the time to its opening.
async fn wait_active(
    api: &Api,
    token: &str,
    campaign: &LiveCampaign,
    timeout: Duration,
    progress: &Progress,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let status = match api.campaign(token, &campaign.id).await {
            Ok(view) => view.status,
            Err(err) => format!("unreadable ({err:#})"),
        };
        if status == "active" {
            return Ok(());
        }
        if DEAD_ENDS.contains(&status.as_str()) {
            bail!(
                "campaign {} became {status} instead of active (was the merchant funded?)",
                campaign.id
            );
        }
        if started.elapsed() >= timeout {
            bail!(
                "campaign {} still {status} after {}s (is the saga worker running?)",
                campaign.id,
                timeout.as_secs()
            );
        }
        let to_open = campaign.opens_at_ms - redpacket_common::time::now_ms();
        progress.update(&format!(
            "campaign {} is {status}; opens in {}.{}s",
            campaign.id,
            to_open.max(0) / 1_000,
            (to_open.max(0) % 1_000) / 100
        ));
        tokio::time::sleep(POLL_EVERY).await;
    }
}
