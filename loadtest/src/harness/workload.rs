//! The measured requests, shared by both load models.
//!
//! An operation (a grab, a campaign created, a read) is written once against [`Transport`],
//! which sends either through a goose user (closed model: goose times it for its report) or
//! through a shared [`DirectClient`] (open model). Either way the harness's own [`Recorder`]
//! gets the latency, status and problem code, and every grab's answer goes to the
//! [`GrabLog`] that the verification reads.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use redpacket_common::wire::WirePool;

use goose::prelude::{GooseMethod, GooseRequest, GooseUser};
use serde_json::Value;

use super::api::{CampaignSpec, CampaignView, GrabView, Tokens, problem_code};
use super::recorder::{Recorder, Sample, TRANSPORT_ERROR};
use super::verify::Granted;

/// Request kinds, as named in the recorder, the summary and goose's report.
pub mod kind {
    pub const GRAB: &str = "grab";
    pub const CREATE: &str = "create_campaign";
    pub const STATS: &str = "campaign_stats";
    pub const MY_CLAIMS: &str = "my_claims";
    pub const MY_WALLET: &str = "my_wallet";
}

/// Answers of a grab that are the system working as designed (a user told "sold out" or
/// "limit reached" got a correct answer): goose counts them as successes.
pub const GRAB_ANSWERS: &[u16] = &[200, 409, 410];

/// The users of a run: `{prefix}-u{n}`, tokens minted before the load (minting costs an HMAC
/// and a JSON encoding, which should not compete with the load) for the first `tokens.len()`;
/// any later user's token is minted when needed.
#[derive(Debug)]
pub struct Population {
    prefix: String,
    tokens: Vec<String>,
    minter: Tokens,
}

impl Population {
    pub fn new(prefix: &str, minted: u64, minter: Tokens) -> anyhow::Result<Self> {
        let tokens = (0..minted)
            .map(|n| minter.user(&user_id(prefix, n)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Population {
            prefix: prefix.to_owned(),
            tokens,
            minter,
        })
    }

    pub fn id(&self, n: u64) -> String {
        user_id(&self.prefix, n)
    }

    pub fn token(&self, n: u64) -> Cow<'_, str> {
        match usize::try_from(n).ok().and_then(|i| self.tokens.get(i)) {
            Some(token) => Cow::Borrowed(token),
            None => Cow::Owned(self.minter.user(&self.id(n)).unwrap_or_default()),
        }
    }
}

/// A user's id: 1–64 letters, digits, `-`, `_`.
pub fn user_id(prefix: &str, n: u64) -> String {
    format!("{prefix}-u{n}")
}

/// A merchant of the run.
#[derive(Debug, Clone)]
pub struct Merchant {
    pub id: String,
    pub token: String,
}

/// A campaign created by the run.
#[derive(Debug, Clone)]
pub struct LiveCampaign {
    pub id: String,
    /// Index into the run's merchants: the owner, whose token reads stats and claims.
    pub merchant: usize,
    pub opens_at_ms: i64,
    pub per_user_limit: i64,
}

/// The campaigns of a run: the ones set up before the load and the ones created during it.
#[derive(Debug, Default)]
pub struct CampaignBook {
    campaigns: RwLock<Vec<LiveCampaign>>,
}

impl CampaignBook {
    pub fn add(&self, campaign: LiveCampaign) {
        self.campaigns
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(campaign);
    }

