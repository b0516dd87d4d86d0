//! Ids are exact: account names and transfer ids that differ only by case are different
//! accounts and transfers on every database, and ids outside the API's alphabet are refused.

use redpacket_common::on_every_backend;
use redpacket_common::testing::Backend;
use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_problem, spawn_app, transfer_body};

/// An account's entries as `(transfer id, amount)`, newest first.
async fn entries(app: &TestApp, name: &str) -> Vec<(String, i64)> {
    let response = app.get(&format!("/accounts/{name}/entries")).await;
    assert_eq!(response.status(), 200, "entries of {name}");
    let page: Value = response.json().await.unwrap();
    page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            (
                entry["transfer_id"].as_str().unwrap().to_owned(),
                entry["amount"].as_i64().unwrap(),
            )
        })
        .collect()
}

async fn accounts_differing_only_by_case_are_different_accounts_on_every_database(
    backend: Backend,
) {
    let app = spawn_app(backend).await;
    app.transfer_ok("top-Alice", "external", "user:Alice", 100)
        .await;
    // Before, MariaDB found Alice's row for this name, and the credit answered 500.
    app.transfer_ok("top-alice", "external", "user:alice", 7)
        .await;

    for (name, balance, transfer) in [
        ("user:Alice", 100, "top-Alice"),
        ("user:alice", 7, "top-alice"),
    ] {
        let account: Value = app
            .get(&format!("/accounts/{name}"))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(
            account,
            json!({"name": name, "currency": "CNY", "balance": balance, "version": 1})
        );
        assert_eq!(entries(&app, name).await, [(transfer.to_owned(), balance)]);
    }
    assert_problem(
        app.get("/accounts/user:ALICE").await,
        404,
        "account_not_found",
        None,
    )
    .await;

    // Money moves between the two like between any two accounts.
    app.transfer_ok("alice-to-Alice", "user:alice", "user:Alice", 7)
        .await;
    assert_eq!(app.balance("user:Alice").await, 107);
    assert_eq!(app.balance("user:alice").await, 0);
    app.assert_invariants().await;
    app.stop().await;
}
on_every_backend!(accounts_differing_only_by_case_are_different_accounts_on_every_database);

async fn transfer_ids_differing_only_by_case_are_different_transfers_on_every_database(
    backend: Backend,
) {
    let app = spawn_app(backend).await;
    let first = app
        .transfer(&transfer_body("T-1", "external", "user:u", 5))
        .await;
    assert_eq!(first.status(), 200);
    // The same body under `t-1` is a transfer of its own: neither a replay nor a conflict.
    let second = app
        .transfer(&transfer_body("t-1", "external", "user:u", 5))
        .await;
    assert_eq!(second.status(), 200);
    assert!(second.headers().get("idempotent-replayed").is_none());
    let second: Value = second.json().await.unwrap();
    assert_eq!(second["id"], "t-1");
    assert_eq!(second["credit_balance_after"], 10);
    assert_eq!(app.balance("user:u").await, 10);

    // Each id still replays as itself and conflicts as itself.
    let again = app
        .transfer(&transfer_body("T-1", "external", "user:u", 5))
        .await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(
        again.json::<Value>().await.unwrap()["credit_balance_after"],
        5
    );
    assert_problem(
        app.transfer(&transfer_body("T-1", "external", "user:u", 6))
            .await,
        409,
        "transfer_conflict",
        Some("id"),
    )
    .await;
    assert_eq!(
        entries(&app, "user:u").await,
        [("t-1".to_owned(), 5), ("T-1".to_owned(), 5)]
    );
    app.assert_invariants().await;
    app.stop().await;
}
on_every_backend!(transfer_ids_differing_only_by_case_are_different_transfers_on_every_database);

async fn a_batch_holding_ids_differing_only_by_case_applies_every_transfer_on_every_database(
    backend: Backend,
) {
    let app = spawn_app(backend).await;
    app.transfer_ok("fund", "external", "escrow:c1", 1_000)
        .await;
    app.transfer_ok("first-Bob", "escrow:c1", "user:Bob", 1)
        .await;
    // Before, on MariaDB one credit to `user:bob` failed the whole batch it rode in, with 500,
    // on every retry: the batch's other credits never landed.
    let transfers = vec![
        transfer_body("grab:A1", "escrow:c1", "user:bob", 10),
        transfer_body("grab:a1", "escrow:c1", "user:Bob", 20),
        transfer_body("grab:B1", "escrow:c1", "user:BOB", 30),
        transfer_body("grab:b1", "escrow:c1", "user:carol", 40),
    ];
    let response = app.batch(transfers).await;
    assert_eq!(response.status(), 200);
    let results: Value = response.json().await.unwrap();
    let results = results["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    for (result, (id, balance_after)) in results.iter().zip([
        ("grab:A1", 10),
        ("grab:a1", 21),
        ("grab:B1", 30),
        ("grab:b1", 40),
    ]) {
        assert_eq!(result["ok"], true, "{result}");
        assert_eq!(result["transfer"]["id"], id, "{result}");
        assert_eq!(
            result["transfer"]["credit_balance_after"], balance_after,
            "{result}"
        );
    }
    assert_eq!(app.balance("user:bob").await, 10);
    assert_eq!(app.balance("user:Bob").await, 21);
    assert_eq!(app.balance("user:BOB").await, 30);
    assert_eq!(app.balance("user:carol").await, 40);
    assert_eq!(app.balance("escrow:c1").await, 899);
    app.assert_invariants().await;
    app.stop().await;
}
on_every_backend!(
    a_batch_holding_ids_differing_only_by_case_applies_every_transfer_on_every_database
);

async fn non_ascii_ids_are_refused_naming_the_field_and_change_nothing_on_every_database(
    backend: Backend,
) {
    let app = spawn_app(backend).await;
    app.transfer_ok("seed", "external", "user:cafe", 10).await;
    // Account ids and transfer ids are ASCII letters, digits and a few signs: `café`, its
    // decomposed spelling and `CAFÉ` are refused, never taken for `cafe`.
    for look_alike in ["café", "cafe\u{301}", "CAFÉ"] {
        for (body, field, code) in [
            (
                transfer_body("t-1", "user:cafe", &format!("user:{look_alike}"), 1),
                "credit",
                "invalid_account",
            ),
            (
                transfer_body("t-1", &format!("user:{look_alike}"), "user:cafe", 1),
                "debit",
                "invalid_account",
            ),
            (
                transfer_body(&format!("t-{look_alike}"), "user:cafe", "user:x", 1),
                "id",
                "invalid_transfer_id",
            ),
        ] {
            assert_problem(app.transfer(&body).await, 422, code, Some(field)).await;
            let batch: Value = app.batch(vec![body]).await.json().await.unwrap();
            assert_eq!(batch["results"][0]["ok"], false, "{batch}");
            assert_eq!(batch["results"][0]["error"]["code"], code, "{batch}");
            assert_eq!(batch["results"][0]["error"]["field"], field, "{batch}");
        }
        for path in [
            format!("/accounts/user:{look_alike}"),
            format!("/accounts/user:{look_alike}/entries"),
        ] {
            assert_problem(app.get(&path).await, 422, "invalid_account", Some("name")).await;
        }
    }
    assert_eq!(app.balance("user:cafe").await, 10);
    assert_eq!(entries(&app, "user:cafe").await, [("seed".to_owned(), 10)]);
    app.assert_invariants().await;
    app.stop().await;
}
on_every_backend!(non_ascii_ids_are_refused_naming_the_field_and_change_nothing_on_every_database);
