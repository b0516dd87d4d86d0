//! Overload: with its database pool exhausted the campaign service answers 503 `overloaded` with
//! `Retry-After` within the stated acquire wait, never 500, and serves again once the pool frees.
//!
//! The service runs as its binary does, from its configuration, with a pool of one connection.
//! The test takes that connection away the way a slow request does: it locks a campaign's row
//! on a connection of its own, and a request of the service that must update the row waits for
//! the lock on the service's only connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redpacket_common::db::ACQUIRE_TIMEOUT;
use redpacket_common::testing::{Backend, wait_for_a_waiting_statement};
use sea_orm::{ConnectionTrait, TransactionTrait};
use serde_json::{Value, json};

use crate::helpers::{TestApp, campaign_body, spawn_configured_app};

/// The longest a shed request may take: the acquire wait and slack for a debug build on a busy
/// machine, well under the 5 s of the gateway's read deadline.
const SHED_WITHIN: Duration = Duration::from_millis(2_500);

/// Requests of every kind the service answers from its database: the reads of the harness's
/// verification and a write.
async fn probes(
    app: &Arc<TestApp>,
    id: &str,
) -> Vec<(String, u16, Option<String>, Value, Duration)> {
    let paths = [
        ("GET", "/users/u1/claims".to_owned()),
        ("GET", format!("/campaigns/{id}/claims")),
        ("GET", format!("/campaigns/{id}/stats")),
        ("POST", "/campaigns".to_owned()),
    ];
    let calls = paths.into_iter().cycle().take(12).map(|(method, path)| {
        let app = app.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let request = match method {
                "GET" => app.client.get(format!("{}{path}", app.address)),
                _ => app
                    .client
                    .post(format!("{}{path}", app.address))
                    .json(&campaign_body(1_000, 10, 1)),
            };
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|value| value.to_str().unwrap().to_owned());
            let body: Value = response.json().await.unwrap();
            (
                format!("{method} {path}"),
                status,
                retry_after,
                body,
                started.elapsed(),
            )
        })
    });
    let mut answers = Vec::new();
    for call in calls.collect::<Vec<_>>() {
        answers.push(call.await.unwrap());
    }
    answers
}

async fn an_exhausted_pool_is_answered_503_overloaded_at_once_then_serves_again(backend: Backend) {
    let app = Arc::new(spawn_configured_app(backend, 1).await);
    let id = app.create(&campaign_body(1_000, 10, 1)).await;
    let locker = redpacket_common::db::connect(app.database_url(), 2)
        .await
        .unwrap();
    let lock = locker.begin().await.unwrap();
    lock.execute_unprepared(&format!(
        "SELECT id FROM campaign_campaigns WHERE id = {id} FOR UPDATE"
    ))
    .await
    .unwrap();

    // The funding saga's call updates the row: it waits for the lock, holding the pool's only
    // connection.
    let blocked = tokio::spawn({
        let app = app.clone();
        let id = id.clone();
        async move {
            app.post(&format!("/campaigns/{id}/funded"), &json!({}))
                .await
        }
    });
    wait_for_a_waiting_statement(&locker, Duration::from_secs(10)).await;

    for (call, status, retry_after, body, took) in probes(&app, &id).await {
        assert_eq!(
            (status, body["code"].as_str(), retry_after.as_deref()),
            (503, Some("overloaded"), Some("1")),
            "{call}: {body}"
        );
        assert!(
            took >= ACQUIRE_TIMEOUT - Duration::from_millis(100) && took < SHED_WITHIN,
            "{call} was answered after {took:?}"
        );
    }
    assert!(!blocked.is_finished(), "the funded call still waits");

    lock.rollback().await.unwrap();
    let funded = blocked.await.unwrap();
    assert_eq!(
        funded.status(),
        200,
        "the waiting call finishes once the lock is gone"
    );
    for (call, status, _, body, _) in probes(&app, &id).await {
        assert!(status == 200 || status == 201, "{call}: {status} {body}");
    }
    locker.close().await.unwrap();
    Arc::into_inner(app).unwrap().stop().await;
}

mod an_exhausted_pool_is_answered_503_overloaded_at_once_then_serves_again {
    use redpacket_common::testing::Backend;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_postgres() {
        super::an_exhausted_pool_is_answered_503_overloaded_at_once_then_serves_again(
            Backend::Postgres,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_mariadb() {
        super::an_exhausted_pool_is_answered_503_overloaded_at_once_then_serves_again(
            Backend::MySql,
        )
        .await;
    }
}
