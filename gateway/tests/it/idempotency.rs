//! Idempotent means the same answer: a retry with the same `Idempotency-Key` and the same
//! request answers the original result, whatever differs between attempts (every retry of a
//! real client carries a new request id).

use redpacket_common::auth::Role;
use serde_json::{Value, json};

use crate::system::{System, token};

/// Sends `body` to `path` with a request id of its own and the given idempotency key.
async fn attempt(
    system: &System,
    path: &str,
    bearer: &str,
    key: Option<&str>,
    request_id: &str,
    body: Value,
) -> (u16, Value) {
    let mut request = system
        .gateway
        .client
        .post(format!("{}{path}", system.gateway.url))
        .bearer_auth(bearer)
        .header("X-Request-Id", request_id);
    if !body.is_null() {
        request = request.json(&body);
    }
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    assert_eq!(
        response.headers()["x-request-id"].to_str().unwrap(),
        request_id,
        "each attempt is its own request"
    );
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_top_up_retried_with_a_new_request_id_answers_the_original_transfer() {
    let system = System::start().await;
    let operator = token(Role::Operator, "ops");
    let body = json!({"merchant_id": "acme", "amount": 500, "currency": "CNY"});
    let path = "/v1/admin/topups";
    let (status, first) = attempt(
        &system,
        path,
        &operator,
        Some("tk-1"),
        "rid-a1",
        body.clone(),
    )
    .await;
    assert_eq!(status, 200, "{first}");
    for retry in ["rid-a2", "rid-a3"] {
        let (status, again) =
            attempt(&system, path, &operator, Some("tk-1"), retry, body.clone()).await;
        assert_eq!(
            (status, &again),
            (200, &first),
            "a retry answers the original"
        );
    }
    // Only a different request under the same key is a conflict.
    for different in [
        json!({"merchant_id": "acme", "amount": 501, "currency": "CNY"}),
        json!({"merchant_id": "other", "amount": 500, "currency": "CNY"}),
    ] {
        let (status, problem) =
            attempt(&system, path, &operator, Some("tk-1"), "rid-a4", different).await;
        assert_eq!(
            (status, problem["code"].as_str()),
            (409, Some("transfer_conflict"))
        );
    }
    let (_, wallet) = system
        .gateway
        .get("/v1/merchants/me/wallet", &token(Role::Merchant, "acme"))
        .await;
    assert_eq!(wallet["balance"], 500, "the money moved once");
}

#[tokio::test]
async fn a_campaign_create_and_a_cancel_retried_with_new_request_ids_answer_the_original() {
    let system = System::start().await;
    system.top_up("acme", 10_000).await;
    let merchant = token(Role::Merchant, "acme");
    let body = json!({
        "title": "retried", "currency": "CNY", "total_amount": 1_000,
        "packet_count": 10, "split": {"mode": "fixed"},
        "starts_at": redpacket_common::time::rfc3339_in(300_000),
        "ends_at": redpacket_common::time::rfc3339_in(600_000)
    });
    let (status, created) = attempt(
        &system,
        "/v1/campaigns",
        &merchant,
        Some("ck-1"),
        "rid-c1",
        body.clone(),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let (status, again) = attempt(
        &system,
        "/v1/campaigns",
        &merchant,
        Some("ck-1"),
        "rid-c2",
        body.clone(),
    )
    .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["id"], created["id"]);
    assert_eq!(
        again["seed"], created["seed"],
        "the original split, not a new one"
    );
    let mut other = body.clone();
    other["total_amount"] = json!(2_000);
    let (status, problem) = attempt(
        &system,
        "/v1/campaigns",
        &merchant,
        Some("ck-1"),
        "rid-c3",
        other,
    )
    .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (409, Some("idempotency_key_reused"))
    );

    system.wait_status("acme", &id, "scheduled").await;
    let cancel = format!("/v1/campaigns/{id}/cancel");
    let (status, cancelled) =
        attempt(&system, &cancel, &merchant, None, "rid-x1", Value::Null).await;
    assert_eq!(
        (status, cancelled["status"].as_str()),
        (200, Some("cancelled")),
        "{cancelled}"
    );
    let (status, again) = attempt(&system, &cancel, &merchant, None, "rid-x2", Value::Null).await;
    assert_eq!(
        (status, again["status"].as_str()),
        (200, Some("cancelled")),
        "{again}"
    );
    assert_eq!(again["id"], cancelled["id"]);
    let (_, page) = system.gateway.get("/v1/campaigns", &merchant).await;
    assert_eq!(
        page["campaigns"].as_array().unwrap().len(),
        1,
        "one campaign, {page}"
    );
}
