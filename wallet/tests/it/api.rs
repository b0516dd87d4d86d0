use redpacket_common::testing::Backend;
use serde_json::{Value, json};

use crate::helpers::{assert_problem, spawn_app, transfer_body};
use redpacket_common::on_every_backend;

async fn a_top_up_and_a_transfer_move_money_and_post_entries(backend: Backend) {
    let app = spawn_app(backend).await;
    let topup = app
        .transfer_ok("top-1", "external", "merchant:m1", 10_000)
        .await;
    assert_eq!(topup["credit_balance_after"], 10_000);
    assert_eq!(topup["debit_balance_after"], -10_000);
    app.transfer_ok("fund-1", "merchant:m1", "escrow:c1", 2_500)
        .await;

    assert_eq!(app.balance("external").await, -10_000);
    assert_eq!(app.balance("merchant:m1").await, 7_500);
    assert_eq!(app.balance("escrow:c1").await, 2_500);

    let account: Value = app.get("/accounts/merchant:m1").await.json().await.unwrap();
    assert_eq!(
        account,
        json!({"name": "merchant:m1", "currency": "CNY", "balance": 7_500, "version": 2})
    );
    app.assert_invariants().await;
    app.stop().await;
}
on_every_backend!(a_top_up_and_a_transfer_move_money_and_post_entries);

async fn a_retried_transfer_moves_money_once_and_a_different_body_conflicts(backend: Backend) {
    let app = spawn_app(backend).await;
    let body = json!({"id": "t-1", "debit": "external", "credit": "user:u1", "amount": 300,
                      "currency": "CNY", "metadata": {"b": 1, "a": "x"}});
    let first = app.transfer(&body).await;
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();

    // The same body with its keys in another order is the same transfer.
    let again = app
        .post_raw(
            "/transfers",
            r#"{"metadata": {"a": "x", "b": 1}, "currency": "CNY", "amount": 300,
                "credit": "user:u1", "debit": "external", "id": "t-1"}"#,
        )
        .await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    assert_eq!(app.balance("user:u1").await, 300);

    // A retry whose metadata carries what differs per attempt (a request id, a time) is the
    // same transfer: it answers the original, metadata included.
    let mut retried = body.clone();
    retried["metadata"] = json!({"a": "x", "b": 1, "request_id": "attempt-2"});
    let again = app.transfer(&retried).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    assert_eq!(app.balance("user:u1").await, 300);

    let mut different = body.clone();
    different["amount"] = json!(301);
    assert_problem(
        app.transfer(&different).await,
        409,
        "transfer_conflict",
        Some("id"),
    )
    .await;
    assert_eq!(app.balance("user:u1").await, 300);
    for (field, value) in [
        ("credit", json!("user:u2")),
        ("debit", json!("merchant:m")),
        ("currency", json!("USD")),
    ] {
        let mut different = body.clone();
        different[field] = value;
        assert_problem(
            app.transfer(&different).await,
            409,
            "transfer_conflict",
            Some("id"),
        )
        .await;
    }
    assert_eq!(app.balance("user:u1").await, 300);
    app.assert_invariants().await;
    app.stop().await;
}
on_every_backend!(a_retried_transfer_moves_money_once_and_a_different_body_conflicts);

async fn an_overdraft_or_a_currency_mismatch_changes_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    app.transfer_ok("top", "external", "merchant:m", 100).await;
    let body = assert_problem(
        app.transfer(&transfer_body("over", "merchant:m", "user:u", 101))
            .await,
        422,
        "insufficient_funds",
        Some("amount"),
    )
    .await;
    assert!(body["detail"].as_str().unwrap().contains("merchant:m"));
    // The refused transfer created no account and kept no id.
    assert_eq!(app.get("/accounts/user:u").await.status(), 404);
    app.transfer_ok("over", "merchant:m", "user:u", 100).await;

    let usd = json!({"id": "usd", "debit": "external", "credit": "merchant:m", "amount": 5,
                     "currency": "USD"});
    assert_problem(
        app.transfer(&usd).await,
        422,
        "currency_mismatch",
        Some("currency"),
    )
    .await;
    assert_eq!(app.balance("merchant:m").await, 0);
    assert_eq!(app.balance("user:u").await, 100);
    app.assert_invariants().await;
    app.stop().await;
}
on_every_backend!(an_overdraft_or_a_currency_mismatch_changes_nothing);

async fn unknown_accounts_answer_not_found(backend: Backend) {
    let app = spawn_app(backend).await;
    assert_problem(
        app.get("/accounts/user:nobody").await,
        404,
        "account_not_found",
        None,
    )
    .await;
    assert_problem(
        app.get("/accounts/user:nobody/entries").await,
        404,
        "account_not_found",
        None,
    )
    .await;
    assert_problem(
        app.get("/accounts/bank:1").await,
        422,
        "invalid_account",
        Some("name"),
    )
    .await;
    app.stop().await;
}
on_every_backend!(unknown_accounts_answer_not_found);

