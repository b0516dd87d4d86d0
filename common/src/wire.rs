//! A lean keep-alive HTTP/1.1 client: the gateway's grab relay (the one upstream call of its hot
//! path) and the load harness's open-model requests, where the client's own cost per request is
//! what limits the measurement.
//!
//! hyper's pooled client hands every request to a task of its own per connection (a channel in,
//! a oneshot out, two cross-task wake-ups) and builds a header map each way. Here the caller's
//! task writes the request on a pooled connection with one write and reads the answer itself:
//! a head parsed in place by `httparse`, a body of the announced length. Anything unexpected (a
//! closed connection, no `Content-Length`, a head or body over its bound) fails the call (the
//! gateway's breaker counts it) and the connection is dropped; only a connection whose exchange
//! ended cleanly goes back to the pool. Plain HTTP only: both users talk to a local address.

use std::io::ErrorKind;
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use poem::http::{HeaderValue, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::front;

/// The largest answer head read.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// The largest answer body read (a grab answer is about 150 bytes; a refused grab lists at most
/// 100 claims).
const MAX_BODY_BYTES: usize = 256 * 1024;
/// Headers of an answer looked at.
const MAX_HEADERS: usize = 32;
/// Idle connections kept; more are closed when they come back.
const MAX_IDLE: usize = 1024;

/// An answer, any status.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
    pub retry_after: Option<HeaderValue>,
}

/// Connections to one upstream (`host:port`).
#[derive(Debug)]
pub struct WirePool {
    host: String,
    /// Idle connections per event loop (see [`front::Loops`]): a connection is registered with
    /// the reactor of the loop that opened it and stays there. The last list serves the shared
    /// runtime.
    idle: Vec<Mutex<Vec<TcpStream>>>,
}

impl WirePool {
    /// A pool for `host:port` (also sent as `Host`).
    pub fn new(host: String) -> Self {
        WirePool {
            host,
            idle: (0..=front::MAX_LOOP_THREADS)
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
        }
    }

    /// `POST path` with a JSON body and the request id; the answer whatever its status.
    pub async fn post_json(
        &self,
        path: &str,
        body: &[u8],
        request_id: &str,
    ) -> Result<Reply, String> {
        self.send(
            "POST",
            path,
            &[
                ("content-type", "application/json"),
                ("x-request-id", request_id),
            ],
            Some(body),
        )
        .await
    }

    /// One request, `headers` as given plus `host` and (with a body) `content-length`; the
    /// answer whatever its status.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Reply, String> {
        // Each goes into the request line or a header: a stray CR or LF would split them.
        if headers
            .iter()
            .flat_map(|(name, value)| name.bytes().chain(value.bytes()))
            .chain(method.bytes())
            .chain(path.bytes())
            .any(|b| b == b'\r' || b == b'\n')
        {
            return Err("a line break in the method, path or a header".to_owned());
        }
        let body_len = body.map_or(0, <[u8]>::len);
        let mut request = Vec::with_capacity(128 + path.len() + body_len);
        for part in [method, " ", path, " HTTP/1.1\r\nhost: ", self.host.as_str()] {
            request.extend_from_slice(part.as_bytes());
        }
        for &(name, value) in headers {
            for part in ["\r\n", name, ": ", value] {
                request.extend_from_slice(part.as_bytes());
            }
        }
        if let Some(body) = body {
            let mut length = itoa::Buffer::new();
            for part in ["\r\ncontent-length: ", length.format(body.len())] {
                request.extend_from_slice(part.as_bytes());
            }
            request.extend_from_slice(b"\r\n\r\n");
            request.extend_from_slice(body);
        } else {
            request.extend_from_slice(b"\r\n\r\n");
        }
        let mut stream = match self.checkout() {
            Some(stream) => stream,
            None => self.connect().await?,
        };
        stream
            .write_all(&request)
            .await
            .map_err(|err| format!("writing to {}: {err}", self.host))?;
        let (reply, reusable) = read_answer(&mut stream)
            .await
            .map_err(|err| format!("reading from {}: {err}", self.host))?;
        if reusable {
            self.checkin(stream);
        }
        Ok(reply)
    }

    async fn connect(&self) -> Result<TcpStream, String> {
        let stream = TcpStream::connect(&self.host)
            .await
            .map_err(|err| format!("connecting to {}: {err}", self.host))?;
        // The request is written whole; Nagle would only hold it back for a delayed ACK.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// An idle connection the upstream has not closed meanwhile.
    fn checkout(&self) -> Option<TcpStream> {
        loop {
            let stream = self.idle().lock().ok()?.pop()?;
            // Between exchanges an upstream sends nothing: anything readable is its closing
            // (EOF), and a would-block read is a live connection.
            let mut probe = [0u8; 1];
            match stream.try_read(&mut probe) {
                Err(err) if err.kind() == ErrorKind::WouldBlock => return Some(stream),
                _ => continue,
            }
        }
    }

    /// The idle list of the caller's event loop.
    fn idle(&self) -> &Mutex<Vec<TcpStream>> {
        let index = front::loop_index().unwrap_or(front::MAX_LOOP_THREADS);
        &self.idle[index.min(front::MAX_LOOP_THREADS)]
    }

    fn checkin(&self, stream: TcpStream) {
        if let Ok(mut idle) = self.idle().lock()
            && idle.len() < MAX_IDLE
        {
            idle.push(stream);
        }
    }
}

