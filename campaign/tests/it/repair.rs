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
    let response = app.post("/repair", &json!({"min_age_ms": 500})).await;
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
    let campaign_id: i64 = id.parse().unwrap();
    let second = redpacket_campaign::service::claim_id(1 << 50, campaign_id);
    plant_pending(&app, &id, &second, "alice", &planted).await;

    let report = app
        .service
        .repair(RepairOptions {
            limit: 100,
            min_age_ms: 1_000,
            cursor: None,
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

/// Every item of every bucket of a campaign's pool, and its meta hash's `state` and `left`.
async fn buckets_of(app: &TestApp, id: &str, buckets: u32) -> (Vec<String>, String, i64) {
    let mut redis = app.pool.connection();
    let key = |kind: &str| format!("{}:{{c:{id}}}:{kind}", app.prefix);
    let mut items = Vec::new();
    for bucket in 0..buckets {
        let list: Vec<String> = redis
            .lrange(key(&format!("b:{bucket}")), 0, -1)
            .await
            .unwrap();
        items.extend(list);
    }
    let state: String = redis.hget(key("meta"), "state").await.unwrap();
    let left: i64 = redis.hget(key("meta"), "left").await.unwrap();
    (items, state, left)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_keeps_no_copy_of_a_duplicated_packet_a_grab_took_between_the_inventory_and_the_mend()
 {
    let app = spawn_app(Setup {
        backend: Backend::Postgres,
        pool: PoolKind::Redis,
    })
    .await;
    let id = app.create(&campaign_body(6_000, 20, 5)).await;
    app.fund_and_open(&id).await;
    let model = app.service.campaign(&id).await.unwrap();
    let pool = pool_campaign(&model);
    let buckets = u32::try_from(model.buckets).unwrap();
    // A copy of the packet bob's grab takes next, planted at the head of his home bucket: the
    // packet is in the pool twice and no claim holds it.
    let mut redis = app.pool.connection();
    let key = |kind: &str| format!("{}:{{c:{id}}}:{kind}", app.prefix);
    let home = redpacket_campaign::pool::home_bucket("bob", buckets);
    let head: String = redis.lindex(key(&format!("b:{home}")), 0).await.unwrap();
    let (seq, amount) = head.split_once(':').unwrap();
    let amount: i64 = amount.parse().unwrap();
    let _: () = redis.lpush(key(&format!("b:{home}")), &head).await.unwrap();
    let _: () = redis.hincr(key("meta"), "left", 1).await.unwrap();
    let _: () = redis
        .hincr(key("meta"), "left_amount", amount)
        .await
        .unwrap();

    let Inventory::Held(inventory) = app.service.pool().inventory(&pool, 1_000).await.unwrap()
    else {
        panic!("the pool is loaded");
    };
    let (packets, holders) = app
        .service
        .store()
        .packet_holders(&model, 1_000)
        .await
        .unwrap()
        .unwrap();
    let (mends, drift) = redpacket_campaign::service::mends_of(&inventory, &packets, &holders);
    assert_eq!(
        mends,
        vec![Mend::Duplicate {
            seq: seq.parse().unwrap(),
            amount,
            copies: 2
        }]
    );
    // Bob's grab pops one copy: the packet is his (pending), and grabs move no version mark.
    let granted: Value = app.grab(&id, "bob").await.json().await.unwrap();
    let pending = app
        .service
        .pool()
        .pending_claim(model.id, granted["claim_id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pending.seq.to_string(), seq, "{granted}");
    assert!(matches!(
        app.service
            .pool()
            .mend(&pool, &inventory.version, drift, &mends)
            .await
            .unwrap(),
        MendOutcome::Mended { .. }
    ));
    let (items, state, left) = buckets_of(&app, &id, buckets).await;
    assert!(
        !items.contains(&head),
        "the packet bob holds is in no bucket: {items:?}"
    );
    assert_eq!((state.as_str(), left), ("scheduled", 19), "{items:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_never_reopens_an_exhausted_pool_whose_counters_drifted() {
    let app = spawn_app(Setup {
        backend: Backend::Postgres,
        pool: PoolKind::Redis,
    })
    .await;
    let id = app.create(&campaign_body(600, 2, 5)).await;
    app.fund_and_open(&id).await;
    assert_eq!(app.grab(&id, "alice").await.status(), 200);
    assert_eq!(app.grab(&id, "alice").await.status(), 200);
    let model = app.service.campaign(&id).await.unwrap();
    let pool = pool_campaign(&model);
    let buckets = u32::try_from(model.buckets).unwrap();
    let claims = app.handoff(&id, buckets).await;
    for claim in &claims {
        record(&app, &id, claim).await;
    }
    // The counters drift (left says one packet is there, no bucket holds it).
    let mut redis = app.pool.connection();
    let meta = format!("{}:{{c:{id}}}:meta", app.prefix);
    let _: () = redis.hincr(&meta, "left", 1).await.unwrap();
    let Inventory::Held(inventory) = app.service.pool().inventory(&pool, 1_000).await.unwrap()
    else {
        panic!("the pool is loaded");
    };
    assert_eq!(inventory.state, "exhausted");
    // A mend decided while the campaign looked live is refused by the script itself.
    let stale = [Mend::Add {
        seq: claims[0].2,
        amount: claims[0].3,
    }];
    assert_eq!(
        app.service
            .pool()
            .mend(&pool, &inventory.version, (1, 0), &stale)
            .await
            .unwrap(),
        MendOutcome::NotLive("exhausted".to_owned())
    );
    let report = repair(&app).await;
    let mended = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|finding| finding["kind"] == "pool_mismatch" && finding["repaired"] == true);
    assert!(!mended, "{report}");
    let (items, state, _) = buckets_of(&app, &id, buckets).await;
    assert_eq!(
        (items.len(), state.as_str()),
        (0, "exhausted"),
        "the pool stays ended"
    );
    app.stop().await;
}

/// Plants a grant in Redis only (no hand-off entry): `user` is granted packet `item` under a
/// new claim id, popped from its bucket.
async fn plant_grant(app: &TestApp, id: &str, user: &str, item: &str, n: u64) -> String {
    let mut redis = app.pool.connection();
    let key = |kind: &str| format!("{}:{{c:{id}}}:{kind}", app.prefix);
    let (seq, _) = item.split_once(':').unwrap();
    let buckets = u32::try_from(app.service.campaign(id).await.unwrap().buckets).unwrap();
    let bucket = seq.parse::<u32>().unwrap() % buckets;
    let _: i64 = redis
        .lrem(key(&format!("b:{bucket}")), 1, item)
        .await
        .unwrap();
    let claim = redpacket_campaign::service::claim_id((1 << 50) + n, id.parse().unwrap());
    plant_pending(app, id, &claim, user, item).await;
    claim
}

/// Writes `claim` as a pending grant of packet `item` ("seq:amount") to `user`, five seconds
/// old, and takes the packet off the pool's counters, as the grab script does (no hand-off).
async fn plant_pending(app: &TestApp, id: &str, claim: &str, user: &str, item: &str) {
    let mut redis = app.pool.connection();
    let key = |kind: &str| format!("{}:{{c:{id}}}:{kind}", app.prefix);
    let (seq, amount) = item.split_once(':').unwrap();
    let _: () = redis
        .hset(
            key("pending"),
            claim,
            format!(
                "{user}:{seq}:{amount}:{}",
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_records_a_grant_of_a_packet_returned_before_its_claims_row_and_leaves_a_real_conflict_unrepaired()
 {
    let app = spawn_app(Setup {
        backend: Backend::Postgres,
        pool: PoolKind::Redis,
    })
    .await;
    let id = app.create(&campaign_body(600, 3, 5)).await;
    app.fund_and_open(&id).await;
    assert_eq!(app.grab(&id, "alice").await.status(), 200);
    assert_eq!(app.grab(&id, "alice").await.status(), 200);
    let model = app.service.campaign(&id).await.unwrap();
    let pool = pool_campaign(&model);
    let claims = app
        .handoff(&id, u32::try_from(model.buckets).unwrap())
        .await;
    for claim in &claims {
        record(&app, &id, claim).await;
    }
    let (old, _, seq, amount) = claims[0].clone();
    // Alice's first claim is being compensated: its packet went back first, its row still
    // says pending. Bob is granted that packet; his hand-off entry is lost.
    assert!(
        app.service
            .pool()
            .return_packet(&pool, &old, seq, amount)
            .await
            .unwrap()
    );
    let bob = plant_grant(&app, &id, "bob", &format!("{seq}:{amount}"), 1).await;
    // Carol is granted the packet alice's second claim holds (no return): a real conflict, in
    // a pool never rebuilt.
    let (_, _, taken_seq, taken_amount) = claims[1].clone();
    let _: () = app
        .pool
        .connection()
        .rpush(
            format!("{}:{{c:{id}}}:b:{}", app.prefix, taken_seq % 4),
            format!("{taken_seq}:{taken_amount}"),
        )
        .await
        .unwrap();
    let carol = plant_grant(
        &app,
        &id,
        "carol",
        &format!("{taken_seq}:{taken_amount}"),
        2,
    )
    .await;

    let report = repair(&app).await;
    let finding = |claim: &str| {
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|finding| finding["id"] == claim)
            .cloned()
            .unwrap_or_else(|| panic!("a finding for {claim}: {report}"))
    };
    assert_eq!(finding(&bob)["repaired"], true, "{report}");
    let recorded = app.service.store().claim(&bob).await.unwrap().unwrap();
    assert_eq!(
        (recorded.status.as_str(), recorded.reason),
        ("pending", None),
        "bob was answered 200 for a packet that was back in the pool: he is paid"
    );
    assert_eq!(finding(&carol)["repaired"], false, "{report}");
    assert!(
        finding(&carol)["action"]
            .as_str()
            .unwrap()
            .contains("packet_taken"),
        "{report}"
    );
    assert!(app.service.store().claim(&carol).await.unwrap().is_none());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_refuses_an_age_below_the_floor_and_follows_its_cursor_to_the_end() {
    let app = spawn_app(Setup {
        backend: Backend::Postgres,
        pool: PoolKind::Redis,
    })
    .await;
    let below = app.post("/repair", &json!({"min_age_ms": 499})).await;
    assert_eq!(below.status(), 422);
    let problem: Value = below.json().await.unwrap();
    assert_eq!(problem["field"], "min_age_ms", "{problem}");
    let bad = app.post("/repair", &json!({"cursor": "x:y:z"})).await;
    assert_eq!(bad.status(), 422);

    // Three claims still pending past the age bound, one a call.
    let id = app.create(&campaign_body(600, 3, 5)).await;
    app.fund_and_open(&id).await;
    for _ in 0..3 {
        assert_eq!(app.grab(&id, "alice").await.status(), 200);
    }
    for claim in app.handoff(&id, 4).await {
        record(&app, &id, &claim).await;
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let mut body = json!({"min_age_ms": 500, "limit": 1});
        if let Some(cursor) = &cursor {
            body["cursor"] = json!(cursor);
        }
        let response = app.post("/repair", &body).await;
        assert_eq!(response.status(), 200);
        let report: Value = response.json().await.unwrap();
        for claim in report["pending_claims"].as_array().unwrap() {
            seen.push(claim["claim_id"].as_str().unwrap().to_owned());
        }
        if report["more"] != true {
            break;
        }
        cursor = Some(report["cursor"].as_str().unwrap().to_owned());
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        (seen.len(), unique.len()),
        (3, 3),
        "each claim once: {seen:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_takes_out_a_held_packet_and_checks_every_later_record_of_the_campaign() {
    let app = spawn_app(Setup {
        backend: Backend::Postgres,
        pool: PoolKind::Redis,
    })
    .await;
    let id = app.create(&campaign_body(600, 3, 5)).await;
    app.fund_and_open(&id).await;
    assert_eq!(app.grab(&id, "alice").await.status(), 200);
    let claim = app.handoff(&id, 4).await.remove(0);
    record(&app, &id, &claim).await;
    // The packet alice holds is in a bucket again: it could be granted a second time.
    let _: () = app
        .pool
        .connection()
        .rpush(
            format!("{}:{{c:{id}}}:b:{}", app.prefix, claim.2 % 4),
            format!("{}:{}", claim.2, claim.3),
        )
        .await
        .unwrap();
    let _: () = app
        .pool
        .connection()
        .hincr(format!("{}:{{c:{id}}}:meta", app.prefix), "left", 1)
        .await
        .unwrap();
    assert!(
        app.service
            .campaign(&id)
            .await
            .unwrap()
            .pool_rebuilt_at_ms
            .is_none()
    );
    let report = repair(&app).await;
    assert_eq!(report["findings"][0]["kind"], "pool_mismatch", "{report}");
    assert_eq!(report["findings"][0]["repaired"], true, "{report}");
    assert!(
        app.service
            .campaign(&id)
            .await
            .unwrap()
            .pool_rebuilt_at_ms
            .is_some(),
        "the campaign's records are checked from now on"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_is_refused_while_another_replica_holds_the_repair_lease() {
    let app = spawn_app(Setup {
        backend: Backend::Postgres,
        pool: PoolKind::Redis,
    })
    .await;
    // Another replica's repair: the same lease in the same Redis.
    let other = redpacket_common::lease::LeaseManager::with_fence_key(
        app.pool.connection(),
        &format!("{}:lease:fence", app.prefix),
    );
    let held = other
        .try_acquire(
            &format!("{}:lease:campaign-repair", app.prefix),
            std::time::Duration::from_secs(30),
        )
        .await
        .unwrap()
        .unwrap();
    let busy = app.post("/repair", &json!({"min_age_ms": 500})).await;
    assert_eq!(busy.status(), 503);
    assert_eq!(busy.headers()["retry-after"], "5");
    let problem: Value = busy.json().await.unwrap();
    assert_eq!(problem["code"], "repair_in_progress", "{problem}");
    held.release().await.unwrap();
    assert_eq!(repair(&app).await["findings"], json!([]));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_reports_a_grant_that_can_never_be_recorded_once_per_run_and_still_reaches_the_end()
{
    let app = spawn_app(Setup {
        backend: Backend::Postgres,
        pool: PoolKind::Redis,
    })
    .await;
    let id = app.create(&campaign_body(600, 3, 5)).await;
    app.fund_and_open(&id).await;
    for _ in 0..2 {
        assert_eq!(app.grab(&id, "alice").await.status(), 200);
    }
    for claim in app.handoff(&id, 4).await {
        record(&app, &id, &claim).await;
    }
    // A pending grant of a packet the campaign does not have: it can never be recorded.
    let bogus = redpacket_campaign::service::claim_id(1 << 51, id.parse().unwrap());
    let _: () = app
        .pool
        .connection()
        .hset(
            format!("{}:{{c:{id}}}:pending", app.prefix),
            &bogus,
            format!(
                "dave:99:7:{}",
                chrono::Utc::now().timestamp_millis() - 5_000
            ),
        )
        .await
        .unwrap();
    let (mut findings, mut pending, mut cursor) = (Vec::new(), Vec::new(), None::<String>);
    let mut finished = false;
    for _ in 0..10 {
        let mut body = json!({"min_age_ms": 500, "limit": 1});
        if let Some(cursor) = &cursor {
            body["cursor"] = json!(cursor);
        }
        let report: Value = app.post("/repair", &body).await.json().await.unwrap();
        findings.extend(report["findings"].as_array().unwrap().iter().cloned());
        pending.extend(report["pending_claims"].as_array().unwrap().iter().cloned());
        if report["more"] != true {
            finished = true;
            break;
        }
        cursor = Some(report["cursor"].as_str().unwrap().to_owned());
    }
    assert!(finished, "the run reaches the end: {findings:?}");
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert_eq!(
        (&findings[0]["id"], &findings[0]["repaired"]),
        (&json!(bogus), &json!(false))
    );
    assert_eq!(pending.len(), 2, "{pending:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_reports_a_campaign_it_cannot_read_and_still_repairs_the_others() {
    let app = spawn_app(Setup {
        backend: Backend::Postgres,
        pool: PoolKind::Redis,
    })
    .await;
    let broken = app.create(&campaign_body(600, 3, 5)).await;
    app.fund_and_open(&broken).await;
    let _: () = app
        .pool
        .connection()
        .hset(
            format!("{}:{{c:{broken}}}:pending", app.prefix),
            "c0",
            "not a pending claim",
        )
        .await
        .unwrap();
    let mut body = campaign_body(600, 3, 5);
    body["seed"] = json!(7);
    let other = app.create(&body).await;
    app.fund_and_open(&other).await;
    assert_eq!(app.grab(&other, "alice").await.status(), 200);
    let claim = app.handoff(&other, 4).await.remove(0);
    record(&app, &other, &claim).await;

    let report = repair(&app).await;
    assert_eq!(report["findings"][0]["kind"], "repair_failed", "{report}");
    assert_eq!(report["findings"][0]["id"], json!(broken), "{report}");
    assert_eq!(report["findings"][0]["repaired"], false, "{report}");
    assert_eq!(
        report["pending_claims"][0]["claim_id"],
        json!(claim.0),
        "the other campaign is still looked at: {report}"
    );
    app.stop().await;
}
