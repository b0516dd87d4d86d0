//! The HTTP front: the hot route ahead of the framework, the framework behind it, on the
//! shared runtime and on event-loop threads, a clean stop, and the times and the bound that
//! keep a connection from being held for free.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use poem::http::StatusCode;
use poem::{Route, get, handler, post};
use redpacket_common::front::{self, ConnectionLimits, Head, HotRoute, Loops, Reply};
use redpacket_common::http::BoundListener;
use redpacket_common::telemetry::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Answers `POST /hot/{x}` itself with the request id, the loop it ran on and the body it got,
/// except `/hot/defer`, which it leaves to the framework. Bodies are bounded to 64 bytes.
struct Hot;

impl HotRoute for Hot {
    fn wants(&self, head: &Head<'_>) -> bool {
        head.method() == "POST" && head.path().starts_with("/hot/") && head.path() != "/hot/defer"
    }

    fn body_limit(&self) -> usize {
        64
    }

    async fn call(&self, _head: &Head<'_>, body: &[u8], request_id: &str) -> Reply {
        let on_loop = front::loop_index().is_some();
        let body = String::from_utf8_lossy(body);
        Reply::Json(
            StatusCode::OK,
            serde_json::to_vec(
                &serde_json::json!({"id": request_id, "on_loop": on_loop, "body": body}),
            )
            .unwrap()
            .into(),
        )
    }
}

#[handler]
fn framework() -> &'static str {
    "framework"
}

async fn serves_hot_and_framework_routes_and_stops_cleanly(loops: Loops) {
    let listener = BoundListener::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let url = format!("http://{}", listener.local_addr());
    let metrics = Metrics::new("front");
    let routes = Route::new()
        .at("/hot/:x", post(framework))
        .at("/plain", get(framework));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server =
        tokio::spawn(
            listener.serve_with_hot_route(routes, Hot, metrics.clone(), loops, async {
                let _ = stopped.await;
            }),
        );
    let client = reqwest::Client::new();

    let hot = client
        .post(format!("{url}/hot/a"))
        .header("x-request-id", "given-1")
        .send()
        .await
        .unwrap();
    assert_eq!(hot.status(), 200);
    assert_eq!(hot.headers()["x-request-id"], "given-1");
    let body: serde_json::Value = hot.json().await.unwrap();
    assert_eq!(body["id"], "given-1");
    assert_eq!(body["on_loop"], matches!(loops, Loops::Threads(_)));

    let deferred = client
        .post(format!("{url}/hot/defer"))
        .send()
        .await
        .unwrap();
    assert_eq!(deferred.text().await.unwrap(), "framework");
    let plain = client.get(format!("{url}/plain")).send().await.unwrap();
    assert_eq!(plain.text().await.unwrap(), "framework");
    let wrong_method = client.get(format!("{url}/hot/a")).send().await.unwrap();
    assert_eq!(
        wrong_method.status(),
        405,
        "not the hot route's: the framework's answer"
    );

    // Many connections at once, spread over the loops.
    let calls: Vec<_> = (0..40)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let answer = client.post(format!("{url}/hot/{i}")).send().await.unwrap();
                assert_eq!(answer.status(), 200);
                assert!(answer.headers().contains_key("x-request-id"));
            })
        })
        .collect();
    for call in calls {
        call.await.unwrap();
    }
    let rendered = metrics.render();
    let counted: u64 = rendered
        .lines()
        .filter(|line| {
            line.starts_with("rp_http_requests_total{")
                && line.contains(r#"method="POST""#)
                && line.contains(r#"status="200""#)
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(counted, 41, "every hot answer is counted once: {rendered}");

    let _ = stop.send(());
    stops_promptly(server).await;
    assert!(
        reqwest::Client::new()
            .get(format!("{url}/plain"))
            .send()
            .await
            .is_err(),
        "nothing listens after the stop"
    );
}

#[tokio::test]
async fn on_the_shared_runtime() {
    serves_hot_and_framework_routes_and_stops_cleanly(Loops::Shared).await;
}

#[tokio::test]
async fn on_event_loop_threads() {
    serves_hot_and_framework_routes_and_stops_cleanly(Loops::Threads(3)).await;
}

/// A server with the [`Hot`] route on two event loops; the sender stops it.
async fn start() -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    start_with(ConnectionLimits::default()).await
}

/// [`start`] with these times and this bound on connections.
async fn start_with(
    limits: ConnectionLimits,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let listener = BoundListener::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
        .with_limits(limits);
    let addr = listener.local_addr().to_string();
    let routes = Route::new()
        .at("/hot/:x", post(framework))
        .at("/plain", get(framework));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(listener.serve_with_hot_route(
        routes,
        Hot,
        Metrics::new("front_raw"),
        Loops::Threads(2),
        async {
            let _ = stopped.await;
        },
    ));
    (addr, stop, server)
}

/// Waits for a server told to stop: it ends within 5 s, without error.
async fn stops_promptly(server: tokio::task::JoinHandle<anyhow::Result<()>>) {
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server stops promptly")
        .unwrap()
        .unwrap();
}

/// One answer read off a raw connection.
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(field, _)| field.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|err| panic!("{err}: {self:?}"))
    }
}