    pub fn all(&self) -> Vec<LiveCampaign> {
        self.campaigns
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn first(&self) -> Option<LiveCampaign> {
        self.campaigns
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .first()
            .cloned()
    }

    /// A campaign to grab from: half the time the first (the hot one), else any that should be
    /// open by now. `draw` is a random number.
    pub fn pick_open(&self, now_ms: i64, draw: u64) -> Option<LiveCampaign> {
        let campaigns = self.campaigns.read().unwrap_or_else(|p| p.into_inner());
        let open: Vec<&LiveCampaign> = campaigns
            .iter()
            .filter(|c| c.opens_at_ms <= now_ms)
            .collect();
        if open.is_empty() {
            return None;
        }
        if draw.is_multiple_of(2) {
            return Some(open[0].clone());
        }
        let index =
            usize::try_from((draw / 2) % u64::try_from(open.len()).unwrap_or(1)).unwrap_or(0);
        Some(open[index].clone())
    }

    /// Any campaign (for reading its stats).
    pub fn pick_any(&self, draw: u64) -> Option<LiveCampaign> {
        let campaigns = self.campaigns.read().unwrap_or_else(|p| p.into_inner());
        let len = u64::try_from(campaigns.len()).ok().filter(|len| *len > 0)?;
        campaigns
            .get(usize::try_from(draw % len).unwrap_or(0))
            .cloned()
    }
}

/// Every grab's answer, per campaign, for the verification.
#[derive(Debug, Default)]
pub struct GrabLog {
    inner: Mutex<GrabLogInner>,
}

#[derive(Debug, Default)]
struct GrabLogInner {
    granted: HashMap<String, Vec<Granted>>,
    users: HashSet<String>,
    campaigns: HashSet<String>,
    unreadable_200: u64,
}

impl GrabLog {
    /// Records that `user` tried `campaign`, and the claim when it was granted.
    pub fn record(&self, campaign: &str, user: &str, granted: Option<GrabView>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if !inner.users.contains(user) {
            inner.users.insert(user.to_owned());
        }
        if !inner.campaigns.contains(campaign) {
            inner.campaigns.insert(campaign.to_owned());
        }
        if let Some(grab) = granted {
            inner
                .granted
                .entry(campaign.to_owned())
                .or_default()
                .push(Granted {
                    claim_id: grab.claim_id,
                    user_id: user.to_owned(),
                    amount: grab.amount,
                });
        }
    }

    /// A 200 whose body was not a grab result.
    pub fn record_unreadable(&self) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unreadable_200 += 1;
    }

    pub fn granted(&self, campaign: &str) -> Vec<Granted> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .granted
            .get(campaign)
            .cloned()
            .unwrap_or_default()
    }

    /// Every user who sent a grab, sorted.
    pub fn users(&self) -> Vec<String> {
        let mut users: Vec<String> = self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .users
            .iter()
            .cloned()
            .collect();
        users.sort();
        users
    }

    /// Every campaign a grab was sent to.
    pub fn campaigns_tried(&self) -> HashSet<String> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .campaigns
            .clone()
    }

    pub fn unreadable_200(&self) -> u64 {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unreadable_200
    }
}

/// The operations of the workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Grab,
    Create,
    Browse,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Grab => "grab",
            Op::Create => "create",
            Op::Browse => "browse",
        }
    }
}

/// Operations in set proportions, interleaved (smooth weighted round robin: weights 1:3
/// give `B A B B`, not `A B B B`), so any window of the run has the mix.
#[derive(Debug, Clone)]
pub struct Mix {
    pattern: Vec<Op>,
}

impl Mix {
    pub fn new(weights: &[(Op, u32)]) -> Self {
        let total: i64 = weights.iter().map(|(_, w)| i64::from(*w)).sum();
        let mut current: Vec<i64> = vec![0; weights.len()];
        let mut pattern = Vec::new();
        for _ in 0..total {
            for (slot, (_, weight)) in current.iter_mut().zip(weights) {
                *slot += i64::from(*weight);
            }
            let Some((best, _)) = current
                .iter()
                .enumerate()
                .max_by_key(|(index, value)| (**value, std::cmp::Reverse(*index)))
            else {
                break;
            };
            current[best] -= total;
            pattern.push(weights[best].0);
        }
        Mix { pattern }
    }

    /// The `seq`-th operation.
    pub fn pick(&self, seq: u64) -> Option<Op> {
        let len = u64::try_from(self.pattern.len()).ok().filter(|l| *l > 0)?;
        self.pattern
            .get(usize::try_from(seq % len).unwrap_or(0))
            .copied()
    }
}

