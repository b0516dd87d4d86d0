use redpacket_common::testing::Backend;
use redpacket_wallet::entity::{account, transfer};
use sea_orm::{EntityTrait, PaginatorTrait, QueryOrder};

use crate::helpers::{TestApp, spawn_app};
use redpacket_common::on_every_backend;

/// Every account with its balance, and the number of transfers.
async fn snapshot(app: &TestApp) -> (Vec<(String, i64)>, u64) {
    let accounts = account::Entity::find()
        .order_by_asc(account::Column::Name)
        .all(app.ledger.db())
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.name, a.balance))
        .collect();
    let transfers = transfer::Entity::find()
        .count(app.ledger.db())
        .await
        .unwrap();
    (accounts, transfers)
}

async fn every_bad_input_is_a_problem_and_changes_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    app.transfer_ok("seed", "external", "merchant:m", 1_000)
        .await;
    let before = snapshot(&app).await;

    let big_metadata = format!(r#"{{"note": "{}"}}"#, "x".repeat(5000));
    let cases: Vec<(String, u16, &str, Option<&str>)> = vec![
        ("{not json".into(), 400, "malformed_json", None),
        ("".into(), 400, "malformed_json", None),
        (
            r#"{"id":"a","debit":"merchant:m","credit":"user:u","amount":1,"currency":"CNY","extra":1}"#.into(),
            400, "unknown_field", Some("extra"),
        ),
        (
            r#"{"id":"a","debit":"merchant:m","credit":"user:u","amount":"1","currency":"CNY"}"#.into(),
            400, "invalid_field", Some("amount"),
        ),
        (
            r#"{"id":"a","debit":"merchant:m","credit":"user:u","amount":1.5,"currency":"CNY"}"#.into(),
            400, "invalid_field", Some("amount"),
        ),
        (
            r#"{"id":"a","debit":"merchant:m","credit":"user:u","amount":99999999999999999999,"currency":"CNY"}"#.into(),
            400, "invalid_field", Some("amount"),
        ),
        (
            r#"{"id":"a","debit":"merchant:m","credit":"user:u","currency":"CNY"}"#.into(),
            400, "missing_field", Some("amount"),
        ),
        (
            r#"{"id":"a","debit":"merchant:m","credit":"user:u","amount":0,"currency":"CNY"}"#.into(),
            422, "invalid_amount", Some("amount"),
        ),
        (
            r#"{"id":"a","debit":"merchant:m","credit":"user:u","amount":-5,"currency":"CNY"}"#.into(),
            422, "invalid_amount", Some("amount"),
        ),
        (
            r#"{"id":"a","debit":"merchant:m","credit":"user:u","amount":1000000000000001,"currency":"CNY"}"#.into(),
            422, "invalid_amount", Some("amount"),
        ),
        (
            r#"{"id":"a","debit":"merchant:m","credit":"user:u","amount":1,"currency":"XBT"}"#.into(),
            422, "unknown_currency", Some("currency"),
        ),
        (
            r#"{"id":"a","debit":"merchant:m","credit":"user:u","amount":1,"currency":"cny"}"#.into(),
            422, "unknown_currency", Some("currency"),
        ),
        (
            r#"{"id":"a","debit":"bank:1","credit":"user:u","amount":1,"currency":"CNY"}"#.into(),
            422, "invalid_account", Some("debit"),
        ),
        (
            r#"{"id":"a","debit":"merchant:m","credit":"user:a/b","amount":1,"currency":"CNY"}"#.into(),
            422, "invalid_account", Some("credit"),
        ),
        (
            r#"{"id":"a","debit":"merchant:m","credit":"merchant:m","amount":1,"currency":"CNY"}"#.into(),
            422, "same_account", Some("credit"),
        ),
        (
            r#"{"id":"","debit":"merchant:m","credit":"user:u","amount":1,"currency":"CNY"}"#.into(),
            422, "invalid_transfer_id", Some("id"),
        ),
        (
            format!(r#"{{"id":"a","debit":"merchant:m","credit":"user:u","amount":1,"currency":"CNY","metadata":{big_metadata}}}"#),
            422, "metadata_too_large", Some("metadata"),
        ),
        (
            r#"{"id":"a","debit":"merchant:m","credit":"user:u","amount":1,"currency":"CNY","metadata":"text"}"#.into(),
            422, "invalid_metadata", Some("metadata"),
        ),
        (
            r#"{"id":"a","debit":"merchant:m","credit":"user:u","amount":5000,"currency":"CNY"}"#.into(),
            422, "insufficient_funds", Some("amount"),
        ),
    ];
    for (body, status, code, field) in cases {
        let response = app.post_raw("/transfers", &body).await;
        assert_eq!(response.status(), status, "{body}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json",
            "{body}"
        );
        let problem: serde_json::Value = response.json().await.unwrap();
        assert_eq!(problem["code"], code, "{body} -> {problem}");
        assert_eq!(problem["field"].as_str(), field, "{body} -> {problem}");
        assert_eq!(snapshot(&app).await, before, "{body} changed the ledger");
    }

    // No content type, a wrong one, and a body over the limit. The server answers these
    // without reading the body and then closes the connection, so they go on connections of
    // their own instead of the shared pool.
    let unpooled = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let no_type = unpooled
        .post(format!("{}/transfers", app.address))
        .body(r#"{"id":"a"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(no_type.status(), 415);
    assert_eq!(
        no_type.headers()["content-type"],
        "application/problem+json"
    );
    // Just over the bound: the client finishes writing before the server refuses and closes
    // (a body megabytes over it can meet the closed connection while still being written).
    let huge = format!(
        r#"{{"transfers": [{}]}}"#,
        "1,".repeat((redpacket_wallet::BODY_LIMIT_BYTES + 1024) / 2)
    );
    let too_large = unpooled
        .post(format!("{}/transfers/batch", app.address))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(too_large.status(), 413);
    assert_eq!(
        too_large.headers()["content-type"],
        "application/problem+json"
    );
    let wrong_method = app.get("/transfers").await;
    assert_eq!(wrong_method.status(), 405);
    assert_eq!(
        wrong_method.headers()["content-type"],
        "application/problem+json"
    );

    assert_eq!(snapshot(&app).await, before);
    app.assert_invariants().await;
    app.stop().await;
}
on_every_backend!(every_bad_input_is_a_problem_and_changes_nothing);
