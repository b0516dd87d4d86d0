//! The HTTP/1.1 server in front of every service: one optional *hot route* answered on
//! connections the front reads and writes itself, and everything else handed to hyper's
//! connection driver and the poem endpoint behind it.
//!
//! A seckill's grab is one small request repeated tens of thousands of times a second. Through
//! poem every request crosses the route tree, the edge middleware and poem-openapi's extractors,
//! each a boxed future whose state machine is moved on every call; through hyper alone it still
//! gets a header map, a request and a response object, a body channel and the dispatcher's
//! bookkeeping. A connection therefore starts in the front's own loop: each request head is
//! parsed in place (`httparse`, no copy) and, when it is the hot route's and plain (HTTP/1.1,
//! a `Content-Length` body within the route's bound, no `Transfer-Encoding`, `Expect` or
//! `Upgrade` header, `Connection` at most `keep-alive`), answered there and written in one
//! buffer. The first request that is anything else (another route, a chunked body, a malformed
//! head) hands the connection, with the bytes already read, to hyper, which serves it from then
//! on: the unusual cases get hyper's answers, exactly as before the loop existed.
//!
//! The hot route answers what the documented operation describes, with the same checks and the
//! same answers (each service's tests compare the two), whichever of the two drives the
//! connection, and may leave any request it does not want (an unusual content type, say) to
//! the framework. The front gives it what the edge gives every request: a request id (the
//! client's when sane), a tracing span, the id echoed on the answer, and the HTTP metrics.
//!
//! No connection is held for free ([`ConnectionLimits`]): a request head must arrive whole
//! within [`HEAD_TIMEOUT`] (from the accept for a connection's first request, from its first
//! byte for a later one: a head dribbled a byte at a time is cut at the deadline of the whole
//! head), a keep-alive connection is closed when its next request has not begun
//! [`KEEP_ALIVE_TIMEOUT`] after an answer, and a server holds at most [`MAX_CONNECTIONS`]
//! connections: one more is answered 503 with `Retry-After` at once and closed, never left in
//! the listen backlog. Both drivers keep these times: the front's loop with one timer per
//! connection, moved rather than replaced, and hyper through a watch on the connection's reads
//! and answers.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use poem::http::{HeaderMap, HeaderValue, StatusCode, header};
use poem::web::{LocalAddr, RemoteAddr};
use poem::{Endpoint, IntoResponse};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::Instrument;

use crate::http::{
    DEFAULT_BODY_LIMIT_BYTES, REQUEST_ID_HEADER, SHUTDOWN_GRACE, read_body_limited,
    request_id_or_new,
};
use crate::problem::{Problem, problem_from_error};
use crate::telemetry::Metrics;

/// A response body: bytes built by a hot route, or whatever the framework streams.
pub type Body = Either<Full<Bytes>, BoxBody<Bytes, std::io::Error>>;
/// A request as hyper hands it over.
pub type HyperRequest = hyper::Request<Incoming>;
/// A response as hyper sends it.
pub type Answer = hyper::Response<Body>;

/// The longest request head the front's own loop reads; a longer one goes to hyper, whose
/// bounds then apply.
pub const HOT_HEAD_MAX_BYTES: usize = 16 * 1024;
/// The most header fields the front's own loop parses; a request with more goes to hyper.
pub const HOT_HEADERS_MAX: usize = 32;

/// The longest a request head may take to arrive: from the accept for a connection's first
/// request, from its first byte for a later one (hyper's default; nginx's
/// `client_header_timeout` is 60 s). A head is a few hundred bytes sent at once: only a broken
/// or hostile client needs longer. In the front's own loop the hot route's bounded body is due
/// by the same deadline.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest a keep-alive connection waits, after an answer, for the first byte of its next
/// request (nginx's `keepalive_timeout`); the front's loop also cuts an answer the client has
/// not taken within it. Longer than the idle time of the pooled clients in front of a service
/// (60 s for the gateway's hyper client and the saga worker's, and for a load balancer as
/// usually set), so that such a client drops an idle connection before the server closes it
/// under a request; the gateway's grab relay ([`crate::wire::WirePool`]) checks a pooled
/// connection for the server's close before reusing it.
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(75);
/// Connections one server holds open at once; one more is answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 10_000;
/// The largest `RP_MAX_CONNECTIONS`.
pub const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;

/// How long a connection may take and how many a server holds: what keeps a connection from
/// being held for free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// See [`HEAD_TIMEOUT`].
    pub head_timeout: Duration,
    /// See [`KEEP_ALIVE_TIMEOUT`].
    pub keep_alive_timeout: Duration,
    /// See [`MAX_CONNECTIONS`]. Lowered at start to half the open files the process may have
    /// (after raising its soft limit as far as needed), so that refusing stays possible.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            head_timeout: HEAD_TIMEOUT,
            keep_alive_timeout: KEEP_ALIVE_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

