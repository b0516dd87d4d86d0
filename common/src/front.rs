//! The HTTP/1.1 server in front of every service: hyper's connection driver with one optional
//! *hot route* answered before the framework, and everything else handed to the poem endpoint.
//!
//! A seckill's grab is one small request repeated tens of thousands of times a second. Through
//! poem every request crosses the route tree, the edge middleware and poem-openapi's extractors,
//! each a boxed future whose state machine is moved on every call. The hot route is a plain
//! async function over hyper's request: it answers the grab the documented operation describes,
//! with the same checks and the same answers (each service's tests compare the two), and may
//! hand any request it does not want (an unusual content type, say) to the framework untouched.
//! The front gives it what the edge gives every request: a request id (the client's when sane),
//! a tracing span, the id echoed on the answer, and the HTTP metrics.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use poem::http::{HeaderValue, Method, StatusCode, header};
use poem::web::{LocalAddr, RemoteAddr};
use poem::{Endpoint, IntoResponse};
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::http::{REQUEST_ID_HEADER, SHUTDOWN_GRACE, request_id_from};
use crate::problem::problem_from_error;
use crate::telemetry::Metrics;

/// A response body: bytes built by a hot route, or whatever the framework streams.
pub type Body = Either<Full<Bytes>, BoxBody<Bytes, std::io::Error>>;
/// A request as the front receives it.
pub type HotRequest = hyper::Request<Incoming>;
/// A response as the front sends it.
pub type Answer = hyper::Response<Body>;

/// One route served ahead of the framework.
pub trait HotRoute: Send + Sync + 'static {
    /// Whether a request with this method and path is this route's.
    fn matches(&self, method: &Method, path: &str) -> bool;

    /// Answers a matched request, or gives it back untouched (body unread) for the framework
    /// to answer. `request_id` is the request's id (the client's when sane, else a new one).
    fn call(
        &self,
        request: HotRequest,
        request_id: &str,
    ) -> impl Future<Output = Result<Answer, HotRequest>> + Send;
}

/// No hot route: every request goes to the framework.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHotRoute;

impl HotRoute for NoHotRoute {
    fn matches(&self, _method: &Method, _path: &str) -> bool {
        false
    }

    async fn call(&self, request: HotRequest, _request_id: &str) -> Result<Answer, HotRequest> {
        Err(request)
    }
}

/// The one path segment between `prefix` and `suffix` (`/campaigns/` and `/grab`), when the
/// path is that and the segment is plain: a segment with `%` is left to the framework, which
/// decodes it.
pub fn path_segment<'a>(path: &'a str, prefix: &str, suffix: &str) -> Option<&'a str> {
    let segment = path.strip_prefix(prefix)?.strip_suffix(suffix)?;
    (!segment.is_empty() && !segment.contains(['/', '%'])).then_some(segment)
}

/// A JSON answer with the given status.
pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Answer {
    let mut answer = hyper::Response::new(Either::Left(Full::new(body.into())));
    *answer.status_mut() = status;
    answer.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    answer
}

/// A framework response as the front sends it.
pub fn from_poem(response: poem::Response) -> Answer {
    hyper::Response::<BoxBody<Bytes, std::io::Error>>::from(response).map(Either::Right)
}

/// A framework error as the service edge answers it: a ready response as it is, anything else
/// as problem+json.
pub fn error_response(err: poem::Error) -> poem::Response {
    if err.is_from_response() {
        err.into_response()
    } else {
        problem_from_error(err).into_response()
    }
}

/// What every connection of one server shares.
struct Shared<E, R> {
    endpoint: E,
    hot: R,
    /// Where the hot route's requests are counted (the edge counts the others).
    metrics: Option<Metrics>,
    local_addr: SocketAddr,
}

