//! The fault suite: the distributed system as separate processes on real servers, a seckill
//! through the gateway at a fixed rate (the load harness's open model), and faults during the
//! load: services SIGKILLed and started again, RabbitMQ and Redis restarted, PostgreSQL stopped,
//! replicas lost, proxies that delay, reset, lose answers and answer errors. After each
//! scenario the system must converge within [`CONVERGE_WITHIN`], then every promise is checked:
//!
//! - the harness's verdict: every 200 grab recorded for its user with its amount, credited or
//!   compensated once, no campaign over its packets or a user over the limit, the credited
//!   sums, and the gateway's reconciliation (the ledger sums to zero, no account but `external`
//!   negative, each escrow holds the unclaimed packets plus the claims in flight, no saga stuck);
//! - each granted user's balance is the sum of their credited claims, and each of their 200
//!   grabs is among their claims, credited or compensated, with the amount they were answered;
//! - the campaign, once ended, settles with the exact refund: total − credited;
//! - `redpacket reconcile --repair` passes and finds nothing left behind to repair (nothing
//!   dead-lettered or stalled; younger than its 60 s floor, claims are on their normal path).
//!
//! A seed picks the faults' moments (`RP_FAULT_SEED` replays one); a failing run prints it with
//! the command that replays it. Each scenario writes its row of RELIABILITY.md's table to
//! `$CARGO_TARGET_DIR/faults/<scenario>.json` (`scripts/fault-suite.sh` prints the table).
//! The suite restarts the local RabbitMQ: nextest runs each scenario alone
//! (`.config/nextest.toml`).

mod proxy;
mod schedule;
mod system;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use loadtest::harness::api::{Api, Tokens};
use loadtest::harness::cli::Cli;
use loadtest::harness::verify::Outcome;
use rand::Rng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

use proxy::Fault;
use schedule::{Action, Link, Target, Timed, kills, moment};
use system::{BIN, Shape, System};

/// How long the load runs once the campaign is open; every fault ends inside it.
const LOAD_MS: u64 = 14_000;
/// Faults fall in this window of the load (from the campaign's opening).
const FAULTS_FROM_MS: u64 = 1_000;
const FAULTS_TO_MS: u64 = 12_000;
/// Grabs a second asked of the gateway.
const RATE: u64 = 100;
/// More packets than grabs: the campaign is still live when the load ends, and ends by its
/// time, with a refund of what was left.
const PACKETS: u64 = 2_000;
/// How long the campaign lasts from its opening.
const CAMPAIGN_MS: u64 = 18_000;
/// From the end of the last fault to every grab settled and the campaign refunded.
const CONVERGE_WITHIN: Duration = Duration::from_secs(120);
/// Fewer grabs answered 200 than this and the scenario tested too little to tell.
const MIN_GRANTS: u64 = 100;
/// Scenarios run one at a time in a process too (`cargo test` runs a binary's tests at once):
/// one restarts the local RabbitMQ.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What a scenario found, a row of RELIABILITY.md.
#[derive(Debug, Default)]
struct Report {
    grabs_answered: u64,
    faults: u64,
    violations: Vec<String>,
    converge_ms: u64,
    /// How long the harness waited after the load for every grab to be settled.
    drain_ms: u64,
}

