//! The command line: a scenario, its flags, and goose's.
//!
//! clap parses everything the harness knows. goose's own flags that the scenarios use keep
//! goose's names and meaning (`--host`, `--users`, `--increase-rate` — goose 0.18 calls it
//! `--hatch-rate`, accepted too —, `--run-time`, `--report-file`) and are handed to goose in the
//! closed model; any other goose flag goes after `--` and reaches goose unchanged
//! (`loadtest seckill -- --help` lists them).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Drives a running red-packet system through its public gateway, then verifies it.
///
/// After every run the harness waits for the saga worker to drain, checks the invariants
/// through the public API and the reconciliation endpoint, prints a verdict table and exits
/// with status 2 if any check failed. Tokens are minted with the gateway's secret:
/// `RP_AUTH_SECRET`, or `--data-dir` of a `redpacket dev` that generated one.
#[derive(Debug, Parser)]
#[command(name = "loadtest", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// One hot campaign opening a few seconds ahead; distinct users grab once each the moment
    /// it opens.
    Seckill(SeckillArgs),
    /// Reads only (campaign stats, my claims, my wallet) at a target rate.
    Browse(BrowseArgs),
    /// Merchants create campaigns while users grab and browse, in set proportions.
    Mixed(MixedArgs),
    /// Steady mixed load for a set time, sampling the memory (VmRSS) of given processes.
    Soak(SoakArgs),
}

/// The load model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Model {
    /// goose users, each sending its next request when the last one answered.
    Closed,
    /// Arrivals at `--rate` per second whatever the latency; beyond `--max-in-flight`
    /// outstanding requests an arrival is dropped (and counted).
    Open,
}

/// Flags of every scenario.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The gateway's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080", help_heading = "Target")]
    pub host: String,
    /// Read the token secret from DIR/auth-secret (the file `redpacket dev --data-dir DIR`
    /// writes) when RP_AUTH_SECRET is not set.
    #[arg(long, value_name = "DIR", help_heading = "Target")]
    pub data_dir: Option<PathBuf>,
    /// Use this operator token instead of minting one (users' and merchants' tokens still
    /// need the secret).
    #[arg(long, value_name = "TOKEN", help_heading = "Target")]
    pub operator_token: Option<String>,
    /// Currency of the campaigns and top-ups.
    #[arg(long, default_value = "CNY", help_heading = "Target")]
    pub currency: String,

    /// Load model [default: closed for seckill, open for the others].
    #[arg(long, value_enum, help_heading = "Load")]
    pub model: Option<Model>,
    /// Closed model: concurrent goose users.
    #[arg(long, short = 'u', default_value_t = 64, help_heading = "Load")]
    pub users: usize,
    /// Closed model: goose users started per second (goose's --hatch-rate) [default: all at
    /// once, i.e. --users per second].
    #[arg(
        long,
        visible_alias = "hatch-rate",
        value_name = "RATE",
        help_heading = "Load"
    )]
    pub increase_rate: Option<String>,
    /// How long the load runs (30s, 5m, 1h30m) [default: seckill until every grabber grabbed,
    /// browse and mixed 60s, soak 10m].
    #[arg(long, value_name = "TIME", value_parser = checked_duration, help_heading = "Load")]
    pub run_time: Option<String>,
    /// Open model: arrivals per second [default: seckill 2000, browse 500, mixed 300, soak
    /// 200]. Closed model: a cap on requests per second (goose's --throttle-requests), off
    /// unless given.
    #[arg(long, help_heading = "Load")]
    pub rate: Option<u64>,
    /// Open model: the rate climbs linearly from 0 to --rate over this long.
    #[arg(long, value_name = "TIME", default_value = "0s", value_parser = parse_duration, help_heading = "Load")]
    pub ramp: Duration,
    /// Open model: most requests outstanding at once; an arrival beyond it is dropped.
    #[arg(long, default_value_t = 256, help_heading = "Load")]
    pub max_in_flight: usize,

    /// goose's reports (closed model), repeatable; the extension picks the format (.html,
    /// .md, .json) [default: beside the summary, <name>-goose.html and .md].
    #[arg(long, value_name = "FILE", help_heading = "Reports")]
    pub report_file: Vec<String>,
    /// The run's summary JSON; the SVG plots are written beside it as <name>-latency.svg,
    /// <name>-throughput.svg (and soak's <name>-rss.svg), <name> being the summary's file name
    /// less `-summary.json` [default: target/loadtest/<scenario>-summary.json].
    #[arg(long, value_name = "FILE", help_heading = "Reports")]
    pub summary: Option<PathBuf>,
    /// Also write every grab answered 200 (campaign, user, claim, amount), one JSON object a
    /// line, for checks of one's own after the run (the fault suite's per-user balances).
    #[arg(long, value_name = "FILE", help_heading = "Reports")]
    pub grants: Option<PathBuf>,

    /// Before the scenario, measure at the same concurrency the raw Redis grab script and
    /// `GET /v1/ping`, and report the scenario's throughput as ratios to both.
    #[arg(long, help_heading = "Baseline")]
    pub baseline: bool,
    /// Redis of the raw-script baseline (a scratch key prefix, deleted afterwards).
    #[arg(
        long,
        default_value = "redis://127.0.0.1:6379",
        help_heading = "Baseline"
    )]
    pub redis_url: String,
    /// Seconds of each baseline phase.
    #[arg(long, default_value_t = 5, help_heading = "Baseline")]
    pub baseline_seconds: u64,
    /// Baseline concurrency [default: --users in the closed model, --max-in-flight in the
    /// open one].
    #[arg(long, help_heading = "Baseline")]
    pub baseline_concurrency: Option<usize>,

    /// Longest wait for a campaign to become active during set-up.
    #[arg(long, value_name = "TIME", default_value = "120s", value_parser = parse_duration, help_heading = "Waits")]
    pub setup_timeout: Duration,
    /// Longest wait for the saga worker to credit or compensate every grab.
    #[arg(long, value_name = "TIME", default_value = "180s", value_parser = parse_duration, help_heading = "Waits")]
    pub drain_timeout: Duration,
    /// Concurrent reads of the drain wait and the verification (claims of every user who
    /// grabbed), at most 256; each read waits out 429/503/504 for at most 10 attempts / 60 s.
    #[arg(long, default_value_t = VERIFY_CONCURRENCY, value_parser = parse_verify_concurrency, help_heading = "Waits")]
    pub verify_concurrency: usize,

    /// Further goose flags, after `--` (closed model), e.g. `-- --no-granular-report`.
    #[arg(last = true, value_name = "GOOSE_ARGS")]
    pub goose_args: Vec<String>,
}

