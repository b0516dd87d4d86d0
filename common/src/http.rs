//! What every service's HTTP edge shares: strict JSON bodies, problem+json errors, request
//! ids, `/metrics`, `/health/live`, `/health/ready`, binding and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use poem::web::Json;
use poem::{Endpoint, EndpointExt, IntoResponse, Request, Response, Route, get, handler};
use poem_openapi::payload::{ParsePayload, Payload};
use poem_openapi::registry::{MetaSchemaRef, Registry};
use poem_openapi::types::Type;
use serde::de::DeserializeOwned;

use crate::front::{ConnectionLimits, HotRoute, Loops, NoHotRoute};
use crate::problem::Problem;
use crate::telemetry::Metrics;

/// The header that carries a request's id through every hop.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// The default bound on a request body.
pub const DEFAULT_BODY_LIMIT_BYTES: usize = 256 * 1024;
/// The longest request id accepted from a client; a longer one is replaced.
const MAX_REQUEST_ID_LEN: usize = 128;
/// How long a stopping server waits for requests in flight.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A JSON request body parsed strictly with serde: unknown fields, wrong types and trailing
/// data are refused with a problem naming the field, and the body is bounded to `LIMIT` bytes
/// (a constant per operation, so no per-request state is needed to enforce it).
#[derive(Debug)]
pub struct StrictJson<T, const LIMIT: usize = DEFAULT_BODY_LIMIT_BYTES>(pub T);

impl<T: Type, const LIMIT: usize> Payload for StrictJson<T, LIMIT> {
    const CONTENT_TYPE: &'static str = "application/json";

    fn check_content_type(content_type: &str) -> bool {
        content_type
            .split(';')
            .next()
            .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
    }

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

impl<T: DeserializeOwned + Send, const LIMIT: usize> ParsePayload for StrictJson<T, LIMIT> {
    const IS_REQUIRED: bool = true;

    async fn from_request(_request: &Request, body: &mut poem::RequestBody) -> poem::Result<Self> {
        let limit = LIMIT;
        let bytes = body
            .take()?
            .into_bytes_limit(limit)
            .await
            .map_err(|err| match err {
                poem::error::ReadBodyError::PayloadTooLarge => body_too_large(limit),
                other => Problem::bad_request("invalid_body", other.to_string()),
            })?;
        parse_strict(&bytes).map(StrictJson).map_err(Into::into)
    }
}

fn body_too_large(limit: usize) -> Problem {
    Problem::new(
        poem::http::StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "Payload too large",
        format!("the request body exceeds {limit} bytes"),
    )
}

/// Reads a whole body of at most `limit` bytes, refusing it as [`StrictJson`] does.
pub async fn read_body_limited<B>(body: B, limit: usize) -> Result<bytes::Bytes, Problem>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => Err(body_too_large(limit)),
        Err(err) => Err(Problem::bad_request("invalid_body", err.to_string())),
    }
}

poem_openapi::impl_apirequest_for_payload!(
    StrictJson<T, LIMIT>,
    T: Type + DeserializeOwned + Send,
    const LIMIT: usize
);

/// A JSON response serialized straight from the value with serde (poem-openapi's `Json` goes
/// through an intermediate `serde_json::Value`, an allocation per field). For hot paths.
#[derive(Debug)]
pub struct FastJson<T>(pub T);

impl<T: Type + serde::Serialize + Send> Payload for FastJson<T> {
    const CONTENT_TYPE: &'static str = "application/json; charset=utf-8";

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

impl<T: serde::Serialize + Send> poem::IntoResponse for FastJson<T> {
    fn into_response(self) -> Response {
        match serde_json::to_vec(&self.0) {
            Ok(body) => Response::builder()
                .content_type("application/json; charset=utf-8")
                .body(body),
            Err(err) => {
                tracing::error!(error = %err, "serializing a response failed");
                Problem::internal().into_response()
            }
        }
    }
}

impl<T: Type + serde::Serialize + Send> poem_openapi::ApiResponse for FastJson<T> {
    fn meta() -> poem_openapi::registry::MetaResponses {
        poem_openapi::registry::MetaResponses {
            responses: vec![poem_openapi::registry::MetaResponse {
                description: "",
                status: Some(200),
                status_range: None,
                content: vec![poem_openapi::registry::MetaMediaType {
                    content_type: "application/json; charset=utf-8",
                    schema: T::schema_ref(),
                }],
                headers: vec![],
            }],
        }
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

/// Parses JSON with serde, naming the field at fault in the problem.
pub fn parse_strict<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        let message = inner.to_string();
        // serde_path_to_error already ends the path with the unknown field's name.
        let unknown = message
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split('`').next())
            .map(|name| {
                if path == "." {
                    name.to_owned()
                } else {
                    path.clone()
                }
            });
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next())
            .map(|name| {
                if path == "." {
                    name.to_owned()
                } else {
                    format!("{path}.{name}")
                }
            });
        let (code, field) = match (unknown, missing) {
            (Some(field), _) => ("unknown_field", Some(field)),
            (None, Some(field)) => ("missing_field", Some(field)),
            (None, None) if inner.is_syntax() || inner.is_eof() => ("malformed_json", None),
            (None, None) => ("invalid_field", (path != ".").then_some(path)),
        };
        let problem = Problem::bad_request(code, message);
        match field {
            Some(field) => problem.with_field(field),
            None => problem,
        }
    })?;
    deserializer
        .end()
        .map_err(|err| Problem::bad_request("malformed_json", err.to_string()))?;
    Ok(value)
}

