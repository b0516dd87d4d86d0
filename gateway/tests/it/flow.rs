//! The main flow end to end through the gateway, bad input, request ids and degradation.

use std::time::{Duration, Instant};

use redpacket_common::auth::Role;
use reqwest::Method;
use serde_json::{Value, json};

use crate::system::{System, token};

async fn wait_credited(system: &System, user: &str, claim: &str) -> Value {
    let user = token(Role::User, user);
    for _ in 0..300 {
        let (status, body) = system
            .gateway
            .get(&format!("/v1/claims/{claim}"), &user)
            .await;
        assert_eq!(status, 200, "{body}");
        if body["status"] == "credited" {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("claim {claim} never credited");
}

#[tokio::test]
async fn the_main_flow_moves_money_from_merchant_to_users() {
    let system = System::start().await;
    let gw = &system.gateway;
    system.top_up("acme", 100_000).await;
    let merchant = token(Role::Merchant, "acme");
    let (status, wallet) = gw.get("/v1/merchants/me/wallet", &merchant).await;
    assert_eq!(status, 200);
    assert_eq!(
        wallet,
        json!({"account": "merchant:acme", "currency": "CNY", "balance": 100_000})
    );

    let id = system.active_campaign("acme", 10_000, 10).await;
    let (_, after_funding) = gw.get("/v1/merchants/me/wallet", &merchant).await;
    assert_eq!(after_funding["balance"], 90_000, "the total went to escrow");

    let mut claims = Vec::new();
    for i in 0..5 {
        let user = format!("u{i}");
        let (status, grabbed) = gw
            .post(
                &format!("/v1/campaigns/{id}/grab"),
                &token(Role::User, &user),
                None,
            )
            .await;
        assert_eq!(status, 200, "{grabbed}");
        assert_eq!(grabbed["status"], "pending");
        assert_eq!(grabbed["currency"], "CNY");
        assert!(grabbed["amount"].as_i64().unwrap() >= 1);
        claims.push((user, grabbed));
    }
    // A second grab by the same user: limit reached, with the existing claim.
    let (status, problem) = gw
        .post(
            &format!("/v1/campaigns/{id}/grab"),
            &token(Role::User, "u0"),
            None,
        )
        .await;
    assert_eq!(status, 409);
    assert_eq!(problem["code"], "limit_reached");

    let mut total = 0;
    for (user, grabbed) in &claims {
        let claim_id = grabbed["claim_id"].as_str().unwrap();
        let claim = wait_credited(&system, user, claim_id).await;
        assert_eq!(claim["user_id"], user.as_str());
        assert_eq!(claim["campaign_id"], id.as_str());
        assert!(claim["credited_at"].is_string());
        let (_, wallet) = gw.get("/v1/me/wallet", &token(Role::User, user)).await;
        assert_eq!(wallet["balance"], grabbed["amount"]);
        assert_eq!(wallet["account"], format!("user:{user}"));
        let (_, entries) = gw
            .get("/v1/me/wallet/entries", &token(Role::User, user))
            .await;
        assert_eq!(entries["entries"].as_array().unwrap().len(), 1);
        let (_, mine) = gw.get("/v1/me/claims", &token(Role::User, user)).await;
        assert_eq!(mine["claims"][0]["id"], claim_id);
        total += grabbed["amount"].as_i64().unwrap();
    }

    let (status, stats) = gw
        .get(&format!("/v1/campaigns/{id}/stats"), &merchant)
        .await;
    assert_eq!(status, 200);
    for field in [
        "packets_total",
        "packets_remaining",
        "packets_grabbed",
        "packets_credited",
        "packets_compensated",
        "amount_total",
        "amount_remaining",
        "amount_grabbed",
        "amount_credited",
        "amount_refunded",
    ] {
        assert!(stats[field].is_i64(), "stats lack {field}: {stats}");
    }
    assert_eq!(stats["packets_credited"], 5);
    assert_eq!(stats["amount_credited"], total);
    let (_, page) = gw
        .get(&format!("/v1/campaigns/{id}/claims"), &merchant)
        .await;
    assert_eq!(page["claims"].as_array().unwrap().len(), 5);
    let (_, mine) = gw.get("/v1/campaigns", &merchant).await;
    assert_eq!(mine["campaigns"][0]["id"], id.as_str());

    // A user never seen has an empty wallet, not an error.
    let (status, empty) = gw.get("/v1/me/wallet", &token(Role::User, "nobody")).await;
    assert_eq!((status.as_u16(), empty["balance"].as_i64()), (200, Some(0)));

    let (status, reconciliation) = gw
        .get("/v1/admin/reconciliation", &token(Role::Operator, "ops"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(reconciliation["ok"], true, "{reconciliation:#}");
    let names: Vec<&str> = reconciliation["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|check| check["name"].as_str().unwrap())
        .collect();
    for name in [
        "ledger_sums_to_zero",
        "users_within_limit",
        "escrow_matches_claims",
    ] {
        assert!(names.contains(&name), "{names:?}");
    }
}

#[tokio::test]
async fn the_request_id_reaches_the_claim_and_comes_back() {
    let system = System::start().await;
    system.top_up("acme", 1_000).await;
    let id = system.active_campaign("acme", 100, 2).await;
    let response = system
        .gateway
        .client
        .post(format!("{}/v1/campaigns/{id}/grab", system.gateway.url))
        .bearer_auth(token(Role::User, "u1"))
        .header("X-Request-Id", "trace-me-123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "trace-me-123");
    let claim: Value = response.json().await.unwrap();
    let claim_id = claim["claim_id"].as_str().unwrap();
    wait_credited(&system, "u1", claim_id).await;
    let recorded = system
        .campaigns
        .store()
        .claim(claim_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(recorded.request_id.as_deref(), Some("trace-me-123"));
}

#[tokio::test]
async fn bad_input_gets_a_clear_problem_and_changes_nothing() {
    let system = System::start().await;
    let gw = &system.gateway;
    let merchant = token(Role::Merchant, "acme");
    let operator = token(Role::Operator, "ops");
    let valid = json!({
        "title": "t", "currency": "CNY", "total_amount": 100, "packet_count": 10,
        "split": {"mode": "fixed"}, "starts_at": "2030-01-01T00:00:00Z",
        "ends_at": "2030-01-01T01:00:00Z"
    });
    let with = |name: &str, value: Value| {
        let mut body = valid.clone();
        body[name] = value;
        body
    };
    let mut without_title = valid.clone();
    without_title.as_object_mut().unwrap().remove("title");
    let cases = [
        (
            with("surprise", json!(1)),
            400,
            "unknown_field",
            Some("surprise"),
        ),
        (without_title, 400, "missing_field", Some("title")),
        (
            with("packet_count", json!("ten")),
            400,
            "invalid_field",
            Some("packet_count"),
        ),
        (
            with("split", json!({"mode": "weird"})),
            400,
            "invalid_field",
            Some("split.mode"),
        ),
        (
            with("packet_count", json!(0)),
            422,
            "invalid_field",
            Some("packet_count"),
        ),
        (
            with("total_amount", json!(5)),
            422,
            "impossible_split",
            Some("total_amount"),
        ),
        (
            with("ends_at", json!("2029-01-01T00:00:00Z")),
            422,
            "invalid_field",
            Some("ends_at"),
        ),
        (
            with("title", json!("")),
            422,
            "invalid_field",
            Some("title"),
        ),
    ];
    for (body, status, code, field) in cases {
        let (got, problem) = gw
            .post("/v1/campaigns", &merchant, Some(body.clone()))
            .await;
        assert_eq!(got.as_u16(), status, "{body} → {problem}");
        assert_eq!(problem["code"], code, "{body} → {problem}");
        assert_eq!(problem["field"].as_str(), field, "{body} → {problem}");
    }
    // An idempotency key that is not ASCII is refused by name, not ignored (a retry would
    // then create the campaign twice).
    for key in ["café", "CAFÉ"] {
        let response = gw
            .client
            .post(format!("{}/v1/campaigns", gw.url))
            .bearer_auth(&merchant)
            .header(
                "Idempotency-Key",
                reqwest::header::HeaderValue::from_bytes(key.as_bytes()).unwrap(),
            )
            .json(&valid)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422, "{key}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "invalid_field", "{problem}");
        assert_eq!(problem["field"], "Idempotency-Key", "{problem}");
    }
    let (_, page) = gw.get("/v1/campaigns", &merchant).await;
    assert_eq!(page["campaigns"], json!([]), "nothing was created");

    // A body over the limit is refused before it is read.
    let huge = with("title", json!("x".repeat(300 * 1024)));
    let (status, problem) = gw.post("/v1/campaigns", &merchant, Some(huge)).await;
    assert_eq!(
        (status.as_u16(), problem["code"].as_str()),
        (413, Some("payload_too_large"))
    );

    // Top-ups: the key is required and checked, the merchant id too; the wallet's own rules
    // come back with its codes.
    let topup = |key: Option<&str>, body: Value| {
        let mut request = gw
            .client
            .post(format!("{}/v1/admin/topups", gw.url))
            .bearer_auth(&operator)
            .json(&body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let body = json!({"merchant_id": "acme", "amount": 10, "currency": "CNY"});
    let (status, problem) = topup(None, body.clone()).await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (400, Some("Idempotency-Key"))
    );
    let (status, problem) = topup(Some("bad key!"), body.clone()).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (400, Some("invalid_idempotency_key"))
    );
    let (status, problem) = topup(
        Some("k1"),
        json!({"merchant_id": "a b", "amount": 10, "currency": "CNY"}),
    )
    .await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (422, Some("merchant_id"))
    );
    let (status, problem) = topup(
        Some("k2"),
        json!({"merchant_id": "acme", "amount": -5, "currency": "CNY"}),
    )
    .await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (422, Some("amount")),
        "{problem}"
    );
    let (status, _) = topup(Some("k3"), body.clone()).await;
    assert_eq!(status, 200);
    let (status, problem) = topup(
        Some("k3"),
        json!({"merchant_id": "acme", "amount": 11, "currency": "CNY"}),
    )
    .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (409, Some("transfer_conflict"))
    );
    let (_, wallet) = gw.get("/v1/merchants/me/wallet", &merchant).await;
    assert_eq!(
        wallet["balance"], 10,
        "only the one valid top-up moved money"
    );

    // Ids and cursors that cannot be ours.
    let user = token(Role::User, "u1");
    let (status, problem) = gw.post("/v1/campaigns/../../x/grab", &user, None).await;
    assert_eq!(status, 404, "{problem}");
    let (status, problem) = gw.post("/v1/campaigns/abc/grab", &user, None).await;
    assert_eq!(
        (status.as_u16(), problem["code"].as_str()),
        (404, Some("campaign_not_found"))
    );
    let (status, problem) = gw.get("/v1/claims/zz-not-hex", &user).await;
    assert_eq!(
        (status.as_u16(), problem["code"].as_str()),
        (404, Some("claim_not_found"))
    );
    let (status, problem) = gw.get("/v1/me/claims?cursor=%27%3B", &user).await;
    assert_eq!(
        (status.as_u16(), problem["field"].as_str()),
        (400, Some("cursor"))
    );
    let (status, _, problem) = gw.send(Method::GET, "/v1/nowhere", Some(&user), None).await;
    assert_eq!(
        (status.as_u16(), problem["code"].as_str()),
        (404, Some("not_found"))
    );
}

#[tokio::test]
async fn with_the_campaign_service_down_grabs_fail_fast_and_stats_go_stale() {
    let mut system = System::start().await;
    system.top_up("acme", 1_000).await;
    let id = system.active_campaign("acme", 100, 10).await;
    let merchant = token(Role::Merchant, "acme");
    let (status, fresh) = system
        .gateway
        .get(&format!("/v1/campaigns/{id}/stats"), &merchant)
        .await;
    assert_eq!(status, 200);

    system.stop_campaign_service().await;
    let user = token(Role::User, "u1");
    for _ in 0..30 {
        let started = Instant::now();
        let (status, headers, problem) = system
            .gateway
            .send(
                Method::POST,
                &format!("/v1/campaigns/{id}/grab"),
                Some(&user),
                None,
            )
            .await;
        assert_eq!(status, 503, "{problem}");
        assert!(headers.contains_key("retry-after"));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a grab must fail fast, took {:?}",
            started.elapsed()
        );
    }
    let (status, headers, stale) = system
        .gateway
        .send(
            Method::GET,
            &format!("/v1/campaigns/{id}/stats"),
            Some(&merchant),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(stale, fresh, "the last known figures");
    assert!(headers.contains_key("x-stale-seconds"), "{headers:?}");
    assert!(headers["warning"].to_str().unwrap().starts_with("110"));
    let (_, breakers) = system
        .gateway
        .get("/v1/admin/breakers", &token(Role::Operator, "ops"))
        .await;
    let campaign = breakers["breakers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["upstream"] == "campaign")
        .unwrap();
    assert_eq!(campaign["state"], "open", "{breakers}");
}