impl<E: Endpoint, R: HotRoute> Shared<E, R> {
    async fn answer(&self, request: HotRequest, remote_addr: SocketAddr) -> Answer {
        let request = if self.hot.matches(request.method(), request.uri().path()) {
            match self.answer_hot(request).await {
                Ok(answer) => return answer,
                Err(request) => request,
            }
        } else {
            request
        };
        let request = poem::Request::from((
            request,
            LocalAddr(self.local_addr.into()),
            RemoteAddr(remote_addr.into()),
            poem::http::uri::Scheme::HTTP,
        ));
        from_poem(self.endpoint.get_response(request).await)
    }

    /// The hot route with the edge's duties around it.
    async fn answer_hot(&self, request: HotRequest) -> Result<Answer, HotRequest> {
        let started = Instant::now();
        let request_id = request_id_from(request.headers());
        let method = request.method().clone();
        let span = tracing::info_span!("request", request_id = %request_id, method = %method, path = %request.uri().path());
        let mut answer = self.hot.call(request, &request_id).instrument(span).await?;
        if let Ok(value) = HeaderValue::from_str(&request_id) {
            answer.headers_mut().insert(REQUEST_ID_HEADER, value);
        }
        if let Some(metrics) = &self.metrics {
            metrics.observe_http(method.as_str(), answer.status().as_u16(), started.elapsed());
        }
        Ok(answer)
    }
}

/// How a server drives its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Loops {
    /// On the process's multi-threaded runtime, like every other task.
    #[default]
    Shared,
    /// On this many threads, each a single-threaded event loop owning the connections handed
    /// to it (round robin): a request is read, answered and its upstream call made on one
    /// thread, with no work stealing and no cross-thread wake-ups, as nginx's workers do.
    Threads(usize),
}

/// The largest number of event-loop threads.
pub const MAX_LOOP_THREADS: usize = 64;

impl Loops {
    /// One event loop per core, as nginx's `worker_processes auto`.
    pub fn per_core() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        Loops::Threads(cores.min(MAX_LOOP_THREADS))
    }

    /// `RP_HTTP_THREADS`: 0 serves on the shared runtime, N on N event loops; `default` when
    /// unset.
    pub fn from_source(
        source: &crate::config::ConfigSource,
        default: Loops,
    ) -> Result<Self, crate::ConfigError> {
        if !source.is_set("RP_HTTP_THREADS") {
            return Ok(default);
        }
        let threads: usize = source.or("RP_HTTP_THREADS", 0)?;
        match threads {
            0 => Ok(Loops::Shared),
            1..=MAX_LOOP_THREADS => Ok(Loops::Threads(threads)),
            _ => Err(crate::ConfigError::Malformed {
                var: "RP_HTTP_THREADS".into(),
                shown: format!(" `{threads}`"),
                reason: format!("at most {MAX_LOOP_THREADS} (0 serves on the shared runtime)"),
            }),
        }
    }
}

