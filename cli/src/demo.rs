//! `redpacket demo` and `redpacket reconcile` (`--repair`): drive a running system through its
//! public API.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use redpacket_common::auth::{Role, TokenKey};
use serde_json::{Value, json};

/// How long the demo waits for the campaign to open and for the credits.
const WAIT: Duration = Duration::from_secs(120);
/// Grabs in flight at once.
const CONCURRENCY: usize = 64;

/// A client of the public API with tokens minted from the shared secret.
pub struct Api {
    base: String,
    client: reqwest::Client,
    key: TokenKey,
}

impl Api {
    pub fn new(base: &str, key: TokenKey) -> anyhow::Result<Self> {
        Ok(Api {
            base: base.trim_end_matches('/').to_owned(),
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(CONCURRENCY)
                .timeout(Duration::from_secs(30))
                .build()?,
            key,
        })
    }

    fn token(&self, role: Role, sub: &str) -> anyhow::Result<String> {
        Ok(self.key.mint(role, sub, Duration::from_secs(3600))?)
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let (status, _, body) = self.call_timed(method, path, token, key, body).await?;
        Ok((status, body))
    }

    /// [`Api::call`], with the answer's `Retry-After` (seconds) when it has one.
    async fn call_timed(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Option<u64>, Value)> {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach {}{path}", self.base))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse().ok());
        let body = response.json().await.unwrap_or(Value::Null);
        Ok((status, retry_after, body))
    }

    /// The reconciliation, as the operator sees it.
    /// Replays dead letters matching `filter` (the gateway's bulk replay body) until none is
    /// left or `most` were taken: every outcome, oldest first.
    pub async fn replay(&self, filter: Value, most: usize) -> anyhow::Result<Vec<Value>> {
        let operator = self.token(Role::Operator, "replay-ops")?;
        let mut outcomes = Vec::new();
        loop {
            let (status, body) = self
                .call(
                    reqwest::Method::POST,
                    "/v1/admin/dead-letters/replay",
                    &operator,
                    None,
                    Some(filter.clone()),
                )
                .await?;
            if status != 200 {
                bail!("the replay answered {status}: {body}");
            }
            let taken = body["outcomes"].as_array().cloned().unwrap_or_default();
            let replayed_any = taken.iter().any(|o| o["outcome"] == "replayed");
            outcomes.extend(taken);
            // A page with nothing newly replayed would come back the same: stop there.
            if body["more"] != true || !replayed_any || outcomes.len() >= most {
                return Ok(outcomes);
            }
        }
    }

    /// Runs the repair (`POST /v1/admin/reconciliation/repair`), each call resuming at the
    /// cursor the previous one answered, until no service has more to look at, at most
    /// `most_calls` calls: every finding, in order. `more` is left true when the run could
    /// not finish within its calls. A repair already running elsewhere (503
    /// `repair_in_progress`) is waited for, as its `Retry-After` says, a few times.
    pub async fn repair(
        &self,
        limit: u32,
        min_age_ms: i64,
        most_calls: u32,
    ) -> anyhow::Result<RepairOutcome> {
        let operator = self.token(Role::Operator, "repair-ops")?;
        let mut outcome = RepairOutcome {
            more: true,
            ..RepairOutcome::default()
        };
        let mut cursor: Option<Value> = None;
        let mut busy_waits = 0;
        while outcome.calls < most_calls.max(1) {
            let mut request = json!({ "limit": limit, "min_age_ms": min_age_ms });
            if let Some(cursor) = &cursor {
                request["cursor"] = cursor.clone();
            }
            let (status, retry_after, body) = self
                .call_timed(
                    reqwest::Method::POST,
                    "/v1/admin/reconciliation/repair",
                    &operator,
                    None,
                    Some(request),
                )
                .await?;
            if status == 503
                && body["code"] == "repair_in_progress"
                && busy_waits < REPAIR_BUSY_WAITS
            {
                busy_waits += 1;
                let wait = retry_after.unwrap_or(1).clamp(1, REPAIR_BUSY_WAIT_MAX_S);
                tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
                continue;
            }
            if status != 200 {
                bail!("the repair answered {status}: {body}");
            }
            outcome.calls += 1;
            outcome
                .findings
                .extend(body["findings"].as_array().cloned().unwrap_or_default());
            outcome.more = body["more"] == true;
            if !outcome.more {
                break;
            }
            cursor = body
                .get("cursor")
                .filter(|cursor| cursor.is_string())
                .cloned();
        }
        Ok(outcome)
    }

