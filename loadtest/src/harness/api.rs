//! The gateway's public API as the harness uses it outside the measured load: set-up, the
//! drain wait and the verification. Every call names its token; tokens are minted here from
//! the shared secret (the gateway has no endpoint that issues them).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use redpacket_common::auth::{Role, TokenKey};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// How the harness's own reads (set-up checks, the drain wait, the verification) ride out the
/// system's pushback: a 429 (rate limited), a 503 (shed: a bound in flight, an open breaker, an
/// exhausted database pool) or a 504 (the gateway's deadline), and a call that got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts of one read, the first included.
    pub attempts: u32,
    /// The longest one read may take, its waits included.
    pub total: Duration,
    /// The wait after the first pushback that names none (`Retry-After`), doubling after each
    /// further one.
    pub backoff: Duration,
    /// The longest single wait, whatever `Retry-After` asks.
    pub longest_wait: Duration,
}

/// The retry bound of every read of the harness: 10 attempts within 60 s, each wait what
/// `Retry-After` asks (at most 5 s) or else 250 ms doubling. A read still pushed back then is
/// reported as given up ([`GaveUp`]), not as a broken invariant.
pub const READ_RETRY: RetryPolicy = RetryPolicy {
    attempts: 10,
    total: Duration::from_secs(60),
    backoff: Duration::from_millis(250),
    longest_wait: Duration::from_secs(5),
};

/// The shortest wait between two attempts, whatever `Retry-After` says (`0` included).
const SHORTEST_WAIT: Duration = Duration::from_millis(50);

impl RetryPolicy {
    /// Whether an answer is pushback to wait out rather than the system's word.
    pub fn is_pushback(status: u16) -> bool {
        matches!(status, 429 | 503 | 504)
    }

    /// The wait before the next attempt, after `failed` pushed-back attempts that took
    /// `elapsed` in all; `None` once another attempt would pass the bound of attempts or time.
    pub fn wait_before_next(
        &self,
        failed: u32,
        elapsed: Duration,
        retry_after: Option<Duration>,
    ) -> Option<Duration> {
        if failed >= self.attempts {
            return None;
        }
        let doubling = self
            .backoff
            .saturating_mul(1 << failed.saturating_sub(1).min(16));
        let wait = retry_after
            .unwrap_or(doubling)
            .min(self.longest_wait)
            .max(SHORTEST_WAIT);
        (elapsed + wait < self.total).then_some(wait)
    }
}

/// A read the system kept pushing back on past the [`RetryPolicy`]: it was overloaded for
/// longer than the harness waits, and nothing is known of what the read would have shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GaveUp {
    pub what: String,
    pub attempts: u32,
    pub elapsed: Duration,
    /// The last answer: status and problem code, or why there was none.
    pub last: String,
}

impl std::fmt::Display for GaveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: gave up after {} attempts in {:.1} s, the last answered {}",
            self.what,
            self.attempts,
            self.elapsed.as_secs_f64(),
            self.last
        )
    }
}

impl std::error::Error for GaveUp {}

/// How long the harness's tokens live: longer than any run.
pub const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// Operator subjects the drain wait and the verification read with, in turn. The gateway
/// rate-limits each token subject (`RP_LIMIT_USER_RPS`, 20/s by default); reading the stats and
/// claims of hundreds of campaigns as one subject would spend most of its time on 429s.
pub const READERS: usize = 32;

/// Mints the harness's tokens.
#[derive(Debug, Clone)]
pub struct Tokens {
    key: TokenKey,
    operator: String,
    readers: Arc<Vec<String>>,
    next_reader: Arc<AtomicUsize>,
}

