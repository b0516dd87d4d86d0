//! `redpacket dev` as a newcomer runs it: the binary on a fresh data directory and port, the
//! demo through the public API, and a restart that keeps everything. No server is needed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redpacket_common::auth::{Role, TokenKey};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_redpacket");

struct Dev {
    child: Child,
    url: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Dev {
    async fn start(dir: &Path, port: u16) -> Dev {
        let child = Command::new(BIN)
            .args([
                "dev",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(dir)
            .env_remove("RP_AUTH_SECRET")
            .env_remove("RP_CONFIG_FILE")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Owned at once, so every path below (a panic included) kills and reaps it on drop.
        let dev = Dev {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let client = reqwest::Client::new();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if let Ok(response) = client.get(format!("{}/v1/ping", dev.url)).send().await
                && response.status() == 200
            {
                return dev;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("redpacket dev did not answer within 60 s");
    }

    /// SIGTERM, then the process must exit cleanly on its own.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "redpacket dev exited with {status}");
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "redpacket dev did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn key(dir: &Path) -> TokenKey {
    let secret = std::fs::read_to_string(dir.join("auth-secret")).expect("dev keeps a secret");
    TokenKey::new(secret.trim().as_bytes())
}

async fn get(url: &str, token: &str) -> Value {
    let response = reqwest::Client::new()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "GET {url}");
    response.json().await.unwrap()
}

fn run(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .env_remove("RP_AUTH_SECRET")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_runs_the_demo_and_keeps_everything_across_a_restart() {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("rp-dev-{}", uuid::Uuid::new_v4().simple()));
    let port = free_port();
    let dev = Dev::start(&dir, port).await;

    let demo = run(&["demo", "--gateway", &dev.url, "--users", "200"], &dir);
    assert!(
        demo.status.success(),
        "the demo failed:\n{}\n{}",
        String::from_utf8_lossy(&demo.stdout),
        String::from_utf8_lossy(&demo.stderr)
    );
    let table = String::from_utf8_lossy(&demo.stdout);
    assert!(
        table.contains("reconciliation") && table.contains("ok"),
        "{table}"
    );

    // The seeded campaign: a user grabs from it and is credited.
    let key = key(&dir);
    let merchant = key
        .mint(Role::Merchant, "demo-shop", Duration::from_secs(600))
        .unwrap();
    let user = key
        .mint(Role::User, "returning-user", Duration::from_secs(600))
        .unwrap();
    let campaigns = get(&format!("{}/v1/campaigns", dev.url), &merchant).await;
    assert_eq!(
        campaigns["campaigns"].as_array().unwrap().len(),
        1,
        "seeded once"
    );
    let seeded = campaigns["campaigns"][0]["id"].as_str().unwrap().to_owned();
    let client = reqwest::Client::new();
    let mut claim = Value::Null;
    for _ in 0..300 {
        let response = client
            .post(format!("{}/v1/campaigns/{seeded}/grab", dev.url))
            .bearer_auth(&user)
            .send()
            .await
            .unwrap();
        if response.status() == 200 {
            claim = response.json().await.unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let claim_id = claim["claim_id"]
        .as_str()
        .expect("the seeded campaign opens")
        .to_owned();
    let claim_url = format!("{}/v1/claims/{claim_id}", dev.url);
    for _ in 0..300 {
        if get(&claim_url, &user).await["status"] == "credited" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before_wallet = get(&format!("{}/v1/me/wallet", dev.url), &user).await;
    let before_merchant = get(&format!("{}/v1/merchants/me/wallet", dev.url), &merchant).await;
    assert_eq!(before_wallet["balance"], claim["amount"]);
    dev.stop();

    // Again on the same directory: everything is where it was, nothing seeded twice.
    let dev = Dev::start(&dir, free_port()).await;
    let claim_after = get(&format!("{}/v1/claims/{claim_id}", dev.url), &user).await;
    assert_eq!(claim_after["status"], "credited");
    assert_eq!(
        get(&format!("{}/v1/me/wallet", dev.url), &user).await,
        before_wallet
    );
    assert_eq!(
        get(&format!("{}/v1/merchants/me/wallet", dev.url), &merchant).await,
        before_merchant
    );
    let campaigns = get(&format!("{}/v1/campaigns", dev.url), &merchant).await;
    assert_eq!(campaigns["campaigns"].as_array().unwrap().len(), 1);
    // The limit still holds after the restart: the pool remembers the claim.
    let again = client
        .post(format!("{}/v1/campaigns/{seeded}/grab", dev.url))
        .bearer_auth(&user)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    let reconcile = run(&["reconcile", "--gateway", &dev.url, "--json"], &dir);
    assert!(
        reconcile.status.success(),
        "{}",
        String::from_utf8_lossy(&reconcile.stdout)
    );
    let verdict: Value = serde_json::from_slice(&reconcile.stdout).unwrap();
    assert_eq!(verdict["ok"], true);
    dev.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tokens_minted_by_the_cli_follow_the_data_directory_secret() {
    let dir = std::env::temp_dir().join(format!("rp-token-{}", uuid::Uuid::new_v4().simple()));
    let minted = run(
        &[
            "token", "--role", "merchant", "--sub", "shop-1", "--ttl", "1h",
        ],
        &dir,
    );
    assert!(minted.status.success());
    let token = String::from_utf8(minted.stdout).unwrap();
    let claims = key(&dir).verify(token.trim()).unwrap();
    assert_eq!(
        (claims.sub.as_str(), claims.role),
        ("shop-1", Role::Merchant)
    );
    let refused = run(&["token", "--role", "king", "--sub", "x"], &dir);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("unknown role"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A campaign whose end event (its refund's message) was lost: `reconcile --repair` through the
/// binary drives the refund, exits zero once the reconciliation holds, and a second run finds
/// nothing to repair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_repair_settles_a_campaign_whose_refund_was_lost_and_then_finds_nothing() {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("rp-repair-{}", uuid::Uuid::new_v4().simple()));
    let dev = Dev::start(&dir, free_port()).await;
    let repair = |dir: &Path| {
        run(
            &[
                "reconcile",
                "--repair",
                "--min-age-ms",
                "1000",
                "--gateway",
                &dev.url,
            ],
            dir,
        )
    };
    let clean = repair(&dir);
    let printed = String::from_utf8_lossy(&clean.stdout).into_owned();
    assert!(
        clean.status.success(),
        "{printed}\n{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    assert!(printed.contains("nothing to repair"), "{printed}");

    let merchant = key(&dir)
        .mint(Role::Merchant, "demo-shop", Duration::from_secs(600))
        .unwrap();
    let list_url = format!("{}/v1/campaigns", dev.url);
    let mut seeded = String::new();
    for _ in 0..300 {
        let campaigns = get(&list_url, &merchant).await;
        if campaigns["campaigns"][0]["status"] == "active" {
            seeded = campaigns["campaigns"][0]["id"].as_str().unwrap().to_owned();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!seeded.is_empty(), "the seeded campaign opens");
    // Ended without its `campaign.ended` event: nothing would ever refund it.
    let campaign_db = sea_orm::Database::connect(format!(
        "sqlite://{}?mode=rw",
        dir.join("campaign.sqlite").display()
    ))
    .await
    .unwrap();
    let ended_at = chrono::Utc::now().timestamp_millis() - 10_000;
    sea_orm::ConnectionTrait::execute_unprepared(
        &campaign_db,
        &format!(
            "UPDATE campaign_campaigns SET status = 'expired', updated_at_ms = {ended_at} WHERE id = {seeded}"
        ),
    )
    .await
    .unwrap();
    campaign_db.close().await.unwrap();

    let repaired = repair(&dir);
    let printed = String::from_utf8_lossy(&repaired.stdout).into_owned();
    assert!(
        repaired.status.success(),
        "{printed}\n{}",
        String::from_utf8_lossy(&repaired.stderr)
    );
    assert!(
        printed.contains("repaired") && printed.contains(&format!("refund:{seeded}")),
        "{printed}"
    );
    // The refund the repair started runs on its own, within moments.
    let campaign_url = format!("{}/v1/campaigns/{seeded}", dev.url);
    let mut campaign = Value::Null;
    for _ in 0..300 {
        campaign = get(&campaign_url, &merchant).await;
        if campaign["status"] == "settled" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(campaign["status"], "settled", "{campaign}");
    let wallet = get(&format!("{}/v1/merchants/me/wallet", dev.url), &merchant).await;
    assert_eq!(
        wallet["balance"], 10_000_000,
        "every packet went back to the merchant"
    );

    let again = repair(&dir);
    let printed = String::from_utf8_lossy(&again.stdout).into_owned();
    assert!(again.status.success(), "{printed}");
    assert!(printed.contains("nothing to repair"), "{printed}");
    dev.stop();
}