impl ConnectionLimits {
    /// `RP_MAX_CONNECTIONS` (1 to [`MAX_CONNECTIONS_LIMIT`]), `RP_HEAD_TIMEOUT_MS` and
    /// `RP_KEEP_ALIVE_TIMEOUT_MS` (1 to 600,000); the defaults when unset.
    pub fn from_source(source: &crate::config::ConfigSource) -> Result<Self, crate::ConfigError> {
        let millis = |var: &str, default: Duration| -> Result<Duration, crate::ConfigError> {
            let default = u64::try_from(default.as_millis()).unwrap_or(u64::MAX);
            let value: u64 = source.or(var, default)?;
            if !(1..=600_000).contains(&value) {
                return Err(crate::ConfigError::Malformed {
                    var: var.to_owned(),
                    shown: format!(" `{value}`"),
                    reason: "must be between 1 and 600000 milliseconds".into(),
                });
            }
            Ok(Duration::from_millis(value))
        };
        let max_connections: usize = source.or("RP_MAX_CONNECTIONS", MAX_CONNECTIONS)?;
        if !(1..=MAX_CONNECTIONS_LIMIT).contains(&max_connections) {
            return Err(crate::ConfigError::Malformed {
                var: "RP_MAX_CONNECTIONS".into(),
                shown: format!(" `{max_connections}`"),
                reason: format!("must be between 1 and {MAX_CONNECTIONS_LIMIT}"),
            });
        }
        Ok(ConnectionLimits {
            head_timeout: millis("RP_HEAD_TIMEOUT_MS", HEAD_TIMEOUT)?,
            keep_alive_timeout: millis("RP_KEEP_ALIVE_TIMEOUT_MS", KEEP_ALIVE_TIMEOUT)?,
            max_connections,
        })
    }
}

/// Raises the process's soft limit on open files to `wanted` when it is lower (at most to the
/// hard limit, as Go's runtime does at start) and answers the soft limit then in force; `None`
/// where it cannot be read.
pub fn raise_open_files_limit(wanted: usize) -> Option<usize> {
    #[cfg(unix)]
    {
        use nix::libc::rlim_t;
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
        let wanted = rlim_t::try_from(wanted).unwrap_or(rlim_t::MAX);
        let soft = if soft < wanted {
            let raised = wanted.min(hard);
            match setrlimit(Resource::RLIMIT_NOFILE, raised, hard) {
                Ok(()) => raised,
                Err(_) => soft,
            }
        } else {
            soft
        };
        Some(usize::try_from(soft).unwrap_or(usize::MAX))
    }
    #[cfg(not(unix))]
    {
        let _ = wanted;
        None
    }
}

/// The bound on connections a server keeps: `wanted`, or half the open files the process may
/// have when that is less (each connection may need a second descriptor, for an upstream or a
/// database, and refusing one more needs a descriptor too).
fn connection_bound(wanted: usize) -> usize {
    let Some(open_files) = raise_open_files_limit(wanted.saturating_mul(2)) else {
        return wanted;
    };
    let bound = wanted.min(open_files / 2).max(1);
    if bound < wanted {
        tracing::warn!(
            wanted,
            bound,
            open_files,
            "the open-files limit is too low for the bound on connections; raise it (ulimit -n)"
        );
    }
    bound
}

/// The head of a request as a hot route sees it: parsed in place by the front's loop, or
/// hyper's on a connection hyper drives.
#[derive(Debug, Clone, Copy)]
pub struct Head<'a> {
    method: &'a str,
    path: &'a str,
    headers: Headers<'a>,
}

#[derive(Debug, Clone, Copy)]
enum Headers<'a> {
    Parsed(&'a [httparse::Header<'a>]),
    Map(&'a HeaderMap),
}

impl<'a> Head<'a> {
    /// The method, as sent (methods are case-sensitive).
    pub fn method(&self) -> &'a str {
        self.method
    }

    /// The path, without the query.
    pub fn path(&self) -> &'a str {
        self.path
    }

    /// The value of the first header field named `name` (lower case), if any.
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        match self.headers {
            Headers::Parsed(headers) => headers
                .iter()
                .find(|field| field.name.eq_ignore_ascii_case(name))
                .map(|field| field.value),
            Headers::Map(map) => map.get(name).map(HeaderValue::as_bytes),
        }
    }
}

/// What a hot route answers.
#[derive(Debug)]
pub enum Reply {
    /// A JSON body with this status, the common case, written without a header map.
    Json(StatusCode, Bytes),
    /// A framework response (a problem, say), sent as it is.
    Response(poem::Response),
}

impl Reply {
    /// The answer's status.
    pub fn status(&self) -> StatusCode {
        match self {
            Reply::Json(status, _) => *status,
            Reply::Response(response) => response.status(),
        }
    }
}

