//! The load harness behind the `loadtest` binary: drives a running system through its public
//! gateway, then verifies it.
//!
//! A run is: optional baselines ([`baseline`]) → set-up ([`setup`]) → the measured load, closed
//! ([`closed_model`], goose) or open ([`open_model`]), its requests written once in
//! [`workload`] and recorded by [`recorder`] → the drain wait and the reads of the verification
//! ([`drain`]) → the verdict ([`verify`]) → the summary JSON, SVG plots and tables
//! ([`summary`], [`svg`]).

pub mod api;
pub mod baseline;
pub mod cli;
pub mod closed_model;
pub mod drain;
pub mod histogram;
pub mod open_model;
pub mod progress;
pub mod recorder;
pub mod rss;
pub mod setup;
pub mod summary;
pub mod svg;
pub mod verify;
pub mod workload;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

use api::{Api, Tokens};
use cli::{Cli, Model, Scenario};
use closed_model::{GooseArgs, ScenarioSpec, iterations_for};
use open_model::{OpenPlan, run_open};
use recorder::Recorder;
use workload::{CampaignBook, Ctx, DirectClient, GrabLog, Grabbers, Mix, Op, Transport, run_op};

/// How long the open model waits for its last answers.
const OPEN_GRACE: Duration = Duration::from_secs(30);

