//! `POST /v1/admin/reconciliation/repair` against the whole system on the real servers, with
//! each thing it repairs broken on purpose: a claim granted in Redis whose hand-off was lost,
//! a recorded claim with no saga, a dead-lettered saga, packets missing from and extra in a
//! pool, counters off the buckets, an ended campaign whose refund message was dropped, a pool
//! flushed. After the repair the reconciliation holds, the money is exact, and a second run
//! finds nothing.

use std::time::Duration;

use redis::AsyncCommands;
use redpacket_campaign::pool::home_bucket;
use redpacket_campaign::service::claim_id;
use redpacket_campaign::store::{ClaimRecord, pool_state, status};
use redpacket_common::auth::Role;
use redpacket_common::messages::{Envelope, SagaEvent};
use redpacket_common::testing::redis_url;
use serde_json::{Value, json};

use crate::system::{System, token};

const BUCKETS: u32 = 4;

struct Keys {
    prefix: String,
    campaign: i64,
}

impl Keys {
    fn of(system: &System, campaign: &str) -> Keys {
        Keys {
            prefix: system.redis_prefix.clone(),
            campaign: campaign.parse().unwrap(),
        }
    }
    fn key(&self, kind: &str) -> String {
        format!("{}:{{c:{}}}:{kind}", self.prefix, self.campaign)
    }
    fn bucket(&self, k: u32) -> String {
        self.key(&format!("b:{k}"))
    }
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Grants a packet in Redis exactly as the grab script does, but writes no hand-off entry:
/// what a Redis failover or a deleted entry leaves behind. Answers the claim and its amount.
async fn grant_without_handoff(
    redis: &mut redis::aio::MultiplexedConnection,
    keys: &Keys,
    user: &str,
    snowflake: u64,
) -> (String, u32, i64) {
    for k in 0..BUCKETS {
        let item: Option<String> = redis.lpop(keys.bucket(k), None).await.unwrap();
        let Some(item) = item else { continue };
        let (seq, amount) = item.split_once(':').unwrap();
        let (seq, amount): (u32, i64) = (seq.parse().unwrap(), amount.parse().unwrap());
        let claim = claim_id(snowflake, keys.campaign);
        let grabbed_at = chrono::Utc::now().timestamp_millis() - 10_000;
        let users = keys.key(&format!("u:{}", home_bucket(user, BUCKETS)));
        let _: () = redis
            .hset(&users, user, format!("{claim}:{amount}"))
            .await
            .unwrap();
        let _: () = redis
            .hset(
                keys.key("pending"),
                &claim,
                format!("{user}:{seq}:{amount}:{grabbed_at}"),
            )
            .await
            .unwrap();
        let _: () = redis.hincr(keys.key("meta"), "left", -1).await.unwrap();
        let _: () = redis
            .hincr(keys.key("meta"), "left_amount", -amount)
            .await
            .unwrap();
        return (claim, seq, amount);
    }
    panic!("the pool is empty");
}

async fn repair(system: &System) -> Value {
    let (status, report) = system
        .gateway
        .post(
            "/v1/admin/reconciliation/repair",
            &token(Role::Operator, "ops"),
            Some(json!({"min_age_ms": 1000, "limit": 500})),
        )
        .await;
    assert_eq!(status, 200, "{report}");
    report
}

async fn reconciliation(system: &System) -> Value {
    let (status, body) = system
        .gateway
        .get("/v1/admin/reconciliation", &token(Role::Operator, "ops"))
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..300 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting until {what}");
}

async fn balance(system: &System, user: &str) -> i64 {
    let (_, wallet) = system
        .gateway
        .get("/v1/me/wallet", &token(Role::User, user))
        .await;
    wallet["balance"].as_i64().unwrap_or(0)
}

fn finding<'a>(report: &'a Value, kind: &str, id: &str) -> &'a Value {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|finding| finding["kind"] == kind && finding["id"] == id)
        .unwrap_or_else(|| panic!("no {kind} finding for {id} in {report}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_puts_right_what_was_broken_on_purpose_and_a_second_run_finds_nothing() {
    let system = System::start().await;
    system.top_up("m1", 1_000_000).await;
    let pooled = system.active_campaign("m1", 20_000, 20).await;
    let ended = system.active_campaign("m1", 5_000, 10).await;
    let store = system.campaigns.store();

    // Grabs on the normal path, all credited.
    let mut grabbed = Vec::new();
    for user in ["u1", "u2", "u3"] {
        let (status, body) = system
            .gateway
            .post(
                &format!("/v1/campaigns/{pooled}/grab"),
                &token(Role::User, user),
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        grabbed.push(body);
    }
    wait_until("the grabs are credited", || async {
        system
            .campaigns
            .stats(&pooled)
            .await
            .unwrap()
            .packets_credited
            == 3
    })
    .await;
    let (status, clean) = system
        .gateway
        .post(
            "/v1/admin/reconciliation/repair",
            &token(Role::Operator, "ops"),
            Some(json!({"min_age_ms": 1000})),
        )
        .await;
    assert_eq!(status, 200, "{clean}");
    assert_eq!(clean["findings"], json!([]), "nothing is broken yet");

    let mut redis = redis().await;
    let keys = Keys::of(&system, &pooled);
    let pooled_id: i64 = pooled.parse().unwrap();
    // 1. A grab answered in Redis whose hand-off entry was lost: in no database, no saga.
    let (lost, _, lost_amount) = grant_without_handoff(&mut redis, &keys, "u9", 1 << 50).await;
    // 2. A claim recorded pending whose saga never started (its message was dropped).
    let (orphan, orphan_seq, orphan_amount) =
        grant_without_handoff(&mut redis, &keys, "u10", (1 << 50) + 1).await;
    let record = |id: &str, user: &str, seq: u32, amount: i64| ClaimRecord {
        id: id.to_owned(),
        campaign_id: pooled_id,
        user_id: user.to_owned(),
        seq,
        amount,
        currency: "CNY".into(),
        grabbed_at_ms: chrono::Utc::now().timestamp_millis() - 10_000,
        request_id: None,
    };
    system
        .campaigns
        .record_claim(record(&orphan, "u10", orphan_seq, orphan_amount))
        .await
        .unwrap();
    // 3. A saga given up: stuck, its message in the dead letters.
    let (stuck, stuck_seq, stuck_amount) =
        grant_without_handoff(&mut redis, &keys, "u11", (1 << 50) + 2).await;
    system
        .campaigns
        .record_claim(record(&stuck, "u11", stuck_seq, stuck_amount))
        .await
        .unwrap();
    let envelope = Envelope::new(
        format!("grab:{stuck}"),
        None,
        SagaEvent::GrabClaimed {
            claim_id: stuck.clone(),
            campaign_id: pooled.clone(),
            user_id: "u11".into(),
            packet_seq: stuck_seq,
            amount: stuck_amount,
            currency: "CNY".into(),
            grabbed_at_ms: chrono::Utc::now().timestamp_millis() - 10_000,
        },
    );
    let message = String::from_utf8(envelope.to_bytes()).unwrap();
    let stuck_saga = format!("grab:{stuck}");
    system
        .sagas
        .claim(&stuck_saga, "grab", &message, None, 1)
        .await
        .unwrap();
    system
        .sagas
        .bury(
            7,
            &stuck_saga,
            &message,
            "out of retries (broken on purpose)",
        )
        .await
        .unwrap();
    // 4. The pool disagrees with the database: a packet missing (popped, counters untouched),
    // a credited claim's packet back in a bucket, a packet there twice.
    let missing: String = redis.lpop(keys.bucket(1), None).await.unwrap();
    let credited = store
        .claim(grabbed[0]["claim_id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    let held_item = format!("{}:{}", credited.packet_seq, credited.amount);
    let _: () = redis
        .rpush(
            keys.bucket(u32::try_from(credited.packet_seq).unwrap() % BUCKETS),
            &held_item,
        )
        .await
        .unwrap();
    let twice: String = redis.lindex(keys.bucket(2), 0).await.unwrap();
    let _: () = redis.rpush(keys.bucket(2), &twice).await.unwrap();
    // 5. A campaign ended whose `campaign.ended` event (the refund's message) was dropped.
    let ended_id: i64 = ended.parse().unwrap();
    let snapshot = system
        .campaigns
        .pool()
        .close(ended_id)
        .await
        .unwrap()
        .unwrap();
    store
        .finalize_remaining(ended_id, snapshot.packets_left, snapshot.amount_left)
        .await
        .unwrap();
    assert!(
        store
            .transition(
                ended_id,
                &[status::ACTIVE],
                status::EXPIRED,
                None,
                None,
                chrono::Utc::now().timestamp_millis() - 10_000,
            )
            .await
            .unwrap()
    );
    store
        .set_pool_state(ended_id, pool_state::CLOSED)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let broken = reconciliation(&system).await;
    assert_eq!(broken["ok"], false, "the dead letter shows: {broken}");

    let report = repair(&system).await;
    assert_eq!(report["unrepaired"], 0, "{report}");
    assert_eq!(report["ok"], true, "{report}");
    let campaign_finding = finding(&report, "claim_unrecorded", &lost);
    assert_eq!(campaign_finding["service"], "campaign");
    assert_eq!(campaign_finding["repaired"], true);
    finding(&report, "claim_pending", &format!("grab:{lost}"));
    finding(&report, "claim_pending", &format!("grab:{orphan}"));
    let replayed = finding(&report, "claim_pending", &stuck_saga);
    assert!(
        replayed["action"]
            .as_str()
            .unwrap()
            .contains("dead letter 7: replayed"),
        "{replayed}"
    );
    let mended = finding(&report, "pool_mismatch", &pooled);
    let action = mended["action"].as_str().unwrap();
    assert!(
        action.contains("1 packet(s) put back, 2 item(s) taken out"),
        "{mended}"
    );
    assert!(
        action.contains(&format!("seq {}", missing.split_once(':').unwrap().0)),
        "{mended}"
    );
    finding(&report, "campaign_unsettled", &format!("refund:{ended}"));

    // The money: each repaired claim credited once, the refund done, every invariant held.
    wait_until("the repaired claims are credited", || async {
        system
            .campaigns
            .stats(&pooled)
            .await
            .unwrap()
            .packets_credited
            == 6
    })
    .await;
    system.wait_status("m1", &ended, "settled").await;
    assert_eq!(balance(&system, "u9").await, lost_amount);
    assert_eq!(balance(&system, "u10").await, orphan_amount);
    assert_eq!(balance(&system, "u11").await, stuck_amount);
    let items: i64 = {
        let mut total = 0;
        for k in 0..BUCKETS {
            let length: i64 = redis.llen(keys.bucket(k)).await.unwrap();
            total += length;
        }
        total
    };
    let pool = system
        .campaigns
        .pool()
        .snapshot(pooled_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (items, pool.packets_left),
        (20 - 6, 20 - 6),
        "the buckets hold every packet no claim holds, once"
    );
    wait_until("the reconciliation holds", || async {
        reconciliation(&system).await["ok"] == true
    })
    .await;
    let again = repair(&system).await;
    assert_eq!(again["findings"], json!([]), "a second run repairs nothing");

    // 6. The pool flushed from Redis: rebuilt from the database, grabs go on.
    let mut doomed: Vec<String> = vec![keys.key("meta"), keys.key("pending")];
    doomed.extend((0..BUCKETS).map(|k| keys.bucket(k)));
    doomed.extend((0..BUCKETS).map(|k| keys.key(&format!("u:{k}"))));
    let _: () = redis.del(&doomed).await.unwrap();
    let mut rebuilt = false;
    for _ in 0..40 {
        let report = repair(&system).await;
        let lost_pool = report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|finding| finding["kind"] == "pool_lost");
        if let Some(lost_pool) = lost_pool {
            assert_eq!(lost_pool["id"], pooled.as_str(), "{report}");
        }
        if report["unrepaired"] == 0
            && system
                .campaigns
                .pool()
                .snapshot(pooled_id)
                .await
                .unwrap()
                .is_some()
        {
            rebuilt = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(rebuilt, "the flushed pool was rebuilt");
    let pool = system
        .campaigns
        .pool()
        .snapshot(pooled_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        pool.packets_left, 14,
        "rebuilt with the packets no claim holds"
    );
    let (status, body) = system
        .gateway
        .post(
            &format!("/v1/campaigns/{pooled}/grab"),
            &token(Role::User, "u20"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    wait_until("the new grab is credited", || async {
        system
            .campaigns
            .stats(&pooled)
            .await
            .unwrap()
            .packets_credited
            == 7
    })
    .await;
    wait_until("the reconciliation holds after the rebuild", || async {
        reconciliation(&system).await["ok"] == true
    })
    .await;
    let last = repair(&system).await;
    assert_eq!(last["findings"], json!([]), "nothing left to repair");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_refuses_bad_bounds_and_callers_that_are_not_operators() {
    let system = System::start().await;
    let path = "/v1/admin/reconciliation/repair";
    let operator = token(Role::Operator, "ops");
    let (status, problem) = system
        .gateway
        .post(path, &operator, Some(json!({"limit": 501})))
        .await;
    assert_eq!((status.as_u16(), &problem["field"]), (422, &json!("limit")));
    let (status, problem) = system
        .gateway
        .post(path, &operator, Some(json!({"min_age_ms": -1})))
        .await;
    assert_eq!(
        (status.as_u16(), &problem["field"]),
        (422, &json!("min_age_ms"))
    );
    // Below the campaign service's floor (a second in this system): refused, not shortened.
    let (status, problem) = system
        .gateway
        .post(path, &operator, Some(json!({"min_age_ms": 999})))
        .await;
    assert_eq!(
        (status.as_u16(), &problem["field"]),
        (422, &json!("min_age_ms")),
        "{problem}"
    );
    let (status, problem) = system
        .gateway
        .post(path, &operator, Some(json!({"cursor": "not a cursor"})))
        .await;
    assert_eq!(
        (status.as_u16(), &problem["field"]),
        (422, &json!("cursor")),
        "{problem}"
    );
    let (status, _) = system
        .gateway
        .post(path, &token(Role::Merchant, "m1"), Some(json!({})))
        .await;
    assert_eq!(status.as_u16(), 403);
    let (status, report) = system.gateway.post(path, &operator, Some(json!({}))).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        report,
        json!({"ok": true, "repaired": 0, "unrepaired": 0, "findings": [], "more": false})
    );
}