/// One route served ahead of the framework.
pub trait HotRoute: Send + Sync + 'static {
    /// Whether this route answers a request with this head; any other request goes to the
    /// framework, untouched.
    fn wants(&self, head: &Head<'_>) -> bool;

    /// The largest body the route reads; a longer one is refused (413 `payload_too_large`)
    /// before the route is called.
    fn body_limit(&self) -> usize {
        DEFAULT_BODY_LIMIT_BYTES
    }

    /// Answers a request it wants. `request_id` is the request's id (the client's when sane,
    /// else a new one).
    fn call(
        &self,
        head: &Head<'_>,
        body: &[u8],
        request_id: &str,
    ) -> impl Future<Output = Reply> + Send;
}

/// No hot route: every request goes to the framework.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHotRoute;

impl HotRoute for NoHotRoute {
    fn wants(&self, _head: &Head<'_>) -> bool {
        false
    }

    async fn call(&self, _head: &Head<'_>, _body: &[u8], _request_id: &str) -> Reply {
        Reply::Response(StatusCode::NOT_FOUND.into_response())
    }
}

/// The one path segment between `prefix` and `suffix` (`/campaigns/` and `/grab`), when the
/// path is that and the segment is plain: a segment with `%` is left to the framework, which
/// decodes it.
pub fn path_segment<'a>(path: &'a str, prefix: &str, suffix: &str) -> Option<&'a str> {
    let segment = path.strip_prefix(prefix)?.strip_suffix(suffix)?;
    (!segment.is_empty() && !segment.contains(['/', '%'])).then_some(segment)
}

/// The JSON content type the hot answers carry.
const JSON_CONTENT_TYPE: &str = "application/json; charset=utf-8";

/// A JSON answer with the given status, as hyper sends it.
pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Answer {
    let mut answer = hyper::Response::new(Either::Left(Full::new(body.into())));
    *answer.status_mut() = status;
    answer.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(JSON_CONTENT_TYPE),
    );
    answer
}

/// A framework response as hyper sends it.
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
    /// How hyper drives a connection handed to it.
    http1: http1::Builder,
    limits: ConnectionLimits,
}

impl<E: Endpoint, R: HotRoute> Shared<E, R> {
    /// A request on a connection hyper drives: the hot route's when it wants it, else the
    /// framework's.
    async fn answer(&self, request: HyperRequest, remote_addr: SocketAddr) -> Answer {
        let (parts, body) = request.into_parts();
        let head = Head {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            headers: Headers::Map(&parts.headers),
        };
        if self.hot.wants(&head) {
            let body = read_body_limited(body, self.hot.body_limit()).await;
            let body = body.as_deref().map_err(Clone::clone);
            let (reply, request_id) = self.answer_hot(&head, body).await;
            let mut answer = match reply {
                Reply::Json(status, body) => json(status, body),
                Reply::Response(response) => from_poem(response),
            };
            if let Ok(value) = HeaderValue::from_str(&request_id) {
                answer.headers_mut().insert(REQUEST_ID_HEADER, value);
            }
            return answer;
        }
        let request = poem::Request::from((
            hyper::Request::from_parts(parts, body),
            LocalAddr(self.local_addr.into()),
            RemoteAddr(remote_addr.into()),
            poem::http::uri::Scheme::HTTP,
        ));
        from_poem(self.endpoint.get_response(request).await)
    }