/// Runs the scenario; returns what the verdict concluded.
pub async fn run(cli: Cli) -> anyhow::Result<verify::Outcome> {
    let scenario = &cli.scenario;
    let args = scenario.run_args();
    let name = scenario.name();
    let model = scenario.model();
    let run_time = scenario.run_duration();

    let secret = load_secret(args.data_dir.as_deref())?;
    let tokens = Tokens::new(&secret, args.operator_token.clone())?;
    let api = Api::new(&args.host, args.verify_concurrency.max(8))?;
    api.ping()
        .await
        .with_context(|| format!("the gateway at {} does not answer", args.host))?;
    let summary_path = summary::summary_path(name, args.summary.as_deref());
    if let Some(dir) = summary_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }

    let baseline = if args.baseline {
        let concurrency = args.baseline_concurrency.unwrap_or(match model {
            Model::Closed => args.users,
            Model::Open => args.max_in_flight,
        });
        eprintln!(
            "baseline: raw Redis grab script, then GET /v1/ping, {concurrency} concurrent, {} s each",
            args.baseline_seconds
        );
        Some(
            baseline::measure(
                &args.redis_url,
                &api.base,
                concurrency,
                args.baseline_seconds,
            )
            .await
            .context("the baseline")?,
        )
    } else {
        None
    };

    let run_id = format!("lt{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let prepared = setup::prepare(scenario, &api, &tokens, &run_id, args.setup_timeout).await?;
    let grabbers = match scenario {
        // Without a run time the closed model stops after the iterations that cover every
        // grabber; the grabs of the last round past the count are skipped.
        Scenario::Seckill(seckill) if run_time.is_none() && model == Model::Closed => {
            Grabbers::Distinct {
                cap: Some(seckill.grabbers),
            }
        }
        Scenario::Seckill(_) => Grabbers::Distinct { cap: None },
        _ => Grabbers::Random,
    };
    let campaigns = CampaignBook::default();
    for campaign in prepared.campaigns {
        campaigns.add(campaign);
    }
    let grabs = GrabLog::default();
    for (campaign, user, claim) in prepared.seed_grabs {
        grabs.record(&campaign, &user, claim);
    }
    let ctx = Arc::new(Ctx {
        base: api.base.clone(),
        recorder: Recorder::new(Instant::now()),
        grabs,
        users: prepared.users,
        population: prepared.population,
        grabbers,
        merchants: prepared.merchants,
        campaigns,
        created: prepared.created,
        next_grabber: AtomicU64::new(0),
        next_read: AtomicU64::new(0),
        next_creation: AtomicU64::new(0),
    });
    let started_at = redpacket_common::time::rfc3339(redpacket_common::time::now_ms());
    let sampler = match scenario {
        Scenario::Soak(soak) if !soak.pids.is_empty() => {
            Some(rss::RssSampler::start(&soak.pids, ctx.recorder.origin()))
        }
        _ => None,
    };

    let mut files = Vec::new();
    let mut open = None;
    let mut goose = None;
    match model {
        Model::Closed => {
            let (brief, reports) = closed_load(&ctx, scenario, &summary_path).await?;
            goose = Some(brief);
            files.extend(reports);
        }
        Model::Open => open = Some(open_load(&ctx, scenario).await?),
    }
    let recording = ctx.recorder.snapshot();
    let rss = match sampler {
        Some(sampler) => sampler.stop().await,
        None => Vec::new(),
    };

    let to_check = drain::campaigns_to_check(&ctx);
    let drain = drain::wait_drained(
        &api,
        &tokens,
        &to_check,
        args.drain_timeout,
        args.verify_concurrency,
    )
    .await;
    let facts = drain::collect_facts(&api, &ctx, &to_check, &tokens, args.verify_concurrency).await;
    let mut verdict = verify::evaluate(&facts);
    if let Some(path) = &args.grants {
        write_grants(path, &facts).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Scenario::Soak(soak) = scenario
        && let Some(limit_mib) = soak.max_rss_growth_mib
    {
        let mut checks = verdict.checks;
        checks.extend(rss_checks(&rss, limit_mib));
        verdict = verify::Verdict::new(checks);
    }

    // Plots, then the summary that lists them.
    let asked = open.as_ref().map(|outcome| outcome.rate_asked);
    files.extend(write_charts(&summary_path, name, &recording, asked, &rss)?);
    files.push(summary_path.clone());
    let report = summary::RunReport {
        scenario: name,
        model: match model {
            Model::Closed => "closed",
            Model::Open => "open",
        },
        host: &args.host,
        started_at,
        settings: settings_json(scenario),
        recording: &recording,
        open: open.as_ref(),
        goose,
        baseline: baseline.as_ref(),
        drain: &drain,
        facts: &facts,
        verdict: &verdict,
        rss: &rss,
        files,
        unreadable_200: ctx.grabs.unreadable_200(),
    };
    let json = serde_json::to_string_pretty(&report.to_json())?;
    std::fs::write(&summary_path, json)
        .with_context(|| format!("writing {}", summary_path.display()))?;
    println!("{}", report.text());
    println!("{}", verify::table(&verdict));
    Ok(verdict.outcome)
}

/// Every grab answered 200, one JSON object a line.
fn write_grants(path: &Path, facts: &verify::RunFacts) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for campaign in &facts.campaigns {
        for granted in &campaign.granted {
            let line = json!({"campaign_id": campaign.id, "grant": granted});
            writeln!(out, "{line}")?;
        }
    }
    out.flush()?;
    Ok(())
}

/// The closed model: goose runs the scenario; returns what the summary says of goose and the
/// report files it wrote.
async fn closed_load(
    ctx: &Arc<Ctx>,
    scenario: &Scenario,
    summary_path: &Path,
) -> anyhow::Result<(serde_json::Value, Vec<PathBuf>)> {
    let args = scenario.run_args();
    let report_files: Vec<String> = if args.report_file.is_empty() {
        ["goose.html", "goose.md"]
            .iter()
            .map(|suffix| summary::beside(summary_path, suffix).display().to_string())
            .collect()
    } else {
        args.report_file.clone()
    };
    // Without a run time, seckill stops after the iterations that cover every grabber.
    let iterations = match scenario {
        Scenario::Seckill(seckill) if scenario.run_time().is_none() => {
            Some(iterations_for(seckill.grabbers, args.users))
        }
        _ => None,
    };
    let goose_args = GooseArgs {
        host: ctx.base.clone(),
        users: args.users,
        hatch_rate: args
            .increase_rate
            .clone()
            .unwrap_or_else(|| args.users.to_string()),
        run_time: scenario.run_time(),
        iterations,
        report_files: report_files.clone(),
        throttle: args.rate,
        extra: args.goose_args.clone(),
    };
    eprintln!("goose {}", goose_args.to_args().join(" "));
    let metrics =
        closed_model::run_closed(ctx.clone(), &goose_args, &goose_scenarios(scenario)).await?;
    let brief = json!({
        "arguments": goose_args.to_args(),
        "maximum_users": metrics.maximum_users,
        "total_users": metrics.total_users,
        "duration_s": metrics.duration,
        "reports": report_files,
    });
    Ok((brief, report_files.into_iter().map(Into::into).collect()))
}

