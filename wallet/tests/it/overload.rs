//! Overload: with its database pool exhausted the wallet answers 503 `overloaded` with
//! `Retry-After` within the stated acquire wait, never 500, and serves again once the pool frees.
//!
//! The wallet runs as its binary does, from its configuration, with a pool of one connection.
//! The test takes that connection away the way a slow request does: it locks an account's row
//! on a connection of its own, and a transfer to that account waits for the lock on the
//! wallet's only connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redpacket_common::db::ACQUIRE_TIMEOUT;
use redpacket_common::testing::{Backend, wait_for_a_waiting_statement};
use sea_orm::{ConnectionTrait, TransactionTrait};
use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_configured_app, transfer_body};

/// The longest a shed request may take: the acquire wait and slack for a debug build on a busy
/// machine, well under the 5 s of the gateway's read deadline.
const SHED_WITHIN: Duration = Duration::from_millis(2_500);

/// Requests of every kind the wallet answers from its database.
async fn probes(app: &Arc<TestApp>) -> Vec<(String, u16, Option<String>, Value, Duration)> {
    let single = transfer_body("t-single", "external", "user:9", 5);
    let batch = json!({ "transfers": [transfer_body("t-batch", "external", "user:8", 5)] });
    let calls: [(&str, &str, Option<Value>); 5] = [
        ("GET", "/accounts/external", None),
        ("GET", "/accounts/merchant:m1/entries", None),
        ("GET", "/invariants", None),
        ("POST", "/transfers", Some(single)),
        ("POST", "/transfers/batch", Some(batch)),
    ];
    let tasks: Vec<_> = calls
        .into_iter()
        .cycle()
        .take(15)
        .map(|(method, path, body)| {
            let app = app.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let url = format!("{}{path}", app.address);
                let request = match body {
                    Some(body) => app.client.post(url).json(&body),
                    None => app.client.get(url),
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
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

async fn an_exhausted_pool_is_answered_503_overloaded_at_once_then_serves_again(backend: Backend) {
    let app = Arc::new(spawn_configured_app(backend, 1).await);
    app.transfer_ok("t-first", "external", "merchant:m1", 100)
        .await;
    let locker = redpacket_common::db::connect(app.database_url(), 2)
        .await
        .unwrap();
    let lock = locker.begin().await.unwrap();
    lock.execute_unprepared(
        "SELECT name FROM wallet_accounts WHERE name = 'merchant:m1' FOR UPDATE",
    )
    .await
    .unwrap();

    // A transfer to the account locks its row: it waits for the test's lock, holding the
    // pool's only connection.
    let blocked = tokio::spawn({
        let app = app.clone();
        async move {
            app.transfer(&transfer_body("t-blocked", "external", "merchant:m1", 7))
                .await
        }
    });
    wait_for_a_waiting_statement(&locker, Duration::from_secs(10)).await;

    for (call, status, retry_after, body, took) in probes(&app).await {
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
    assert!(!blocked.is_finished(), "the blocked transfer still waits");

    lock.rollback().await.unwrap();
    let transfer = blocked.await.unwrap();
    assert_eq!(
        transfer.status(),
        200,
        "the waiting transfer finishes once the lock is gone"
    );
    for (call, status, _, body, _) in probes(&app).await {
        assert_eq!(status, 200, "{call}: {body}");
    }
    assert_eq!(app.balance("merchant:m1").await, 107);
    assert_eq!(
        app.balance("user:9").await,
        5,
        "a shed transfer moved nothing"
    );
    app.assert_invariants().await;
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