    pub async fn reconciliation(&self) -> anyhow::Result<Value> {
        let operator = self.token(Role::Operator, "demo-ops")?;
        let (status, body) = self
            .call(
                reqwest::Method::GET,
                "/v1/admin/reconciliation",
                &operator,
                None,
                None,
            )
            .await?;
        if status != 200 {
            bail!("the reconciliation answered {status}: {body}");
        }
        Ok(body)
    }
}

fn progress(label: &str, done: i64, total: i64) {
    let width = 30;
    let filled = if total > 0 {
        usize::try_from(done.clamp(0, total) * width / total).unwrap_or(0)
    } else {
        0
    };
    let width = usize::try_from(width).unwrap_or(30);
    eprint!(
        "\r  {label:<22} [{}{}] {done}/{total}",
        "#".repeat(filled),
        ".".repeat(width - filled)
    );
    let _ = std::io::stderr().flush();
}

/// Options of a demo run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub users: u32,
    pub packets: u32,
    pub total_amount: i64,
}

/// Tops up a merchant, creates a campaign, lets the users grab, waits for the credits and
/// prints what happened. Errs when an invariant does not hold.
pub async fn demo(api: &Api, options: &DemoOptions) -> anyhow::Result<()> {
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let merchant_id = format!("demo-{run}");
    let operator = api.token(Role::Operator, "demo-ops")?;
    let merchant = api.token(Role::Merchant, &merchant_id)?;
    eprintln!(
        "demo {run}: merchant {merchant_id}, {} users, {} packets",
        options.users, options.packets
    );

    let (status, body) = api
        .call(
            reqwest::Method::POST,
            "/v1/admin/topups",
            &operator,
            Some(&format!("demo-{run}")),
            Some(json!({"merchant_id": merchant_id, "amount": options.total_amount, "currency": "CNY"})),
        )
        .await?;
    if status != 200 {
        bail!("the top-up answered {status}: {body}");
    }
    let starts = chrono::Utc::now() + chrono::Duration::seconds(3);
    let (status, campaign) = api
        .call(
            reqwest::Method::POST,
            "/v1/campaigns",
            &merchant,
            Some(&format!("demo-{run}")),
            Some(json!({
                "title": format!("Demo {run}"), "currency": "CNY",
                "total_amount": options.total_amount, "packet_count": options.packets,
                "split": {"mode": "double_mean"}, "starts_at": starts.to_rfc3339(),
                "ends_at": (starts + chrono::Duration::hours(1)).to_rfc3339(),
            })),
        )
        .await?;
    if status != 201 {
        bail!("creating the campaign answered {status}: {campaign}");
    }
    let id = campaign["id"]
        .as_str()
        .context("the campaign has no id")?
        .to_owned();

    let started = Instant::now();
    loop {
        let (_, campaign) = api
            .call(
                reqwest::Method::GET,
                &format!("/v1/campaigns/{id}"),
                &merchant,
                None,
                None,
            )
            .await?;
        let status = campaign["status"].as_str().unwrap_or_default().to_owned();
        eprint!("\r  campaign {id}: {status:<10}");
        let _ = std::io::stderr().flush();
        match status.as_str() {
            "active" => break,
            "rejected" | "cancelled" => bail!("the campaign became {status}: {campaign}"),
            _ if started.elapsed() > WAIT => bail!("the campaign never opened (still {status})"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    eprintln!();

    let tokens: Vec<String> = (0..options.users)
        .map(|i| api.token(Role::User, &format!("demo-{run}-u{i}")))
        .collect::<anyhow::Result<_>>()?;
    let grab_started = Instant::now();
    let statuses: Vec<u16> = futures::stream::iter(tokens)
        .map(|token| {
            let path = format!("/v1/campaigns/{id}/grab");
            async move {
                api.call(reqwest::Method::POST, &path, &token, None, None)
                    .await
                    .map_or(0, |(status, _)| status)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let grab_time = grab_started.elapsed();
    let granted = i64::try_from(statuses.iter().filter(|s| **s == 200).count()).unwrap_or(0);
    let sold_out = statuses.iter().filter(|s| **s == 410).count();
    let failed = statuses.len() - usize::try_from(granted).unwrap_or(0) - sold_out;

    let stats = loop {
        let (_, stats) = api
            .call(
                reqwest::Method::GET,
                &format!("/v1/campaigns/{id}/stats"),
                &merchant,
                None,
                None,
            )
            .await?;
        let settled = stats["packets_credited"].as_i64().unwrap_or(0)
            + stats["packets_compensated"].as_i64().unwrap_or(0);
        progress("crediting wallets", settled, granted);
        if settled >= granted {
            eprintln!();
            break stats;
        }
        if grab_started.elapsed() > WAIT {
            eprintln!();
            bail!("only {settled} of {granted} grabs were credited within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let reconciliation = api.reconciliation().await?;
    let ok = reconciliation["ok"].as_bool().unwrap_or(false);
    let grabs_per_second = granted.saturating_mul(1000)
        / i64::try_from(grab_time.as_millis().max(1)).unwrap_or(i64::MAX);

    let rows = [
        ("users", options.users.to_string()),
        ("grabbed (200)", granted.to_string()),
        ("sold out (410)", sold_out.to_string()),
        ("other answers", failed.to_string()),
        ("credited", stats["packets_credited"].to_string()),
        ("compensated", stats["packets_compensated"].to_string()),
        ("amount grabbed", stats["amount_grabbed"].to_string()),
        ("amount credited", stats["amount_credited"].to_string()),
        ("amount remaining", stats["amount_remaining"].to_string()),
        ("grabs/s", grabs_per_second.to_string()),
        (
            "reconciliation",
            if ok { "ok".into() } else { "BROKEN".into() },
        ),
    ];
    println!();
    println!("  {:<18} {:>14}", "campaign", id);
    for (name, value) in rows {
        println!("  {name:<18} {value:>14}");
    }
    if !ok {
        print_checks(&reconciliation);
        bail!("an invariant is broken");
    }
    if granted > i64::from(options.packets) {
        bail!("{granted} grabs succeeded for {} packets", options.packets);
    }
    if failed > 0 {
        bail!("{failed} grabs got an unexpected answer");
    }
    Ok(())
}

/// Times a repair run waits for another repair to finish before it gives up.
const REPAIR_BUSY_WAITS: u32 = 5;
/// The longest wait for another repair, whatever its `Retry-After` says.
const REPAIR_BUSY_WAIT_MAX_S: u64 = 10;

/// Every finding of a repair run, over its calls.
#[derive(Debug, Default)]
pub struct RepairOutcome {
    pub findings: Vec<Value>,
    pub calls: u32,
    /// The run ended with more to look at: its calls ran out before the end.
    pub more: bool,
}

impl RepairOutcome {
    /// Findings left unrepaired.
    pub fn unrepaired(&self) -> usize {
        self.findings
            .iter()
            .filter(|finding| finding["repaired"] != true)
            .count()
    }
}

/// Prints each finding of a repair as repaired or left, with what was done or why not.
pub fn print_findings(outcome: &RepairOutcome) {
    if outcome.findings.is_empty() {
        println!("  nothing to repair");
    }
    for finding in &outcome.findings {
        println!(
            "  {:<10} {:<8} {:<18} {:<24} {}",
            if finding["repaired"] == true {
                "repaired"
            } else {
                "UNREPAIRED"
            },
            finding["service"].as_str().unwrap_or("?"),
            finding["kind"].as_str().unwrap_or("?"),
            finding["id"].as_str().unwrap_or("?"),
            finding["action"].as_str().unwrap_or("")
        );
    }
    if outcome.more {
        println!("  more may be left beyond this run's bound: run the repair again");
    }
}

/// Prints each check as held or broken, with its detail (the offending ids).
pub fn print_checks(reconciliation: &Value) {
    for check in reconciliation["checks"].as_array().into_iter().flatten() {
        let held = check["ok"].as_bool().unwrap_or(false);
        println!(
            "  {:<8} {:<28} {}",
            if held { "held" } else { "BROKEN" },
            check["name"].as_str().unwrap_or("?"),
            check["detail"].as_str().unwrap_or("")
        );
    }
}