/// The open model: arrivals at the scenario's rate, each operation picked from its mix.
async fn open_load(ctx: &Arc<Ctx>, scenario: &Scenario) -> anyhow::Result<open_model::OpenOutcome> {
    let args = scenario.run_args();
    let run_time = scenario.run_duration();
    // Without a run time, seckill stops after one arrival per grabber.
    let limit = match scenario {
        Scenario::Seckill(seckill) if run_time.is_none() => Some(seckill.grabbers),
        _ => None,
    };
    let rate = scenario.rate();
    eprintln!(
        "open model: {rate}/s{}{}, at most {} in flight",
        limit.map_or(String::new(), |l| format!(", {l} arrivals")),
        run_time.map_or(String::new(), |t| format!(", for {}s", t.as_secs())),
        args.max_in_flight
    );
    let client = Arc::new(DirectClient::new(&ctx.base, args.max_in_flight)?);
    let mix = Arc::new(open_mix(scenario));
    let shared = ctx.clone();
    let plan = OpenPlan {
        rate,
        ramp: args.ramp,
        limit,
        run_for: run_time,
        max_in_flight: args.max_in_flight,
        grace: OPEN_GRACE,
    };
    Ok(run_open(plan, move |arrival| {
        let (ctx, client, mix) = (shared.clone(), client.clone(), mix.clone());
        async move {
            if let Some(op) = mix.pick(arrival) {
                run_op(&ctx, &mut Transport::Direct(&client), op).await;
            }
        }
    })
    .await)
}

/// One verdict row per sampled process: its RSS grew by at most `limit_mib`.
fn rss_checks(rss: &[rss::RssSeries], limit_mib: u64) -> Vec<verify::Check> {
    let limit_kib = i64::try_from(limit_mib.saturating_mul(1_024)).unwrap_or(i64::MAX);
    rss.iter()
        .filter_map(rss::RssSeries::drift)
        .map(|drift| verify::Check {
            name: format!("rss growth of {}", drift.name),
            ok: drift.drift_kib <= limit_kib,
            detail: format!("{} KiB (limit {limit_mib} MiB)", drift.drift_kib),
        })
        .collect()
}

/// Writes the SVG plots beside the summary; returns their paths.
fn write_charts(
    summary_path: &Path,
    name: &str,
    recording: &recorder::Recording,
    asked: Option<u64>,
    rss: &[rss::RssSeries],
) -> anyhow::Result<Vec<PathBuf>> {
    let mut charts = vec![
        ("latency.svg", summary::latency_chart(name, recording)),
        (
            "throughput.svg",
            summary::throughput_chart(name, recording, asked),
        ),
    ];
    if !rss.is_empty() {
        charts.push(("rss.svg", summary::rss_chart(name, rss)));
    }
    let mut paths = Vec::new();
    for (suffix, chart) in charts {
        let path = summary::beside(summary_path, suffix);
        std::fs::write(&path, chart.render())
            .with_context(|| format!("writing {}", path.display()))?;
        paths.push(path);
    }
    Ok(paths)
}