impl Tokens {
    /// `operator` overrides the minted operator token when given (for the top-ups and the
    /// reconciliation; the readers are minted all the same).
    pub fn new(secret: &[u8], operator: Option<String>) -> anyhow::Result<Self> {
        let key = TokenKey::new(secret);
        let operator = match operator {
            Some(token) => token,
            None => key.mint(Role::Operator, "loadtest", TOKEN_TTL)?,
        };
        let readers = (0..READERS)
            .map(|n| key.mint(Role::Operator, &format!("loadtest-reader-{n}"), TOKEN_TTL))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Tokens {
            key,
            operator,
            readers: Arc::new(readers),
            next_reader: Arc::default(),
        })
    }

    pub fn operator(&self) -> &str {
        &self.operator
    }

    /// The next reader's operator token.
    pub fn reader(&self) -> &str {
        let turn = self.next_reader.fetch_add(1, Ordering::Relaxed);
        &self.readers[turn % self.readers.len()]
    }

    pub fn user(&self, id: &str) -> anyhow::Result<String> {
        Ok(self.key.mint(Role::User, id, TOKEN_TTL)?)
    }

    pub fn merchant(&self, id: &str) -> anyhow::Result<String> {
        Ok(self.key.mint(Role::Merchant, id, TOKEN_TTL)?)
    }
}

/// A campaign as `GET /v1/campaigns/{id}` shows it (the fields the harness reads).
#[derive(Debug, Clone, Deserialize)]
pub struct CampaignView {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub packet_count: Option<i64>,
    #[serde(default)]
    pub per_user_limit: Option<i64>,
}

/// `GET /v1/campaigns/{id}/stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct StatsView {
    pub packets_total: i64,
    pub packets_remaining: i64,
    pub packets_grabbed: i64,
    pub packets_credited: i64,
    pub packets_compensated: i64,
    /// Not in the gateway's documented contract but in the campaign service's stats: grabs
    /// neither credited nor compensated. Preferred when present (see [`StatsView::in_flight`]).
    #[serde(default)]
    pub packets_in_flight: Option<i64>,
    pub amount_total: i64,
    pub amount_remaining: i64,
    pub amount_grabbed: i64,
    pub amount_credited: i64,
    #[serde(default)]
    pub amount_refunded: i64,
}

impl StatsView {
    /// Grabs the saga has not finished. `packets_in_flight` when the gateway passes it on;
    /// else `grabbed − credited − compensated`, which is exact unless compensated packets went
    /// back to the pool (they leave `grabbed` but stay in `compensated`; then this undercounts
    /// and is clamped at zero).
    pub fn in_flight(&self) -> i64 {
        self.packets_in_flight.unwrap_or_else(|| {
            (self.packets_grabbed - self.packets_credited - self.packets_compensated).max(0)
        })
    }
}

/// A claim as the claims listings and `GET /v1/claims/{id}` show it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ClaimView {
    pub id: String,
    pub campaign_id: String,
    pub user_id: String,
    pub amount: i64,
    pub status: String,
    pub created_at: String,
    #[serde(default)]
    pub credited_at: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ClaimsPage {
    claims: Vec<ClaimView>,
    #[serde(default)]
    next_cursor: Option<String>,
}

/// One check of `GET /v1/admin/reconciliation`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct ReconciliationCheck {
    pub name: String,
    pub ok: bool,
    #[serde(default)]
    pub detail: Value,
}

/// `GET /v1/admin/reconciliation`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Reconciliation {
    pub ok: bool,
    #[serde(default)]
    pub checks: Vec<ReconciliationCheck>,
}

/// A grab's granted answer.
#[derive(Debug, Clone, Deserialize)]
pub struct GrabView {
    pub claim_id: String,
    pub amount: i64,
}

/// What to create: the body of `POST /v1/campaigns`.
#[derive(Debug, Clone)]
pub struct CampaignSpec {
    pub title: String,
    pub currency: String,
    pub total_amount: i64,
    pub packet_count: i64,
    /// `fixed`, `double_mean` or `bounded`.
    pub split: String,
    pub min_amount: Option<i64>,
    pub max_amount: Option<i64>,
    pub per_user_limit: i64,
    pub starts_at_ms: i64,
    pub ends_at_ms: i64,
    pub seed: Option<u64>,
}