thread_local! {
    static LOOP_INDEX: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The index of the event-loop thread running the caller, if it runs on one (state kept per
/// loop, like a connection pool, is indexed by it).
pub fn loop_index() -> Option<usize> {
    LOOP_INDEX.with(std::cell::Cell::get)
}

/// Serves HTTP/1.1 on `listener` until `shutdown` resolves, then lets requests in flight finish
/// for at most [`SHUTDOWN_GRACE`].
pub async fn serve<E, R>(
    listener: TcpListener,
    endpoint: E,
    hot: R,
    metrics: Option<Metrics>,
    loops: Loops,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()>
where
    E: Endpoint + 'static,
    R: HotRoute,
{
    let local_addr = listener.local_addr()?;
    let shared = Arc::new(Shared {
        endpoint,
        hot,
        metrics,
        local_addr,
    });
    let Loops::Threads(threads) = loops else {
        let (connections, accepted) = tokio::sync::mpsc::unbounded_channel();
        let (served, ()) = tokio::join!(drive(shared, accepted), async move {
            accept(listener, &[connections], shutdown).await;
        });
        return served;
    };
    let mut senders = Vec::with_capacity(threads);
    let mut finished = Vec::with_capacity(threads);
    for index in 0..threads {
        let (connections, accepted) = tokio::sync::mpsc::unbounded_channel();
        let (done, finished_rx) = tokio::sync::oneshot::channel();
        let shared = shared.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name(format!("http-loop-{index}"))
            .spawn(move || {
                LOOP_INDEX.with(|slot| slot.set(Some(index)));
                let _ = done.send(runtime.block_on(drive(shared, accepted)));
            })?;
        senders.push(connections);
        finished.push(finished_rx);
    }
    accept(listener, &senders, shutdown).await;
    // The loops finish once every sender is gone.
    drop(senders);
    for finished in finished {
        finished
            .await
            .map_err(|_| anyhow::anyhow!("an event-loop thread ended abnormally"))??;
    }
    Ok(())
}

/// A connection accepted, on its way to the loop that serves it.
type Accepted = (std::net::TcpStream, SocketAddr);

/// Accepts until `shutdown` resolves, handing connections to the loops in turn; returning drops
/// the senders, which tells the loops to finish.
async fn accept(
    listener: TcpListener,
    loops: &[tokio::sync::mpsc::UnboundedSender<Accepted>],
    shutdown: impl Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    for next in (0..loops.len()).cycle() {
        let (stream, remote_addr) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %err, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Answers are written whole; Nagle would only hold them back for a delayed ACK.
        let _ = stream.set_nodelay(true);
        // Moved between runtimes as a plain socket; the loop registers it with its own reactor.
        match stream.into_std() {
            Ok(stream) => {
                let _ = loops[next].send((stream, remote_addr));
            }
            Err(err) => tracing::warn!(error = %err, "handing a connection over failed"),
        }
    }
}

/// Serves the connections handed over until the acceptor stops, then drains them for at most
/// [`SHUTDOWN_GRACE`].
async fn drive<E, R>(
    shared: Arc<Shared<E, R>>,
    mut accepted: tokio::sync::mpsc::UnboundedReceiver<Accepted>,
) -> anyhow::Result<()>
where
    E: Endpoint + 'static,
    R: HotRoute,
{
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder.keep_alive(true);
    while let Some((stream, remote_addr)) = accepted.recv().await {
        let stream = match tokio::net::TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "registering a connection failed");
                continue;
            }
        };
        let shared = shared.clone();
        let service = hyper::service::service_fn(move |request: HotRequest| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(shared.answer(request, remote_addr).await) }
        });
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_s = SHUTDOWN_GRACE.as_secs(),
            "requests still in flight after the grace period were cut"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigSource;

    fn loops(value: Option<&str>) -> Result<Loops, crate::ConfigError> {
        let pairs = value.map(|value| ("RP_HTTP_THREADS".to_owned(), value.to_owned()));
        let source = ConfigSource::from_environment(pairs).unwrap();
        Loops::from_source(&source, Loops::Threads(7))
    }

    #[test]
    fn a_path_segment_is_plain_and_whole() {
        let segment = |path| path_segment(path, "/campaigns/", "/grab");
        assert_eq!(segment("/campaigns/42/grab"), Some("42"));
        for other in [
            "/campaigns//grab",
            "/campaigns/4/2/grab",
            "/campaigns/%34/grab",
            "/campaigns/42/grabs",
            "/v1/campaigns/42/grab",
        ] {
            assert_eq!(segment(other), None, "{other}");
        }
    }

    #[test]
    fn the_loop_setting_is_bounded_and_named_when_wrong() {
        assert_eq!(
            loops(None).unwrap(),
            Loops::Threads(7),
            "unset: the default"
        );
        assert_eq!(loops(Some("0")).unwrap(), Loops::Shared);
        assert_eq!(loops(Some("2")).unwrap(), Loops::Threads(2));
        assert_eq!(loops(Some("64")).unwrap(), Loops::Threads(64));
        for bad in ["65", "-1", "two"] {
            let err = loops(Some(bad)).unwrap_err().to_string();
            assert!(err.contains("RP_HTTP_THREADS"), "{bad}: {err}");
        }
        assert!(matches!(
            Loops::per_core(),
            Loops::Threads(1..=MAX_LOOP_THREADS)
        ));
    }
}