/// The token secret: `RP_AUTH_SECRET`, else the file a `redpacket dev --data-dir` keeps.
fn load_secret(data_dir: Option<&Path>) -> anyhow::Result<Vec<u8>> {
    use redpacket_common::auth::{SECRET_FILE, SECRET_VAR, secret_from_text};
    if let Ok(text) = std::env::var(SECRET_VAR) {
        return Ok(secret_from_text(SECRET_VAR, &text)?.expose().clone());
    }
    if let Some(dir) = data_dir {
        let path = dir.join(SECRET_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the token secret from {}", path.display()))?;
        return Ok(secret_from_text(&path.display().to_string(), text.trim())?
            .expose()
            .clone());
    }
    bail!(
        "no token secret: set {SECRET_VAR} to the gateway's secret, or pass --data-dir of the \
         `redpacket dev` that generated one"
    )
}

/// The goose scenarios of the closed model: users are shared out by weight.
fn goose_scenarios(scenario: &Scenario) -> Vec<ScenarioSpec> {
    match scenario {
        Scenario::Seckill(_) => vec![ScenarioSpec {
            name: "seckill",
            weight: 1,
            op: Op::Grab,
        }],
        Scenario::Browse(_) => vec![ScenarioSpec {
            name: "browse",
            weight: 1,
            op: Op::Browse,
        }],
        Scenario::Mixed(cli::MixedArgs { mix, .. }) | Scenario::Soak(cli::SoakArgs { mix, .. }) => {
            [
                ("merchant", mix.create_weight, Op::Create),
                ("grabber", mix.grab_weight, Op::Grab),
                ("browser", mix.browse_weight, Op::Browse),
            ]
            .into_iter()
            .filter(|(_, weight, _)| *weight > 0)
            .map(|(name, weight, op)| ScenarioSpec {
                name,
                weight: usize::try_from(weight).unwrap_or(1),
                op,
            })
            .collect()
        }
    }
}

/// The open model's operations in proportion.
fn open_mix(scenario: &Scenario) -> Mix {
    match scenario {
        Scenario::Seckill(_) => Mix::new(&[(Op::Grab, 1)]),
        Scenario::Browse(_) => Mix::new(&[(Op::Browse, 1)]),
        Scenario::Mixed(cli::MixedArgs { mix, .. }) | Scenario::Soak(cli::SoakArgs { mix, .. }) => {
            Mix::new(&[
                (Op::Create, mix.create_weight),
                (Op::Grab, mix.grab_weight),
                (Op::Browse, mix.browse_weight),
            ])
        }
    }
}

/// The flags that shaped the run, for the summary.
fn settings_json(scenario: &Scenario) -> serde_json::Value {
    let args = scenario.run_args();
    let campaign = scenario.campaign_args();
    let mut settings = json!({
        "users": args.users,
        "increase_rate": args.increase_rate,
        "run_time": scenario.run_time(),
        // The open model's arrival rate; in the closed model only a cap when given.
        "rate": match scenario.model() {
            Model::Open => Some(scenario.rate()),
            Model::Closed => args.rate,
        },
        "ramp_s": args.ramp.as_secs(),
        "max_in_flight": args.max_in_flight,
        "packets": campaign.packets,
        "total_amount": campaign.total_amount.unwrap_or(campaign.packets.saturating_mul(100)),
        "split": campaign.split.wire(),
        "per_user_limit": campaign.per_user_limit,
        "opens_in_s": campaign.opens_in.as_secs(),
        "campaign_duration_s": campaign.campaign_duration.as_secs(),
    });
    match scenario {
        Scenario::Seckill(seckill) => settings["grabbers"] = seckill.grabbers.into(),
        Scenario::Browse(browse) => {
            settings["population"] = browse.population.into();
            settings["seed_grabs"] = browse.seed_grabs.into();
        }
        Scenario::Mixed(cli::MixedArgs { mix, .. }) | Scenario::Soak(cli::SoakArgs { mix, .. }) => {
            settings["population"] = mix.population.into();
            settings["merchants"] = mix.merchants.into();
            settings["weights"] = json!({
                "create": mix.create_weight, "grab": mix.grab_weight, "browse": mix.browse_weight,
            });
            settings["created_packets"] = mix.created_packets.into();
        }
    }
    settings
}
