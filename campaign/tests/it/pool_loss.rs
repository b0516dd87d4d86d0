//! A pool lost by Redis while its campaign is live is rebuilt from the database, and a grab
//! the lost pool answered that is recorded only after the rebuild cannot take a packet or a
//! user's right that the rebuilt pool gave to someone else: it is recorded compensated, with
//! the reason, and the claim recorded first keeps the packet.

use redis::AsyncCommands;
use redpacket_common::testing::Backend;
use serde_json::{Value, json};

use crate::helpers::{PoolKind, Setup, TestApp, campaign_body, spawn_app};

/// Deletes the campaign's pool keys from Redis (its meta hash, buckets, users, pending), as a
/// Redis restarted without persistence would have lost them; the hand-off is kept, as if
/// already relayed.
async fn lose_pool(app: &TestApp, id: &str) {
    let mut connection = app.pool.connection();
    let keys: Vec<String> = connection
        .keys(format!("{}:{{c:{id}}}:*", app.prefix))
        .await
        .unwrap();
    let pool_keys: Vec<&String> = keys.iter().filter(|key| !key.contains("}:h:")).collect();
    assert!(!pool_keys.is_empty());
    let _: () = connection.del(pool_keys).await.unwrap();
}

async fn grab_when_rebuilt(app: &TestApp, id: &str, user: &str) -> Value {
    for _ in 0..100 {
        let response = app.grab(id, user).await;
        match response.status().as_u16() {
            200 => return response.json().await.unwrap(),
            503 => {
                let problem: Value = response.json().await.unwrap();
                assert_eq!(problem["code"], "pool_rebuilding", "{problem}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            status => panic!("grab answered {status}: {}", response.text().await.unwrap()),
        }
    }
    panic!("the pool was not rebuilt");
}

async fn record(app: &TestApp, id: &str, claim: &(String, String, u32, i64)) -> Value {
    let (claim_id, user, seq, amount) = claim;
    let response = app
        .post(
            &format!("/claims/{claim_id}/record"),
            &json!({"campaign_id": id, "user_id": user, "packet_seq": seq, "amount": amount,
                    "currency": "CNY", "grabbed_at_ms": chrono::Utc::now().timestamp_millis()}),
        )
        .await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grab_recorded_after_the_rebuild_never_takes_a_packet_or_a_right_given_again() {
    let app = spawn_app(Setup {
        backend: Backend::Postgres,
        pool: PoolKind::Redis,
    })
    .await;
    // Two packets, one per user.
    let id = app.create(&campaign_body(300, 2, 1)).await;
    app.fund_and_open(&id).await;
    assert_eq!(app.grab(&id, "alice").await.status(), 200);
    let lost = app.handoff(&id, 4).await;
    assert_eq!(lost.len(), 1, "alice's grab, relayed but not yet recorded");

    lose_pool(&app, &id).await;
    // Rebuilt without alice's claim (the database does not know it yet): both packets are
    // back, and alice may grab again.
    let bob = grab_when_rebuilt(&app, &id, "bob").await;
    let again = grab_when_rebuilt(&app, &id, "alice").await;
    let all = app.handoff(&id, 4).await;
    let later: Vec<_> = all.iter().filter(|c| c.0 != lost[0].0).cloned().collect();
    assert_eq!(later.len(), 2);
    for claim in &later {
        assert_eq!(record(&app, &id, claim).await["status"], "pending");
    }
    // Alice's first grab is recorded last: its packet is bob's or hers again, and she already
    // holds her one claim. Recorded compensated, nothing moved; the others keep theirs.
    let first = record(&app, &id, &lost[0]).await;
    assert_eq!(first["status"], "compensated", "{first}");
    let reason = first["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("packet_taken") || reason.starts_with("limit_reached"),
        "{reason}"
    );
    // Recorded again (a retry): the same answer.
    assert_eq!(record(&app, &id, &lost[0]).await, first);
    let stats = app.get_json(&format!("/campaigns/{id}/stats")).await;
    assert_eq!(stats["packets_in_flight"], 2, "{stats}");
    assert_eq!(stats["packets_compensated"], 1, "{stats}");
    assert!(bob["amount"].as_i64().unwrap() > 0 && again["amount"].as_i64().unwrap() > 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_flight_count_stays_exact_whichever_grab_of_a_rebuilt_pool_is_recorded_first() {
    let app = spawn_app(Setup {
        backend: Backend::Postgres,
        pool: PoolKind::Redis,
    })
    .await;
    let id = app.create(&campaign_body(300, 2, 1)).await;
    app.fund_and_open(&id).await;
    assert_eq!(app.grab(&id, "alice").await.status(), 200);
    let lost = app.handoff(&id, 4).await;
    lose_pool(&app, &id).await;
    grab_when_rebuilt(&app, &id, "bob").await;
    grab_when_rebuilt(&app, &id, "alice").await;
    let all = app.handoff(&id, 4).await;
    // The lost pool's grant first this time, then the rebuilt pool's two.
    assert_eq!(record(&app, &id, &lost[0]).await["status"], "pending");
    for claim in all.iter().filter(|c| c.0 != lost[0].0) {
        record(&app, &id, claim).await;
    }
    let claims = app
        .service
        .store()
        .claims_of_campaign(id.parse().unwrap(), None, 10)
        .await
        .unwrap();
    assert_eq!(claims.len(), 3);
    let pending: Vec<_> = claims.iter().filter(|c| c.status == "pending").collect();
    let mut seqs: Vec<i32> = pending.iter().map(|c| c.packet_seq).collect();
    seqs.dedup();
    assert_eq!(
        seqs.len(),
        pending.len(),
        "no packet held twice: {claims:?}"
    );
    let stats = app.get_json(&format!("/campaigns/{id}/stats")).await;
    assert_eq!(
        stats["packets_in_flight"],
        pending.len(),
        "in flight = the claims left to credit: {stats} {claims:?}"
    );
    assert_eq!(
        stats["amount_in_flight"],
        pending.iter().map(|c| c.amount).sum::<i64>(),
        "{stats}"
    );
    app.stop().await;
}