/// Reads what the stream has into `buffer`; the end of the stream is an error (`when` says
/// where in the answer it came).
async fn read_more(
    stream: &mut TcpStream,
    buffer: &mut BytesMut,
    when: &str,
) -> Result<(), String> {
    match stream.read_buf(buffer).await {
        Ok(0) => Err(format!("the connection closed {when}")),
        Ok(_) => Ok(()),
        Err(err) => Err(err.to_string()),
    }
}

/// Reads one answer: its status, `Retry-After`, body, and whether the connection may be reused.
async fn read_answer(stream: &mut TcpStream) -> Result<(Reply, bool), String> {
    let mut buffer = BytesMut::with_capacity(1024);
    loop {
        read_more(stream, &mut buffer, "before an answer").await?;
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut head = httparse::Response::new(&mut headers);
        let head_len = match head.parse(&buffer).map_err(|err| err.to_string())? {
            httparse::Status::Complete(len) => len,
            httparse::Status::Partial if buffer.len() < MAX_HEAD_BYTES => continue,
            httparse::Status::Partial => return Err("an answer head over 16 KiB".to_owned()),
        };
        let status = head
            .code
            .and_then(|code| StatusCode::from_u16(code).ok())
            .ok_or("an answer without a status")?;
        let mut content_length = None;
        let mut retry_after = None;
        let mut close = head.version == Some(0);
        for header in head.headers.iter() {
            if header.name.eq_ignore_ascii_case("content-length") {
                content_length = std::str::from_utf8(header.value)
                    .ok()
                    .and_then(|value| value.trim().parse::<usize>().ok());
            } else if header.name.eq_ignore_ascii_case("retry-after") {
                retry_after = HeaderValue::from_bytes(header.value).ok();
            } else if header.name.eq_ignore_ascii_case("connection") {
                close = header.value.eq_ignore_ascii_case(b"close");
            } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                return Err("a chunked answer (the upstream sends Content-Length)".to_owned());
            }
        }
        let length = content_length.ok_or("an answer without Content-Length")?;
        if length > MAX_BODY_BYTES {
            return Err(format!("an answer body of {length} bytes"));
        }
        let end = head_len + length;
        while buffer.len() < end {
            buffer.reserve(end - buffer.len());
            read_more(stream, &mut buffer, "inside an answer").await?;
        }
        // Bytes past the answer would be an answer to nothing: the connection is not reused.
        let reusable = !close && buffer.len() == end;
        let body: Bytes = buffer.split_to(end).split_off(head_len).freeze();
        return Ok((
            Reply {
                status,
                body,
                retry_after,
            },
            reusable,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A server that answers each connection's requests with the given raw answers, in turn.
    async fn server(answers: Vec<&'static [u8]>) -> (String, tokio::task::JoinHandle<usize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let mut connections = 0;
            let mut answers = answers.into_iter();
            while let Some(first) = answers.next() {
                let (mut socket, _) = listener.accept().await.unwrap();
                connections += 1;
                let mut next = Some(first);
                while let Some(answer) = next {
                    let mut buffer = vec![0u8; 4096];
                    let read = socket.read(&mut buffer).await.unwrap();
                    let text = String::from_utf8_lossy(&buffer[..read]).into_owned();
                    assert!(text.starts_with("POST /grab HTTP/1.1\r\n"), "{text}");
                    assert!(text.contains("x-request-id: r-1\r\n"), "{text}");
                    assert!(text.ends_with("\r\n\r\n{\"a\":1}"), "{text}");
                    socket.write_all(answer).await.unwrap();
                    // An answer saying `close` ends this connection; the next is a new one.
                    next = if answer.windows(5).any(|w| w == b"close") {
                        None
                    } else {
                        answers.next()
                    };
                }
            }
            connections
        });
        (host, task)
    }

    #[tokio::test]
    async fn answers_are_read_whole_and_connections_reused_until_closed() {
        let (host, server) = server(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n{\"b\":2}",
            b"HTTP/1.1 409 Conflict\r\nContent-Length: 2\r\nRetry-After: 3\r\n\r\n{}",
            b"HTTP/1.1 503 Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ])
        .await;
        let pool = WirePool::new(host);
        let reply = pool.post_json("/grab", br#"{"a":1}"#, "r-1").await.unwrap();
        assert_eq!(
            (reply.status, &reply.body[..]),
            (StatusCode::OK, &br#"{"b":2}"#[..])
        );
        let reply = pool.post_json("/grab", br#"{"a":1}"#, "r-1").await.unwrap();
        assert_eq!(reply.status, StatusCode::CONFLICT);
        assert_eq!(reply.retry_after.unwrap(), "3");
        let reply = pool.post_json("/grab", br#"{"a":1}"#, "r-1").await.unwrap();
        assert_eq!(
            (reply.status, reply.body.len()),
            (StatusCode::SERVICE_UNAVAILABLE, 0)
        );
        let reply = pool.post_json("/grab", br#"{"a":1}"#, "r-1").await.unwrap();
        assert_eq!(&reply.body[..], b"ok");
        assert_eq!(
            server.await.unwrap(),
            2,
            "a new connection only after `close`"
        );
    }

    #[tokio::test]
    async fn a_request_is_written_as_given_with_a_length_only_for_a_body() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        // Answers every request with the request's own bytes.
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            loop {
                let mut buffer = vec![0u8; 4096];
                let read = socket.read(&mut buffer).await.unwrap();
                if read == 0 {
                    return;
                }
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {read}\r\n\r\n");
                socket.write_all(head.as_bytes()).await.unwrap();
                socket.write_all(&buffer[..read]).await.unwrap();
            }
        });
        let pool = WirePool::new(host.clone());
        let reply = pool
            .send("GET", "/v1/ping", &[("authorization", "Bearer t")], None)
            .await
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&reply.body),
            format!("GET /v1/ping HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer t\r\n\r\n")
        );
        let reply = pool.send("POST", "/x", &[], Some(b"{}")).await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&reply.body),
            format!("POST /x HTTP/1.1\r\nhost: {host}\r\ncontent-length: 2\r\n\r\n{{}}")
        );
    }

    #[tokio::test]
    async fn broken_answers_fail_the_call() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\n\r\nno length",
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
            b"not http at all\r\n\r\n",
        ] {
            let (host, server) = server(vec![answer, answer]).await;
            let pool = WirePool::new(host);
            // The short body: the server then waits for a request that never comes; closing
            // its side is what ends the answer early.
            let call = pool.post_json("/grab", br#"{"a":1}"#, "r-1");
            let result = tokio::time::timeout(std::time::Duration::from_millis(500), call).await;
            assert!(
                !matches!(result, Ok(Ok(_))),
                "{:?} was accepted",
                String::from_utf8_lossy(answer)
            );
            server.abort();
        }
        let pool = WirePool::new("127.0.0.1:9".to_owned());
        assert!(pool.post_json("/grab", b"{}", "r-1").await.is_err());
        let refused = pool.post_json("/grab\r\nx: y", b"{}", "r-1").await;
        assert!(refused.unwrap_err().contains("line break"));
        let refused = pool.send("GET", "/", &[("x", "1\r\nevil: 2")], None).await;
        assert!(refused.unwrap_err().contains("line break"));
    }
}
