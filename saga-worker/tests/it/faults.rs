//! A proxy in front of the wallet or the campaign service that can fail on purpose, as the
//! load balancers and proxies between real services do.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use poem::http::StatusCode;
use poem::listener::TcpListener;
use poem::{Body, EndpointExt, Request, Response, Route, Server};
use serde_json::{Value, json};

/// What the proxy does to the calls it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Answer 503 to everything.
    Unavailable,
    /// Refuse every grab credit with 422, forward the rest.
    RejectCredits,
    /// Never answer grab credits (a wallet that hangs).
    Hang,
    /// Answer every POST with this status and an HTML page of the proxy's own, without
    /// forwarding it (a timeout, a body too large, a bad gateway, a stray 4xx).
    Page(u16),
    /// Forward every POST, let the receiver commit it, then lose its answer and send a 408
    /// page instead (a timeout on the way back).
    CommitThenLose,
}

#[derive(Debug, Clone)]
pub struct Faults {
    mode: Arc<Mutex<Mode>>,
    /// POSTs the proxy answered itself instead of relaying the receiver's answer.
    pub faulted: Arc<AtomicU64>,
    pub url: String,
}

impl Faults {
    pub fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn mode(&self) -> Mode {
        *self.mode.lock().unwrap()
    }
}

fn page(status: u16) -> Response {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .content_type("text/html")
        .body(format!(
            "<html><body><h1>{status}</h1><p>the proxy</p></body></html>"
        ))
}

fn refusal() -> Value {
    json!({"ok": false, "status": 422, "error": {"type": "/problems/insufficient_funds",
           "title": "Unprocessable request", "status": 422, "code": "insufficient_funds",
           "detail": "refused on purpose"}})
}

/// Starts the proxy in front of `upstream_url`.
pub async fn start(upstream_url: String) -> Faults {
    let faults = Faults {
        mode: Arc::new(Mutex::new(Mode::Pass)),
        faulted: Arc::new(AtomicU64::new(0)),
        url: String::new(),
    };
    let client = reqwest::Client::new();
    let state = (faults.clone(), client, upstream_url);
    let endpoint = Route::new()
        .at(
            "/*path",
            poem::endpoint::make(move |request: Request| {
                let (faults, client, upstream) = state.clone();
                async move { forward(&faults, &client, &upstream, request).await }
            }),
        )
        .map_to_response();
    let acceptor = poem::listener::Listener::into_acceptor(TcpListener::bind("127.0.0.1:0"))
        .await
        .unwrap();
    let port = poem::listener::Acceptor::local_addr(&acceptor)[0]
        .as_socket_addr()
        .unwrap()
        .port();
    tokio::spawn(Server::new_with_acceptor(acceptor).run(endpoint));
    Faults {
        url: format!("http://127.0.0.1:{port}"),
        ..faults
    }
}

async fn forward(
    faults: &Faults,
    client: &reqwest::Client,
    wallet: &str,
    mut request: Request,
) -> poem::Result<Response> {
    let mode = faults.mode();
    let post = request.method() == poem::http::Method::POST;
    if let (Mode::Page(status), true) = (mode, post) {
        faults.faulted.fetch_add(1, Ordering::Relaxed);
        return Ok(page(status));
    }
    let body = request.take_body().into_bytes().await?;
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let is_credit = |t: &Value| t["id"].as_str().is_some_and(|id| id.starts_with("grab:"));
    if mode == Mode::Unavailable {
        return Ok(Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .body("down on purpose"));
    }
    if mode == Mode::Hang
        && (is_credit(&json)
            || json["transfers"]
                .as_array()
                .is_some_and(|t| t.iter().any(is_credit)))
    {
        std::future::pending::<()>().await;
    }
    if mode == Mode::RejectCredits {
        if path == "/transfers" && is_credit(&json) {
            return Ok(Response::builder()
                .status(StatusCode::UNPROCESSABLE_ENTITY)
                .content_type("application/problem+json")
                .body(refusal()["error"].to_string()));
        }
        if path == "/transfers/batch"
            && json["transfers"]
                .as_array()
                .is_some_and(|t| t.iter().all(is_credit))
        {
            let results: Vec<Value> = json["transfers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|_| refusal())
                .collect();
            return Ok(Response::builder()
                .content_type("application/json")
                .body(json!({ "results": results }).to_string()));
        }
    }
    let upstream = client
        .request(request.method().clone(), format!("{wallet}{path}"))
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .map_err(|err| poem::Error::from_string(err.to_string(), StatusCode::BAD_GATEWAY))?;
    let status = upstream.status();
    let content_type = upstream
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_owned();
    let bytes = upstream
        .bytes()
        .await
        .map_err(|err| poem::Error::from_string(err.to_string(), StatusCode::BAD_GATEWAY))?;
    if mode == Mode::CommitThenLose && post {
        faults.faulted.fetch_add(1, Ordering::Relaxed);
        return Ok(page(408));
    }
    Ok(Response::builder()
        .status(status)
        .content_type(content_type)
        .body(Body::from(bytes.to_vec())))
}
