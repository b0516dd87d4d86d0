//! The gateway against nginx, on one hot campaign, in one run at the same concurrency:
//!
//! - **gateway**: `POST /v1/campaigns/{id}/grab` with a user bearer token (verified, rate
//!   limited per user, per campaign and globally, relayed through the campaign circuit breaker);
//! - **direct**: `POST /campaigns/{id}/grab` on the campaign service itself;
//! - **nginx**: the same request through Debian's nginx reverse proxy (keep-alive upstream) in
//!   front of the same campaign service;
//! - **raw**: the Redis grab script called directly by as many callers (the load harness's
//!   `--baseline`), once a round: the ceiling of every grab path on this machine.
//!
//! The system runs as child processes of the release `redpacket` binary (wallet, campaign, saga
//! worker, gateway), each service on its own scratch PostgreSQL database, with a fresh Redis key
//! prefix and RabbitMQ names; everything is removed afterwards. wrk drives every target, the
//! targets interleaved round after round so that machine noise spreads evenly over them. The
//! CPU time each process spent per grab is read from `/proc` around every run.
//!
//! `--compare-gateway <binary>` runs a second gateway from another build beside the first (same
//! settings, its own users): an A/B of a gateway change within one run.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use loadtest::harness::baseline::raw_grabs;
use loadtest::{ScratchDatabases, WrkReport, ratio, unlink_prefix, wrk, wrk_installed};
use redpacket_common::auth::{Role, TokenKey};
use redpacket_common::time::rfc3339_in;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

/// Benchmarks the gateway, the campaign service alone and nginx in front of it, in one run.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// A PostgreSQL server URL; three scratch databases are created on it and dropped afterwards.
    #[arg(
        long,
        env = "RP_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    postgres_url: String,
    /// Redis URL; keys go under a fresh prefix, deleted afterwards.
    #[arg(
        long,
        env = "RP_BENCH_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
    /// RabbitMQ URL; the saga worker's exchange and queues get a fresh prefix, deleted afterwards.
    #[arg(
        long,
        env = "RP_BENCH_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// The release `redpacket` binary (default: next to this executable). Build it with
    /// `cargo build --release -p redpacket`.
    #[arg(long)]
    redpacket: Option<PathBuf>,
    /// The nginx binary.
    #[arg(long, default_value = "/usr/sbin/nginx")]
    nginx: PathBuf,
    /// nginx `worker_processes`: `auto` is one per core, the parallelism the gateway's runtime
    /// has too (one worker thread per core).
    #[arg(long, default_value = "auto")]
    nginx_workers: String,
    /// Packets of the hot campaign (1 minor unit each); enough that no run sells it out (three
    /// rounds take about 4,000,000 here).
    #[arg(long, default_value_t = 6_000_000)]
    packets: i64,
    /// Distinct users per target, cycled (the campaign allows each 100 claims; the gateway's
    /// per-user limit stays at its default and is never reached).
    #[arg(long, default_value_t = 100_000)]
    users: usize,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// wrk connections (the concurrency, the same for every target).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds of each run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Rounds; each runs every target once, in a rotating order.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Keep the saga worker running during the runs (it then credits the grabs meanwhile and
    /// competes for the CPU); by default it is stopped once the campaign is active.
    #[arg(long)]
    keep_saga_worker: bool,
    /// Seconds of an untimed warm-up run of every target before the rounds (connection pools,
    /// the limiters' tables, the users' first claims).
    #[arg(long, default_value_t = 3)]
    warmup_seconds: u64,
    /// A second `redpacket` binary whose gateway runs beside the first with the same settings,
    /// as target `gateway-b`: an A/B of a gateway change within one run.
    #[arg(long)]
    compare_gateway: Option<PathBuf>,
    /// Pause after setup, before the runs, printing the pids (to attach `perf`).
    #[arg(long, default_value_t = 0)]
    pause_seconds: u64,
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Claims one user may hold in the hot campaign (the campaign service's maximum).
const PER_USER_LIMIT: i64 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Gateway,
    Direct,
    Nginx,
    /// The gateway of `--compare-gateway`.
    GatewayB,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Gateway => "gateway",
            Target::Direct => "direct",
            Target::Nginx => "nginx",
            Target::GatewayB => "gateway-b",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Target::Gateway => "gateway `POST /v1/campaigns/{id}/grab` (token, limits, breaker)",
            Target::Direct => "campaign service `POST /campaigns/{id}/grab`",
            Target::Nginx => "nginx → campaign service `POST /campaigns/{id}/grab`",
            Target::GatewayB => "gateway-b (`--compare-gateway`), the same request",
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    redpacket_common::telemetry::install_crypto_provider();
    let binary = match &args.redpacket {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory of this executable")?
            .join("redpacket"),
    };
    anyhow::ensure!(
        binary.is_file(),
        "{} not found: build it first with `cargo build --release -p redpacket` (or pass --redpacket)",
        binary.display()
    );
    if let Some(path) = &args.compare_gateway {
        anyhow::ensure!(path.is_file(), "{} not found", path.display());
    }
    anyhow::ensure!(
        wrk_installed().await,
        "wrk is not installed (apt-get install -y wrk)"
    );
    anyhow::ensure!(
        args.nginx.is_file(),
        "{} not found (apt-get install -y nginx-light, or pass --nginx)",
        args.nginx.display()
    );
    anyhow::ensure!(
        args.threads >= 1 && args.connections >= args.threads && args.users >= args.threads,
        "need at least one wrk thread, a connection and a user per thread"
    );
    let scratch =
        ScratchDatabases::create(&args.postgres_url, &["wallet", "campaign", "saga"]).await?;
    let run_id = scratch.run_id().to_owned();
    let dir = std::env::temp_dir().join(format!("gateway-bench-{run_id}"));
    std::fs::create_dir_all(&dir)?;
    let mut system = System {
        dir: dir.clone(),
        services: Vec::new(),
    };
    // Ctrl-C still cleans up: the run is dropped, then everything below happens.
    let outcome = tokio::select! {
        outcome = run(&args, &binary, &scratch, &run_id, &mut system) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    if let Err(err) = &outcome {
        eprintln!("gateway-bench: {err:#}");
        system.print_logs();
    }
    // Clean up whatever happened, then report the first failure.
    system.stop_all().await;
    let mut cleanup = Vec::new();
    if let Err(err) = unlink_prefix(&args.redis_url, &format!("rpbench:{run_id}")).await {
        cleanup.push(format!("Redis keys: {err:#}"));
    }
    if let Err(err) = delete_broker_topology(&args.amqp_url, &format!("rpbench.{run_id}")).await {
        cleanup.push(format!("RabbitMQ topology: {err:#}"));
    }
    if let Err(err) = scratch.drop_all().await {
        cleanup.push(format!("scratch databases: {err:#}"));
    }
    std::fs::remove_dir_all(&dir).ok();
    for problem in &cleanup {
        eprintln!("gateway-bench: cleanup failed: {problem}");
    }
    outcome?;
    anyhow::ensure!(cleanup.is_empty(), "cleanup failed");
    Ok(())
}

/// A child process of the system.
struct Service {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.name)
            .field("pid", &self.child.id())
            .finish_non_exhaustive()
    }
}

