//! The HTTP front: the hot route ahead of the framework, the framework behind it, on the
//! shared runtime and on event-loop threads, and a clean stop.

use std::time::Duration;

use poem::http::{Method, StatusCode};
use poem::{Route, get, handler, post};
use redpacket_common::front::{self, Answer, HotRequest, HotRoute, Loops};
use redpacket_common::http::BoundListener;
use redpacket_common::telemetry::Metrics;

/// Answers `POST /hot/{x}` itself with the request id and the loop it ran on, except
/// `/hot/defer`, which it gives back to the framework.
struct Hot;

impl HotRoute for Hot {
    fn matches(&self, method: &Method, path: &str) -> bool {
        method == Method::POST && path.starts_with("/hot/")
    }

    async fn call(&self, request: HotRequest, request_id: &str) -> Result<Answer, HotRequest> {
        if request.uri().path() == "/hot/defer" {
            return Err(request);
        }
        let on_loop = front::loop_index().is_some();
        Ok(front::json(
            StatusCode::OK,
            serde_json::to_vec(&serde_json::json!({"id": request_id, "on_loop": on_loop})).unwrap(),
        ))
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
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server stops promptly")
        .unwrap()
        .unwrap();
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
