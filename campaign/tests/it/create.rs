use redpacket_campaign::entity::packet;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use serde_json::{Value, json};

use crate::helpers::{Setup, TestApp, assert_problem, campaign_body, rfc3339_in, spawn_app};
use crate::on_every_pool;

async fn packets_of(app: &TestApp, id: &str) -> Vec<i64> {
    packet::Entity::find()
        .filter(packet::Column::CampaignId.eq(id.parse::<i64>().unwrap()))
        .order_by_asc(packet::Column::Seq)
        .all(app.service.store().db())
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.amount)
        .collect()
}

async fn a_created_campaign_waits_for_funding_with_its_split_stored(setup: Setup) {
    let app = spawn_app(setup).await;
    let body = campaign_body(10_000, 100, 2);
    let response = app.post("/campaigns", &body).await;
    assert_eq!(response.status(), 201);
    let campaign: Value = response.json().await.unwrap();
    assert_eq!(campaign["status"], "funding");
    assert_eq!(campaign["total_amount"], 10_000);
    assert_eq!(campaign["packet_count"], 100);
    assert_eq!(campaign["per_user_limit"], 2);
    assert_eq!(campaign["split"]["mode"], "double_mean");
    assert_eq!(campaign["seed"], 42);
    let id = campaign["id"].as_str().unwrap();
    assert_eq!(app.get_json(&format!("/campaigns/{id}")).await, campaign);

    let packets = packets_of(&app, id).await;
    assert_eq!(packets.len(), 100);
    assert_eq!(packets.iter().sum::<i64>(), 10_000);
    assert!(packets.iter().all(|p| *p >= 1));

    // The same seed splits the same way.
    let again = app.create(&body).await;
    assert_eq!(packets_of(&app, &again).await, packets);

    // Fixed and bounded splits.
    let mut fixed = campaign_body(1_001, 10, 1);
    fixed["split"] = json!({"mode": "fixed"});
    let fixed_id = app.create(&fixed).await;
    assert_eq!(
        packets_of(&app, &fixed_id).await,
        [101, 100, 100, 100, 100, 100, 100, 100, 100, 100]
    );
    let mut bounded = campaign_body(5_000, 100, 1);
    bounded["split"] = json!({"mode": "bounded", "min_amount": 20, "max_amount": 80});
    let bounded_id = app.create(&bounded).await;
    let packets = packets_of(&app, &bounded_id).await;
    assert_eq!(packets.iter().sum::<i64>(), 5_000);
    assert!(packets.iter().all(|p| (20..=80).contains(p)), "{packets:?}");

    // The merchant's list, newest first, page by page.
    let page = app.get_json("/campaigns?merchant_id=m1&limit=2").await;
    let ids: Vec<&str> = page["campaigns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [bounded_id.as_str(), fixed_id.as_str()]);
    let cursor = page["next_cursor"].as_str().unwrap();
    let rest = app
        .get_json(&format!(
            "/campaigns?merchant_id=m1&limit=2&cursor={cursor}"
        ))
        .await;
    assert_eq!(rest["campaigns"].as_array().unwrap().len(), 2);
    assert_eq!(
        app.get_json("/campaigns?merchant_id=other").await["campaigns"],
        json!([])
    );
    app.stop().await;
}
on_every_pool!(a_created_campaign_waits_for_funding_with_its_split_stored);

async fn a_retried_create_answers_the_same_campaign(setup: Setup) {
    let app = spawn_app(setup).await;
    let body = campaign_body(10_000, 100, 1);
    let send = |body: Value| {
        let client = app.client.clone();
        let url = format!("{}/campaigns", app.address);
        async move {
            client
                .post(url)
                .header("Idempotency-Key", "create-1")
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let first = send(body.clone()).await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let again = send(body.clone()).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await.unwrap()["id"], first["id"]);
    let mut other = body.clone();
    other["total_amount"] = json!(20_000);
    assert_problem(
        send(other).await,
        409,
        "idempotency_key_reused",
        Some("Idempotency-Key"),
    )
    .await;
    let list = app.get_json("/campaigns?merchant_id=m1").await;
    assert_eq!(list["campaigns"].as_array().unwrap().len(), 1);
    app.stop().await;
}
on_every_pool!(a_retried_create_answers_the_same_campaign);

async fn every_bad_create_is_a_problem_and_creates_nothing(setup: Setup) {
    let app = spawn_app(setup).await;
    let base = campaign_body(10_000, 100, 1);
    let with = |path: &str, value: Value| {
        let mut body = base.clone();
        let mut target = &mut body;
        let parts: Vec<&str> = path.split('.').collect();
        for part in &parts[..parts.len() - 1] {
            target = &mut target[*part];
        }
        target[parts[parts.len() - 1]] = value;
        body
    };
    let cases: Vec<(Value, u16, &str, Option<&str>)> = vec![
        (
            with("title", json!("")),
            422,
            "invalid_field",
            Some("title"),
        ),
        (
            with("title", json!("x".repeat(201))),
            422,
            "invalid_field",
            Some("title"),
        ),
        (
            with("currency", json!("XXX")),
            422,
            "invalid_field",
            Some("currency"),
        ),
        (
            with("total_amount", json!(0)),
            422,
            "invalid_field",
            Some("total_amount"),
        ),
        (
            with("total_amount", json!(-10)),
            422,
            "invalid_field",
            Some("total_amount"),
        ),
        (
            with("packet_count", json!(0)),
            422,
            "invalid_field",
            Some("packet_count"),
        ),
        (
            with("packet_count", json!(10_000_001)),
            422,
            "impossible_split",
            Some("packet_count"),
        ),
        (
            with("packet_count", json!(10_001)),
            422,
            "impossible_split",
            Some("total_amount"),
        ),
        (
            with("per_user_limit", json!(0)),
            422,
            "invalid_field",
            Some("per_user_limit"),
        ),
        (
            with("per_user_limit", json!(101)),
            422,
            "invalid_field",
            Some("per_user_limit"),
        ),
        (
            with("ends_at", json!(rfc3339_in(-5_000))),
            422,
            "invalid_field",
            Some("ends_at"),
        ),
        (
            with("ends_at", json!(rfc3339_in(31 * 24 * 3_600_000))),
            422,
            "invalid_field",
            Some("ends_at"),
        ),
        (
            with("merchant_id", json!("a:b")),
            422,
            "invalid_field",
            Some("merchant_id"),
        ),
        (
            with("split", json!({"mode": "bounded"})),
            422,
            "impossible_split",
            Some("split.max_amount"),
        ),
        (
            with(
                "split",
                json!({"mode": "bounded", "min_amount": 1, "max_amount": 50}),
            ),
            422,
            "impossible_split",
            Some("total_amount"),
        ),
        (
            with("split", json!({"mode": "double_mean", "min_amount": 0})),
            422,
            "impossible_split",
            Some("split.min_amount"),
        ),
        (
            with("split", json!({"mode": "random"})),
            400,
            "invalid_field",
            Some("split.mode"),
        ),
        (
            with("split", json!({"mode": "fixed", "extra": 1})),
            400,
            "unknown_field",
            Some("split.extra"),
        ),
        (
            with("starts_at", json!("tomorrow")),
            400,
            "invalid_field",
            Some("starts_at"),
        ),
        (
            with("total_amount", json!("100")),
            400,
            "invalid_field",
            Some("total_amount"),
        ),
        (with("seed", json!(-1)), 400, "invalid_field", Some("seed")),
    ];
    for (body, status, code, field) in cases {
        let response = app.post("/campaigns", &body).await;
        let problem = assert_problem(response, status, code, field).await;
        assert!(problem["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }
    let response = app
        .client
        .post(format!("{}/campaigns", app.address))
        .body("{")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_problem(response, 400, "malformed_json", None).await;
    assert_eq!(
        app.get_json("/campaigns?merchant_id=m1").await["campaigns"],
        json!([])
    );
    app.stop().await;
}
on_every_pool!(every_bad_create_is_a_problem_and_creates_nothing);