impl Service {
    fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGTERM (graceful: nginx and the services drain), then SIGKILL after 10 s.
    async fn stop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
            if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
                .await
                .is_ok()
            {
                return;
            }
        }
        let _ = self.child.kill().await;
    }
}

/// The processes started, stopped at the end whatever happens.
#[derive(Debug)]
struct System {
    dir: PathBuf,
    services: Vec<Service>,
}

impl System {
    fn spawn(
        &mut self,
        name: &'static str,
        program: &Path,
        args: &[&str],
        env: &[(&str, String)],
    ) -> anyhow::Result<u32> {
        let log = self.dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true);
        // Only the settings given here: nothing inherited (RP_CONFIG_FILE, RP_LOG...).
        for (var, _) in std::env::vars() {
            if var.starts_with("RP_") {
                command.env_remove(var);
            }
        }
        command.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        let child = command
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        let pid = child.id().context("no pid")?;
        self.services.push(Service { name, child, log });
        Ok(pid)
    }

    fn pid(&self, name: &str) -> Option<u32> {
        self.services
            .iter()
            .find(|service| service.name == name)
            .and_then(Service::pid)
    }

    /// Waits until `url` answers 2xx, failing early when the process exits.
    async fn wait_ready(
        &mut self,
        name: &str,
        client: &reqwest::Client,
        url: &str,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(response) = client.get(url).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            if let Some(service) = self.services.iter_mut().find(|s| s.name == name)
                && let Some(status) = service.child.try_wait()?
            {
                anyhow::bail!("{name} exited ({status}) before it was ready");
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{name} not ready at {url} after 90 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(&mut self, name: &str) {
        if let Some(service) = self.services.iter_mut().find(|s| s.name == name) {
            service.stop().await;
        }
    }

    /// Stops every process, the last started first.
    async fn stop_all(&mut self) {
        while let Some(mut service) = self.services.pop() {
            service.stop().await;
        }
    }

    fn print_logs(&self) {
        for service in &self.services {
            let text = std::fs::read_to_string(&service.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(15)..];
            if !tail.is_empty() {
                eprintln!("--- last lines of {} ---", service.name);
                for line in tail {
                    eprintln!("{line}");
                }
            }
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn run(
    args: &Args,
    binary: &Path,
    scratch: &ScratchDatabases,
    run_id: &str,
    system: &mut System,
) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()?;
    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let key = TokenKey::new(secret.as_bytes());
    let [
        wallet_port,
        campaign_port,
        saga_port,
        gateway_port,
        nginx_port,
        gateway_b_port,
    ] = [
        free_port()?,
        free_port()?,
        free_port()?,
        free_port()?,
        free_port()?,
        free_port()?,
    ];
    let url = |port: u16| format!("http://127.0.0.1:{port}");
    let (wallet_url, campaign_url, saga_url, gateway_url, nginx_url, gateway_b_url) = (
        url(wallet_port),
        url(campaign_port),
        url(saga_port),
        url(gateway_port),
        url(nginx_port),
        url(gateway_b_port),
    );
    let redis_prefix = format!("rpbench:{run_id}");
    let amqp_prefix = format!("rpbench.{run_id}");
    let quiet = [
        ("RP_LOG", "warn".to_owned()),
        ("RP_LOG_FORMAT", "human".to_owned()),
    ];
    let with_quiet = |mut env: Vec<(&'static str, String)>| {
        env.extend(quiet.iter().cloned());
        env
    };

    // 1. The distributed system, each service a process of the release binary.
    println!(
        "gateway-bench: starting wallet, campaign, saga worker and gateway from {}",
        binary.display()
    );
    system.spawn(
        "wallet",
        binary,
        &["wallet", "--migrate"],
        &with_quiet(vec![
            ("RP_DATABASE_URL", scratch.url(0)),
            ("RP_LISTEN", format!("127.0.0.1:{wallet_port}")),
        ]),
    )?;
    system.spawn(
        "campaign",
        binary,
        &["campaign", "--migrate"],
        &with_quiet(vec![
            ("RP_DATABASE_URL", scratch.url(1)),
            ("RP_REDIS_URL", args.redis_url.clone()),
            ("RP_REDIS_PREFIX", redis_prefix.clone()),
            ("RP_WORKER_ID", "901".to_owned()),
            ("RP_LISTEN", format!("127.0.0.1:{campaign_port}")),
        ]),
    )?;
    system
        .wait_ready("wallet", &client, &format!("{wallet_url}/health/ready"))
        .await?;
    system
        .wait_ready("campaign", &client, &format!("{campaign_url}/health/ready"))
        .await?;
    system.spawn(
        "saga-worker",
        binary,
        &["saga-worker", "--migrate"],
        &with_quiet(vec![
            ("RP_DATABASE_URL", scratch.url(2)),
            ("RP_REDIS_URL", args.redis_url.clone()),
            ("RP_REDIS_PREFIX", redis_prefix.clone()),
            ("RP_AMQP_URL", args.amqp_url.clone()),
            ("RP_AMQP_PREFIX", amqp_prefix.clone()),
            ("RP_CAMPAIGN_URL", campaign_url.clone()),
            ("RP_WALLET_URL", wallet_url.clone()),
            ("RP_WORKER_ID", "902".to_owned()),
            ("RP_LISTEN", format!("127.0.0.1:{saga_port}")),
        ]),
    )?;
    // The limits stay on, high enough never to refuse, so their code runs on every request;
    // the per-user limit keeps its default (20/s, burst 40), far above what a cycled user does.
    let gateway_env = |port: u16| {
        with_quiet(vec![
            ("RP_LISTEN", format!("127.0.0.1:{port}")),
            ("RP_CAMPAIGN_URL", campaign_url.clone()),
            ("RP_WALLET_URL", wallet_url.clone()),
            ("RP_SAGA_URL", saga_url.clone()),
            ("RP_AUTH_SECRET", secret.clone()),
            ("RP_LIMIT_GLOBAL_RPS", "1000000".to_owned()),
            ("RP_LIMIT_GLOBAL_BURST", "1000000".to_owned()),
            ("RP_LIMIT_CAMPAIGN_RPS", "1000000".to_owned()),
            ("RP_LIMIT_CAMPAIGN_BURST", "1000000".to_owned()),
        ])
    };
    system.spawn("gateway", binary, &["gateway"], &gateway_env(gateway_port))?;
    if let Some(other) = &args.compare_gateway {
        system.spawn(
            "gateway-b",
            other,
            &["gateway"],
            &gateway_env(gateway_b_port),
        )?;
    }
    system
        .wait_ready("saga-worker", &client, &format!("{saga_url}/health/ready"))
        .await?;
    system
        .wait_ready("gateway", &client, &format!("{gateway_url}/health/ready"))
        .await?;
    if args.compare_gateway.is_some() {
        system
            .wait_ready(
                "gateway-b",
                &client,
                &format!("{gateway_b_url}/health/ready"),
            )
            .await?;
    }

    // 2. nginx in front of the campaign service.
    let nginx_conf = system.dir.join("nginx.conf");
    std::fs::write(
        &nginx_conf,
        nginx_config(&system.dir, &args.nginx_workers, nginx_port, campaign_port),
    )?;
    let nginx_dir = system.dir.display().to_string();
    let nginx_error = system.dir.join("nginx-error.log").display().to_string();
    let nginx_conf_arg = nginx_conf.display().to_string();
    system.spawn(
        "nginx",
        &args.nginx.clone(),
        &["-p", &nginx_dir, "-e", &nginx_error, "-c", &nginx_conf_arg],
        &[],
    )?;
    system
        .wait_ready("nginx", &client, &format!("{nginx_url}/health/live"))
        .await?;

    // 3. One hot campaign, created and funded through the gateway.
    let ttl = Duration::from_secs(6 * 3600);
    let operator = key.mint(Role::Operator, "bench-operator", ttl)?;
    let merchant = key.mint(Role::Merchant, "bench", ttl)?;
    let topup = client
        .post(format!("{gateway_url}/v1/admin/topups"))
        .bearer_auth(&operator)
        .header("Idempotency-Key", format!("bench-{run_id}"))
        .json(&json!({"merchant_id": "bench", "amount": args.packets, "currency": "CNY"}))
        .send()
        .await?;
    anyhow::ensure!(
        topup.status().is_success(),
        "top-up: {} {}",
        topup.status(),
        topup.text().await?
    );
    let started = Instant::now();
    let created = client
        .post(format!("{gateway_url}/v1/campaigns"))
        .bearer_auth(&merchant)
        .json(&json!({
            "title": "gateway bench", "currency": "CNY",
            "total_amount": args.packets, "packet_count": args.packets,
            "split": {"mode": "fixed"}, "per_user_limit": PER_USER_LIMIT,
            "starts_at": rfc3339_in(0), "ends_at": rfc3339_in(6 * 3_600_000),
        }))
        .send()
        .await?;
    anyhow::ensure!(
        created.status().is_success(),
        "create campaign: {} {}",
        created.status(),
        created.text().await?
    );
    let created: Value = created.json().await?;
    let id = created["id"].as_str().context("no campaign id")?.to_owned();
    wait_active(&client, &gateway_url, &merchant, &id).await?;
    println!(
        "gateway-bench: campaign {id} of {} packets created, funded by the saga and active in {:.1?}",
        args.packets,
        started.elapsed()
    );
    if args.keep_saga_worker {
        println!("gateway-bench: the saga worker keeps running (it credits grabs during the runs)");
    } else {
        system.stop("saga-worker").await;
        println!(
            "gateway-bench: saga worker stopped now that the campaign is active: the runs measure \
             the grab path only (grabs wait in the Redis hand-off stream, uncredited)"
        );
    }

    // 4. The requests: users cycled per wrk thread, the same pattern for every target.
    let per_thread = args.users / args.threads;
    let grab_path = format!("/campaigns/{id}/grab");
    let gateway_path = format!("/v1/campaigns/{id}/grab");
    let mut scripts = vec![
        (
            Target::Gateway,
            gateway_script(&system.dir, "g", &gateway_path),
            gateway_url.clone(),
        ),
        (
            Target::Direct,
            campaign_script(&grab_path, "d", per_thread),
            campaign_url.clone(),
        ),
        (
            Target::Nginx,
            campaign_script(&grab_path, "n", per_thread),
            nginx_url.clone(),
        ),
    ];
    if args.compare_gateway.is_some() {
        scripts.push((
            Target::GatewayB,
            gateway_script(&system.dir, "h", &gateway_path),
            gateway_b_url.clone(),
        ));
    }
    // Each gateway its own users (`g…`, `h…`), each with a token, one file per wrk thread.
    for users in ["g", "h"].iter().take(scripts.len() - 2) {
        for thread in 0..args.threads {
            let mut tokens = String::with_capacity(per_thread * 160);
            for k in 1..=per_thread {
                tokens.push_str(&key.mint(Role::User, &format!("{users}{thread}_{k}"), ttl)?);
                tokens.push('\n');
            }
            std::fs::write(
                system.dir.join(format!("tokens-{users}-{thread}.txt")),
                tokens,
            )?;
        }
    }
    let mut targets = Vec::new();
    for (target, script, base) in scripts {
        let path = system.dir.join(format!("{}.lua", target.name()));
        std::fs::write(&path, script)?;
        targets.push((target, path, base));
    }
    // One grab through each, checked, before any is timed.
    let smoke_token = key.mint(Role::User, "smoke", ttl)?;
    for (target, _, base) in &targets {
        let request = match target {
            Target::Gateway | Target::GatewayB => client
                .post(format!("{base}{gateway_path}"))
                .bearer_auth(&smoke_token),
            _ => client
                .post(format!("{base}{grab_path}"))
                .json(&json!({"user_id": format!("smoke-{}", target.name())})),
        };
        let response = request.send().await?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or_default();
        anyhow::ensure!(
            status.is_success() && body["claim_id"].is_string(),
            "a grab through {} answered {status}: {body}",
            target.name()
        );
    }

    let pids = Pids::find(system, &args.redis_url).await;
    println!(
        "gateway-bench: pids gateway {:?}, gateway-b {:?}, campaign {:?}, nginx {:?} (workers {:?}), redis {:?}",
        pids.gateway, pids.gateway_b, pids.campaign, pids.nginx, pids.nginx_workers, pids.redis
    );
    if args.pause_seconds > 0 {
        println!("gateway-bench: pausing {} s", args.pause_seconds);
        tokio::time::sleep(Duration::from_secs(args.pause_seconds)).await;
    }
    let clock = clock_ticks().await;
    let duration = Duration::from_secs(args.seconds);
    if args.warmup_seconds > 0 {
        println!(
            "gateway-bench: warm-up, {} s per target (not counted)",
            args.warmup_seconds
        );
        for (_, script, base) in &targets {
            let warmup = Duration::from_secs(args.warmup_seconds);
            wrk(args.threads, args.connections, warmup, script, base).await?;
        }
    }
    println!(
        "gateway-bench: {} rounds × {} targets, wrk -t{} -c{} -d{}s each, {} users per target",
        args.rounds,
        targets.len(),
        args.threads,
        args.connections,
        args.seconds,
        args.users
    );
    let mut results: Vec<(usize, Target, WrkReport, Cpu)> = Vec::new();
    let mut raw_rates = Vec::new();
    for round in 0..args.rounds {
        for offset in 0..targets.len() {
            let (target, script, base) = &targets[(round + offset) % targets.len()];
            // A moment for the previous run's connections to close.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let before = pids.sample(*target);
            let report = wrk(args.threads, args.connections, duration, script, base).await?;
            let cpu = pids.sample(*target).since(&before);
            println!(
                "  round {} {:<8} {:>7} grabs/s  p50 {:>9.2?}  p99 {:>9.2?}  non-2xx {}  socket errors {}",
                round + 1,
                target.name(),
                report.ok_per_second(),
                report.p50.unwrap_or_default(),
                report.p99.unwrap_or_default(),
                report.non_2xx,
                report.socket_errors
            );
            results.push((round + 1, *target, report, cpu));
        }
        // The raw Redis grab script at the same concurrency, as the load harness's baseline
        // measures it: the ceiling of any grab path on this machine.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let prefix = format!("rpbench:{run_id}:raw{round}");
        let raw = raw_grabs(&args.redis_url, &prefix, args.connections, duration).await;
        unlink_prefix(&args.redis_url, &prefix).await?;
        let raw = raw?;
        println!(
            "  round {} raw      {:>7} calls/s  (the Redis grab script, {} callers, {} failed)",
            round + 1,
            raw.per_second(),
            args.connections,
            raw.failed
        );
        raw_rates.push(raw.per_second());
    }

    // 5. The figures.
    let stats: Value = client
        .get(format!("{campaign_url}/campaigns/{id}/stats"))
        .send()
        .await?
        .json()
        .await?;
    println!();
    println!(
        "| round | target | grabs/s | p50 | p99 | non-2xx | socket errors | proxy CPU µs/grab (kernel) | campaign CPU µs/grab | Redis CPU µs/grab | wrk CPU µs/grab | machine busy | of it, other processes |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (round, target, report, cpu) in &results {
        let ok = report.requests.saturating_sub(report.non_2xx);
        let per_grab = |ticks: Option<u64>| match ticks {
            Some(ticks) if ok > 0 => (ticks.saturating_mul(1_000_000) / clock / ok).to_string(),
            _ => "–".to_owned(),
        };
        let flag = if failed_share_over(report, 2) {
            " ⚠"
        } else {
            ""
        };
        println!(
            "| {round} | {} | {}{flag} | {} | {} | {} | {} | {} | {} | {} | {} | {}% | {}% |",
            target.name(),
            report.ok_per_second(),
            millis(report.p50),
            millis(report.p99),
            report.non_2xx,
            report.socket_errors,
            match cpu.proxy {
                Some(_) => format!("{} ({})", per_grab(cpu.proxy), per_grab(cpu.proxy_sys)),
                None => "–".to_owned(),
            },
            per_grab(cpu.campaign),
            per_grab(cpu.redis),
            per_grab(cpu.wrk),
            cpu.machine_busy_percent(),
            cpu.other_percent()
        );
    }
    let medians: Vec<Median> = targets
        .iter()
        .map(|(target, _, _)| {
            let runs: Vec<&WrkReport> = results
                .iter()
                .filter(|(_, t, _, _)| t == target)
                .map(|(_, _, report, _)| report)
                .collect();
            Median {
                target: *target,
                rate: median(runs.iter().map(|r| r.ok_per_second()).collect()).unwrap_or(0),
                p50: median(runs.iter().filter_map(|r| r.p50).collect()),
                p99: median(runs.iter().filter_map(|r| r.p99).collect()),
            }
        })
        .collect();
    println!();
    println!("| target | median grabs/s | median p50 | median p99 |");
    println!("|---|---:|---:|---:|");
    for m in &medians {
        println!(
            "| {} | {} | {} | {} |",
            m.target.describe(),
            m.rate,
            millis(m.p50),
            millis(m.p99)
        );
    }
    let of = |target: Target| medians.iter().find(|m| m.target == target).copied();
    let (Some(gateway), Some(direct), Some(nginx)) =
        (of(Target::Gateway), of(Target::Direct), of(Target::Nginx))
    else {
        anyhow::bail!("a target has no run");
    };
    let invalid: Vec<String> = results
        .iter()
        .filter(|(_, _, report, _)| failed_share_over(report, 2))
        .map(|(round, target, _, _)| format!("round {round} {}", target.name()))
        .collect();
    let verdict = |met: bool| match (invalid.is_empty(), met) {
        (false, _) => "not valid: failed answers, see below",
        (true, true) => "met",
        (true, false) => "MISSED",
    };
    println!();
    println!(
        "gateway / nginx throughput: {} (target ≥ 1.00×) — {}",
        ratio(gateway.rate, nginx.rate),
        verdict(gateway.rate >= nginx.rate)
    );
    println!(
        "gateway p99 / nginx p99: {} (target ≤ 1.20×) — {}",
        ratio(micros(gateway.p99), micros(nginx.p99)),
        verdict(micros(gateway.p99).saturating_mul(100) <= micros(nginx.p99).saturating_mul(120))
    );
    // The medians above decide; the totals over every round show the same comparison with the
    // rounds' noise averaged instead of picked.
    let total = |target: Target| -> u64 {
        results
            .iter()
            .filter(|(_, t, _, _)| *t == target)
            .map(|(_, _, report, _)| report.ok_per_second())
            .sum()
    };
    println!(
        "over all {} rounds: gateway / nginx throughput {}",
        args.rounds,
        ratio(total(Target::Gateway), total(Target::Nginx))
    );
    println!(
        "gateway / direct throughput: {}; nginx / direct: {}",
        ratio(gateway.rate, direct.rate),
        ratio(nginx.rate, direct.rate)
    );
    let raw = median(raw_rates).unwrap_or(0);
    println!(
        "raw Redis grab script, median {raw} calls/s at concurrency {}: gateway {}, nginx {}, direct {} of it",
        args.connections,
        ratio(gateway.rate, raw),
        ratio(nginx.rate, raw),
        ratio(direct.rate, raw)
    );
    if let Some(b) = of(Target::GatewayB) {
        println!(
            "gateway-b / gateway throughput: {}, p99 {}; gateway-b / nginx throughput: {}, p99 {}",
            ratio(b.rate, gateway.rate),
            ratio(micros(b.p99), micros(gateway.p99)),
            ratio(b.rate, nginx.rate),
            ratio(micros(b.p99), micros(nginx.p99))
        );
    }
    println!(
        "campaign after the runs: {} of {} packets grabbed, {} left",
        stats["packets_grabbed"], stats["packets_total"], stats["packets_remaining"]
    );
    if !invalid.is_empty() {
        println!(
            "⚠ more than 2% of the answers were not 2xx (or failed) in: {}",
            invalid.join(", ")
        );
    }
    let disturbed: Vec<String> = results
        .iter()
        .filter(|(_, _, _, cpu)| cpu.other_percent() > 5)
        .map(|(round, target, _, cpu)| {
            format!("round {round} {} ({}%)", target.name(), cpu.other_percent())
        })
        .collect();
    if !disturbed.is_empty() {
        println!(
            "⚠ other processes took more than 5% of the machine in: {} — rerun on a quiet machine",
            disturbed.join(", ")
        );
    }
    Ok(())
}

/// One target's medians over the rounds.
#[derive(Debug, Clone, Copy)]
struct Median {
    target: Target,
    rate: u64,
    p50: Option<Duration>,
    p99: Option<Duration>,
}

fn micros(duration: Option<Duration>) -> u64 {
    duration.map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn failed_share_over(report: &WrkReport, percent: u64) -> bool {
    (report.non_2xx + report.socket_errors).saturating_mul(100)
        > report.requests.saturating_mul(percent)
}

fn millis(duration: Option<Duration>) -> String {
    match duration {
        Some(d) => {
            let micros = d.as_micros();
            format!("{}.{:02} ms", micros / 1000, (micros % 1000) / 10)
        }
        None => "–".to_owned(),
    }
}

fn median<T: Ord + Copy>(mut values: Vec<T>) -> Option<T> {
    values.sort_unstable();
    values.get(values.len() / 2).copied()
}

async fn wait_active(
    client: &reqwest::Client,
    gateway: &str,
    token: &str,
    id: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let campaign: Value = client
            .get(format!("{gateway}/v1/campaigns/{id}"))
            .bearer_auth(token)
            .send()
            .await?
            .json()
            .await?;
        match campaign["status"].as_str() {
            Some("active") => return Ok(()),
            Some("funding" | "scheduled") => {}
            // Loading millions of packets keeps the campaign service busy: a slow answer is
            // asked again.
            None if campaign["code"] == "upstream_timeout" => {}
            _ => anyhow::bail!("campaign {id} did not become active: {campaign}"),
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "campaign {id} still not active after 180 s: {campaign}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The nginx configuration: a keep-alive upstream pool to the campaign service, no access log,
/// everything it writes under `dir`.
fn nginx_config(dir: &Path, workers: &str, port: u16, upstream_port: u16) -> String {
    let dir = dir.display();
    format!(
        r#"worker_processes {workers};
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    upstream campaign {{
        server 127.0.0.1:{upstream_port};
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://campaign;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#
    )
}

/// Per wrk thread, every request prepared up front (`Authorization` with one user's token,
/// users cycled), so wrk spends as little CPU as possible per request.
fn gateway_script(dir: &Path, users: &str, path: &str) -> String {
    format!(
        r#"local next_thread = 0
setup = function(thread)
  thread:set("tid", next_thread)
  next_thread = next_thread + 1
end
local requests = {{}}
local n = 0
local i = 0
init = function(args)
  for token in io.lines("{dir}/tokens-{users}-" .. tid .. ".txt") do
    n = n + 1
    requests[n] = wrk.format("POST", "{path}", {{["Authorization"] = "Bearer " .. token}}, nil)
  end
end
request = function()
  i = i + 1
  if i > n then i = 1 end
  return requests[i]
end
"#,
        dir = dir.display()
    )
}

/// The same for the campaign service's own grab: the user in the body.
fn campaign_script(path: &str, prefix: &str, per_thread: usize) -> String {
    format!(
        r#"local next_thread = 0
setup = function(thread)
  thread:set("tid", next_thread)
  next_thread = next_thread + 1
end
local requests = {{}}
local n = {per_thread}
local i = 0
init = function(args)
  for k = 1, n do
    local body = '{{"user_id":"{prefix}' .. tid .. '_' .. k .. '"}}'
    requests[k] = wrk.format("POST", "{path}", {{["Content-Type"] = "application/json"}}, body)
  end
end
request = function()
  i = i + 1
  if i > n then i = 1 end
  return requests[i]
end
"#
    )
}

/// The processes whose CPU time is read around each run.
#[derive(Debug)]
struct Pids {
    gateway: Option<u32>,
    gateway_b: Option<u32>,
    campaign: Option<u32>,
    nginx: Option<u32>,
    nginx_workers: Vec<u32>,
    redis: Option<u32>,
}

/// CPU ticks of one run.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    proxy: Option<u64>,
    /// Of `proxy`, the time in the kernel.
    proxy_sys: Option<u64>,
    campaign: Option<u64>,
    redis: Option<u64>,
    /// wrk's (the children this process reaped).
    wrk: Option<u64>,
    machine_busy: u64,
    machine_total: u64,
}

impl Cpu {
    fn since(self, before: &Cpu) -> Cpu {
        let diff = |a: Option<u64>, b: Option<u64>| Some(a?.saturating_sub(b?));
        Cpu {
            proxy: diff(self.proxy, before.proxy),
            proxy_sys: diff(self.proxy_sys, before.proxy_sys),
            campaign: diff(self.campaign, before.campaign),
            redis: diff(self.redis, before.redis),
            wrk: diff(self.wrk, before.wrk),
            machine_busy: self.machine_busy.saturating_sub(before.machine_busy),
            machine_total: self.machine_total.saturating_sub(before.machine_total),
        }
    }

    fn machine_busy_percent(&self) -> u64 {
        self.machine_busy.saturating_mul(100) / self.machine_total.max(1)
    }

    /// The share of the machine busy with anything but the measured processes and wrk: other
    /// work on the machine that disturbed the run.
    fn other_percent(&self) -> u64 {
        let known = [self.proxy, self.campaign, self.redis, self.wrk]
            .iter()
            .flatten()
            .sum::<u64>();
        self.machine_busy.saturating_sub(known).saturating_mul(100) / self.machine_total.max(1)
    }
}

impl Pids {
    async fn find(system: &System, redis_url: &str) -> Self {
        let nginx = system.pid("nginx");
        let redis = async {
            let mut connection = redis::Client::open(redis_url)
                .ok()?
                .get_multiplexed_async_connection()
                .await
                .ok()?;
            let info: String = redis::cmd("INFO")
                .arg("server")
                .query_async(&mut connection)
                .await
                .ok()?;
            let pid: u32 = info
                .lines()
                .find_map(|line| line.strip_prefix("process_id:"))?
                .trim()
                .parse()
                .ok()?;
            // Only a Redis on this machine (its pid is ours to read).
            Path::new(&format!("/proc/{pid}/stat"))
                .exists()
                .then_some(pid)
        }
        .await;
        Pids {
            gateway: system.pid("gateway"),
            gateway_b: system.pid("gateway-b"),
            campaign: system.pid("campaign"),
            nginx,
            nginx_workers: nginx.map(children_of).unwrap_or_default(),
            redis,
        }
    }

    fn sample(&self, target: Target) -> Cpu {
        let proxy: Vec<u32> = match target {
            Target::Gateway => self.gateway.into_iter().collect(),
            Target::GatewayB => self.gateway_b.into_iter().collect(),
            Target::Direct => Vec::new(),
            Target::Nginx => self
                .nginx
                .into_iter()
                .chain(self.nginx_workers.iter().copied())
                .collect(),
        };
        let proxy_ticks: Vec<(u64, u64)> = proxy.into_iter().filter_map(user_sys_ticks).collect();
        let (proxy, proxy_sys) = if proxy_ticks.is_empty() {
            (None, None)
        } else {
            (
                Some(proxy_ticks.iter().map(|(user, sys)| user + sys).sum()),
                Some(proxy_ticks.iter().map(|(_, sys)| sys).sum()),
            )
        };
        let (machine_busy, machine_total) = machine_ticks().unwrap_or_default();
        Cpu {
            proxy,
            proxy_sys,
            campaign: self.campaign.and_then(process_ticks),
            redis: self.redis.and_then(process_ticks),
            wrk: reaped_children_ticks(),
            machine_busy,
            machine_total,
        }
    }
}

/// The fields of `/proc/{pid}/stat` after the command name (field 3, the state, is index 0).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = text.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// User and system CPU time of a process (all its threads), in clock ticks.
fn user_sys_ticks(pid: u32) -> Option<(u64, u64)> {
    let fields = stat_fields(pid)?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime, stime))
}

/// User + system CPU time of the children this process waited for (wrk), in clock ticks.
fn reaped_children_ticks() -> Option<u64> {
    let fields = stat_fields(std::process::id())?;
    let cutime: u64 = fields.get(13)?.parse().ok()?;
    let cstime: u64 = fields.get(14)?.parse().ok()?;
    Some(cutime + cstime)
}

/// User + system CPU time of a process, in clock ticks.
fn process_ticks(pid: u32) -> Option<u64> {
    user_sys_ticks(pid).map(|(user, sys)| user + sys)
}

fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            stat_fields(*pid)
                .and_then(|fields| fields.get(1)?.parse::<u32>().ok())
                .is_some_and(|ppid| ppid == parent)
        })
        .collect()
}

/// (busy, total) clock ticks of the whole machine, from `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let values: Vec<u64> = line
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().take(8).sum();
    // idle and iowait
    let idle = values.get(3)? + values.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

async fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .await
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100)
}

/// Deletes the saga worker's exchange and queues under `prefix`.
async fn delete_broker_topology(amqp_url: &str, prefix: &str) -> anyhow::Result<()> {
    // The worker's default retry base, so the (re)declaration matches what it declared.
    let broker = redpacket_saga_worker::broker::Broker::connect(
        amqp_url,
        prefix,
        redpacket_saga_worker::broker::DEFAULT_RETRY_BASE,
    )
    .await?;
    broker.delete_topology().await?;
    broker.close_connection().await;
    Ok(())
}