/// Who grabs.
#[derive(Debug, Clone, Copy)]
pub enum Grabbers {
    /// Every grab a new user: user `n` for the `n`-th grab; with `cap`, grabs past it are
    /// skipped (the closed model's last iteration).
    Distinct { cap: Option<u64> },
    /// Random users of the population (a user may grab again and meet the per-user limit).
    Random,
}

/// Everything the operations share.
#[derive(Debug)]
pub struct Ctx {
    pub base: String,
    pub recorder: Recorder,
    pub grabs: GrabLog,
    pub users: Population,
    pub population: u64,
    pub grabbers: Grabbers,
    pub merchants: Vec<Merchant>,
    pub campaigns: CampaignBook,
    /// The campaigns merchants create during the run; `starts_at`/`ends_at` are offsets from
    /// the creation (`starts_at_ms`, `ends_at_ms` relative).
    pub created: Option<CampaignSpec>,
    /// The next distinct grabber ([`Grabbers::Distinct`]).
    pub next_grabber: AtomicU64,
    /// Turns of their own for the reads and the creations, so that their rotations (which
    /// read, which merchant) do not lock step with the operation mix's pattern.
    pub next_read: AtomicU64,
    pub next_creation: AtomicU64,
}

/// How the measured requests are sent.
#[derive(Debug)]
pub enum Transport<'a> {
    /// Through a goose user: goose records it for its report too.
    Goose(&'a mut GooseUser),
    /// Through a shared client (open model).
    Direct(&'a DirectClient),
}

/// The longest a request of the open model waits for its whole answer.
const DIRECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The open model's client, shared by every arrival.
///
/// On plain HTTP it is the lean keep-alive client of [`redpacket_common::wire`]: the load
/// generator runs on the same cores as the system it measures, and reqwest costs several times
/// more CPU per request (URL parsing, a clone of the client's service stack, a connection task
/// behind a channel), which the system under test would lose. HTTPS goes through reqwest.
#[derive(Debug)]
pub enum DirectClient {
    Wire {
        pool: WirePool,
        /// The base URL's path, put before every request's.
        prefix: String,
    },
    Reqwest {
        client: reqwest::Client,
        base: String,
    },
}

impl DirectClient {
    /// A client of `base` keeping up to `idle` connections.
    pub fn new(base: &str, idle: usize) -> anyhow::Result<Self> {
        let url = reqwest::Url::parse(base).with_context(|| format!("the host URL `{base}`"))?;
        if url.scheme() == "http" {
            let host = url
                .host_str()
                .with_context(|| format!("the host URL `{base}` has no host"))?;
            let port = url.port_or_known_default().unwrap_or(80);
            return Ok(DirectClient::Wire {
                pool: WirePool::new(format!("{host}:{port}")),
                prefix: url.path().trim_end_matches('/').to_owned(),
            });
        }
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(idle)
            .timeout(DIRECT_TIMEOUT)
            .build()?;
        Ok(DirectClient::Reqwest {
            client,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    /// `GET path` (`post`: `POST`) with the given headers and body; the status and body of the
    /// answer, whatever the status.
    pub async fn send(
        &self,
        post: bool,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> anyhow::Result<(u16, Bytes)> {
        match self {
            DirectClient::Wire { pool, prefix } => {
                let prefixed;
                let path = if prefix.is_empty() {
                    path
                } else {
                    prefixed = format!("{prefix}{path}");
                    &prefixed
                };
                let method = if post { "POST" } else { "GET" };
                let reply =
                    tokio::time::timeout(DIRECT_TIMEOUT, pool.send(method, path, headers, body))
                        .await
                        .context("no answer within the timeout")?
                        .map_err(anyhow::Error::msg)?;
                Ok((reply.status.as_u16(), reply.body))
            }
            DirectClient::Reqwest { client, base } => {
                let url = format!("{base}{path}");
                let mut request = if post {
                    client.post(url)
                } else {
                    client.get(url)
                };
                for (name, value) in headers {
                    request = request.header(*name, *value);
                }
                if let Some(body) = body {
                    request = request.body(body.to_vec());
                }
                let response = request.send().await?;
                let status = response.status().as_u16();
                Ok((status, response.bytes().await?))
            }
        }
    }

    /// Sends a measured request.
    async fn call(&self, call: &Call<'_>) -> anyhow::Result<(u16, Bytes)> {
        let authorization = format!("Bearer {}", call.token);
        let key;
        let mut headers: Vec<(&str, &str)> = Vec::with_capacity(3);
        headers.push(("authorization", &authorization));
        if call.idempotency_key {
            key = uuid::Uuid::new_v4().to_string();
            headers.push(("idempotency-key", &key));
        }
        let body = match &call.body {
            Some(body) => {
                headers.push(("content-type", "application/json"));
                Some(serde_json::to_vec(body)?)
            }
            None => None,
        };
        self.send(call.post, &call.path, &headers, body.as_deref())
            .await
    }
}

/// One measured request.
#[derive(Debug)]
struct Call<'a> {
    kind: &'static str,
    post: bool,
    path: String,
    token: &'a str,
    body: Option<Value>,
    idempotency_key: bool,
    /// Statuses that are correct answers (goose: successes).
    expected: &'static [u16],
}

/// A measured request's answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Bytes,
}

impl Transport<'_> {
    async fn call(&mut self, ctx: &Ctx, call: Call<'_>) -> Answer {
        let started = Instant::now();
        let answer = match self {
            Transport::Goose(user) => goose_call(user, &call).await,
            Transport::Direct(client) => match client.call(&call).await {
                Ok((status, body)) => Answer { status, body },
                Err(_) => Answer {
                    status: TRANSPORT_ERROR,
                    body: Bytes::new(),
                },
            },
        };
        let code = if answer.status >= 400 {
            problem_code(&answer.body)
        } else {
            None
        };
        ctx.recorder.record(Sample {
            kind: call.kind,
            started,
            latency: started.elapsed(),
            status: answer.status,
            code: code.as_deref(),
        });
        answer
    }
}

fn decorate(mut request: reqwest::RequestBuilder, call: &Call<'_>) -> reqwest::RequestBuilder {
    request = request.bearer_auth(call.token);
    if call.idempotency_key {
        request = request.header("Idempotency-Key", uuid::Uuid::new_v4().to_string());
    }
    if let Some(body) = &call.body {
        request = request.json(body);
    }
    request
}

async fn goose_call(user: &mut GooseUser, call: &Call<'_>) -> Answer {
    let method = if call.post {
        GooseMethod::Post
    } else {
        GooseMethod::Get
    };
    let failed = Answer {
        status: TRANSPORT_ERROR,
        body: Bytes::new(),
    };
    let Ok(builder) = user.get_request_builder(&method, &call.path) else {
        return failed;
    };
    let request = GooseRequest::builder()
        .name(call.kind)
        .set_request_builder(decorate(builder, call))
        .build();
    let Ok(mut goose) = user.request(request).await else {
        return failed;
    };
    let Ok(response) = goose.response else {
        return failed;
    };
    let status = response.status().as_u16();
    let Ok(body) = response.bytes().await else {
        return failed;
    };
    if call.expected.contains(&status) && !goose.request.success {
        let _ = user.set_success(&mut goose.request);
    }
    Answer { status, body }
}

/// Runs one operation of kind `op`.
pub async fn run_op(ctx: &Ctx, transport: &mut Transport<'_>, op: Op) {
    match op {
        Op::Grab => grab(ctx, transport).await,
        Op::Create => create(ctx, transport).await,
        Op::Browse => browse(ctx, transport).await,
    }
}

async fn grab(ctx: &Ctx, transport: &mut Transport<'_>) {
    let now = redpacket_common::time::now_ms();
    let (user, campaign) = match ctx.grabbers {
        Grabbers::Distinct { cap } => {
            let user = ctx.next_grabber.fetch_add(1, Ordering::Relaxed);
            if cap.is_some_and(|cap| user >= cap) {
                return;
            }
            (user, ctx.campaigns.first())
        }
        Grabbers::Random => (
            rand::random_range(0..ctx.population.max(1)),
            ctx.campaigns.pick_open(now, rand::random()),
        ),
    };
    let Some(campaign) = campaign else {
        return;
    };
    let token = ctx.users.token(user);
    let answer = transport
        .call(
            ctx,
            Call {
                kind: kind::GRAB,
                post: true,
                path: format!("/v1/campaigns/{}/grab", campaign.id),
                token: &token,
                body: None,
                idempotency_key: false,
                expected: GRAB_ANSWERS,
            },
        )
        .await;
    let user_id = ctx.users.id(user);
    if answer.status == 200 {
        match serde_json::from_slice::<GrabView>(&answer.body) {
            Ok(grab) => ctx.grabs.record(&campaign.id, &user_id, Some(grab)),
            Err(_) => {
                ctx.grabs.record(&campaign.id, &user_id, None);
                ctx.grabs.record_unreadable();
            }
        }
    } else {
        ctx.grabs.record(&campaign.id, &user_id, None);
    }
}

async fn create(ctx: &Ctx, transport: &mut Transport<'_>) {
    let (Some(template), Ok(count)) = (&ctx.created, u64::try_from(ctx.merchants.len())) else {
        return;
    };
    if count == 0 {
        return;
    }
    let turn = ctx.next_creation.fetch_add(1, Ordering::Relaxed);
    let merchant = usize::try_from(turn % count).unwrap_or(0);
    let now = redpacket_common::time::now_ms();
    let mut spec = template.clone();
    spec.starts_at_ms = now + template.starts_at_ms;
    spec.ends_at_ms = now + template.ends_at_ms;
    let answer = transport
        .call(
            ctx,
            Call {
                kind: kind::CREATE,
                post: true,
                path: "/v1/campaigns".to_owned(),
                token: &ctx.merchants[merchant].token,
                body: Some(spec.body()),
                idempotency_key: true,
                expected: &[201],
            },
        )
        .await;
    if answer.status == 201
        && let Ok(view) = serde_json::from_slice::<CampaignView>(&answer.body)
    {
        ctx.campaigns.add(LiveCampaign {
            id: view.id,
            merchant,
            opens_at_ms: spec.starts_at_ms,
            per_user_limit: spec.per_user_limit,
        });
    }
}

/// Reads in turn: a campaign's stats (as its merchant), a user's claims, a user's wallet.
async fn browse(ctx: &Ctx, transport: &mut Transport<'_>) {
    let user = rand::random_range(0..ctx.population.max(1));
    let turn = ctx.next_read.fetch_add(1, Ordering::Relaxed);
    let (kind, path, token): (&'static str, String, Cow<'_, str>) = match turn % 3 {
        0 => {
            let Some(campaign) = ctx.campaigns.pick_any(rand::random()) else {
                return;
            };
            let Some(merchant) = ctx.merchants.get(campaign.merchant) else {
                return;
            };
            (
                kind::STATS,
                format!("/v1/campaigns/{}/stats", campaign.id),
                Cow::Borrowed(merchant.token.as_str()),
            )
        }
        1 => (
            kind::MY_CLAIMS,
            "/v1/me/claims".to_owned(),
            ctx.users.token(user),
        ),
        _ => (
            kind::MY_WALLET,
            "/v1/me/wallet".to_owned(),
            ctx.users.token(user),
        ),
    };
    transport
        .call(
            ctx,
            Call {
                kind,
                post: false,
                path,
                token: &token,
                body: None,
                idempotency_key: false,
                // A user without a wallet yet may be told 404: a correct answer.
                expected: &[200, 404],
            },
        )
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mix_interleaves_in_proportion() {
        let mix = Mix::new(&[(Op::Create, 1), (Op::Grab, 3)]);
        let ops: Vec<Op> = (0..4).map(|i| mix.pick(i).unwrap()).collect();
        assert_eq!(ops, vec![Op::Grab, Op::Create, Op::Grab, Op::Grab]);
        let mix = Mix::new(&[(Op::Create, 1), (Op::Grab, 20), (Op::Browse, 9)]);
        let mut counts = HashMap::new();
        for seq in 0..300 {
            *counts.entry(mix.pick(seq).unwrap()).or_insert(0) += 1;
        }
        assert_eq!(counts[&Op::Create], 10);
        assert_eq!(counts[&Op::Grab], 200);
        assert_eq!(counts[&Op::Browse], 90);
        // No long runs: browse comes back at least every 4 operations.
        let pattern: Vec<Op> = (0..30).map(|i| mix.pick(i).unwrap()).collect();
        for window in pattern.windows(5) {
            assert!(window.contains(&Op::Browse), "{pattern:?}");
        }
        assert_eq!(Mix::new(&[(Op::Grab, 0)]).pick(0), None);
    }

    #[test]
    fn the_hot_campaign_gets_half_the_grabs_once_others_open() {
        let book = CampaignBook::default();
        assert!(book.pick_open(0, 0).is_none());
        for (id, opens) in [("hot", 0), ("later", 1_000), ("open", 10)] {
            book.add(LiveCampaign {
                id: id.to_owned(),
                merchant: 0,
                opens_at_ms: opens,
                per_user_limit: 1,
            });
        }
        assert_eq!(book.pick_open(100, 0).unwrap().id, "hot");
        assert_eq!(book.pick_open(100, 3).unwrap().id, "open");
        assert!(
            (0..100)
                .filter_map(|draw| book.pick_open(100, draw))
                .all(|c| c.id != "later")
        );
        assert_eq!(book.pick_any(1).unwrap().id, "later");
    }

    #[tokio::test]
    async fn the_direct_client_sends_the_measured_request_whole() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/prefix/", listener.local_addr().unwrap());
        // Answers with the request's own bytes.
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buffer = vec![0u8; 4096];
            let read = socket.read(&mut buffer).await.unwrap();
            let head = format!("HTTP/1.1 201 Created\r\ncontent-length: {read}\r\n\r\n");
            socket.write_all(head.as_bytes()).await.unwrap();
            socket.write_all(&buffer[..read]).await.unwrap();
        });
        let client = DirectClient::new(&base, 4).unwrap();
        assert!(matches!(client, DirectClient::Wire { .. }));
        let call = Call {
            kind: kind::CREATE,
            post: true,
            path: "/v1/campaigns".to_owned(),
            token: "t0k",
            body: Some(serde_json::json!({"a": 1})),
            idempotency_key: true,
            expected: &[201],
        };
        let (status, echoed) = client.call(&call).await.unwrap();
        assert_eq!(status, 201);
        let text = String::from_utf8_lossy(&echoed);
        assert!(
            text.starts_with("POST /prefix/v1/campaigns HTTP/1.1\r\n"),
            "{text}"
        );
        for header in [
            "authorization: Bearer t0k\r\n",
            "idempotency-key: ",
            "content-type: application/json\r\n",
            "content-length: 7\r\n",
        ] {
            assert!(text.contains(header), "{header} missing from {text}");
        }
        assert!(text.ends_with("\r\n\r\n{\"a\":1}"), "{text}");
        assert!(matches!(
            DirectClient::new("https://gateway.example", 4).unwrap(),
            DirectClient::Reqwest { .. }
        ));
        assert!(DirectClient::new("not a url", 4).is_err());
    }

    #[test]
    fn the_grab_log_keeps_grants_and_every_user() {
        let log = GrabLog::default();
        log.record(
            "c1",
            "u1",
            Some(GrabView {
                claim_id: "k1".to_owned(),
                amount: 5,
            }),
        );
        log.record("c1", "u2", None);
        log.record("c2", "u1", None);
        assert_eq!(log.users(), vec!["u1", "u2"]);
        assert_eq!(log.granted("c1").len(), 1);
        assert!(log.granted("c2").is_empty());
    }
}