/// The campaign the scenario sets up.
#[derive(Debug, Clone, Args)]
pub struct CampaignArgs {
    /// Packets of the campaign set up before the load.
    #[arg(long, default_value_t = 1_000, help_heading = "Campaign")]
    pub packets: i64,
    /// Its total in minor units [default: 100 per packet].
    #[arg(long, help_heading = "Campaign")]
    pub total_amount: Option<i64>,
    /// How the total is split.
    #[arg(
        long,
        value_enum,
        default_value = "double-mean",
        help_heading = "Campaign"
    )]
    pub split: SplitMode,
    /// Smallest packet (bounded split; optional for the others).
    #[arg(long, help_heading = "Campaign")]
    pub min_amount: Option<i64>,
    /// Largest packet (bounded split).
    #[arg(long, help_heading = "Campaign")]
    pub max_amount: Option<i64>,
    /// Claims one user may hold per campaign.
    #[arg(long, default_value_t = 1, help_heading = "Campaign")]
    pub per_user_limit: i64,
    /// How far ahead of its creation the campaign opens.
    #[arg(long, value_name = "TIME", default_value = "5s", value_parser = parse_duration, help_heading = "Campaign")]
    pub opens_in: Duration,
    /// How long a campaign stays open.
    #[arg(long, value_name = "TIME", default_value = "30m", value_parser = parse_duration, help_heading = "Campaign")]
    pub campaign_duration: Duration,
    /// Seed of the split (the same seed gives the same packets) [default: random].
    #[arg(long, help_heading = "Campaign")]
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SplitMode {
    Fixed,
    DoubleMean,
    Bounded,
}

