//! Ids are exact: user ids, merchant ids, claim ids and idempotency keys that differ only by
//! case are different on every database, and ids outside the API's alphabet are refused.

use serde_json::{Value, json};

use crate::helpers::{Setup, TestApp, assert_problem, campaign_body, spawn_app};
use crate::on_every_pool;

/// Creates a campaign with an `Idempotency-Key`.
async fn create_with_key(app: &TestApp, body: &Value, key: &[u8]) -> reqwest::Response {
    app.client
        .post(format!("{}/campaigns", app.address))
        .header(
            "Idempotency-Key",
            reqwest::header::HeaderValue::from_bytes(key).unwrap(),
        )
        .json(body)
        .send()
        .await
        .unwrap()
}

/// The ids of a merchant's campaigns, newest first.
async fn campaigns_of(app: &TestApp, merchant: &str) -> Vec<String> {
    let page = app
        .get_json(&format!("/campaigns?merchant_id={merchant}"))
        .await;
    page["campaigns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|campaign| {
            assert_eq!(campaign["merchant_id"], merchant, "{campaign}");
            campaign["id"].as_str().unwrap().to_owned()
        })
        .collect()
}

async fn users_differing_only_by_case_are_different_users_for_limits_and_claims_on_every_database(
    setup: Setup,
) {
    let app = spawn_app(setup).await;
    let id = app.create(&campaign_body(1_000, 10, 1)).await;
    app.fund_and_open(&id).await;

    let users = ["alice", "Alice", "ALICE"];
    let mut claims = Vec::new();
    for user in users {
        let response = app.grab(&id, user).await;
        assert_eq!(response.status(), 200, "{user} grabs under a limit of one");
        let grab: Value = response.json().await.unwrap();
        claims.push(grab["claim_id"].as_str().unwrap().to_owned());
    }
    let again = assert_problem(app.grab(&id, "Alice").await, 409, "limit_reached", None).await;
    assert_eq!(again["claims"].as_array().unwrap().len(), 1, "{again}");
    assert_eq!(again["claims"][0]["claim_id"], claims[1].as_str());

    // The saga records every claim; alice's is credited.
    let handoff = app.handoff(&id, 4).await;
    assert_eq!(handoff.len(), 3);
    for (claim, user, seq, amount) in &handoff {
        let record = json!({
            "campaign_id": id, "user_id": user, "packet_seq": seq, "amount": amount,
            "currency": "CNY", "grabbed_at_ms": chrono::Utc::now().timestamp_millis()
        });
        let response = app.post(&format!("/claims/{claim}/record"), &record).await;
        assert_eq!(response.status(), 200, "record {claim} of {user}");
    }
    let credited = app
        .post(&format!("/claims/{}/credited", claims[0]), &json!({}))
        .await;
    assert_eq!(credited.status(), 200);

    // Before, MariaDB listed all three claims as each spelling's.
    for (user, claim) in users.iter().zip(&claims) {
        let mine = app.get_json(&format!("/users/{user}/claims")).await;
        let mine = mine["claims"].as_array().unwrap();
        assert_eq!(mine.len(), 1, "{user}: {mine:?}");
        assert_eq!(mine[0]["id"], claim.as_str());
        assert_eq!(mine[0]["user_id"], *user);
        let status = if *user == "alice" {
            "credited"
        } else {
            "pending"
        };
        assert_eq!(mine[0]["status"], status, "{user}");
    }
    // Claim ids are lowercase hex: an uppercased one names no claim.
    assert_problem(
        app.get(&format!("/claims/{}", claims[0].to_uppercase()))
            .await,
        404,
        "claim_not_found",
        None,
    )
    .await;
    // Three users within a limit of one each, counted as three.
    let reconciliation = app.get_json("/reconciliation").await;
    let checks = reconciliation["checks"].as_array().unwrap();
    assert!(checks.iter().all(|c| c["ok"] == true), "{reconciliation}");
    let stats = app.get_json(&format!("/campaigns/{id}/stats")).await;
    assert_eq!(stats["packets_credited"], 1);
    assert_eq!(stats["packets_in_flight"], 2);
    app.stop().await;
}
on_every_pool!(
    users_differing_only_by_case_are_different_users_for_limits_and_claims_on_every_database
);

