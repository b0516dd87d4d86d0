//! A proxy in front of the wallet that can fail on purpose.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use poem::http::StatusCode;
use poem::listener::TcpListener;
use poem::{Body, EndpointExt, Request, Response, Route, Server};
use serde_json::{Value, json};

/// What the proxy does to wallet calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Forward everything.
    Pass = 0,
    /// Answer 503 to everything.
    Unavailable = 1,
    /// Refuse every grab credit with 422, forward the rest.
    RejectCredits = 2,
    /// Never answer grab credits (a wallet that hangs).
    Hang = 3,
}

#[derive(Debug, Clone)]
pub struct Faults {
    mode: Arc<AtomicU8>,
    pub url: String,
}

impl Faults {
    pub fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }
}

fn refusal() -> Value {
    json!({"ok": false, "status": 422, "error": {"type": "/problems/insufficient_funds",
           "title": "Unprocessable request", "status": 422, "code": "insufficient_funds",
           "detail": "refused on purpose"}})
}

/// Starts the proxy in front of `wallet_url`.
pub async fn start(wallet_url: String) -> Faults {
    let mode = Arc::new(AtomicU8::new(Mode::Pass as u8));
    let client = reqwest::Client::new();
    let state = (mode.clone(), client, wallet_url);
    let endpoint = Route::new()
        .at(
            "/*path",
            poem::endpoint::make(move |request: Request| {
                let (mode, client, wallet) = state.clone();
                async move { forward(mode.load(Ordering::SeqCst), &client, &wallet, request).await }
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
        mode,
        url: format!("http://127.0.0.1:{port}"),
    }
}

async fn forward(
    mode: u8,
    client: &reqwest::Client,
    wallet: &str,
    mut request: Request,
) -> poem::Result<Response> {
    let body = request.take_body().into_bytes().await?;
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let is_credit = |t: &Value| t["id"].as_str().is_some_and(|id| id.starts_with("grab:"));
    if mode == Mode::Unavailable as u8 {
        return Ok(Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .body("down on purpose"));
    }
    if mode == Mode::Hang as u8
        && (is_credit(&json)
            || json["transfers"]
                .as_array()
                .is_some_and(|t| t.iter().any(is_credit)))
    {
        std::future::pending::<()>().await;
    }
    if mode == Mode::RejectCredits as u8 {
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
    Ok(Response::builder()
        .status(status)
        .content_type(content_type)
        .body(Body::from(bytes.to_vec())))
}
