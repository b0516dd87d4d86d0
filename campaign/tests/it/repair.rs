//! The campaign service's repair on real Redis and PostgreSQL: a mend decided before the pool
//! moved is refused, so a packet is never put back twice; a claim granted in Redis only is
//! recorded with the checks of a rebuilt pool, so a user never passes the limit.

use redis::AsyncCommands;
use redpacket_campaign::pool::{Inventory, Mend, MendOutcome};
use redpacket_campaign::service::{RepairOptions, pool_campaign};
use redpacket_common::testing::Backend;
use serde_json::{Value, json};

use crate::helpers::{PoolKind, Setup, TestApp, campaign_body, spawn_app};

async fn record(app: &TestApp, id: &str, claim: &(String, String, u32, i64)) -> Value {
    let (claim_id, user, seq, amount) = claim;
    let response = app
        .post(
            &format!("/claims/{claim_id}/record"),
            &json!({"campaign_id": id, "user_id": user, "packet_seq": seq, "amount": amount,
                    "currency": "CNY", "grabbed_at_ms": chrono::Utc::now().timestamp_millis() - 5_000}),
        )
        .await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn repair(app: &TestApp) -> Value {
    let response = app.post("/repair", &json!({"min_age_ms": 0})).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mend_decided_before_a_packet_came_back_is_refused_and_the_packet_is_in_the_pool_once() {
    let app = spawn_app(Setup {
        backend: Backend::Postgres,
        pool: PoolKind::Redis,
    })
    .await;
    let id = app.create(&campaign_body(600, 3, 1)).await;
    app.fund_and_open(&id).await;
    assert_eq!(app.grab(&id, "alice").await.status(), 200);
    let claim = app.handoff(&id, 4).await.remove(0);
    assert_eq!(record(&app, &id, &claim).await["status"], "pending");
    let model = app.service.campaign(&id).await.unwrap();
    let pool = pool_campaign(&model);
    let Inventory::Held(before) = app.service.pool().inventory(&pool, 1_000).await.unwrap() else {
        panic!("the pool is loaded");
    };
    // The claim is compensated while the campaign is live: its packet goes back by a return.
    let response = app
        .post(
            &format!("/claims/{}/compensated", claim.0),
            &json!({"reason": "insufficient_funds"}),
        )
        .await;
    assert_eq!(response.status(), 200);
    // A mend decided from the inventory before the return would put that packet back again.
    let stale = [Mend::Add {
        seq: claim.2,
        amount: claim.3,
    }];
    assert_eq!(
        app.service
            .pool()
            .mend(&pool, &before.version, (0, 0), &stale)
            .await
            .unwrap(),
        MendOutcome::Moved
    );
    let Inventory::Held(after) = app.service.pool().inventory(&pool, 1_000).await.unwrap() else {
        panic!("the pool is loaded");
    };
    let copies = after
        .packets
        .iter()
        .filter(|(seq, _)| *seq == claim.2)
        .count();
    assert_eq!((copies, after.left), (1, 3), "the packet is back once");
    assert_eq!(repair(&app).await["findings"], json!([]), "{after:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_granted_in_redis_only_is_recorded_with_the_limit_checked_and_the_pool_stays_exact()
{
    let app = spawn_app(Setup {
        backend: Backend::Postgres,
        pool: PoolKind::Redis,
    })
    .await;
    let id = app.create(&campaign_body(600, 3, 1)).await;
    app.fund_and_open(&id).await;
    assert_eq!(app.grab(&id, "alice").await.status(), 200);
    let claim = app.handoff(&id, 4).await.remove(0);
    assert_eq!(record(&app, &id, &claim).await["status"], "pending");
    // A second grant to alice, in Redis only (a pool that forgot her first one, then failed
    // over): a packet popped and a pending claim, no hand-off entry.
    let mut redis = app.pool.connection();
    let key = |kind: &str| format!("{}:{{c:{id}}}:{kind}", app.prefix);
    let mut planted = None;
    for bucket in 0..4 {
        let item: Option<String> = redis.lpop(key(&format!("b:{bucket}")), None).await.unwrap();
        if let Some(item) = item {
            planted = Some(item);
            break;
        }
    }
    let planted = planted.unwrap();
    let (seq, amount) = planted.split_once(':').unwrap();
    let campaign_id: i64 = id.parse().unwrap();
    let second = redpacket_campaign::service::claim_id(1 << 50, campaign_id);
    let _: () = redis
        .hset(
            key("pending"),
            &second,
            format!(
                "alice:{seq}:{amount}:{}",
                chrono::Utc::now().timestamp_millis() - 5_000
            ),
        )
        .await
        .unwrap();
    let _: () = redis.hincr(key("meta"), "left", -1).await.unwrap();
    let _: () = redis
        .hincr(key("meta"), "left_amount", -amount.parse::<i64>().unwrap())
        .await
        .unwrap();

    let report = app
        .service
        .repair(RepairOptions {
            limit: 100,
            min_age_ms: 1_000,
        })
        .await
        .unwrap();
    assert_eq!(report.findings.len(), 1, "{report:?}");
    let finding = &report.findings[0];
    assert_eq!(
        (finding.kind, finding.id.as_str(), finding.repaired),
        ("claim_unrecorded", second.as_str(), true)
    );
    let recorded = app.service.store().claim(&second).await.unwrap().unwrap();
    assert_eq!(recorded.status, "compensated");
    assert!(
        recorded.reason.unwrap().starts_with("limit_reached"),
        "alice holds her limit already"
    );
    assert_eq!(
        report
            .pending_claims
            .iter()
            .map(|c| c.id.as_str())
            .collect::<Vec<_>>(),
        vec![claim.0.as_str()],
        "only the pending claim is the saga worker's to look at"
    );
    // The refused grant's packet stays out for the refund: the pool and the database agree.
    let again = repair(&app).await;
    assert_eq!(again["findings"], json!([]), "{again}");
    let stats = app.get_json(&format!("/campaigns/{id}/stats")).await;
    assert_eq!(stats["packets_remaining"], 1, "{stats}");
    let bad = app.post("/repair", &json!({"limit": 0})).await;
    assert_eq!(bad.status(), 422);
    app.stop().await;
}
