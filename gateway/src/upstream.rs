//! Calls to one upstream service through its circuit breaker, with a deadline per call and the
//! request id carried along.

use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use poem::http::uri::{Authority, Scheme};
use poem::http::{HeaderValue, Method, StatusCode, Uri, header};
use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use redpacket_common::Problem;
use redpacket_common::http::REQUEST_ID_HEADER;
use redpacket_common::telemetry::Metrics;
use redpacket_common::wire::{self, WirePool};

use crate::breaker::{Breaker, BreakerConfig, BreakerSnapshot, Outcome, Transition};
use crate::error::GatewayError;

/// An upstream's answer, any status.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
    pub retry_after: Option<HeaderValue>,
}

impl From<wire::Reply> for Reply {
    fn from(reply: wire::Reply) -> Self {
        Reply {
            status: reply.status,
            body: reply.body,
            retry_after: reply.retry_after,
        }
    }
}

impl Reply {
    /// The body when the status is 2xx, else the upstream's problem relayed.
    pub fn success(self) -> Result<Bytes, GatewayError> {
        if self.status.is_success() {
            Ok(self.body)
        } else {
            Err(self.into_error())
        }
    }

    pub fn into_error(self) -> GatewayError {
        GatewayError::Upstream {
            status: self.status,
            body: self.body,
            retry_after: self.retry_after,
        }
    }

    /// Parses a 2xx body, or relays the problem.
    pub fn json<T: serde::de::DeserializeOwned>(self) -> Result<T, GatewayError> {
        let body = self.success()?;
        serde_json::from_slice(&body).map_err(|err| {
            tracing::error!(error = %err, "an upstream answered JSON the gateway cannot read");
            GatewayError::Problem(Problem::internal())
        })
    }
}

/// Breaker gauges and counters, shared by the upstreams of a gateway.
#[derive(Debug, Clone)]
pub struct BreakerMetrics {
    state: IntGaugeVec,
    transitions: IntCounterVec,
    rejected: IntCounterVec,
}

impl BreakerMetrics {
    pub fn new(metrics: &Metrics) -> Self {
        let state = IntGaugeVec::new(
            Opts::new(
                "gateway_breaker_state",
                "Circuit breaker state per upstream: 0 closed, 1 half-open, 2 open",
            ),
            &["upstream"],
        )
        .unwrap_or_else(|err| panic!("static metric definition is valid: {err}"));
        let transitions = IntCounterVec::new(
            Opts::new(
                "gateway_breaker_transitions_total",
                "Circuit breaker state changes per upstream",
            ),
            &["upstream", "from", "to"],
        )
        .unwrap_or_else(|err| panic!("static metric definition is valid: {err}"));
        let rejected = IntCounterVec::new(
            Opts::new(
                "gateway_breaker_rejected_total",
                "Calls refused by an open circuit breaker",
            ),
            &["upstream"],
        )
        .unwrap_or_else(|err| panic!("static metric definition is valid: {err}"));
        metrics.register(Box::new(state.clone()));
        metrics.register(Box::new(transitions.clone()));
        metrics.register(Box::new(rejected.clone()));
        BreakerMetrics {
            state,
            transitions,
            rejected,
        }
    }
}

/// The HTTP/1.1 client of the upstreams: hyper's pooled client, without reqwest's layers
/// (a `Url` parsed twice per call, IDNA, redirect policy, its own boxed futures).
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Why a call got no answer.
enum CallError {
    Timeout,
    Failed(String),
}

/// One upstream service.
#[derive(Debug)]
pub struct Upstream {
    name: &'static str,
    base: String,
    scheme: Scheme,
    authority: Authority,
    /// The base URL's path (`/api` in `http://host/api`), put before every call's path.
    prefix: String,
    client: HttpClient,
    /// The hot path's connections (the grab relay).
    wire: WirePool,
    breaker: Breaker,
    metrics: BreakerMetrics,
}

