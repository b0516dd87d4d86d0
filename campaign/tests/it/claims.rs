use std::sync::Arc;

use redpacket_campaign::entity::claim;
use sea_orm::{ActiveValue::Set, EntityTrait};

use serde_json::{Value, json};

use crate::helpers::{Setup, assert_problem, campaign_body, rfc3339_in, spawn_app};
use crate::on_every_pool;

fn record_body(id: &str, grab: &Value, user: &str, seq: u32) -> Value {
    json!({
        "campaign_id": id,
        "user_id": user,
        "packet_seq": seq,
        "amount": grab["amount"],
        "currency": "CNY",
        "grabbed_at_ms": chrono::Utc::now().timestamp_millis(),
        "request_id": "req-1"
    })
}

async fn claims_move_from_pending_to_credited_or_compensated(setup: Setup) {
    let app = Arc::new(spawn_app(setup).await);
    let id = app.create(&campaign_body(1_000, 10, 1)).await;
    app.fund_and_open(&id).await;

    let mut grabs = Vec::new();
    for user in ["alice", "bob", "carol"] {
        let response = app.grab(&id, user).await;
        assert_eq!(response.status(), 200);
        let grab: Value = response.json().await.unwrap();
        assert_eq!(grab["status"], "pending");
        grabs.push((user, grab));
    }
    let handoff = app.handoff(&id, 4).await;

    // Before the saga records it, the claim is read from the pool.
    let (_, alice) = &grabs[0];
    let alice_claim = alice["claim_id"].as_str().unwrap();
    let pending = app.get_json(&format!("/claims/{alice_claim}")).await;
    assert_eq!(pending["status"], "pending");
    assert_eq!(pending["user_id"], "alice");
    assert_eq!(pending["amount"], alice["amount"]);

    // The saga records each claim (twice: messages come at least once), each attempt with a
    // request id of its own: the retry answers the original record.
    for (user, grab) in &grabs {
        let claim = grab["claim_id"].as_str().unwrap();
        let seq = handoff.iter().find(|h| h.0 == claim).unwrap().2;
        let mut answers = Vec::new();
        for attempt in 0..2 {
            let mut body = record_body(&id, grab, user, seq);
            body["request_id"] = json!(format!("attempt-{attempt}"));
            let response = app
                .client
                .post(format!("{}/claims/{claim}/record", app.address))
                .header("x-request-id", format!("attempt-{attempt}"))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            answers.push(response.json::<Value>().await.unwrap());
        }
        assert_eq!(
            answers[0], answers[1],
            "a retried record answers the original"
        );
    }
    // A record naming the wrong packet, or changing a recorded claim, is refused.
    let (_, bob) = &grabs[1];
    let bob_claim = bob["claim_id"].as_str().unwrap();
    let mut wrong = record_body(&id, bob, "bob", 0);
    wrong["amount"] = json!(999_999);
    let unknown_claim = format!("{:016x}{}", 12_345, &bob_claim[16..]);
    let response = app
        .post(&format!("/claims/{unknown_claim}/record"), &wrong)
        .await;
    assert_problem(response, 409, "claim_state", None).await;
    let response = app
        .post(&format!("/claims/{bob_claim}/record"), &wrong)
        .await;
    assert_problem(response, 409, "claim_state", None).await;
    let foreign = format!("{}{:016x}", &bob_claim[..16], 999);
    let response = app.post(&format!("/claims/{foreign}/record"), &wrong).await;
    assert_problem(response, 422, "invalid_field", Some("claim_id")).await;

    // alice is credited (twice: idempotent); bob is compensated; carol stays pending.
    for _ in 0..2 {
        let credited = app
            .post(&format!("/claims/{alice_claim}/credited"), &json!({}))
            .await;
        assert_eq!(credited.status(), 200);
        let credited: Value = credited.json().await.unwrap();
        assert_eq!(credited["status"], "credited");
        assert!(credited["credited_at"].is_string());
    }
    let remaining_before =
        app.get_json(&format!("/campaigns/{id}/stats")).await["packets_remaining"]
            .as_i64()
            .unwrap();
    for _ in 0..2 {
        let compensated = app
            .post(
                &format!("/claims/{bob_claim}/compensated"),
                &json!({"reason": "wallet refused"}),
            )
            .await;
        assert_eq!(compensated.status(), 200);
        let compensated: Value = compensated.json().await.unwrap();
        assert_eq!(compensated["status"], "compensated");
        assert_eq!(compensated["reason"], "wallet refused");
    }
    // The campaign is live: bob's packet went back to the pool, once.
    let stats = app.get_json(&format!("/campaigns/{id}/stats")).await;
    assert_eq!(
        stats["packets_remaining"].as_i64().unwrap(),
        remaining_before + 1
    );
    assert_eq!(stats["packets_credited"], 1);
    assert_eq!(stats["packets_compensated"], 1);
    assert_eq!(stats["packets_in_flight"], 1, "carol is still in flight");
    assert_eq!(stats["amount_in_flight"], grabs[2].1["amount"]);

    // Finished claims cannot change their outcome.
    assert_problem(
        app.post(
            &format!("/claims/{alice_claim}/compensated"),
            &json!({"reason": "x"}),
        )
        .await,
        409,
        "claim_state",
        None,
    )
    .await;
    assert_problem(
        app.post(&format!("/claims/{bob_claim}/credited"), &json!({}))
            .await,
        409,
        "claim_state",
        None,
    )
    .await;
    assert_problem(
        app.get(&format!("/claims/{}", "0".repeat(32))).await,
        404,
        "claim_not_found",
        None,
    )
    .await;
    assert_problem(
        app.post(
            &format!("/claims/{bob_claim}/compensated"),
            &json!({"reason": ""}),
        )
        .await,
        422,
        "invalid_field",
        Some("reason"),
    )
    .await;

    // Reads: a user's claims and the campaign's claims.
    let mine = app.get_json("/users/alice/claims").await;
    assert_eq!(mine["claims"].as_array().unwrap().len(), 1);
    assert_eq!(mine["claims"][0]["status"], "credited");
    let all = app
        .get_json(&format!("/campaigns/{id}/claims?limit=2"))
        .await;
    assert_eq!(all["claims"].as_array().unwrap().len(), 2);
    let cursor = all["next_cursor"].as_str().unwrap();
    let rest = app
        .get_json(&format!("/campaigns/{id}/claims?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(rest["claims"].as_array().unwrap().len(), 1);
    assert_problem(
        app.get("/users/alice/claims?cursor=zz").await,
        400,
        "invalid_cursor",
        Some("cursor"),
    )
    .await;

    // The reconciliation's checks hold, and name the offender once one is broken: a claim
    // forged straight into the table puts alice over her limit and the counters off.
    let reconciliation = app.get_json("/reconciliation").await;
    let checks = reconciliation["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 3);
    assert!(checks.iter().all(|c| c["ok"] == true), "{reconciliation}");
    assert_eq!(reconciliation["campaigns"][0]["id"], id.as_str());
    let forged = claim::ActiveModel {
        id: Set("f".repeat(32)),
        campaign_id: Set(id.parse().unwrap()),
        user_id: Set("alice".into()),
        packet_seq: Set(0),
        amount: Set(1),
        currency: Set("CNY".into()),
        status: Set("pending".into()),
        reason: Set(None),
        request_id: Set(None),
        grabbed_at_ms: Set(0),
        recorded_at_ms: Set(0),
        credited_at_ms: Set(None),
        compensated_at_ms: Set(None),
        returned_to_pool: Set(false),
    };
    claim::Entity::insert(forged)
        .exec_without_returning(app.service.store().db())
        .await
        .unwrap();
    let reconciliation = app.get_json("/reconciliation").await;
    let check = |name: &str| {
        reconciliation["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()
            .clone()
    };
    let over = check("users_within_limit");
    assert_eq!(over["ok"], false);
    assert!(
        over["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("{id}/alice")),
        "{over}"
    );
    let drifted = check("counters_match_claims");
    assert_eq!(drifted["ok"], false);
    assert!(
        drifted["detail"].as_str().unwrap().contains(&id),
        "{drifted}"
    );
    assert_eq!(check("grabs_within_packets")["ok"], true);
    Arc::into_inner(app).unwrap().stop().await;
}
on_every_pool!(claims_move_from_pending_to_credited_or_compensated);

async fn after_the_end_stats_equal_the_database_and_settle(setup: Setup) {
    let app = spawn_app(setup).await;
    let mut body = campaign_body(5_000, 50, 1);
    body["ends_at"] = json!(rfc3339_in(2_000));
    let id = app.create(&body).await;
    app.fund_and_open(&id).await;
    let mut credited_amount = 0;
    let mut compensated_amount = 0;
    for i in 0..6 {
        let user = format!("u{i}");
        let grab: Value = app.grab(&id, &user).await.json().await.unwrap();
        let claim = grab["claim_id"].as_str().unwrap().to_owned();
        let seq = app
            .handoff(&id, 4)
            .await
            .into_iter()
            .find(|h| h.0 == claim)
            .unwrap()
            .2;
        assert_eq!(
            app.post(
                &format!("/claims/{claim}/record"),
                &record_body(&id, &grab, &user, seq)
            )
            .await
            .status(),
            200
        );
        if i % 3 == 0 {
            compensated_amount += grab["amount"].as_i64().unwrap();
            // After the end the packet is not returned: it goes to the refund.
            if i == 3 {
                app.wait_for_status(&id, "expired").await;
            }
            let response = app
                .post(
                    &format!("/claims/{claim}/compensated"),
                    &json!({"reason": "test"}),
                )
                .await;
            assert_eq!(response.status(), 200);
        } else {
            credited_amount += grab["amount"].as_i64().unwrap();
            assert_eq!(
                app.post(&format!("/claims/{claim}/credited"), &json!({}))
                    .await
                    .status(),
                200
            );
        }
        if i == 3 {
            break;
        }
    }
    app.wait_for_status(&id, "expired").await;
    let stats = app.get_json(&format!("/campaigns/{id}/stats")).await;
    assert_eq!(stats["packets_credited"], 2);
    assert_eq!(stats["packets_compensated"], 2);
    assert_eq!(stats["amount_credited"], credited_amount);
    // One compensated packet went back to the pool (while live), one did not (after the end).
    assert_eq!(stats["packets_remaining"], 47);
    assert_eq!(stats["packets_in_flight"], 0);
    let refund = 5_000 - credited_amount;
    assert!(compensated_amount > 0);
    let settled = app
        .post(
            &format!("/campaigns/{id}/settled"),
            &json!({"amount_refunded": refund}),
        )
        .await;
    assert_eq!(settled.status(), 200);
    assert_eq!(settled.json::<Value>().await.unwrap()["status"], "settled");
    let stats = app.get_json(&format!("/campaigns/{id}/stats")).await;
    assert_eq!(stats["amount_refunded"], refund);
    assert_eq!(stats["status"], "settled");
    // The counters equal the claims table.
    let claims = app.get_json(&format!("/campaigns/{id}/claims")).await;
    let claims = claims["claims"].as_array().unwrap();
    let credited: i64 = claims
        .iter()
        .filter(|c| c["status"] == "credited")
        .map(|c| c["amount"].as_i64().unwrap())
        .sum();
    assert_eq!(credited, stats["amount_credited"].as_i64().unwrap());
    assert_eq!(
        claims
            .iter()
            .filter(|c| c["status"] == "compensated")
            .count(),
        2
    );
    app.stop().await;
}
on_every_pool!(after_the_end_stats_equal_the_database_and_settle);

fn record_item(id: &str, claim: &str, user: &str, seq: u32, amount: i64) -> Value {
    json!({
        "id": claim,
        "campaign_id": id,
        "user_id": user,
        "packet_seq": seq,
        "amount": amount,
        "currency": "CNY",
        "grabbed_at_ms": chrono::Utc::now().timestamp_millis(),
    })
}

async fn batch_results(app: &crate::helpers::TestApp, path: &str, body: &Value) -> Vec<Value> {
    let response = app.post(path, body).await;
    assert_eq!(response.status(), 200, "{path}");
    let answer: Value = response.json().await.unwrap();
    answer["results"].as_array().unwrap().clone()
}

async fn claims_are_recorded_and_credited_in_batches_exactly(setup: Setup) {
    let app = Arc::new(spawn_app(setup).await);
    let id = app.create(&campaign_body(2_000, 20, 1)).await;
    app.fund_and_open(&id).await;
    let users: Vec<String> = (0..12).map(|i| format!("b{i}")).collect();
    for user in &users {
        assert_eq!(app.grab(&id, user).await.status(), 200);
    }
    let handoff = app.handoff(&id, 4).await;
    assert_eq!(handoff.len(), 12);
    let items: Vec<Value> = handoff
        .iter()
        .map(|(claim, user, seq, amount)| record_item(&id, claim, user, *seq, *amount))
        .collect();
    let reconciled = |app: Arc<crate::helpers::TestApp>| async move {
        let reconciliation = app.get_json("/reconciliation").await;
        let checks = reconciliation["checks"].as_array().unwrap();
        assert!(checks.iter().all(|c| c["ok"] == true), "{reconciliation}");
    };

    // Bad batches are refused whole and change nothing.
    for (body, field) in [
        (json!({"claims": []}), "claims"),
        (json!({"claims": [items[0], items[0]]}), "claims"),
        (json!({"claims": vec![items[0].clone(); 1001]}), "claims"),
        (json!({"ids": []}), "ids"),
        (json!({"ids": ["a", "a"]}), "ids"),
    ] {
        let path = if field == "ids" {
            "/claims/batch/credited"
        } else {
            "/claims/batch/record"
        };
        assert_problem(
            app.post(path, &body).await,
            422,
            "invalid_field",
            Some(field),
        )
        .await;
    }
    let stats = app.get_json(&format!("/campaigns/{id}/stats")).await;
    assert_eq!(stats["packets_in_flight"], 12, "nothing recorded yet");

    // Four recorded one by one first: the batch mixes old and new claims.
    for item in &items[..4] {
        let claim = item["id"].as_str().unwrap();
        let mut single = item.clone();
        single.as_object_mut().unwrap().remove("id");
        assert_eq!(
            app.post(&format!("/claims/{claim}/record"), &single)
                .await
                .status(),
            200
        );
    }
    // A claim naming the wrong amount and one of another campaign fail alone.
    let mut wrong = items[4].clone();
    let lead = if handoff[4].0.starts_with('a') {
        "b"
    } else {
        "a"
    };
    wrong["id"] = json!(format!("{lead}{}", &handoff[4].0[1..]));
    wrong["amount"] = json!(handoff[4].3 + 1);
    let mut batch = items.clone();
    batch.push(wrong);
    // Two overlapping batches race: every claim is recorded and counted once.
    let (all, overlap) = (json!({"claims": batch}), json!({"claims": &items[2..]}));
    let (first, second) = tokio::join!(
        batch_results(&app, "/claims/batch/record", &all),
        batch_results(&app, "/claims/batch/record", &overlap),
    );
    assert_eq!(first.len(), 13);
    for result in first[..12].iter().chain(&second) {
        assert_eq!(result["ok"], true, "{result}");
        assert_eq!(result["claim"]["status"], "pending");
    }
    assert_eq!(first[12]["ok"], false);
    assert_eq!(first[12]["status"], 409, "{}", first[12]);
    assert_eq!(first[12]["error"]["code"], "claim_state");
    assert_eq!(first[3]["claim"]["id"], items[3]["id"]);
    reconciled(app.clone()).await;
    let stats = app.get_json(&format!("/campaigns/{id}/stats")).await;
    assert_eq!(
        stats["packets_in_flight"], 12,
        "recorded claims are still in flight"
    );

    // Two compensated one by one; the batch marks the others credited, twice at once.
    for (claim, ..) in &handoff[..2] {
        let response = app
            .post(
                &format!("/claims/{claim}/compensated"),
                &json!({"reason": "test"}),
            )
            .await;
        assert_eq!(response.status(), 200);
    }
    let mut ids: Vec<String> = handoff.iter().map(|(claim, ..)| claim.clone()).collect();
    ids.push("9".repeat(30));
    let (all, overlap) = (json!({"ids": ids}), json!({"ids": &ids[5..12]}));
    let (first, second) = tokio::join!(
        batch_results(&app, "/claims/batch/credited", &all),
        batch_results(&app, "/claims/batch/credited", &overlap),
    );
    for result in &first[..2] {
        assert_eq!(result["ok"], false);
        assert_eq!(result["status"], 409, "{result}");
    }
    for result in first[2..12].iter().chain(&second) {
        assert_eq!(result["ok"], true, "{result}");
        assert_eq!(result["claim"]["status"], "credited");
    }
    assert_eq!(first[12]["status"], 404);
    let stats = app.get_json(&format!("/campaigns/{id}/stats")).await;
    let credited: i64 = handoff[2..].iter().map(|h| h.3).sum();
    assert_eq!(stats["packets_credited"], 10);
    assert_eq!(stats["amount_credited"], credited);
    assert_eq!(stats["packets_in_flight"], 0);
    reconciled(app.clone()).await;
    Arc::into_inner(app).unwrap().stop().await;
}
on_every_pool!(claims_are_recorded_and_credited_in_batches_exactly);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_batch_of_the_largest_claims_is_never_refused_for_its_size() {
    use crate::helpers::PoolKind;
    let app = spawn_app(Setup {
        backend: redpacket_common::testing::Backend::Postgres,
        pool: PoolKind::Redis,
    })
    .await;
    let count = 1000;
    let id = app.create(&campaign_body(100_000, count, 1)).await;
    app.fund_and_open(&id).await;
    // The longest user id (64 characters) and request id (128) the system lets through.
    let user = |i: i64| format!("{i:0>64}");
    for i in 0..count {
        assert_eq!(app.grab(&id, &user(i)).await.status(), 200);
    }
    let handoff = app.handoff(&id, 4).await;
    assert_eq!(handoff.len(), 1000);
    let items: Vec<Value> = handoff
        .iter()
        .map(|(claim, user, seq, amount)| {
            let mut item = record_item(&id, claim, user, *seq, *amount);
            item["request_id"] = json!("r".repeat(128));
            item
        })
        .collect();
    let body = json!({ "claims": items });
    assert!(
        body.to_string().len() > 256 * 1024,
        "over the general body bound"
    );
    let results = batch_results(&app, "/claims/batch/record", &body).await;
    assert!(results.iter().all(|r| r["ok"] == true));
    let ids: Vec<&str> = handoff.iter().map(|(claim, ..)| claim.as_str()).collect();
    let results = batch_results(&app, "/claims/batch/credited", &json!({ "ids": ids })).await;
    assert!(results.iter().all(|r| r["ok"] == true));
    let stats = app.get_json(&format!("/campaigns/{id}/stats")).await;
    assert_eq!(stats["packets_credited"], 1000);
}