impl SplitMode {
    pub fn wire(self) -> &'static str {
        match self {
            SplitMode::Fixed => "fixed",
            SplitMode::DoubleMean => "double_mean",
            SplitMode::Bounded => "bounded",
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct SeckillArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub campaign: CampaignArgs,
    /// Distinct users, each grabbing once (closed model without --run-time: the run ends when
    /// all have grabbed; with it, fresh users keep grabbing until the time is up).
    #[arg(long, default_value_t = 10_000, help_heading = "Scenario")]
    pub grabbers: u64,
}

#[derive(Debug, Clone, Args)]
pub struct BrowseArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub campaign: CampaignArgs,
    /// Users who browse (random picks).
    #[arg(long, default_value_t = 1_000, help_heading = "Scenario")]
    pub population: u64,
    /// Grabs made during set-up (not measured) so that users have claims and wallets to read.
    #[arg(long, default_value_t = 200, help_heading = "Scenario")]
    pub seed_grabs: u64,
}

#[derive(Debug, Clone, Args)]
pub struct MixArgs {
    /// Users who grab and browse (random picks; a user may grab again and meet the limit).
    #[arg(long, default_value_t = 10_000, help_heading = "Scenario")]
    pub population: u64,
    /// Merchants creating campaigns (the first also owns the hot campaign).
    #[arg(long, default_value_t = 4, help_heading = "Scenario")]
    pub merchants: u32,
    /// Minor units each merchant is topped up with before the load.
    #[arg(long, default_value_t = 1_000_000_000, help_heading = "Scenario")]
    pub merchant_funds: i64,
    /// Weight of creating a campaign (open model: share of arrivals; closed: of goose users).
    #[arg(long, default_value_t = 1, help_heading = "Scenario")]
    pub create_weight: u32,
    /// Weight of a grab.
    #[arg(long, default_value_t = 20, help_heading = "Scenario")]
    pub grab_weight: u32,
    /// Weight of a read (stats, my claims, my wallet in turn).
    #[arg(long, default_value_t = 9, help_heading = "Scenario")]
    pub browse_weight: u32,
    /// Packets of each campaign created during the load (100 minor units each; they open 2 s
    /// after creation).
    #[arg(long, default_value_t = 100, help_heading = "Scenario")]
    pub created_packets: i64,
}

#[derive(Debug, Clone, Args)]
pub struct MixedArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub campaign: CampaignArgs,
    #[command(flatten)]
    pub mix: MixArgs,
}

#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub campaign: CampaignArgs,
    #[command(flatten)]
    pub mix: MixArgs,
    /// A process to sample, NAME=PID (repeatable), e.g. --pid gateway=4242.
    #[arg(long = "pid", value_name = "NAME=PID", value_parser = super::rss::parse_pid_arg, help_heading = "Soak")]
    pub pids: Vec<(String, u32)>,
    /// Fail the verdict if a process's RSS grew by more than this many MiB (last tenth of the
    /// samples against the first) [default: report only].
    #[arg(long, value_name = "MIB", help_heading = "Soak")]
    pub max_rss_growth_mib: Option<u64>,
}

impl Scenario {
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Seckill(_) => "seckill",
            Scenario::Browse(_) => "browse",
            Scenario::Mixed(_) => "mixed",
            Scenario::Soak(_) => "soak",
        }
    }

    pub fn run_args(&self) -> &RunArgs {
        match self {
            Scenario::Seckill(args) => &args.run,
            Scenario::Browse(args) => &args.run,
            Scenario::Mixed(args) => &args.run,
            Scenario::Soak(args) => &args.run,
        }
    }

    pub fn campaign_args(&self) -> &CampaignArgs {
        match self {
            Scenario::Seckill(args) => &args.campaign,
            Scenario::Browse(args) => &args.campaign,
            Scenario::Mixed(args) => &args.campaign,
            Scenario::Soak(args) => &args.campaign,
        }
    }

    pub fn model(&self) -> Model {
        self.run_args().model.unwrap_or(match self {
            Scenario::Seckill(_) => Model::Closed,
            _ => Model::Open,
        })
    }

    pub fn rate(&self) -> u64 {
        self.run_args().rate.unwrap_or(match self {
            Scenario::Seckill(_) => 2_000,
            Scenario::Browse(_) => 500,
            Scenario::Mixed(_) => 300,
            Scenario::Soak(_) => 200,
        })
    }

    /// The run time, when there is one.
    pub fn run_duration(&self) -> Option<Duration> {
        self.run_time().and_then(|text| parse_duration(&text).ok())
    }

    /// The run time, goose's way of writing it, when there is one.
    pub fn run_time(&self) -> Option<String> {
        self.run_args().run_time.clone().or(match self {
            Scenario::Seckill(_) => None,
            Scenario::Browse(_) | Scenario::Mixed(_) => Some("60s".to_owned()),
            Scenario::Soak(_) => Some("10m".to_owned()),
        })
    }
}