impl Upstream {
    pub fn new(
        name: &'static str,
        base_url: &str,
        client: HttpClient,
        breaker: BreakerConfig,
        metrics: BreakerMetrics,
    ) -> anyhow::Result<Self> {
        metrics.state.with_label_values(&[name]).set(0);
        let base = base_url.trim_end_matches('/').to_owned();
        let uri: Uri = base
            .parse()
            .map_err(|err| anyhow::anyhow!("the {name} URL `{base}`: {err}"))?;
        let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned())
        else {
            anyhow::bail!("the {name} URL `{base}` needs a scheme and a host");
        };
        let prefix = uri.path().trim_end_matches('/').to_owned();
        let host = format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(80)
        );
        Ok(Upstream {
            wire: WirePool::new(host),
            name,
            base,
            scheme,
            authority,
            prefix,
            client,
            breaker: Breaker::new(breaker),
            metrics,
        })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn snapshot(&self) -> BreakerSnapshot {
        self.breaker.snapshot(Instant::now())
    }

    /// Whether a call would be refused right now without trying (the breaker is open).
    pub fn is_open(&self) -> bool {
        self.breaker.state() == crate::breaker::BreakerState::Open
            && self
                .snapshot()
                .open_remaining
                .is_some_and(|left| !left.is_zero())
    }

    fn note(&self, transition: Option<Transition>) {
        if let Some(Transition { from, to }) = transition {
            tracing::warn!(
                upstream = self.name,
                from = from.as_str(),
                to = to.as_str(),
                "circuit breaker changed state"
            );
            self.metrics
                .state
                .with_label_values(&[self.name])
                .set(to.gauge());
            self.metrics
                .transitions
                .with_label_values(&[self.name, from.as_str(), to.as_str()])
                .inc();
        }
    }

    /// `GET path` within `deadline`.
    pub async fn get(
        &self,
        path: &str,
        request_id: &str,
        deadline: Duration,
    ) -> Result<Reply, GatewayError> {
        self.call(Method::GET, path, None, &[], request_id, deadline)
            .await
    }

    /// Calls `method path` with an optional JSON body, within `deadline`.
    ///
    /// A refused call (open breaker) and a failed one (connection refused, timeout) answer
    /// 503 / 504 at once; 5xx answers count as failures for the breaker and are relayed.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        headers: &[(&'static str, &str)],
        request_id: &str,
        deadline: Duration,
    ) -> Result<Reply, GatewayError> {
        self.guarded(deadline, self.send(method, path, body, headers, request_id))
            .await
    }

    /// `POST path` with a JSON body on the hot path's own connections (see [`wire`]),
    /// under the same breaker and deadline as [`Upstream::call`].
    pub async fn post_hot(
        &self,
        path: &str,
        body: &[u8],
        request_id: &str,
        deadline: Duration,
    ) -> Result<Reply, GatewayError> {
        let prefixed;
        let path = if self.prefix.is_empty() {
            path
        } else {
            prefixed = format!("{}{path}", self.prefix);
            &prefixed
        };
        let send = async {
            self.wire
                .post_json(path, body, request_id)
                .await
                .map(Reply::from)
                .map_err(CallError::Failed)
        };
        self.guarded(deadline, send).await
    }

    /// Runs one call through the breaker within `deadline`, recording its outcome.
    async fn guarded(
        &self,
        deadline: Duration,
        send: impl Future<Output = Result<Reply, CallError>>,
    ) -> Result<Reply, GatewayError> {
        let started = Instant::now();
        let (permit, transition) = self.breaker.try_acquire(started);
        self.note(transition);
        let permit = match permit {
            Ok(permit) => permit,
            Err(rejected) => {
                self.metrics.rejected.with_label_values(&[self.name]).inc();
                let seconds = rejected.retry_after.as_millis().div_ceil(1000).max(1);
                return Err(Problem::unavailable(
                    "upstream_unavailable",
                    format!(
                        "the {} service is unavailable (circuit open); retry after {seconds} s",
                        self.name
                    ),
                )
                .with_retry_after(u64::try_from(seconds).unwrap_or(u64::MAX))
                .into());
            }
        };
        let result = tokio::time::timeout(deadline, send)
            .await
            .unwrap_or(Err(CallError::Timeout));
        let elapsed = started.elapsed();
        let slow = elapsed > self.breaker.config().slow_call;
        let failed = match &result {
            Ok(reply) => reply.status.is_server_error(),
            Err(_) => true,
        };
        self.note(
            self.breaker
                .record(permit, Outcome { failed, slow }, Instant::now()),
        );
        result.map_err(|err| match err {
            CallError::Timeout => {
                tracing::warn!(upstream = self.name, "upstream timed out");
                Problem::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    "Gateway timeout",
                    format!(
                        "the {} service did not answer within {} ms",
                        self.name,
                        deadline.as_millis()
                    ),
                )
                .into()
            }
            CallError::Failed(error) => {
                tracing::warn!(upstream = self.name, error, "upstream call failed");
                Problem::unavailable(
                    "upstream_unavailable",
                    format!("the {} service cannot be reached", self.name),
                )
                .with_retry_after(1)
                .into()
            }
        })
    }

    /// One request and its whole answer.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        headers: &[(&'static str, &str)],
        request_id: &str,
    ) -> Result<Reply, CallError> {
        let uri = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone());
        let uri = if self.prefix.is_empty() {
            uri.path_and_query(path)
        } else {
            uri.path_and_query(format!("{}{path}", self.prefix))
        };
        let uri = uri
            .build()
            .map_err(|err| CallError::Failed(format!("{}{path}: {err}", self.base)))?;
        let mut request = poem::http::Request::builder().method(method).uri(uri);
        if let Ok(value) = HeaderValue::from_str(request_id) {
            request = request.header(REQUEST_ID_HEADER, value);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let body = match body {
            Some(body) => {
                request = request.header(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                Full::new(body)
            }
            None => Full::new(Bytes::new()),
        };
        let request = request
            .body(body)
            .map_err(|err| CallError::Failed(err.to_string()))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|err| CallError::Failed(err.to_string()))?;
        let status = response.status();
        let retry_after = response.headers().get(header::RETRY_AFTER).cloned();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| CallError::Failed(err.to_string()))?
            .to_bytes();
        Ok(Reply {
            status,
            body,
            retry_after,
        })
    }
}