    /// The hot route with the edge's duties around it: the request id, the span, the metrics.
    /// A body already refused is answered with its problem.
    async fn answer_hot(&self, head: &Head<'_>, body: Result<&[u8], Problem>) -> (Reply, String) {
        let started = Instant::now();
        let request_id = request_id_or_new(head.header(REQUEST_ID_HEADER));
        let reply = match body {
            Ok(body) => {
                let span = tracing::info_span!("request", request_id = %request_id, method = %head.method, path = %head.path);
                let call = self.hot.call(head, body, &request_id);
                // Logging at `warn` (the load setting) disables the span: no wrapper then.
                if span.is_disabled() {
                    call.await
                } else {
                    call.instrument(span).await
                }
            }
            Err(problem) => Reply::Response(problem.into_response()),
        };
        if let Some(metrics) = &self.metrics {
            metrics.observe_http(head.method, reply.status().as_u16(), started.elapsed());
        }
        (reply, request_id)
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
/// for at most [`SHUTDOWN_GRACE`]. Every connection keeps `limits`.
pub async fn serve<E, R>(
    listener: TcpListener,
    endpoint: E,
    hot: R,
    metrics: Option<Metrics>,
    loops: Loops,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()>
where
    E: Endpoint + 'static,
    R: HotRoute,
{
    let local_addr = listener.local_addr()?;
    let mut http1 = http1::Builder::new();
    http1.keep_alive(true);
    // hyper's own head timer starts when it waits for a head, so it would count the keep-alive
    // wait as part of the next head and close an idle connection after the head's time; the
    // connection's watch keeps both times instead (see `serve_connection`).
    http1.header_read_timeout(None);
    let slots = Arc::new(Semaphore::new(connection_bound(limits.max_connections)));
    let acceptor = Acceptor {
        listener,
        slots,
        refusal: refusal().await,
    };
    let shared = Arc::new(Shared {
        endpoint,
        hot,
        metrics,
        local_addr,
        http1,
        limits,
    });
    let Loops::Threads(threads) = loops else {
        let (connections, accepted) = mpsc::unbounded_channel();
        let (served, ()) = tokio::join!(drive(shared, accepted), async move {
            acceptor.run(&[connections], shutdown).await;
        });
        return served;
    };
    let mut senders = Vec::with_capacity(threads);
    let mut finished = Vec::with_capacity(threads);
    for index in 0..threads {
        let (connections, accepted) = mpsc::unbounded_channel();
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
    acceptor.run(&senders, shutdown).await;
    // The loops finish once every sender is gone.
    drop(senders);
    for finished in finished {
        finished
            .await
            .map_err(|_| anyhow::anyhow!("an event-loop thread ended abnormally"))??;
    }
    Ok(())
}

/// A connection accepted, on its way to the loop that serves it, with its slot under the
/// bound (given back when the connection ends).
type Accepted = (std::net::TcpStream, SocketAddr, OwnedSemaphorePermit);

/// The listener, the slots of the bound on connections, and the answer to one too many.
struct Acceptor {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    refusal: Vec<u8>,
}

impl Acceptor {
    /// Accepts until `shutdown` resolves, handing connections to the loops in turn; returning
    /// drops the senders, which tells the loops to finish. A connection over the bound is
    /// refused at once: the loop never waits for a slot, so it always sees the shutdown.
    async fn run(
        self,
        loops: &[mpsc::UnboundedSender<Accepted>],
        shutdown: impl Future<Output = ()> + Send,
    ) {
        tokio::pin!(shutdown);
        for next in (0..loops.len()).cycle() {
            let (stream, remote_addr) = tokio::select! {
                () = &mut shutdown => return,
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors and the like: wait a little rather than spin.
                        tracing::warn!(error = %err, "accepting a connection failed");
                        tokio::select! {
                            () = &mut shutdown => return,
                            () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                        }
                    }
                },
            };
            // Answers are written whole; Nagle would only hold them back for a delayed ACK.
            let _ = stream.set_nodelay(true);
            // Moved between runtimes as a plain socket; the loop registers it with its own
            // reactor.
            let stream = match stream.into_std() {
                Ok(stream) => stream,
                Err(err) => {
                    tracing::warn!(error = %err, "handing a connection over failed");
                    continue;
                }
            };
            match self.slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    let _ = loops[next].send((stream, remote_addr, slot));
                }
                Err(_) => refuse(&stream, &self.refusal),
            }
        }
    }
}

/// The answer to a connection over the bound: 503 `overloaded` with `Retry-After`, and
/// `Connection: close`, built once per server (no `Date`: a 5xx may go without one, and no
/// request id: no request is read).
async fn refusal() -> Vec<u8> {
    let mut response = Problem::unavailable(
        "overloaded",
        "the server is at its bound of open connections; retry shortly",
    )
    .into_response();
    // A problem's body is in memory: it always reads.
    let body = response.take_body().into_bytes().await.unwrap_or_default();
    let mut out = Vec::with_capacity(256 + body.len());
    status_line(&mut out, response.status());
    for (name, value) in response.headers() {
        field(&mut out, name.as_str(), value.as_bytes());
    }
    field(&mut out, "connection", b"close");
    let mut length = itoa::Buffer::new();
    field(
        &mut out,
        "content-length",
        length.format(body.len()).as_bytes(),
    );
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    out
}

/// Refuses a connection over the bound without a task or a wait: one read of what the client
/// already sent (closing a socket with unread bytes resets it, and a reset can destroy the
/// answer before the client reads it), one write of the answer, then the close.
fn refuse(stream: &std::net::TcpStream, answer: &[u8]) {
    use std::io::{Read, Write};
    // The socket is non-blocking (tokio made it so): neither call waits.
    let mut sent = [0u8; 2048];
    let _ = (&*stream).read(&mut sent);
    let _ = (&*stream).write(answer);
}

/// Serves the connections handed over until the acceptor stops, then lets them finish the
/// requests they are answering for at most [`SHUTDOWN_GRACE`]: idle connections close at once,
/// busy ones after their answer.
async fn drive<E, R>(
    shared: Arc<Shared<E, R>>,
    mut accepted: mpsc::UnboundedReceiver<Accepted>,
) -> anyhow::Result<()>
where
    E: Endpoint + 'static,
    R: HotRoute,
{
    let (stop, stopping) = watch::channel(false);
    // Every connection holds a clone; `recv` answers `None` once the last one has ended.
    let (alive, mut all_ended) = mpsc::channel::<Infallible>(1);
    while let Some((stream, remote_addr, slot)) = accepted.recv().await {
        let stream = match TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "registering a connection failed");
                continue;
            }
        };
        let (shared, stopping, alive) = (shared.clone(), stopping.clone(), alive.clone());
        tokio::spawn(async move {
            serve_connection(shared, stream, remote_addr, stopping).await;
            drop(slot);
            drop(alive);
        });
    }
    let _ = stop.send(true);
    drop(alive);
    if tokio::time::timeout(SHUTDOWN_GRACE, all_ended.recv())
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