/// Checks a duration and keeps its text (goose parses `--run-time` itself).
fn checked_duration(text: &str) -> Result<String, String> {
    parse_duration(text).map(|_| text.trim().to_owned())
}

/// Concurrent reads of the drain wait and the verification unless `--verify-concurrency` says
/// otherwise: enough to read 200,000 users' claims in minutes, few enough that the harness's own
/// reads do not exhaust the services' database pools (16 connections each by default).
pub const VERIFY_CONCURRENCY: usize = 32;
/// The most concurrent reads `--verify-concurrency` accepts.
pub const MAX_VERIFY_CONCURRENCY: usize = 256;

fn parse_verify_concurrency(text: &str) -> Result<usize, String> {
    let value: usize = text
        .parse()
        .map_err(|_| format!("`{text}` is not a whole number"))?;
    if (1..=MAX_VERIFY_CONCURRENCY).contains(&value) {
        Ok(value)
    } else {
        Err(format!("must be between 1 and {MAX_VERIFY_CONCURRENCY}"))
    }
}

/// Parses a duration the way goose writes them: `90`, `30s`, `5m`, `1h30m`, `2h5m10s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("an empty duration".to_owned());
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse()
            .map(Duration::from_secs)
            .map_err(|_| format!("`{text}` is too large"));
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            'h' => 3_600,
            'm' => 60,
            's' => 1,
            _ => return Err(format!("`{text}`: units are h, m and s (e.g. 1h30m)")),
        };
        let value: u64 = digits
            .parse()
            .map_err(|_| format!("`{text}`: a unit without a number"))?;
        total = value
            .checked_mul(unit)
            .and_then(|secs| total.checked_add(secs))
            .ok_or_else(|| format!("`{text}` is too large"))?;
        digits.clear();
    }
    if !digits.is_empty() {
        return Err(format!("`{text}`: a number without a unit at the end"));
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_as_goose_writes_them() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse_duration("2h5m10s"), Ok(Duration::from_secs(7_510)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("1h30").is_err());
    }

    #[test]
    fn the_command_line_parses_and_passes_goose_flags_through() {
        let cli = Cli::try_parse_from([
            "loadtest",
            "seckill",
            "--host",
            "http://127.0.0.1:9000",
            "--users",
            "8",
            "--increase-rate",
            "4",
            "--report-file",
            "a.html",
            "--report-file",
            "a.md",
            "--packets",
            "50",
            "--",
            "--no-granular-report",
        ])
        .unwrap();
        let Scenario::Seckill(args) = &cli.scenario else {
            panic!("not seckill");
        };
        assert_eq!(args.run.users, 8);
        assert_eq!(args.run.increase_rate.as_deref(), Some("4"));
        assert_eq!(args.run.report_file, vec!["a.html", "a.md"]);
        assert_eq!(args.run.goose_args, vec!["--no-granular-report"]);
        assert_eq!(args.campaign.packets, 50);
        assert_eq!(args.grabbers, 10_000);
        assert_eq!(cli.scenario.model(), Model::Closed);
        assert_eq!(cli.scenario.run_time(), None);

        let cli = Cli::try_parse_from([
            "loadtest",
            "soak",
            "--pid",
            "gateway=12",
            "--pid",
            "wallet=13",
            "--hatch-rate",
            "2",
        ])
        .unwrap();
        let Scenario::Soak(args) = &cli.scenario else {
            panic!("not soak");
        };
        assert_eq!(args.pids.len(), 2);
        assert_eq!(args.run.increase_rate.as_deref(), Some("2"));
        assert_eq!(cli.scenario.model(), Model::Open);
        assert_eq!(cli.scenario.rate(), 200);
        assert_eq!(cli.scenario.run_time().as_deref(), Some("10m"));
    }

    #[test]
    fn the_help_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