/// Runs a scenario `RP_FAULT_RUNS` times (default once), each on a fresh system with the next
/// seed, and fails on the first run that broke a promise.
async fn scenario(name: &str, shape: Shape, plan: impl Fn(&mut ChaCha8Rng) -> Vec<Timed>) {
    let _alone = ALONE.lock().await;
    let first_seed = schedule::seed();
    let runs: u64 = std::env::var("RP_FAULT_RUNS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(1);
    let mut total = Report::default();
    let started = Instant::now();
    for run in 0..runs {
        let seed = first_seed.wrapping_add(run);
        let replay = format!(
            "RP_FAULT_SEED={seed} cargo nextest run -p redpacket --test faults -E 'test(={name})'"
        );
        eprintln!(
            "fault scenario {name}, run {} of {runs}, seed {seed}; replay: {replay}",
            run + 1
        );
        let mut rng = schedule::rng(seed);
        let plan = plan(&mut rng);
        let mut system = System::start(name, shape).await;
        let report = drive(&mut system, plan, false).await;
        total.grabs_answered += report.grabs_answered;
        total.faults += report.faults;
        total.converge_ms = total.converge_ms.max(report.converge_ms);
        total.drain_ms = total.drain_ms.max(report.drain_ms);
        total.violations.extend(report.violations.iter().cloned());
        if !report.violations.is_empty() {
            write_row(name, first_seed, run + 1, &total, started.elapsed());
            panic!(
                "fault scenario {name} broke {} promise(s) (seed {seed}):\n- {}\nreplay: {replay}\n{}",
                report.violations.len(),
                report.violations.join("\n- "),
                system.logs()
            );
        }
    }
    write_row(name, first_seed, runs, &total, started.elapsed());
}

/// Runs the load with `plan`'s faults, waits for the system to converge and checks it. With
/// `plant`, one unit is credited to a granted user behind the saga's back before the checks,
/// which must find it.
async fn drive(system: &mut System, plan: Vec<Timed>, plant: bool) -> Report {
    let mut report = Report::default();
    let url = system.url();
    let summary = system.dir.join("summary.json");
    let grants = system.dir.join("grants.jsonl");
    let cli = Cli::try_parse_from([
        "loadtest",
        "seckill",
        "--host",
        &url,
        "--data-dir",
        &system.dir.display().to_string(),
        "--model",
        "open",
        "--rate",
        &RATE.to_string(),
        "--ramp",
        "1s",
        "--run-time",
        &format!("{}s", LOAD_MS / 1_000),
        "--grabbers",
        "5000",
        "--packets",
        &PACKETS.to_string(),
        "--opens-in",
        "1s",
        "--campaign-duration",
        &format!("{}s", CAMPAIGN_MS / 1_000),
        "--drain-timeout",
        &format!("{}s", CONVERGE_WITHIN.as_secs()),
        "--summary",
        &summary.display().to_string(),
        "--grants",
        &grants.display().to_string(),
    ])
    .expect("the harness's arguments");
    let load = tokio::spawn(loadtest::harness::run(cli));

    // The faults count from the campaign's opening, once the harness set it up.
    let campaign_id = match wait_open(system).await {
        Ok(id) => id,
        Err(err) => {
            report.violations.push(err);
            return report;
        }
    };
    let origin = Instant::now();
    let done = schedule::run(system, origin, plan).await;
    report.faults = done.faults;
    for line in &done.log {
        eprintln!("fault {line}");
    }
    let faults_ended = done.last_fault_end.unwrap_or(origin);
    for (kind, (windows, effect)) in &done.proxy_effects {
        if *windows >= 2 && *effect == 0 {
            report.violations.push(format!(
                "the proxies' {windows} {kind} windows acted on nothing: the scenario tested less than it says"
            ));
        }
    }

    match load.await {
        Ok(Ok(Outcome::Pass)) => {}
        Ok(Ok(outcome)) => report.violations.push(format!(
            "the harness's verdict is {outcome:?} (its table is in the test's output)"
        )),
        Ok(Err(err)) => report
            .violations
            .push(format!("the harness failed: {err:#}")),
        Err(err) => report
            .violations
            .push(format!("the harness panicked: {err}")),
    }
    let summary: Value = std::fs::read_to_string(&summary)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or(Value::Null);
    report.drain_ms = summary["drain"]["waited_ms"].as_u64().unwrap_or_default();
    let secret = system.secret.as_bytes().to_vec();
    let tokens = Tokens::new(&secret, None).expect("tokens");
    let api = Api::new(&url, 16).expect("a client");
    match settled(&api, &tokens, &campaign_id, faults_ended + CONVERGE_WITHIN).await {
        Ok(stats) => {
            let refund = stats.amount_total - stats.amount_credited;
            if stats.amount_refunded != refund {
                report.violations.push(format!(
                    "campaign {campaign_id} refunded {} instead of total {} − credited {} = {refund}",
                    stats.amount_refunded, stats.amount_total, stats.amount_credited
                ));
            }
        }
        Err(err) => report.violations.push(err),
    }
    report.converge_ms = u64::try_from(faults_ended.elapsed().as_millis()).unwrap_or(u64::MAX);

    let granted = read_grants(&grants);
    if plant && let Some(user) = granted.keys().next() {
        let planted = reqwest::Client::new()
            .post(format!("{}/transfers", system.wallet.url()))
            .json(&json!({"id": "planted-credit", "debit": "external",
                          "credit": format!("user:{user}"), "amount": 1, "currency": "CNY"}))
            .send()
            .await
            .map(|answer| answer.status());
        assert!(
            matches!(planted, Ok(status) if status.is_success()),
            "planting a credit: {planted:?}"
        );
    }
    report.grabs_answered = granted.values().map(|claims| claims.len() as u64).sum();
    // Every 200 the harness counted is in the grants file, readable, and there are enough.
    let answered_200 = summary["grants"].as_u64();
    if answered_200 != Some(report.grabs_answered) {
        report.violations.push(format!(
            "the harness counted {answered_200:?} grabs answered 200 but the grants file has {}",
            report.grabs_answered
        ));
    }
    if summary["grab_answers_unreadable"].as_u64() != Some(0) {
        report.violations.push(format!(
            "grabs answered 200 with a body the harness could not read: {}",
            summary["grab_answers_unreadable"]
        ));
    }
    if report.grabs_answered < MIN_GRANTS {
        report.violations.push(format!(
            "only {} grabs answered 200 (at least {MIN_GRANTS} asked): too little was tested",
            report.grabs_answered
        ));
    }
    report
        .violations
        .extend(check_users(&api, &tokens, &granted).await);
    report.violations.extend(reconcile(system).await);
    report
}

/// Waits until the harness's campaign is active; returns its id.
async fn wait_open(system: &System) -> Result<String, String> {
    let client = reqwest::Client::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(90) {
        let seen: Option<Value> = match client
            .get(format!("{}/reconciliation", system.saga_to_campaign.url))
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(answer) => answer.json().await.ok(),
            Err(_) => None,
        };
        if let Some(campaign) = seen.as_ref().and_then(|body| {
            body["campaigns"]
                .as_array()?
                .iter()
                .find(|c| c["status"] == "active")
                .cloned()
        }) {
            return Ok(campaign["id"].as_str().unwrap_or_default().to_owned());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err("the harness's campaign did not open within 90 s".into())
}

/// Waits until the campaign is settled; returns its stats then.
async fn settled(
    api: &Api,
    tokens: &Tokens,
    campaign_id: &str,
    deadline: Instant,
) -> Result<loadtest::harness::api::StatsView, String> {
    let mut last = String::from("never read");
    while Instant::now() < deadline {
        match api.campaign(tokens.reader(), campaign_id).await {
            Ok(campaign) if campaign.status == "settled" => {
                return api
                    .stats(tokens.reader(), campaign_id)
                    .await
                    .map_err(|err| format!("the stats of settled {campaign_id}: {err:#}"));
            }
            Ok(campaign) => last = campaign.status,
            Err(err) => last = format!("{err:#}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(format!(
        "campaign {campaign_id} not settled within {CONVERGE_WITHIN:?} of the last fault (last seen: {last})"
    ))
}

/// The grabs answered 200: claim → amount, by user.
fn read_grants(path: &std::path::Path) -> BTreeMap<String, BTreeMap<String, i64>> {
    let mut users: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        let Ok(entry) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let grant = &entry["grant"];
        users
            .entry(grant["user_id"].as_str().unwrap_or_default().to_owned())
            .or_default()
            .insert(
                grant["claim_id"].as_str().unwrap_or_default().to_owned(),
                grant["amount"].as_i64().unwrap_or_default(),
            );
    }
    users
}

/// Each granted user's balance is the sum of their credited claims, and each of their 200
/// grabs is among those claims, settled, with the amount answered.
async fn check_users(
    api: &Api,
    tokens: &Tokens,
    granted: &BTreeMap<String, BTreeMap<String, i64>>,
) -> Vec<String> {
    let client = reqwest::Client::new();
    futures::stream::iter(granted.iter())
        .map(|(user, answered)| {
            let client = &client;
            async move {
                let token = match tokens.user(user) {
                    Ok(token) => token,
                    Err(err) => return vec![format!("a token for {user}: {err:#}")],
                };
                let claims = match api.my_claims(&token).await {
                    Ok(claims) => claims,
                    Err(err) => return vec![format!("the claims of {user}: {err:#}")],
                };
                let wallet: Value = match client
                    .get(api.url("/v1/me/wallet"))
                    .bearer_auth(&token)
                    .send()
                    .await
                {
                    Ok(answer) => answer.json().await.unwrap_or(Value::Null),
                    Err(err) => return vec![format!("the wallet of {user}: {err}")],
                };
                let mut found = Vec::new();
                let credited: i64 = claims
                    .iter()
                    .filter(|claim| claim.status == "credited")
                    .map(|claim| claim.amount)
                    .sum();
                if wallet["balance"].as_i64() != Some(credited) {
                    found.push(format!(
                        "user {user} holds {} but was credited {credited}",
                        wallet["balance"]
                    ));
                }
                let by_id: BTreeMap<&str, _> = claims
                    .iter()
                    .map(|claim| (claim.id.as_str(), claim))
                    .collect();
                let ids: BTreeSet<&str> = by_id.keys().copied().collect();
                if ids.len() != claims.len() {
                    found.push(format!("user {user} has a claim listed twice"));
                }
                for (claim_id, amount) in answered {
                    match by_id.get(claim_id.as_str()) {
                        None => found.push(format!(
                            "claim {claim_id} answered 200 to {user} is not among their claims"
                        )),
                        Some(claim) if claim.amount != *amount => found.push(format!(
                            "claim {claim_id} of {user} is {} but was answered {amount}",
                            claim.amount
                        )),
                        Some(claim)
                            if claim.status != "credited" && claim.status != "compensated" =>
                        {
                            found.push(format!(
                                "claim {claim_id} of {user} is still {}",
                                claim.status
                            ))
                        }
                        Some(_) => {}
                    }
                }
                found
            }
        })
        .buffer_unordered(16)
        .flat_map(futures::stream::iter)
        .collect()
        .await
}

/// `redpacket reconcile --repair` against the gateway, as an operator runs it after an
/// incident: it must pass, and find nothing to repair, since the system converged on its own.
/// (Claims and campaigns younger than the repair's 60 s floor are on their normal path: what it
/// finds here is dead letters and stalled sagas.)
async fn reconcile(system: &System) -> Vec<String> {
    let output = tokio::process::Command::new(BIN)
        .args([
            "reconcile",
            "--repair",
            "--json",
            "--gateway",
            &system.url(),
        ])
        .env("RP_AUTH_SECRET", &system.secret)
        .output()
        .await
        .expect("redpacket reconcile runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut found = Vec::new();
    if !output.status.success() {
        found.push(format!(
            "redpacket reconcile --repair failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let findings = serde_json::from_str::<Value>(&stdout)
        .ok()
        .and_then(|out| out["repair"]["findings"].as_array().map(Vec::len));
    match findings {
        Some(0) => {}
        Some(_) => found.push(format!(
            "redpacket reconcile --repair found something left behind: {stdout}"
        )),
        None => found.push(format!(
            "redpacket reconcile --repair printed no findings: {stdout}"
        )),
    }
    found
}

fn write_row(name: &str, seed: u64, runs: u64, report: &Report, took: Duration) {
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let dir = std::path::Path::new(&target).join("faults");
    let _ = std::fs::create_dir_all(&dir);
    let row = json!({
        "scenario": name,
        "seed": seed,
        "runs": runs,
        "grabs_answered": report.grabs_answered,
        "faults_injected": report.faults,
        "violations": report.violations.len(),
        "violation_texts": report.violations,
        "converge_ms": report.converge_ms,
        "drain_ms": report.drain_ms,
        "took_ms": u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
        "at": redpacket_common::time::rfc3339(redpacket_common::time::now_ms()),
    });
    let _ = std::fs::write(dir.join(format!("{name}.json")), row.to_string());
}

const ONE: Shape = Shape {
    campaigns: 1,
    sagas: 1,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn saga_worker_killed_mid_batch() {
    scenario("saga_worker_killed_mid_batch", ONE, |rng| {
        kills(rng, Target::Saga(0), 3, FAULTS_FROM_MS, FAULTS_TO_MS)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn campaign_killed_after_answering_grabs() {
    scenario("campaign_killed_after_answering_grabs", ONE, |rng| {
        kills(rng, Target::Campaign(0), 3, FAULTS_FROM_MS, FAULTS_TO_MS)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wallet_killed_mid_batch() {
    scenario("wallet_killed_mid_batch", ONE, |rng| {
        kills(rng, Target::Wallet, 3, FAULTS_FROM_MS, FAULTS_TO_MS)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_killed() {
    scenario("gateway_killed", ONE, |rng| {
        kills(rng, Target::Gateway, 3, FAULTS_FROM_MS, FAULTS_TO_MS)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_restarted() {
    scenario("rabbitmq_restarted", ONE, |rng| {
        vec![Timed {
            at: moment(rng, FAULTS_FROM_MS, 5_000),
            action: Action::RestartRabbitmq {
                down_for: moment(rng, 1_000, 3_000),
            },
        }]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restarted_from_its_aof() {
    scenario("redis_restarted_from_its_aof", ONE, |rng| {
        vec![Timed {
            at: moment(rng, FAULTS_FROM_MS, 8_000),
            action: Action::RestartRedis {
                down_for: moment(rng, 200, 2_000),
            },
        }]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stopped_for_ten_seconds() {
    scenario("postgres_stopped_for_ten_seconds", ONE, |rng| {
        vec![Timed {
            at: moment(rng, FAULTS_FROM_MS, 2_000),
            action: Action::StopPostgres {
                down_for: Duration::from_secs(10),
            },
        }]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_of_two_replicas_killed() {
    let two = Shape {
        campaigns: 2,
        sagas: 2,
    };
    scenario("one_of_two_replicas_killed", two, |rng| {
        let (saga, campaign) = (rng.random_range(0..2), rng.random_range(0..2));
        vec![
            Timed {
                at: moment(rng, FAULTS_FROM_MS, 6_000),
                action: Action::KillForGood(Target::Saga(saga)),
            },
            Timed {
                at: moment(rng, 6_000, FAULTS_TO_MS),
                action: Action::KillForGood(Target::Campaign(campaign)),
            },
        ]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxies_delay_reset_lose_and_refuse() {
    scenario("proxies_delay_reset_lose_and_refuse", ONE, |rng| {
        // The links a seckill keeps busy: grabs (gateway → campaign), records and marks
        // (saga worker → campaign), credits (saga worker → wallet). The gateway's links to the
        // wallet and the saga worker carry only the reads after the load. A failing grab link
        // opens the gateway's breaker for 5 s, in which that link carries nothing: a window
        // goes there only 6 s or more after the last one did.
        let saga_links = [Link::SagaToWallet, Link::SagaToCampaign];
        // One window after another, each a fault on one link; every kind of fault twice, in
        // an order of the seed's.
        let mut kinds: Vec<u8> = (0..5).chain(0..5).collect();
        kinds.shuffle(rng);
        let mut plan = Vec::new();
        let mut at = FAULTS_FROM_MS;
        let mut grab_link_free_at = 0;
        for kind in kinds {
            let link = if at >= grab_link_free_at {
                grab_link_free_at = at + 6_000;
                Link::GatewayToCampaign
            } else {
                saga_links[rng.random_range(0..saga_links.len())]
            };
            let fault = match kind {
                0 => Fault::Latency(moment(rng, 50, 300)),
                1 => Fault::Reset,
                2 => Fault::LoseAnswers,
                3 => Fault::Status([500, 502, 503, 504][rng.random_range(0..4)]),
                _ => Fault::Status([400, 404, 408, 429][rng.random_range(0..4)]),
            };
            let lasts = moment(rng, 300, 700);
            plan.push(Timed {
                at: Duration::from_millis(at),
                action: Action::Proxy { link, fault, lasts },
            });
            at += u64::try_from(lasts.as_millis()).unwrap_or(0) + rng.random_range(50..150);
        }
        plan
    })
    .await;
}

/// The checks are not vacuous: a credit the saga never made, planted after a clean run, is
/// found (and only it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_checks_find_a_planted_credit() {
    let mut system = System::start("planted", ONE).await;
    let report = drive(&mut system, Vec::new(), true).await;
    assert_eq!(report.violations.len(), 1, "{:#?}", report.violations);
    assert!(
        report.violations[0].contains("holds") && report.violations[0].contains("was credited"),
        "{:#?}",
        report.violations
    );
}

/// Every kind of fault, mixed by the seed, on two replicas of the scaled services.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bit_of_everything() {
    let two = Shape {
        campaigns: 2,
        sagas: 2,
    };
    scenario("a_bit_of_everything", two, |rng| {
        let mut plan = Vec::new();
        let mut at = FAULTS_FROM_MS;
        while at < FAULTS_TO_MS - 2_000 {
            let down_for = moment(rng, 200, 1_500);
            let action = match rng.random_range(0..8) {
                0 => Action::Kill {
                    target: Target::Saga(rng.random_range(0..2)),
                    down_for,
                },
                1 => Action::Kill {
                    target: Target::Campaign(rng.random_range(0..2)),
                    down_for,
                },
                2 => Action::Kill {
                    target: Target::Wallet,
                    down_for,
                },
                3 => Action::Kill {
                    target: Target::Gateway,
                    down_for,
                },
                4 => Action::RestartRabbitmq { down_for },
                5 => Action::RestartRedis { down_for },
                6 => Action::StopPostgres {
                    down_for: moment(rng, 1_000, 4_000),
                },
                _ => Action::Proxy {
                    link: [
                        Link::GatewayToCampaign,
                        Link::SagaToWallet,
                        Link::SagaToCampaign,
                    ][rng.random_range(0..3)],
                    fault: [Fault::Reset, Fault::LoseAnswers, Fault::Status(503)]
                        [rng.random_range(0..3)],
                    lasts: down_for,
                },
            };
            plan.push(Timed {
                at: Duration::from_millis(at),
                action,
            });
            at += rng.random_range(1_500..3_000);
        }
        plan
    })
    .await;
}