async fn entries_page_newest_first_with_a_cursor(backend: Backend) {
    let app = spawn_app(backend).await;
    for i in 1..=7 {
        app.transfer_ok(&format!("t{i}"), "external", "user:p", i)
            .await;
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(cursor) => format!("/accounts/user:p/entries?limit=3&cursor={cursor}"),
            None => "/accounts/user:p/entries?limit=3".to_owned(),
        };
        let page: Value = app.get(&path).await.json().await.unwrap();
        for entry in page["entries"].as_array().unwrap() {
            seen.push((
                entry["transfer_id"].as_str().unwrap().to_owned(),
                entry["amount"].as_i64().unwrap(),
                entry["balance_after"].as_i64().unwrap(),
            ));
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let expected: Vec<(String, i64, i64)> = (1..=7)
        .rev()
        .map(|i| (format!("t{i}"), i, (1..=i).sum()))
        .collect();
    assert_eq!(seen, expected);
    for bad in ["limit=0", "limit=501", "limit=x", "cursor=abc", "cursor=-4"] {
        let response = app.get(&format!("/accounts/user:p/entries?{bad}")).await;
        assert_eq!(response.status(), 400, "{bad}");
    }
    app.stop().await;
}
on_every_backend!(entries_page_newest_first_with_a_cursor);

async fn a_batch_applies_each_transfer_on_its_own_in_order(backend: Backend) {
    let app = spawn_app(backend).await;
    app.transfer_ok("fund", "external", "escrow:hot", 1_000)
        .await;
    let mut transfers: Vec<Value> = (0..10)
        .map(|i| {
            transfer_body(
                &format!("credit-{i}"),
                "escrow:hot",
                &format!("user:{i}"),
                100,
            )
        })
        .collect();
    // The eleventh credit overdraws the escrow; a replay and a conflict follow.
    transfers.push(transfer_body("credit-10", "escrow:hot", "user:10", 100));
    transfers.push(transfer_body("credit-3", "escrow:hot", "user:3", 100));
    transfers.push(transfer_body("credit-4", "escrow:hot", "user:4", 999));
    transfers.push(
        json!({"id": "bad", "debit": "escrow:hot", "credit": "nobody", "amount": 1,
                          "currency": "CNY"}),
    );
    let response = app.batch(transfers).await;
    assert_eq!(response.status(), 200);
    let results: Value = response.json().await.unwrap();
    let results = results["results"].as_array().unwrap();
    assert_eq!(results.len(), 14);
    for (i, result) in results.iter().take(10).enumerate() {
        assert_eq!(result["ok"], true, "{i}: {result}");
        assert_eq!(
            result["transfer"]["debit_balance_after"],
            900 - 100 * i as i64
        );
    }
    assert_eq!(results[10]["error"]["code"], "insufficient_funds");
    assert_eq!(results[10]["status"], 422);
    assert_eq!(results[11]["ok"], true, "a replay within the batch is ok");
    assert_eq!(results[12]["error"]["code"], "transfer_conflict");
    assert_eq!(results[13]["error"]["code"], "invalid_account");
    assert_eq!(results[13]["error"]["field"], "credit");

    assert_eq!(app.balance("escrow:hot").await, 0);
    assert_eq!(app.balance("user:3").await, 100);
    assert_eq!(app.get("/accounts/user:10").await.status(), 404);

    // The whole batch again moves nothing.
    let replay: Vec<Value> = (0..10)
        .map(|i| {
            transfer_body(
                &format!("credit-{i}"),
                "escrow:hot",
                &format!("user:{i}"),
                100,
            )
        })
        .collect();
    let replayed: Value = app.batch(replay).await.json().await.unwrap();
    assert!(
        replayed["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["ok"] == true)
    );
    assert_eq!(app.balance("escrow:hot").await, 0);
    assert_eq!(app.balance("user:9").await, 100);

    let too_many: Vec<Value> = (0..1001)
        .map(|i| transfer_body(&format!("x{i}"), "external", "user:x", 1))
        .collect();
    assert_problem(
        app.batch(too_many).await,
        422,
        "invalid_batch_size",
        Some("transfers"),
    )
    .await;
    assert_problem(
        app.batch(vec![]).await,
        422,
        "invalid_batch_size",
        Some("transfers"),
    )
    .await;
    app.assert_invariants().await;
    app.stop().await;
}
on_every_backend!(a_batch_applies_each_transfer_on_its_own_in_order);

async fn health_metrics_and_spec_are_served(backend: Backend) {
    let app = spawn_app(backend).await;
    assert_eq!(app.get("/health/live").await.status(), 200);
    assert_eq!(app.get("/health/ready").await.status(), 200);
    app.transfer_ok("m", "external", "user:m", 1).await;
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(
            "rp_http_requests_total{method=\"POST\",status=\"200\",service=\"wallet\"} 1"
        ),
        "{metrics}"
    );
    let spec: Value = app.get("/openapi.json").await.json().await.unwrap();
    assert!(spec["paths"]["/transfers/batch"]["post"].is_object());
    let response = app.get("/health/live").await;
    assert!(response.headers().contains_key("x-request-id"));
    let echoed = app
        .client
        .get(format!("{}/health/live", app.address))
        .header("x-request-id", "req-123")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.headers()["x-request-id"], "req-123");
    app.stop().await;
}
on_every_backend!(health_metrics_and_spec_are_served);