/// Resolves once the server is stopping.
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    // An error means the server is gone: stopped too.
    let _ = stopping.wait_for(|stop| *stop).await;
}

/// One connection: hot requests answered in the front's own loop, then, from the first request
/// that is not one, hyper. Either closes the connection at its deadline (see
/// [`ConnectionLimits`]).
async fn serve_connection<E, R>(
    shared: Arc<Shared<E, R>>,
    mut stream: TcpStream,
    remote_addr: SocketAddr,
    mut stopping: watch::Receiver<bool>,
) where
    E: Endpoint + 'static,
    R: HotRoute,
{
    let limits = shared.limits;
    let mut buffer = BytesMut::with_capacity(4096);
    let mut out = Vec::with_capacity(1024);
    // One wait for the stop for the connection's whole life: it registers with the signal
    // once, not once per request.
    let stop = stopped(&mut stopping);
    tokio::pin!(stop);
    // One timer for the connection's whole life too, moved to each new deadline: moving it
    // later (after an answer) only updates the registered entry. The first request's head is
    // due `head_timeout` after the accept.
    let deadline = tokio::time::sleep(limits.head_timeout);
    tokio::pin!(deadline);
    // Whether the deadline running is the current request's (else it is the keep-alive's).
    let mut request_due = true;
    loop {
        if buffer.is_empty() {
            // Idle between requests: a stop closes the connection here, and so does the
            // deadline.
            tokio::select! {
                biased;
                () = &mut stop => return,
                read = stream.read_buf(&mut buffer) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
                () = &mut deadline => return,
            }
        }
        match hot_step(&shared, &buffer, &mut out).await {
            Step::Answered(consumed) => {
                buffer.advance(consumed);
                // The answer must be taken, and the next request begun, within the keep-alive
                // time.
                deadline
                    .as_mut()
                    .reset(tokio::time::Instant::now() + limits.keep_alive_timeout);
                request_due = false;
                tokio::select! {
                    biased;
                    written = stream.write_all(&out) => if written.is_err() {
                        return;
                    },
                    () = &mut deadline => return,
                }
            }
            Step::NeedMore => {
                if !request_due {
                    // A request has begun: the whole of it is due from its first byte (read
                    // just now), however it trickles in.
                    deadline
                        .as_mut()
                        .reset(tokio::time::Instant::now() + limits.head_timeout);
                    request_due = true;
                }
                tokio::select! {
                    biased;
                    read = stream.read_buf(&mut buffer) => match read {
                        // Closed in the middle of a request: nothing to answer.
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    },
                    () = &mut deadline => return,
                }
            }
            Step::HandOver => break,
        }
    }
    // hyper reads the request begun, due when the front's loop had it due.
    let head_due = if request_due {
        deadline.deadline()
    } else {
        tokio::time::Instant::now() + limits.head_timeout
    };
    let watch = Arc::new(Watch::new(limits, head_due));
    let io = TokioIo::new(Rewind {
        read: buffer.freeze(),
        stream,
        watch: watch.clone(),
    });
    let (answering, watching) = (shared.clone(), watch.clone());
    let service = hyper::service::service_fn(move |request: HyperRequest| {
        let shared = answering.clone();
        // Held by the answer's body until hyper has taken it whole.
        let busy = watching.answering();
        async move {
            let answer = shared.answer(request, remote_addr).await;
            Ok::<_, Infallible>(answer.map(|body| WatchedBody { body, _busy: busy }))
        }
    });
    let connection = shared.http1.serve_connection(io, service);
    tokio::pin!(connection);
    let mut stopping_now = false;
    let ended = std::future::poll_fn(|cx| {
        if !stopping_now && stop.as_mut().poll(cx).is_ready() {
            // Closes the connection when idle, else after the answer being written.
            connection.as_mut().graceful_shutdown();
            stopping_now = true;
        }
        if let Poll::Ready(ended) = connection.as_mut().poll(cx) {
            return Poll::Ready(Some(ended));
        }
        // Reads and answers moved the watch's deadline while the connection was polled.
        if let Some(due) = watch.deadline() {
            if deadline.deadline() != due {
                deadline.as_mut().reset(due);
            }
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
        }
        Poll::Pending
    })
    .await;
    if let Some(Err(err)) = ended {
        tracing::debug!(error = %err, "connection ended with an error");
    }
}

/// When a connection hyper drives is due to close, kept by its reads ([`Rewind`]), its
/// service and the bodies of its answers ([`WatchedBody`]); all run in the connection's task.
#[derive(Debug)]
struct Watch {
    limits: ConnectionLimits,
    state: std::sync::Mutex<Watched>,
}

