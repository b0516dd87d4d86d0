//! A TCP proxy that fails on purpose, as the load balancers and meshes between real services
//! do: it spreads connections over its backends (the replicas of a service, round robin, the
//! next one when a backend does not answer) and, while a fault is set, delays, resets, answers
//! in the receiver's place or loses the receiver's answers. The fault is looked at for every
//! chunk, so it reaches the keep-alive connections already open too.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does to what it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Carry everything.
    Pass,
    /// Hold every chunk, either way, this long.
    Latency(Duration),
    /// Reset every connection at its next chunk, and new ones at once.
    Reset,
    /// Carry the requests, let the receiver act on them, then drop its answers and the
    /// connection: the caller never learns that its call succeeded.
    LoseAnswers,
    /// Answer every request with this status and a page of the proxy's own, without carrying
    /// it, then close the connection.
    Status(u16),
}

impl Fault {
    /// The fault's kind, without its parameters.
    pub fn kind(self) -> &'static str {
        match self {
            Fault::Pass => "pass",
            Fault::Latency(_) => "latency",
            Fault::Reset => "reset",
            Fault::LoseAnswers => "lose answers",
            Fault::Status(status) if status >= 500 => "5xx pages",
            Fault::Status(_) => "4xx pages",
        }
    }
}

#[derive(Debug)]
struct State {
    fault: Mutex<Fault>,
    backends: Vec<SocketAddr>,
    next: AtomicUsize,
    /// Connections and chunks the fault acted on.
    injected: AtomicU64,
}

/// A running proxy; it stops when the test's runtime ends.
#[derive(Debug, Clone)]
pub struct Proxy {
    state: Arc<State>,
    pub url: String,
}

/// How long the proxy tries to reach one backend.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

impl Proxy {
    /// Starts a proxy in front of `backends` (loopback ports).
    pub async fn start(backends: &[u16]) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let port = listener.local_addr().expect("its address").port();
        let state = Arc::new(State {
            fault: Mutex::new(Fault::Pass),
            backends: backends
                .iter()
                .map(|port| SocketAddr::from(([127, 0, 0, 1], *port)))
                .collect(),
            next: AtomicUsize::new(0),
            injected: AtomicU64::new(0),
        });
        let accepting = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    // Out of descriptors, say: give the system a moment rather than spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let state = accepting.clone();
                tokio::spawn(async move { carry(state, client).await });
            }
        });
        Proxy {
            state,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    pub fn set(&self, fault: Fault) {
        *self.state.fault.lock().unwrap() = fault;
    }

    /// How many times a fault acted (connections reset or answered, answers lost, chunks held).
    pub fn injected(&self) -> u64 {
        self.state.injected.load(Ordering::Relaxed)
    }
}

impl State {
    fn fault(&self) -> Fault {
        *self.fault.lock().unwrap()
    }

    fn count(&self) {
        self.injected.fetch_add(1, Ordering::Relaxed);
    }

    async fn connect(&self) -> Option<TcpStream> {
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        for offset in 0..self.backends.len() {
            let address = self.backends[(first + offset) % self.backends.len()];
            if let Ok(Ok(stream)) =
                tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address)).await
            {
                let _ = stream.set_nodelay(true);
                return Some(stream);
            }
        }
        None
    }
}

fn page(status: u16) -> Vec<u8> {
    let body = format!("<html><body><h1>{status}</h1><p>the proxy</p></body></html>");
    format!(
        "HTTP/1.1 {status} Proxy\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Ends a connection with a reset (RST), not an orderly close.
fn reset(stream: &TcpStream) {
    #[allow(deprecated)] // tokio steers towards socket2 for SO_LINGER; this is all it takes.
    let _ = stream.set_linger(Some(Duration::ZERO));
}

async fn carry(state: Arc<State>, client: TcpStream) {
    let _ = client.set_nodelay(true);
    if state.fault() == Fault::Reset {
        state.count();
        reset(&client);
        return;
    }
    let Some(backend) = state.connect().await else {
        // No backend answers: as a balancer with every replica down, close at once.
        reset(&client);
        return;
    };
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_backend, mut to_backend) = backend.into_split();
    let ending = tokio::select! {
        ending = pump(&state, &mut from_client, &mut to_backend, Way::Requests) => ending,
        ending = pump(&state, &mut from_backend, &mut to_client, Way::Answers) => ending,
    };
    let (Ok(mut client), Ok(backend)) = (
        from_client.reunite(to_client),
        from_backend.reunite(to_backend),
    ) else {
        return;
    };
    match ending {
        Ending::Closed => {}
        Ending::Reset => {
            reset(&client);
            reset(&backend);
        }
        Ending::Answer(status) => {
            let _ = client.write_all(&page(status)).await;
            let _ = client.shutdown().await;
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    Requests,
    Answers,
}

/// Carries one way of a connection until it ends or a fault ends it.
async fn pump(
    state: &State,
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    way: Way,
) -> Ending {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return Ending::Closed,
            Ok(read) => read,
        };
        let ending = match (state.fault(), way) {
            (Fault::Reset, _) | (Fault::LoseAnswers, Way::Answers) => Some(Ending::Reset),
            (Fault::Status(status), Way::Requests) => Some(Ending::Answer(status)),
            (Fault::Latency(delay), _) => {
                state.count();
                tokio::time::sleep(delay).await;
                None
            }
            _ => None,
        };
        if let Some(ending) = ending {
            state.count();
            return ending;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return Ending::Closed;
        }
    }
}

enum Ending {
    Closed,
    Reset,
    Answer(u16),
}