/// A dependency whose health decides readiness.
pub trait Readiness: Send + Sync + 'static {
    /// `Ok` when every dependency answers, with what an operator should know about them (the
    /// readiness answer's `detail`, left out when empty); otherwise which one does not.
    fn check(&self) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + '_>>;
}

/// Adds to a service's routes what every service has: `/metrics`, `/health/*`, request ids,
/// metrics, and problem+json for every error. The routes are extended in place (no extra
/// nesting level: every level costs each request a boxed future).
pub fn service_endpoint(
    routes: Route,
    metrics: Metrics,
    readiness: Arc<dyn Readiness>,
) -> impl Endpoint + 'static {
    let metrics_for_route = metrics.clone();
    routes
        .at(
            "/metrics",
            get(poem::endpoint::make_sync(move |_| {
                Response::builder()
                    .content_type("text/plain; version=0.0.4")
                    .body(metrics_for_route.render())
            })),
        )
        .at("/health/live", get(live))
        .at(
            "/health/ready",
            get(poem::endpoint::make(move |_| {
                let readiness = readiness.clone();
                async move {
                    match readiness.check().await {
                        Ok(detail) if detail.is_empty() => {
                            Ok(Json(serde_json::json!({"status": "ready"})).into_response())
                        }
                        Ok(detail) => Ok(Json(
                            serde_json::json!({"status": "ready", "detail": detail}),
                        )
                        .into_response()),
                        Err(reason) => Err(Problem::unavailable("not_ready", reason)),
                    }
                }
            })),
        )
        .around(move |endpoint, mut request| {
            let metrics = metrics.clone();
            async move {
                let started = Instant::now();
                let request_id = request_id_of(&request);
                let header = poem::http::HeaderValue::from_str(&request_id).ok();
                if let Some(value) = &header {
                    request.headers_mut().insert(REQUEST_ID_HEADER, value.clone());
                }
                let method = request.method().clone();
                let span = tracing::info_span!("request", request_id = %request_id, method = %method, path = %request.uri().path());
                // Every error, the framework's own included, leaves as problem+json.
                let mut response = tracing::Instrument::instrument(endpoint.call(request), span)
                    .await
                    .unwrap_or_else(crate::front::error_response);
                if let Some(value) = header {
                    response.headers_mut().insert(REQUEST_ID_HEADER, value);
                }
                metrics.observe_http(method.as_str(), response.status().as_u16(), started.elapsed());
                Ok::<_, poem::Error>(response)
            }
        })
}

#[handler]
fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "live"}))
}

/// The text of a request header whatever bytes it holds (bytes that are not UTF-8 become
/// U+FFFD), or `None` when the request has none.
///
/// poem-openapi's `Header<Option<String>>` takes a value that is not visible ASCII for a
/// missing header: `Idempotency-Key: café` would be dropped, and the create it guards would no
/// longer be idempotent. An operation falls back to this, so that its own check refuses the
/// value by name.
pub fn header_text(request: &Request, name: &str) -> Option<String> {
    request
        .headers()
        .get(name)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
}

/// The client's request id when it is sane, else a new one.
pub fn request_id_of(request: &Request) -> String {
    request_id_from(request.headers())
}

/// The request id in these headers when it is sane, else a new one.
pub fn request_id_from(headers: &poem::http::HeaderMap) -> String {
    request_id_or_new(
        headers
            .get(REQUEST_ID_HEADER)
            .map(poem::http::HeaderValue::as_bytes),
    )
}

/// The client's request id (the header's value) when it is sane, else a new one.
pub fn request_id_or_new(given: Option<&[u8]>) -> String {
    given
        .filter(|id| {
            !id.is_empty()
                && id.len() <= MAX_REQUEST_ID_LEN
                && id
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
        })
        // Sane ids are ASCII, so this never fails.
        .and_then(|id| std::str::from_utf8(id).ok())
        .map_or_else(new_request_id, str::to_owned)
}