#[derive(Debug)]
struct Watched {
    /// Requests being answered; while there is one, the front sets no deadline (the route's
    /// own apply).
    answering: usize,
    /// Whether a byte of a request has arrived since the last answer.
    begun: bool,
    /// When the connection is closed: unless a request begins, when idle; unless its head
    /// completes, once begun.
    due: tokio::time::Instant,
}

impl Watch {
    /// A watch on a connection whose request has begun and whose head is due at `head_due`.
    fn new(limits: ConnectionLimits, head_due: tokio::time::Instant) -> Self {
        Watch {
            limits,
            state: std::sync::Mutex::new(Watched {
                answering: 0,
                begun: true,
                due: head_due,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Watched> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// When the connection is due to close, unless a request is being answered.
    fn deadline(&self) -> Option<tokio::time::Instant> {
        let state = self.state();
        (state.answering == 0).then_some(state.due)
    }

    /// Bytes arrived: the first after an answer begins a request, whose head is due from now.
    fn read_some(&self) {
        let mut state = self.state();
        if state.answering == 0 && !state.begun {
            state.begun = true;
            state.due = tokio::time::Instant::now() + self.limits.head_timeout;
        }
    }

    /// hyper has a whole head and calls the service: no deadline until the answer is taken.
    fn answering(self: &Arc<Self>) -> Answering {
        self.state().answering += 1;
        Answering(self.clone())
    }
}

/// A request being answered; dropped with the answer's body, which starts the keep-alive time.
#[derive(Debug)]
struct Answering(Arc<Watch>);

impl Drop for Answering {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.answering = state.answering.saturating_sub(1);
        if state.answering == 0 {
            state.begun = false;
            state.due = tokio::time::Instant::now() + self.0.limits.keep_alive_timeout;
        }
    }
}

/// An answer's body that tells the watch when hyper has taken it whole (hyper drops a body at
/// its end).
#[derive(Debug)]
struct WatchedBody {
    body: Body,
    _busy: Answering,
}

impl hyper::body::Body for WatchedBody {
    type Data = <Body as hyper::body::Body>::Data;
    type Error = <Body as hyper::body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// What the front's loop did with the bytes buffered.
enum Step {
    /// Answered the first request, which took this many bytes; the answer is in `out`.
    Answered(usize),
    /// The first request is not complete yet.
    NeedMore,
    /// The first request is not a plain hot one: hyper takes the connection.
    HandOver,
}

/// Parses the first request buffered and answers it into `out` when it is the hot route's and
/// plain.
async fn hot_step<E: Endpoint, R: HotRoute>(
    shared: &Shared<E, R>,
    buffer: &[u8],
    out: &mut Vec<u8>,
) -> Step {
    let mut fields = [httparse::EMPTY_HEADER; HOT_HEADERS_MAX];
    let mut request = httparse::Request::new(&mut fields);
    let head_len = match request.parse(buffer) {
        Ok(httparse::Status::Complete(head_len)) => head_len,
        Ok(httparse::Status::Partial) if buffer.len() < HOT_HEAD_MAX_BYTES => {
            return Step::NeedMore;
        }
        // Malformed, too many fields or too long: hyper answers it as it answers any other.
        _ => return Step::HandOver,
    };
    let (Some(method), Some(target), Some(1)) = (request.method, request.path, request.version)
    else {
        return Step::HandOver;
    };
    let head = Head {
        method,
        path: target.split_once('?').map_or(target, |(path, _)| path),
        headers: Headers::Parsed(request.headers),
    };
    let Some(body_len) = plain_body_len(request.headers, shared.hot.body_limit()) else {
        return Step::HandOver;
    };
    if !shared.hot.wants(&head) {
        return Step::HandOver;
    }
    let Some(body) = buffer.get(head_len..head_len + body_len) else {
        return Step::NeedMore;
    };
    let (reply, request_id) = shared.answer_hot(&head, Ok(body)).await;
    write_reply(out, reply, &request_id).await;
    Step::Answered(head_len + body_len)
}

/// The body length of a request the front's loop answers itself: one `Content-Length` (or
/// none: no body) within `limit`, and no field that asks for more than a plain exchange.
fn plain_body_len(fields: &[httparse::Header<'_>], limit: usize) -> Option<usize> {
    let mut length = None;
    for field in fields {
        let name = field.name;
        if name.eq_ignore_ascii_case("content-length") {
            if length.is_some() {
                return None;
            }
            let digits = std::str::from_utf8(field.value).ok()?;
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            length = Some(digits.parse::<usize>().ok()?);
        } else if name.eq_ignore_ascii_case("connection") {
            // `keep-alive` is what HTTP/1.1 means anyway; anything else (`close`, `upgrade`,
            // a list) is hyper's to handle.
            if !field.value.eq_ignore_ascii_case(b"keep-alive") {
                return None;
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            return None;
        }
    }
    let length = length.unwrap_or(0);
    (length <= limit).then_some(length)
}

/// Writes a whole HTTP/1.1 answer into `out`: the status line, the reply's fields, the request
/// id, `Content-Length` and `Date`, then the body.
/// A framework body that cannot be read whole is answered as an internal error.
async fn write_reply(out: &mut Vec<u8>, reply: Reply, request_id: &str) {
    out.clear();
    let (status, body) = match reply {
        Reply::Json(status, body) => {
            status_line(out, status);
            field(out, "content-type", JSON_CONTENT_TYPE.as_bytes());
            (status, body)
        }
        Reply::Response(mut response) => {
            let body = match response.take_body().into_bytes().await {
                Ok(body) => body,
                Err(err) => {
                    tracing::error!(error = %err, "reading a hot route's answer failed");
                    response = Problem::internal().into_response();
                    // A problem's body is in memory: it always reads.
                    response.take_body().into_bytes().await.unwrap_or_default()
                }
            };
            let status = response.status();
            status_line(out, status);
            for (name, value) in response.headers() {
                // Framing is the front's; the request id is set below.
                if name != header::CONTENT_LENGTH
                    && name != header::TRANSFER_ENCODING
                    && name != header::CONNECTION
                    && name.as_str() != REQUEST_ID_HEADER
                {
                    field(out, name.as_str(), value.as_bytes());
                }
            }
            (status, body)
        }
    };
    field(out, REQUEST_ID_HEADER, request_id.as_bytes());
    let mut length = itoa::Buffer::new();
    field(out, "content-length", length.format(body.len()).as_bytes());
    DATE.with(|date| field(out, "date", date.borrow_mut().now()));
    out.extend_from_slice(b"\r\n");
    // A 204 or 304 has no body by definition.
    if status != StatusCode::NO_CONTENT && status != StatusCode::NOT_MODIFIED {
        out.extend_from_slice(&body);
    }
}

fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    static DATE: std::cell::RefCell<HttpDate> = const {
        std::cell::RefCell::new(HttpDate { second: u64::MAX, text: String::new() })
    };
}

/// The `Date` field's value, formatted once a second per thread (as hyper does).
struct HttpDate {
    second: u64,
    text: String,
}

impl HttpDate {
    fn now(&mut self) -> &[u8] {
        let now = std::time::SystemTime::now();
        let second = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        if second != self.second {
            self.second = second;
            self.text = httpdate::fmt_http_date(now);
        }
        self.text.as_bytes()
    }
}

/// A connection handed to hyper: the bytes the front's loop read first, then the socket, whose
/// reads tell the watch.
struct Rewind {
    read: Bytes,
    stream: TcpStream,
    watch: Arc<Watch>,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.read.is_empty() {
            let before = buf.filled().len();
            let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
            if buf.filled().len() > before {
                self.watch.read_some();
            }
            return polled;
        }
        let take = self.read.len().min(buf.remaining());
        buf.put_slice(&self.read[..take]);
        self.read.advance(take);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
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

    fn connection_limits(pairs: &[(&str, &str)]) -> Result<ConnectionLimits, crate::ConfigError> {
        let pairs = pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()));
        ConnectionLimits::from_source(&ConfigSource::from_environment(pairs).unwrap())
    }

    #[test]
    fn the_connection_limits_are_the_stated_defaults_bounded_and_named_when_wrong() {
        assert_eq!(
            connection_limits(&[]).unwrap(),
            ConnectionLimits {
                head_timeout: Duration::from_secs(30),
                keep_alive_timeout: Duration::from_secs(75),
                max_connections: 10_000,
            }
        );
        assert_eq!(
            connection_limits(&[
                ("RP_MAX_CONNECTIONS", "200"),
                ("RP_HEAD_TIMEOUT_MS", "500"),
                ("RP_KEEP_ALIVE_TIMEOUT_MS", "1500"),
            ])
            .unwrap(),
            ConnectionLimits {
                head_timeout: Duration::from_millis(500),
                keep_alive_timeout: Duration::from_millis(1_500),
                max_connections: 200,
            }
        );
        for (var, bad) in [
            ("RP_MAX_CONNECTIONS", "0"),
            ("RP_MAX_CONNECTIONS", "1000001"),
            ("RP_MAX_CONNECTIONS", "many"),
            ("RP_HEAD_TIMEOUT_MS", "0"),
            ("RP_HEAD_TIMEOUT_MS", "600001"),
            ("RP_KEEP_ALIVE_TIMEOUT_MS", "0"),
            ("RP_KEEP_ALIVE_TIMEOUT_MS", "-1"),
        ] {
            let err = connection_limits(&[(var, bad)]).unwrap_err().to_string();
            assert!(err.contains(var), "{var}={bad}: {err}");
        }
    }

    #[tokio::test]
    async fn the_refusal_is_a_whole_503_problem_that_closes_the_connection() {
        let refusal = refusal().await;
        let mut fields = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut fields);
        let httparse::Status::Complete(head_len) = response.parse(&refusal).unwrap() else {
            panic!("a whole head");
        };
        assert_eq!(response.code, Some(503));
        let value = |name: &str| {
            response
                .headers
                .iter()
                .find(|field| field.name.eq_ignore_ascii_case(name))
                .map(|field| String::from_utf8_lossy(field.value).into_owned())
        };
        assert_eq!(value("retry-after").as_deref(), Some("1"));
        assert_eq!(value("connection").as_deref(), Some("close"));
        let length: usize = value("content-length").unwrap().parse().unwrap();
        assert_eq!(length, refusal.len() - head_len);
        let body: serde_json::Value = serde_json::from_slice(&refusal[head_len..]).unwrap();
        assert_eq!(
            (body["status"].as_u64(), &body["code"]),
            (Some(503), &serde_json::json!("overloaded"))
        );
    }

    #[test]
    fn the_bound_on_connections_fits_the_open_files_limit() {
        assert_eq!(connection_bound(10), 10, "well within the limit: as asked");
        // Asking for more than the process may open raises its soft limit as far as it goes.
        let bound = connection_bound(usize::MAX / 4);
        let open_files = raise_open_files_limit(0).expect("readable on unix");
        assert_eq!(
            bound,
            open_files / 2,
            "beyond what the process may open: half of it"
        );
    }

    fn field<'a>(name: &'a str, value: &'a str) -> httparse::Header<'a> {
        httparse::Header {
            name,
            value: value.as_bytes(),
        }
    }

    #[test]
    fn only_plain_framing_stays_in_the_front() {
        let len = |fields: &[httparse::Header<'_>]| plain_body_len(fields, 100);
        assert_eq!(len(&[]), Some(0), "no body");
        assert_eq!(
            len(&[field("Host", "x"), field("Content-Length", "12")]),
            Some(12)
        );
        assert_eq!(
            len(&[field("content-length", "100")]),
            Some(100),
            "at the bound"
        );
        for unusual in [
            vec![field("content-length", "101")],
            vec![field("content-length", "1"), field("Content-Length", "1")],
            vec![field("content-length", "+1")],
            vec![field("content-length", "")],
            vec![field("content-length", "99999999999999999999999")],
            vec![field("Transfer-Encoding", "chunked")],
            vec![field("Expect", "100-continue")],
            vec![field("Connection", "close")],
            vec![field("Connection", "keep-alive, upgrade")],
            vec![field("Upgrade", "h2c")],
        ] {
            assert_eq!(len(&unusual), None, "{unusual:?}");
        }
    }

    #[tokio::test]
    async fn an_answer_is_one_whole_http_message() {
        let mut out = Vec::new();
        write_reply(
            &mut out,
            Reply::Json(StatusCode::OK, Bytes::from_static(b"{}")),
            "id-1",
        )
        .await;
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("\r\ncontent-type: application/json; charset=utf-8\r\n"));
        assert!(text.contains("\r\nx-request-id: id-1\r\n"));
        assert!(text.contains("\r\ncontent-length: 2\r\n"));
        assert!(text.contains("\r\ndate: "));
        assert!(text.ends_with("\r\n\r\n{}"), "{text}");

        let problem = Problem::bad_request("invalid_body", "no").into_response();
        write_reply(&mut out, Reply::Response(problem), "id-2").await;
        let mut fields = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut fields);
        let httparse::Status::Complete(head_len) = response.parse(&out).unwrap() else {
            panic!("a whole head");
        };
        assert_eq!(response.code, Some(400));
        let value = |name: &str| {
            response
                .headers
                .iter()
                .find(|field| field.name.eq_ignore_ascii_case(name))
                .map(|field| String::from_utf8_lossy(field.value).into_owned())
        };
        assert_eq!(
            value("content-type").as_deref(),
            Some("application/problem+json")
        );
        assert_eq!(value("x-request-id").as_deref(), Some("id-2"));
        let length: usize = value("content-length").unwrap().parse().unwrap();
        assert_eq!(length, out.len() - head_len);
        let body: serde_json::Value = serde_json::from_slice(&out[head_len..]).unwrap();
        assert_eq!(body["code"], "invalid_body");
    }

    #[tokio::test]
    async fn an_answer_whose_body_cannot_be_read_is_an_internal_error() {
        let failing = futures::stream::once(async {
            Err::<Bytes, std::io::Error>(std::io::Error::other("the body broke"))
        });
        let response = poem::Response::builder()
            .status(StatusCode::OK)
            .body(poem::Body::from_bytes_stream(failing));
        let mut out = Vec::new();
        write_reply(&mut out, Reply::Response(response), "id-3").await;
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 500 "), "{text}");
        assert!(text.contains("\r\nx-request-id: id-3\r\n"), "{text}");
        assert!(text.contains(r#""code":"internal""#), "{text}");
    }
}