/// Reads one `Content-Length`-framed answer; what follows it stays in `buffer`.
async fn read_answer(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Raw {
    loop {
        let mut fields = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut fields);
        if let httparse::Status::Complete(head_len) = response.parse(buffer).unwrap() {
            let headers: Vec<(String, String)> = response
                .headers
                .iter()
                .map(|field| {
                    (
                        field.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(field.value).into_owned(),
                    )
                })
                .collect();
            let status = response.code.unwrap();
            let length: usize = headers
                .iter()
                .find(|(name, _)| name == "content-length")
                .map_or(0, |(_, value)| value.parse().unwrap());
            if buffer.len() >= head_len + length {
                let body =
                    String::from_utf8_lossy(&buffer[head_len..head_len + length]).into_owned();
                buffer.drain(..head_len + length);
                return Raw {
                    status,
                    headers,
                    body,
                };
            }
        }
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(read > 0, "closed before a whole answer: {buffer:?}");
        buffer.extend_from_slice(&chunk[..read]);
    }
}

/// Whether the server closes the connection (within 5 s).
async fn closed(stream: &mut TcpStream) -> bool {
    let mut chunk = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn plain_hot_requests_are_answered_in_place_pipelined_and_split_anywhere() {
    let (addr, stop, server) = start().await;
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    let mut buffer = Vec::new();
    // Two requests in one write, the second with a body and a query.
    stream
        .write_all(
            b"POST /hot/a HTTP/1.1\r\nHost: x\r\nX-Request-Id: one\r\n\r\n\
              POST /hot/b?x=1 HTTP/1.1\r\nHost: x\r\nx-request-id: two\r\nContent-Length: 5\r\n\r\nhello",
        )
        .await
        .unwrap();
    let first = read_answer(&mut stream, &mut buffer).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-request-id"), Some("one"));
    assert_eq!(
        first.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    assert!(first.header("date").is_some());
    assert_eq!(first.json()["body"], "");
    assert_eq!(first.json()["on_loop"], true);
    let second = read_answer(&mut stream, &mut buffer).await;
    assert_eq!(second.json()["id"], "two");
    assert_eq!(second.json()["body"], "hello");

    // One request in pieces: inside the request line, inside a header, inside the body.
    let request: &[u8] =
        b"POST /hot/c HTTP/1.1\r\nHost: x\r\nx-request-id: three\r\ncontent-length: 11\r\n\r\nhello world";
    for piece in [
        &request[..7],
        &request[7..40],
        &request[40..request.len() - 3],
        &request[request.len() - 3..],
    ] {
        stream.write_all(piece).await.unwrap();
        stream.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let third = read_answer(&mut stream, &mut buffer).await;
    assert_eq!(third.json()["id"], "three");
    assert_eq!(third.json()["body"], "hello world");
    // An insane client id is replaced.
    stream
        .write_all(b"POST /hot/d HTTP/1.1\r\nx-request-id: no spaces please\r\n\r\n")
        .await
        .unwrap();
    let fourth = read_answer(&mut stream, &mut buffer).await;
    let id = fourth.header("x-request-id").unwrap();
    assert!(!id.contains(' ') && !id.is_empty(), "{id}");
    assert_eq!(fourth.json()["id"], id);

    let _ = stop.send(());
    assert!(
        closed(&mut stream).await,
        "an idle connection closes on stop"
    );
    stops_promptly(server).await;
}

#[tokio::test]
async fn anything_else_hands_the_connection_to_hyper_with_the_bytes_already_read() {
    let (addr, stop, server) = start().await;
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    let mut buffer = Vec::new();
    // Answered in place, then a framework request arrives together with a hot one behind it.
    stream
        .write_all(b"POST /hot/a HTTP/1.1\r\nx-request-id: in-place\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_answer(&mut stream, &mut buffer).await.json()["id"],
        "in-place"
    );
    stream
        .write_all(
            b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n\
              POST /hot/b HTTP/1.1\r\nHost: x\r\nx-request-id: via-hyper\r\nTransfer-Encoding: chunked\r\n\r\n\
              3\r\nabc\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
    let plain = read_answer(&mut stream, &mut buffer).await;
    assert_eq!((plain.status, plain.body.as_str()), (200, "framework"));
    let hot = read_answer(&mut stream, &mut buffer).await;
    assert_eq!(hot.status, 200, "{hot:?}");
    assert_eq!(hot.header("x-request-id"), Some("via-hyper"));
    assert_eq!(
        hot.json()["body"],
        "abc",
        "a chunked body: hyper reads it, the hot route answers"
    );
    // The deferred path goes to the framework on either driver.
    stream
        .write_all(b"POST /hot/defer HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_answer(&mut stream, &mut buffer).await.body,
        "framework"
    );

    // A body over the route's bound: refused before the route runs, on a fresh connection.
    let mut big = TcpStream::connect(&addr).await.unwrap();
    big.write_all(b"POST /hot/a HTTP/1.1\r\nHost: x\r\nContent-Length: 65\r\n\r\n")
        .await
        .unwrap();
    big.write_all(&[b'x'; 65]).await.unwrap();
    let refused = read_answer(&mut big, &mut Vec::new()).await;
    assert_eq!(refused.status, 413, "{refused:?}");
    assert_eq!(refused.json()["code"], "payload_too_large");
    assert!(refused.header("x-request-id").is_some());

    // A malformed head gets hyper's 400 and the connection closes.
    let mut bad = TcpStream::connect(&addr).await.unwrap();
    bad.write_all(b"POST /hot/a HTTP/1.1\r\nBad Header\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_answer(&mut bad, &mut Vec::new()).await.status, 400);
    assert!(closed(&mut bad).await);

    // `Connection: close` is honoured: answered, then closed.
    let mut once = TcpStream::connect(&addr).await.unwrap();
    once.write_all(b"POST /hot/a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_answer(&mut once, &mut Vec::new()).await.status, 200);
    assert!(closed(&mut once).await);

    // A connection hyper drives also closes on stop.
    let _ = stop.send(());
    assert!(closed(&mut stream).await);
    stops_promptly(server).await;
}

/// Times short enough for tests: a head is due in 500 ms, a keep-alive connection waits 1.5 s.
const SHORT: ConnectionLimits = ConnectionLimits {
    head_timeout: Duration::from_millis(500),
    keep_alive_timeout: Duration::from_millis(1500),
    max_connections: 1_000,
};

/// Whether the server keeps the connection open, sending nothing, for `time`.
async fn open_for(stream: &mut TcpStream, time: Duration) -> bool {
    let mut chunk = [0u8; 64];
    match tokio::time::timeout(time, stream.read(&mut chunk)).await {
        Err(_elapsed) => true,
        Ok(Ok(0) | Err(_)) => false,
        Ok(Ok(read)) => panic!("unexpected bytes: {:?}", &chunk[..read]),
    }
}

/// How long after `since` the server closed the connection; it must within 5 s.
async fn closed_after(stream: &mut TcpStream, since: Instant) -> Duration {
    assert!(closed(stream).await, "the server closes the connection");
    since.elapsed()
}

#[tokio::test]
async fn a_head_not_whole_by_its_deadline_is_cut_from_the_accept() {
    let (addr, stop, server) = start_with(SHORT).await;
    let opened = Instant::now();
    let mut half = TcpStream::connect(&addr).await.unwrap();
    half.write_all(b"POST /hot/a HT").await.unwrap();
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    assert!(
        open_for(&mut half, Duration::from_millis(300)).await,
        "not cut before its deadline"
    );
    let cut = closed_after(&mut half, opened).await;
    assert!(
        (Duration::from_millis(500)..Duration::from_secs(3)).contains(&cut),
        "half a request line is cut at the head deadline: {cut:?}"
    );
    let cut = closed_after(&mut silent, opened).await;
    assert!(
        (Duration::from_millis(500)..Duration::from_secs(3)).contains(&cut),
        "a connection that sends nothing is cut at the head deadline too: {cut:?}"
    );
    let _ = stop.send(());
    stops_promptly(server).await;
}

/// Sends `head` one byte every 50 ms until the server closes the connection; answers how long
/// that took and how many bytes went out meanwhile.
async fn dribble(stream: TcpStream, head: &'static [u8]) -> (Duration, usize) {
    let (mut reader, mut writer) = stream.into_split();
    let sent = Arc::new(AtomicUsize::new(0));
    let counted = sent.clone();
    let writing = tokio::spawn(async move {
        for byte in head {
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
            counted.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let started = Instant::now();
    let mut chunk = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), reader.read(&mut chunk)).await;
    let took = started.elapsed();
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "the server closes a dribbling connection within 5 s: {read:?}"
    );
    writing.abort();
    (took, sent.load(Ordering::Relaxed))
}

/// A head of 200 bytes: 10 s at one byte every 50 ms.
const DRIBBLED: &[u8] = b"POST /hot/slow HTTP/1.1\r\nHost: x\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";

#[tokio::test]
async fn a_head_dribbled_a_byte_at_a_time_is_cut_at_the_deadline_of_the_whole_head() {
    let (addr, stop, server) = start_with(SHORT).await;
    // On the front's own loop, after a hot answer (a keep-alive connection), and on a
    // connection hyper drives, after a framework answer.
    let mut in_front = TcpStream::connect(&addr).await.unwrap();
    in_front
        .write_all(b"POST /hot/a HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_answer(&mut in_front, &mut Vec::new()).await.status,
        200
    );
    let mut in_hyper = TcpStream::connect(&addr).await.unwrap();
    in_hyper
        .write_all(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_answer(&mut in_hyper, &mut Vec::new()).await.body,
        "framework"
    );
    let (front, hyper) = tokio::join!(dribble(in_front, DRIBBLED), dribble(in_hyper, DRIBBLED));
    for (driver, (took, sent)) in [("front", front), ("hyper", hyper)] {
        // A deadline moved by every byte would never come: the bytes kept coming.
        assert!(
            (Duration::from_millis(450)..Duration::from_millis(2_000)).contains(&took),
            "{driver}: cut {took:?} after its first byte"
        );
        assert!(
            sent >= 8,
            "{driver}: still dribbling when cut ({sent} bytes)"
        );
        assert!(
            sent < DRIBBLED.len(),
            "{driver}: cut before the head was whole"
        );
    }
    let _ = stop.send(());
    stops_promptly(server).await;
}

/// Waits out more than a head's time on an idle keep-alive connection, is answered again, then
/// is cut after the keep-alive time; answers when, after the last answer.
async fn keep_alive(addr: &str, request: &[u8]) -> Duration {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut buffer = Vec::new();
    stream.write_all(request).await.unwrap();
    assert_eq!(read_answer(&mut stream, &mut buffer).await.status, 200);
    assert!(
        open_for(&mut stream, Duration::from_millis(1_000)).await,
        "an idle keep-alive connection waits longer than a head's time"
    );
    stream.write_all(request).await.unwrap();
    assert_eq!(read_answer(&mut stream, &mut buffer).await.status, 200);
    let answered = Instant::now();
    closed_after(&mut stream, answered).await
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_keep_alive_time_on_either_driver() {
    let (addr, stop, server) = start_with(SHORT).await;
    let (front, hyper) = tokio::join!(
        keep_alive(&addr, b"POST /hot/a HTTP/1.1\r\nHost: x\r\n\r\n"),
        keep_alive(&addr, b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n"),
    );
    for (driver, idle) in [("front", front), ("hyper", hyper)] {
        assert!(
            (Duration::from_millis(1_450)..Duration::from_millis(3_500)).contains(&idle),
            "{driver}: closed {idle:?} after its last answer"
        );
    }
    let _ = stop.send(());
    stops_promptly(server).await;
}

#[tokio::test]
async fn beyond_the_bound_a_connection_is_refused_at_once_and_service_resumes_when_slots_free() {
    const BOUND: usize = 50;
    let (addr, stop, server) = start_with(ConnectionLimits {
        head_timeout: Duration::from_millis(1_500),
        keep_alive_timeout: Duration::from_millis(1_500),
        max_connections: BOUND,
    })
    .await;
    let opened = Instant::now();
    let mut held = Vec::with_capacity(BOUND);
    for _ in 0..BOUND {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream.write_all(b"POST /hot/a HT").await.unwrap();
        held.push(stream);
    }
    // Sending a request or nothing, a connection over the bound is answered 503 and closed.
    for request in [
        &b"POST /hot/a HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"",
        b"GET /plain",
    ] {
        let asked = Instant::now();
        let mut refused = TcpStream::connect(&addr).await.unwrap();
        // The server may have closed already: what matters is what it answered.
        let _ = refused.write_all(request).await;
        let answer = read_answer(&mut refused, &mut Vec::new()).await;
        assert_eq!(answer.status, 503, "{answer:?}");
        assert_eq!(answer.header("retry-after"), Some("1"));
        assert_eq!(answer.header("connection"), Some("close"));
        assert_eq!(
            answer.header("content-type"),
            Some("application/problem+json")
        );
        assert_eq!(answer.json()["code"], "overloaded");
        assert!(closed(&mut refused).await, "closed after the refusal");
        assert!(
            asked.elapsed() < Duration::from_millis(500),
            "refused at once: {:?}",
            asked.elapsed()
        );
    }
    assert!(
        opened.elapsed() < Duration::from_millis(1_500),
        "the refusals came while the bound was full"
    );
    for stream in &mut held {
        assert!(
            closed(stream).await,
            "a held connection is cut at its deadline"
        );
    }
    let mut fresh = TcpStream::connect(&addr).await.unwrap();
    fresh
        .write_all(b"POST /hot/a HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_answer(&mut fresh, &mut Vec::new()).await.status,
        200,
        "served again once the slots are free"
    );
    let _ = stop.send(());
    stops_promptly(server).await;
}