impl CampaignSpec {
    pub fn body(&self) -> Value {
        let mut split = serde_json::json!({ "mode": self.split });
        if let Some(min) = self.min_amount {
            split["min_amount"] = min.into();
        }
        if let Some(max) = self.max_amount {
            split["max_amount"] = max.into();
        }
        let mut body = serde_json::json!({
            "title": self.title,
            "currency": self.currency,
            "total_amount": self.total_amount,
            "packet_count": self.packet_count,
            "split": split,
            "per_user_limit": self.per_user_limit,
            "starts_at": redpacket_common::time::rfc3339(self.starts_at_ms),
            "ends_at": redpacket_common::time::rfc3339(self.ends_at_ms),
        });
        if let Some(seed) = self.seed {
            body["seed"] = seed.into();
        }
        body
    }
}

/// The problem+json `code` of an error body, if it has one.
pub fn problem_code(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Problem {
        code: String,
    }
    serde_json::from_slice::<Problem>(body)
        .ok()
        .map(|problem| problem.code)
}

/// A client of the gateway for everything but the measured requests.
#[derive(Debug, Clone)]
pub struct Api {
    pub client: reqwest::Client,
    pub base: String,
    /// How its reads wait out pushback.
    pub retry: RetryPolicy,
}

impl Api {
    pub fn new(base: &str, pool: usize) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(pool)
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Api {
            client,
            base: base.trim_end_matches('/').to_owned(),
            retry: READ_RETRY,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn read<T: DeserializeOwned>(
        what: &str,
        response: reqwest::Response,
        expected: u16,
    ) -> anyhow::Result<T> {
        let status = response.status().as_u16();
        let body = response.bytes().await?;
        if status != expected {
            let code = problem_code(&body).unwrap_or_default();
            bail!(
                "{what}: status {status} {code}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            );
        }
        serde_json::from_slice(&body)
            .with_context(|| format!("{what}: unexpected body {}", String::from_utf8_lossy(&body)))
    }

    /// A GET that waits out the system's pushback under [`Api::retry`]: a 429, 503 or 504, or
    /// no answer at all, is tried again after the answer's `Retry-After` or the policy's
    /// backoff; past the policy's bound the read fails with [`GaveUp`]. Any other answer is
    /// returned as it is. Only for the harness's own reads, never the measured load.
    async fn get_response(
        &self,
        token: &str,
        path: &str,
        cursor: Option<&str>,
    ) -> anyhow::Result<reqwest::Response> {
        let what = format!("GET {path}");
        let started = Instant::now();
        let mut failed = 0;
        loop {
            let mut request = self.client.get(self.url(path)).bearer_auth(token);
            if let Some(cursor) = cursor {
                request = request.query(&[("cursor", cursor)]);
            }
            let (last, retry_after) = match request.send().await {
                Ok(response) if !RetryPolicy::is_pushback(response.status().as_u16()) => {
                    return Ok(response);
                }
                Ok(response) => {
                    let status = response.status().as_u16();
                    let retry_after = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|value| value.to_str().ok())
                        .and_then(|value| value.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let body = response.bytes().await.unwrap_or_default();
                    let code = problem_code(&body).unwrap_or_default();
                    (
                        format!("{status} {code}").trim_end().to_owned(),
                        retry_after,
                    )
                }
                Err(err) if err.is_builder() => return Err(err).context(what),
                Err(err) => (format!("nothing ({err})"), None),
            };
            failed += 1;
            match self
                .retry
                .wait_before_next(failed, started.elapsed(), retry_after)
            {
                Some(wait) => tokio::time::sleep(wait).await,
                None => {
                    return Err(GaveUp {
                        what,
                        attempts: failed,
                        elapsed: started.elapsed(),
                        last,
                    }
                    .into());
                }
            }
        }
    }

    async fn get<T: DeserializeOwned>(&self, token: &str, path: &str) -> anyhow::Result<T> {
        let response = self.get_response(token, path, None).await?;
        Self::read(&format!("GET {path}"), response, 200).await
    }

    /// `GET /v1/ping`: whether the gateway answers.
    pub async fn ping(&self) -> anyhow::Result<()> {
        let response = self.client.get(self.url("/v1/ping")).send().await?;
        anyhow::ensure!(
            response.status() == 200,
            "GET /v1/ping: status {}",
            response.status()
        );
        Ok(())
    }

    /// `POST /v1/admin/topups`: credits `merchant_id` with `amount` from outside.
    pub async fn top_up(
        &self,
        operator: &str,
        merchant_id: &str,
        amount: i64,
        currency: &str,
    ) -> anyhow::Result<Value> {
        let response = self
            .client
            .post(self.url("/v1/admin/topups"))
            .bearer_auth(operator)
            .header("Idempotency-Key", uuid::Uuid::new_v4().to_string())
            .json(&serde_json::json!({
                "merchant_id": merchant_id, "amount": amount, "currency": currency,
            }))
            .send()
            .await?;
        Self::read("POST /v1/admin/topups", response, 200).await
    }

    /// `POST /v1/campaigns` as the merchant of `token`.
    pub async fn create_campaign(
        &self,
        token: &str,
        spec: &CampaignSpec,
    ) -> anyhow::Result<CampaignView> {
        let response = self
            .client
            .post(self.url("/v1/campaigns"))
            .bearer_auth(token)
            .header("Idempotency-Key", uuid::Uuid::new_v4().to_string())
            .json(&spec.body())
            .send()
            .await?;
        Self::read("POST /v1/campaigns", response, 201).await
    }

    pub async fn campaign(&self, token: &str, id: &str) -> anyhow::Result<CampaignView> {
        self.get(token, &format!("/v1/campaigns/{id}")).await
    }

    pub async fn stats(&self, token: &str, id: &str) -> anyhow::Result<StatsView> {
        self.get(token, &format!("/v1/campaigns/{id}/stats")).await
    }

    /// Every page of `path` (a claims listing), following `next_cursor`.
    async fn all_claims(&self, token: &str, path: &str) -> anyhow::Result<Vec<ClaimView>> {
        let mut claims = Vec::new();
        let mut cursor: Option<String> = None;
        // Bounded: 100,000 pages is far beyond any campaign (10,000,000 packets / 500).
        for _ in 0..100_000 {
            // A long listing outruns the caller's own rate limit: wait out the pushback.
            let response = self.get_response(token, path, cursor.as_deref()).await?;
            let page: ClaimsPage = Self::read(&format!("GET {path}"), response, 200).await?;
            claims.extend(page.claims);
            match page.next_cursor {
                Some(next) if Some(&next) != cursor.as_ref() => cursor = Some(next),
                _ => return Ok(claims),
            }
        }
        bail!("GET {path}: the cursor never ended")
    }

    /// `GET /v1/campaigns/{id}/claims`, every page, as the owning merchant.
    pub async fn campaign_claims(&self, token: &str, id: &str) -> anyhow::Result<Vec<ClaimView>> {
        self.all_claims(token, &format!("/v1/campaigns/{id}/claims"))
            .await
    }

    /// `GET /v1/me/claims`, every page, as the user of `token`.
    pub async fn my_claims(&self, token: &str) -> anyhow::Result<Vec<ClaimView>> {
        self.all_claims(token, "/v1/me/claims").await
    }

    /// `POST /v1/campaigns/{id}/grab` outside the measured load (seeding): the claim when
    /// granted, else the status.
    pub async fn grab(&self, token: &str, id: &str) -> anyhow::Result<Result<GrabView, u16>> {
        let response = self
            .client
            .post(self.url(&format!("/v1/campaigns/{id}/grab")))
            .bearer_auth(token)
            .send()
            .await?;
        let status = response.status().as_u16();
        if status != 200 {
            return Ok(Err(status));
        }
        Ok(Ok(Self::read("POST grab", response, 200).await?))
    }

    pub async fn reconciliation(&self, operator: &str) -> anyhow::Result<Reconciliation> {
        self.get(operator, "/v1/admin/reconciliation").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_campaign_body_follows_the_contract() {
        let spec = CampaignSpec {
            title: "t".to_owned(),
            currency: "CNY".to_owned(),
            total_amount: 1_000,
            packet_count: 10,
            split: "bounded".to_owned(),
            min_amount: Some(50),
            max_amount: None,
            per_user_limit: 1,
            starts_at_ms: 0,
            ends_at_ms: 1_000,
            seed: Some(7),
        };
        let body = spec.body();
        assert_eq!(
            body["split"],
            serde_json::json!({"mode": "bounded", "min_amount": 50})
        );
        assert_eq!(body["starts_at"], "1970-01-01T00:00:00.000Z");
        assert_eq!(body["ends_at"], "1970-01-01T00:00:01.000Z");
        assert_eq!(body["seed"], 7);
        assert_eq!(body["packet_count"], 10);
    }

    #[test]
    fn in_flight_prefers_the_services_own_count() {
        let mut stats = StatsView {
            packets_grabbed: 10,
            packets_credited: 6,
            packets_compensated: 1,
            ..StatsView::default()
        };
        assert_eq!(stats.in_flight(), 3);
        stats.packets_in_flight = Some(4);
        assert_eq!(stats.in_flight(), 4);
    }

    /// A gateway stand-in that answers `script[n]` (status, `Retry-After`) to its n-th call and
    /// 200 `{}` after the script; returns its URL and its count of calls.
    async fn scripted(script: Vec<(u16, Option<&'static str>)>) -> (String, Arc<AtomicUsize>) {
        use poem::{EndpointExt, Response, Route, http::StatusCode};
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let app = Route::new().nest(
            "/",
            poem::endpoint::make(move |_request| {
                let step = script.get(counted.fetch_add(1, Ordering::SeqCst)).copied();
                async move {
                    let Some((status, retry_after)) = step else {
                        return Response::builder()
                            .content_type("application/json")
                            .body("{}");
                    };
                    let mut response = Response::builder()
                        .status(StatusCode::from_u16(status).unwrap())
                        .content_type("application/problem+json");
                    if let Some(seconds) = retry_after {
                        response = response.header("retry-after", seconds);
                    }
                    response.body(format!(r#"{{"code":"overloaded","status":{status}}}"#))
                }
            })
            .map_to_response(),
        );
        let listener = redpacket_common::http::BoundListener::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let url = format!("http://{}", listener.local_addr());
        tokio::spawn(listener.serve(app, std::future::pending()));
        (url, calls)
    }

    #[test]
    fn a_wait_is_what_retry_after_asks_within_bounds_else_a_doubling_backoff() {
        let policy = READ_RETRY;
        let zero = Duration::ZERO;
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        assert_eq!(policy.wait_before_next(1, zero, Some(s(2))), Some(s(2)));
        assert_eq!(
            policy.wait_before_next(1, zero, Some(s(30))),
            Some(s(5)),
            "at most the longest wait"
        );
        assert_eq!(
            policy.wait_before_next(1, zero, Some(zero)),
            Some(ms(50)),
            "never a busy loop"
        );
        let backoff: Vec<_> = (1..=6)
            .map(|failed| policy.wait_before_next(failed, zero, None).unwrap())
            .collect();
        assert_eq!(
            backoff,
            [ms(250), ms(500), s(1), s(2), s(4), s(5)],
            "doubling, capped"
        );
        assert_eq!(
            policy.wait_before_next(10, zero, None),
            None,
            "10 attempts at most"
        );
        assert_eq!(
            policy.wait_before_next(3, s(59), Some(s(1))),
            None,
            "nor past 60 s"
        );
        assert!(RetryPolicy::is_pushback(429) && RetryPolicy::is_pushback(503));
        assert!(RetryPolicy::is_pushback(504));
        assert!(!RetryPolicy::is_pushback(500) && !RetryPolicy::is_pushback(404));
    }

    #[tokio::test]
    async fn a_read_waits_out_two_503s_for_their_retry_after_and_gets_the_answer() {
        let (url, calls) = scripted(vec![(503, Some("1")), (503, Some("1"))]).await;
        let api = Api::new(&url, 1).unwrap();
        let started = Instant::now();
        let response = api.get_response("t", "/v1/x", None).await.unwrap();
        let took = started.elapsed();
        assert_eq!(response.status(), 200);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(4),
            "waited {took:?} for two Retry-After: 1"
        );
    }

    #[tokio::test]
    async fn a_504_or_a_429_is_waited_out_too_but_a_500_is_the_systems_answer() {
        let (url, calls) = scripted(vec![(504, None), (429, Some("0"))]).await;
        let api = Api::new(&url, 1).unwrap();
        let response = api.get_response("t", "/v1/x", None).await.unwrap();
        assert_eq!(
            (response.status().as_u16(), calls.load(Ordering::SeqCst)),
            (200, 3)
        );

        let (url, calls) = scripted(vec![(500, None)]).await;
        let api = Api::new(&url, 1).unwrap();
        let response = api.get_response("t", "/v1/x", None).await.unwrap();
        assert_eq!(
            (response.status().as_u16(), calls.load(Ordering::SeqCst)),
            (500, 1)
        );
    }

    #[tokio::test]
    async fn a_read_still_pushed_back_at_the_bound_gives_up_and_says_so() {
        let (url, calls) = scripted(vec![(503, Some("0")); 50]).await;
        let mut api = Api::new(&url, 1).unwrap();
        api.retry = RetryPolicy {
            attempts: 4,
            ..READ_RETRY
        };
        let err = api.get_response("t", "/v1/x", None).await.unwrap_err();
        let gave_up = err.downcast_ref::<GaveUp>().expect("a GaveUp");
        assert_eq!(gave_up.attempts, 4);
        assert_eq!(gave_up.last, "503 overloaded");
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert!(
            err.to_string().contains("gave up after 4 attempts"),
            "{err}"
        );

        // The bound on time: one attempt, then a wait that would pass the total.
        api.retry = RetryPolicy {
            total: Duration::from_millis(500),
            ..READ_RETRY
        };
        let (url, _) = scripted(vec![(503, Some("1")); 50]).await;
        api.base = url;
        let started = Instant::now();
        let err = api.get_response("t", "/v1/x", None).await.unwrap_err();
        assert_eq!(err.downcast_ref::<GaveUp>().unwrap().attempts, 1);
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    #[tokio::test]
    async fn a_gateway_that_does_not_answer_is_retried_then_given_up() {
        // A port that was just free: refused at once, every time.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let mut api = Api::new(&url, 1).unwrap();
        api.retry = RetryPolicy {
            attempts: 3,
            backoff: Duration::from_millis(50),
            ..READ_RETRY
        };
        let err = api.get_response("t", "/v1/x", None).await.unwrap_err();
        let gave_up = err.downcast_ref::<GaveUp>().expect("a GaveUp");
        assert_eq!(gave_up.attempts, 3);
        assert!(gave_up.last.starts_with("nothing"), "{}", gave_up.last);
    }

    #[test]
    fn problem_codes_are_read_from_problem_json() {
        assert_eq!(
            problem_code(br#"{"type":"about:blank","status":410,"code":"sold_out"}"#),
            Some("sold_out".to_owned())
        );
        assert_eq!(problem_code(b"not json"), None);
    }
}
