//! The distributed system as separate processes, on servers of its own where a scenario stops
//! them: a private PostgreSQL (initdb into a scratch directory), a private Redis with its
//! append-only file synced on every write, and a RabbitMQ vhost of its own on the local broker.
//! Every service is the `redpacket` binary under a subcommand, on a fixed loopback port so a
//! restart comes back where its callers look; proxies stand between the gateway and its
//! upstreams and between the saga workers and the services.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use redpacket_common::testing::PrivateRedis;
use tokio::process::{Child, Command};

use crate::proxy::Proxy;

pub const BIN: &str = env!("CARGO_BIN_EXE_redpacket");

/// How long a service may take to answer `/health/ready` after a start.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// A free port below Linux's ephemeral range (32768–60999): a port from that range could be
/// taken by an outgoing connection while its killed service is down, and the restart fail.
pub fn free_port() -> u16 {
    use rand::Rng;
    let mut rng = rand::rng();
    for _ in 0..1000 {
        let port = rng.random_range(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000–32000")
}

/// A scratch directory, removed on drop.
#[derive(Debug)]
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir()
            .join("redpacket-tests")
            .join(format!("faults-{name}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("RP_FAULT_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

async fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .await
        .map_err(|err| format!("{program}: {err}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// A PostgreSQL server of the scenario's own, so stopping it stops no one else.
#[derive(Debug)]
pub struct PrivatePostgres {
    pub port: u16,
    bin: PathBuf,
    data: PathBuf,
    /// The server refuses to run as root: then it runs as `postgres`.
    as_postgres: bool,
}

impl PrivatePostgres {
    pub async fn start(dir: &Path) -> PrivatePostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| {
                let mut found: Vec<PathBuf> = versions
                    .filter_map(|entry| entry.ok().map(|e| e.path().join("bin")))
                    .filter(|bin| bin.join("initdb").exists())
                    .collect();
                found.sort();
                found.pop()
            })
            .unwrap_or_default();
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
            .unwrap_or(false);
        let postgres = PrivatePostgres {
            port: free_port(),
            bin,
            data: dir.join("pgdata"),
            as_postgres: root,
        };
        if root {
            run("chown", &["postgres", &dir.display().to_string()])
                .await
                .expect("the scratch directory given to postgres");
        }
        postgres
            .ctl_command(
                "initdb",
                &[
                    "-D",
                    &postgres.data.display().to_string(),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                ],
            )
            .await
            .expect("initdb of the private PostgreSQL (scripts/test.sh installs PostgreSQL)");
        postgres.start_again().await;
        postgres
    }

    async fn ctl_command(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let tool = if self.bin.as_os_str().is_empty() {
            PathBuf::from(tool)
        } else {
            self.bin.join(tool)
        };
        let tool = tool.display().to_string();
        if self.as_postgres {
            let mut all = vec!["-u", "postgres", "--", tool.as_str()];
            all.extend_from_slice(args);
            run("runuser", &all).await
        } else {
            run(&tool, args).await
        }
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Starts the server (again); returns once it accepts connections.
    pub async fn start_again(&self) {
        // The socket in /tmp: a Unix socket's path may not pass 107 bytes; the port names it.
        let options = format!(
            "-p {} -k /tmp -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off",
            self.port
        );
        let log = self.data.parent().unwrap().join("postgres.log");
        self.ctl_command(
            "pg_ctl",
            &[
                "-D",
                &self.data.display().to_string(),
                "-o",
                &options,
                "-l",
                &log.display().to_string(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .await
        .expect("the private PostgreSQL starts");
    }

    /// Stops it at once, as a crash would: every connection dies, nothing is flushed first.
    pub async fn stop_now(&self) {
        self.ctl_command(
            "pg_ctl",
            &[
                "-D",
                &self.data.display().to_string(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        )
        .await
        .expect("the private PostgreSQL stops");
    }

    pub async fn create_database(&self, name: &str) {
        let client = sea_orm::Database::connect(self.url("postgres"))
            .await
            .expect("the private PostgreSQL answers");
        use sea_orm::ConnectionTrait;
        client
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .expect("a database");
        let _ = client.close().await;
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.data.display().to_string();
        let tool = if self.bin.as_os_str().is_empty() {
            PathBuf::from("pg_ctl")
        } else {
            self.bin.join("pg_ctl")
        };
        let tool = tool.display().to_string();
        let args = ["-D", data.as_str(), "-m", "immediate", "stop"];
        let _ = if self.as_postgres {
            std::process::Command::new("runuser")
                .args(["-u", "postgres", "--", tool.as_str()])
                .args(args)
                .output()
        } else {
            std::process::Command::new(&tool).args(args).output()
        };
    }
}

/// A RabbitMQ vhost of the scenario's own on the local broker, deleted on drop.
#[derive(Debug)]
pub struct Vhost {
    pub name: String,
}

impl Vhost {
    pub async fn create() -> Vhost {
        let name = format!("rpt-faults-{}", uuid::Uuid::new_v4().simple());
        run("rabbitmqctl", &["-q", "add_vhost", &name])
            .await
            .expect("rabbitmqctl adds a vhost (scripts/test.sh installs RabbitMQ)");
        run(
            "rabbitmqctl",
            &[
                "-q",
                "set_permissions",
                "-p",
                &name,
                "guest",
                ".*",
                ".*",
                ".*",
            ],
        )
        .await
        .expect("permissions on the vhost");
        Vhost { name }
    }

    pub fn url(&self) -> String {
        let base = std::env::var("RP_TEST_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        let host = base
            .rsplit_once('/')
            .map_or(base.as_str(), |(host, _)| host);
        format!("{host}/{}", self.name)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.name])
            .output();
    }
}

/// Restarts the local RabbitMQ's application: every connection of every vhost drops, durable
/// queues and their messages come back. The fault suite runs alone, so no other test sees it.
pub async fn restart_rabbitmq(down_for: Duration) -> Result<(), String> {
    run("rabbitmqctl", &["-q", "stop_app"]).await?;
    // Whatever happens next (a panic included), the broker is started again.
    let guard = BrokerDown;
    tokio::time::sleep(down_for).await;
    let started = run("rabbitmqctl", &["-q", "start_app"]).await;
    std::mem::forget(guard);
    run("rabbitmqctl", &["-q", "await_startup"]).await?;
    started
}

/// Starts the local RabbitMQ's application when dropped.
struct BrokerDown;

impl Drop for BrokerDown {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "start_app"])
            .output();
    }
}

/// One service process.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    pub port: u16,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Service {
    pub fn new(name: &str, dir: &Path, args: &[&str], env: Vec<(String, String)>) -> Service {
        let port = free_port();
        let mut env = env;
        env.push(("RP_LISTEN".into(), format!("127.0.0.1:{port}")));
        Service {
            name: name.to_owned(),
            port,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env,
            log: dir.join(format!("{name}.log")),
            child: None,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("a log file");
        let child = Command::new(BIN)
            .args(&self.args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RP_LOG", "warn")
            .envs(self.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the log file"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("the redpacket binary starts");
        self.child = Some(child);
    }

    /// Starts it and waits until it is ready; a start that does not come up is tried again
    /// (the port may still be held a moment after a kill).
    pub async fn start(&mut self) {
        let client = reqwest::Client::new();
        let started = Instant::now();
        self.spawn();
        loop {
            if let Ok(answer) = client
                .get(format!("{}/health/ready", self.url()))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                && answer.status() == 200
            {
                return;
            }
            if started.elapsed() > READY_WITHIN {
                panic!(
                    "{} was not ready within {READY_WITHIN:?}; its log:\n{}",
                    self.name,
                    self.log_tail(40)
                );
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                tokio::time::sleep(Duration::from_millis(500)).await;
                self.spawn();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL: nothing is drained, flushed or released.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// How many replicas of the scaled services run.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub campaigns: usize,
    pub sagas: usize,
}

/// The whole distributed system.
#[derive(Debug)]
pub struct System {
    pub postgres: PrivatePostgres,
    pub redis: PrivateRedis,
    _vhost: Vhost,
    pub wallet: Service,
    pub campaigns: Vec<Service>,
    pub sagas: Vec<Service>,
    pub gateway: Service,
    /// Between the gateway and each upstream.
    pub gateway_to_campaign: Proxy,
    pub gateway_to_wallet: Proxy,
    pub gateway_to_saga: Proxy,
    /// Between the saga workers and the wallet, and the campaign service.
    pub saga_to_wallet: Proxy,
    pub saga_to_campaign: Proxy,
    pub secret: String,
    pub dir: PathBuf,
    // Last: the scratch directory goes once every process is gone.
    _scratch: Scratch,
}

impl System {
    pub async fn start(name: &str, shape: Shape) -> System {
        let scratch = Scratch::new(name);
        let dir = scratch.0.clone();
        let pg_dir = dir.join("pg");
        std::fs::create_dir_all(&pg_dir).unwrap();
        let postgres = PrivatePostgres::start(&pg_dir).await;
        for database in ["wallet", "campaign", "saga"] {
            postgres.create_database(database).await;
        }
        // Every write synced to the append-only file before the grab is answered, and no
        // eviction: a Redis restarted from its file has every answered grab.
        let redis = PrivateRedis::start(&[
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--maxmemory-policy",
            "noeviction",
        ])
        .await;
        let vhost = Vhost::create().await;
        let secret = format!("faults-secret-{}", uuid::Uuid::new_v4().simple());
        let var = |key: &str, value: String| (key.to_owned(), value);

        let mut wallet = Service::new(
            "wallet",
            &dir,
            &["wallet", "--migrate"],
            vec![var("RP_DATABASE_URL", postgres.url("wallet"))],
        );
        let campaign_env = |worker: usize| {
            vec![
                var("RP_DATABASE_URL", postgres.url("campaign")),
                var("RP_REDIS_URL", redis.url()),
                var("RP_REDIS_PREFIX", "rpf".into()),
                var("RP_WORKER_ID", (101 + worker).to_string()),
            ]
        };
        let mut campaigns: Vec<Service> = (0..shape.campaigns)
            .map(|n| {
                let args: &[&str] = if n == 0 {
                    &["campaign", "--migrate"]
                } else {
                    &["campaign"]
                };
                Service::new(&format!("campaign-{n}"), &dir, args, campaign_env(n))
            })
            .collect();
        let campaign_ports: Vec<u16> = campaigns.iter().map(|s| s.port).collect();
        let saga_to_wallet = Proxy::start(&[wallet.port]).await;
        let saga_to_campaign = Proxy::start(&campaign_ports).await;
        let saga_env = |worker: usize| {
            vec![
                var("RP_DATABASE_URL", postgres.url("saga")),
                var("RP_REDIS_URL", redis.url()),
                var("RP_REDIS_PREFIX", "rpf".into()),
                var("RP_AMQP_URL", vhost.url()),
                var("RP_AMQP_PREFIX", "rpf".into()),
                var("RP_CAMPAIGN_URL", saga_to_campaign.url.clone()),
                var("RP_WALLET_URL", saga_to_wallet.url.clone()),
                var("RP_WORKER_ID", (201 + worker).to_string()),
            ]
        };
        let mut sagas: Vec<Service> = (0..shape.sagas)
            .map(|n| {
                let args: &[&str] = if n == 0 {
                    &["saga-worker", "--migrate"]
                } else {
                    &["saga-worker"]
                };
                Service::new(&format!("saga-{n}"), &dir, args, saga_env(n))
            })
            .collect();
        let saga_ports: Vec<u16> = sagas.iter().map(|s| s.port).collect();
        let gateway_to_campaign = Proxy::start(&campaign_ports).await;
        let gateway_to_wallet = Proxy::start(&[wallet.port]).await;
        let gateway_to_saga = Proxy::start(&saga_ports).await;
        let mut gateway = Service::new(
            "gateway",
            &dir,
            &["gateway"],
            vec![
                var("RP_CAMPAIGN_URL", gateway_to_campaign.url.clone()),
                var("RP_WALLET_URL", gateway_to_wallet.url.clone()),
                var("RP_SAGA_URL", gateway_to_saga.url.clone()),
                var("RP_AUTH_SECRET", secret.clone()),
            ],
        );

        // Migrations first, by the first replica of each service alone.
        wallet.start().await;
        for campaign in &mut campaigns {
            campaign.start().await;
        }
        for saga in &mut sagas {
            saga.start().await;
        }
        gateway.start().await;
        std::fs::write(
            dir.join(redpacket_common::auth::SECRET_FILE),
            secret.as_bytes(),
        )
        .unwrap();
        System {
            postgres,
            redis,
            _vhost: vhost,
            wallet,
            campaigns,
            sagas,
            gateway,
            gateway_to_campaign,
            gateway_to_wallet,
            gateway_to_saga,
            saga_to_wallet,
            saga_to_campaign,
            secret,
            dir,
            _scratch: scratch,
        }
    }

    pub fn url(&self) -> String {
        self.gateway.url()
    }

    pub fn proxies(&self) -> [&Proxy; 5] {
        [
            &self.gateway_to_campaign,
            &self.gateway_to_wallet,
            &self.gateway_to_saga,
            &self.saga_to_wallet,
            &self.saga_to_campaign,
        ]
    }

    /// The last lines of every service's log, for a failing run.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for service in std::iter::once(&self.wallet)
            .chain(&self.campaigns)
            .chain(&self.sagas)
            .chain(std::iter::once(&self.gateway))
        {
            out.push_str(&format!(
                "--- {} ---\n{}\n",
                service.name,
                service.log_tail(15)
            ));
        }
        out
    }
}