/// A new request id: a random per-process prefix and a counter, unique without a system call
/// per request.
pub fn new_request_id() -> String {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static PREFIX: OnceLock<String> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| uuid::Uuid::new_v4().simple().to_string()[..12].to_owned());
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Twelve hex digits written by hand: the formatting machinery costs more than the rest of
    // an id, and every request without one gets one.
    let mut id = String::with_capacity(24);
    id.push_str(prefix);
    for shift in (0..12).rev() {
        let digit = (count >> (shift * 4)) & 0xf;
        id.push(char::from(
            b"0123456789abcdef"[usize::try_from(digit).unwrap_or(0)],
        ));
    }
    id
}

/// A bound listener, so tests can bind port 0 and learn the port before serving.
#[derive(Debug)]
pub struct BoundListener {
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
    limits: ConnectionLimits,
}

impl BoundListener {
    /// Binds the address now; failures name it.
    pub async fn bind(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|err| anyhow::anyhow!("cannot listen on {addr}: {err}"))?;
        let local_addr = listener
            .local_addr()
            .map_err(|err| anyhow::anyhow!("listener on {addr} has no address: {err}"))?;
        Ok(BoundListener {
            listener,
            local_addr,
            limits: ConnectionLimits::default(),
        })
    }

    /// Serves with these times and this bound on connections instead of the defaults
    /// ([`crate::front::HEAD_TIMEOUT`] and the others).
    pub fn with_limits(mut self, limits: ConnectionLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The address actually bound (the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` resolves, then drains requests in flight for at most
    /// [`SHUTDOWN_GRACE`].
    pub async fn serve(
        self,
        endpoint: impl Endpoint + 'static,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        crate::front::serve(
            self.listener,
            endpoint,
            NoHotRoute,
            None,
            Loops::Shared,
            self.limits,
            shutdown,
        )
        .await
    }

    /// Serves like [`BoundListener::serve`], answering `hot`'s requests ahead of the endpoint
    /// (see [`crate::front`]) on `loops`; `metrics` counts them as the edge counts the others.
    pub async fn serve_with_hot_route(
        self,
        endpoint: impl Endpoint + 'static,
        hot: impl HotRoute,
        metrics: Metrics,
        loops: Loops,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        crate::front::serve(
            self.listener,
            endpoint,
            hot,
            Some(metrics),
            loops,
            self.limits,
            shutdown,
        )
        .await
    }
}

/// Resolves on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown requested");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        amount: i64,
        inner: Option<Inner>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        mode: String,
    }

    #[test]
    fn strict_parsing_names_the_field_at_fault() {
        let err = parse_strict::<Body>(br#"{"amount": "x"}"#).unwrap_err();
        assert_eq!(
            (err.code, err.field.as_deref()),
            ("invalid_field", Some("amount"))
        );
        let err = parse_strict::<Body>(br#"{"amount": 1, "extra": 2}"#).unwrap_err();
        assert_eq!(
            (err.code, err.field.as_deref()),
            ("unknown_field", Some("extra"))
        );
        let err =
            parse_strict::<Body>(br#"{"amount": 1, "inner": {"mode": "a", "x": 1}}"#).unwrap_err();
        assert_eq!(
            (err.code, err.field.as_deref()),
            ("unknown_field", Some("inner.x"))
        );
        let err = parse_strict::<Body>(br#"{"amount": 1"#).unwrap_err();
        assert_eq!(err.code, "malformed_json");
        let err = parse_strict::<Body>(br#"{"amount": 1} trailing"#).unwrap_err();
        assert_eq!(err.code, "malformed_json");
        let err = parse_strict::<Body>(br#"{}"#).unwrap_err();
        assert_eq!(
            (err.code, err.field.as_deref()),
            ("missing_field", Some("amount"))
        );
        let err = parse_strict::<Body>(br#"[1]"#).unwrap_err();
        assert_eq!(err.code, "invalid_field");
        assert!(parse_strict::<Body>(br#"{"amount": 1}"#).is_ok());
    }

    #[test]
    fn new_request_ids_are_a_prefix_and_a_hex_counter() {
        let (first, second) = (new_request_id(), new_request_id());
        for id in [&first, &second] {
            assert_eq!(id.len(), 24, "{id}");
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
                "{id}"
            );
        }
        assert_eq!(first[..12], second[..12], "one prefix per process");
        let count = |id: &str| u64::from_str_radix(&id[12..], 16).unwrap();
        assert!(count(&second) > count(&first), "{first} then {second}");
    }
}