async fn merchants_differing_only_by_case_own_different_campaigns_on_every_database(setup: Setup) {
    let app = spawn_app(setup).await;
    let mut created = Vec::new();
    // The same idempotency key, each merchant its own: two campaigns.
    for merchant in ["m1", "M1"] {
        let mut body = campaign_body(1_000, 10, 1);
        body["merchant_id"] = json!(merchant);
        let response = create_with_key(&app, &body, b"create-1").await;
        assert_eq!(response.status(), 201, "{merchant}");
        let campaign: Value = response.json().await.unwrap();
        assert_eq!(campaign["merchant_id"], merchant);
        created.push(campaign["id"].as_str().unwrap().to_owned());
    }
    assert_ne!(created[0], created[1]);
    assert_eq!(campaigns_of(&app, "m1").await, [created[0].as_str()]);
    assert_eq!(campaigns_of(&app, "M1").await, [created[1].as_str()]);

    // A merchant cannot cancel the other's campaign.
    assert_problem(
        app.post(
            &format!("/campaigns/{}/cancel", created[0]),
            &json!({"merchant_id": "M1"}),
        )
        .await,
        404,
        "campaign_not_found",
        None,
    )
    .await;
    assert_eq!(
        app.get_json(&format!("/campaigns/{}", created[0])).await["status"],
        "funding"
    );
    app.stop().await;
}
on_every_pool!(merchants_differing_only_by_case_own_different_campaigns_on_every_database);

async fn idempotency_keys_differing_only_by_case_create_different_campaigns_on_every_database(
    setup: Setup,
) {
    let app = spawn_app(setup).await;
    let body = campaign_body(1_000, 10, 1);
    let mut created = Vec::new();
    for key in ["Key-1", "key-1", "KEY-1"] {
        let response = create_with_key(&app, &body, key.as_bytes()).await;
        // Before, MariaDB answered `key-1` with the campaign of `Key-1`, as a replay.
        assert_eq!(response.status(), 201, "{key}");
        let campaign: Value = response.json().await.unwrap();
        created.push(campaign["id"].as_str().unwrap().to_owned());
    }
    // Each key still replays as itself.
    for (key, id) in ["Key-1", "key-1", "KEY-1"].iter().zip(&created) {
        let response = create_with_key(&app, &body, key.as_bytes()).await;
        assert_eq!(response.status(), 200, "{key}");
        assert_eq!(response.json::<Value>().await.unwrap()["id"], id.as_str());
    }
    // A title differing by an accent is another request under the same key.
    let mut accented = body.clone();
    accented["title"] = json!("Spring festival café");
    assert_eq!(
        create_with_key(&app, &accented, b"title-1").await.status(),
        201
    );
    accented["title"] = json!("Spring festival cafe");
    assert_problem(
        create_with_key(&app, &accented, b"title-1").await,
        409,
        "idempotency_key_reused",
        Some("Idempotency-Key"),
    )
    .await;
    let mut listed = campaigns_of(&app, "m1").await;
    listed.sort();
    assert_eq!(listed.len(), 4);
    created.sort();
    assert!(created.iter().all(|id| listed.contains(id)));
    app.stop().await;
}
on_every_pool!(
    idempotency_keys_differing_only_by_case_create_different_campaigns_on_every_database
);

async fn non_ascii_ids_are_refused_naming_the_field_and_change_nothing_on_every_database(
    setup: Setup,
) {
    let app = spawn_app(setup).await;
    let id = app.create(&campaign_body(1_000, 10, 1)).await;
    app.fund_and_open(&id).await;
    // Owner ids are ASCII letters, digits, `-` and `_`; idempotency keys visible ASCII.
    for look_alike in ["café", "cafe\u{301}", "CAFÉ"] {
        let mut body = campaign_body(1_000, 10, 1);
        body["merchant_id"] = json!(look_alike);
        assert_problem(
            app.post("/campaigns", &body).await,
            422,
            "invalid_field",
            Some("merchant_id"),
        )
        .await;
        assert_problem(
            app.get(&format!("/campaigns?merchant_id={look_alike}"))
                .await,
            422,
            "invalid_field",
            Some("merchant_id"),
        )
        .await;
        assert_problem(
            app.grab(&id, look_alike).await,
            422,
            "invalid_field",
            Some("user_id"),
        )
        .await;
        assert_problem(
            app.get(&format!("/users/{look_alike}/claims")).await,
            422,
            "invalid_field",
            Some("user_id"),
        )
        .await;
        // Sent as its UTF-8 bytes, the key is refused, not ignored: ignored, a retry would
        // create the campaign twice.
        assert_problem(
            create_with_key(&app, &campaign_body(1_000, 10, 1), look_alike.as_bytes()).await,
            422,
            "invalid_field",
            Some("Idempotency-Key"),
        )
        .await;
    }
    assert_eq!(campaigns_of(&app, "m1").await, [id.as_str()]);
    assert!(app.handoff(&id, 4).await.is_empty());
    let stats = app.get_json(&format!("/campaigns/{id}/stats")).await;
    assert_eq!(stats["packets_remaining"], 10);
    app.stop().await;
}
on_every_pool!(non_ascii_ids_are_refused_naming_the_field_and_change_nothing_on_every_database);
