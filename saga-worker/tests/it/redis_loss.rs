//! What Redis can lose is survived: a hand-off stream gone from Redis stalls no other
//! campaign's hand-off, a fencing counter deleted mid-run gives no older token, and a Redis
//! that evicts keys is refused at start.

use redpacket_common::testing::PrivateRedis;
use redpacket_saga_worker::{Application, TestSwitches};

use crate::helpers::{redis_url, spawn_system};

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_hand_off_stream_stalls_no_other_campaign_and_a_lost_fence_counter_is_survived() {
    let system = spawn_system(TestSwitches::default(), 500).await;
    system.top_up("m1", 100_000).await;
    let lost = system.create_campaign("m1", 10_000, 100, 600_000).await;
    let other = system.create_campaign("m1", 10_000, 100, 600_000).await;
    system.wait_for_status(&lost, "active", 30).await;
    system.wait_for_status(&other, "active", 30).await;
    let first = system.grab_all(&lost, 10, 4).await;
    system
        .wait_until(30, "the first grabs are credited", || async {
            system.stats(&lost).await["packets_credited"] == first.len()
        })
        .await;

    // The campaign's hand-off streams and the fencing counter vanish from Redis.
    let mut connection = redis().await;
    // The streams only, not the relay's leases on them (whose loss the relay notices anyway).
    let mut gone: Vec<String> = system
        .redis_keys(&format!("{{c:{lost}}}:h:"))
        .await
        .into_iter()
        .filter(|key| !key.contains(":relay:"))
        .collect();
    gone.sort();
    gone.dedup();
    assert!(!gone.is_empty());
    gone.extend(system.redis_keys("lease:fence").await);
    let _: () = redis::cmd("DEL")
        .arg(&gone)
        .query_async(&mut connection)
        .await
        .unwrap();

    let others = system.grab_all(&other, 30, 4).await;
    let again = system.grab_all(&lost, 10, 4).await;
    // Promptly: the relay goes on with the other streams at once, it does not wait for the
    // missing one to come back.
    system
        .wait_until(3, "the other campaign's grabs are credited", || async {
            system.stats(&other).await["packets_credited"] == others.len()
        })
        .await;
    system
        .wait_until(30, "the lost streams' new grabs are credited", || async {
            system.stats(&lost).await["packets_credited"] == first.len() + again.len()
        })
        .await;
    assert!(system.sagas.dead_letters(10).await.unwrap().is_empty());
    system.assert_ledger().await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_saga_worker_refuses_to_start_on_a_redis_that_evicts_keys() {
    let system = spawn_system(TestSwitches::default(), 500).await;
    let redis = PrivateRedis::start(&["--maxmemory-policy", "allkeys-random"]).await;
    let mut config = system.config.clone();
    config.redis_url = redpacket_common::Secret::new(redis.url());
    config.listen = "127.0.0.1:0".parse().unwrap();
    let refused = Application::build(config, TestSwitches::default()).await;
    let Err(err) = refused else {
        panic!("an evicting Redis is refused");
    };
    let err = err.to_string();
    assert!(err.contains("allkeys-random"), "{err}");
    system.stop().await;
}

/// Redis loses everything in the middle of a grabbing crowd (a restart without persistence, a
/// flush): the campaign service notices, answers fast 503s meanwhile, rebuilds the pool from
/// the database once the grabs already relayed are recorded, and the crowd grabs on. No packet
/// is held by two claims, no user passes the limit, the counters stay exact and the campaign
/// settles with the exact refund. (Grabs answered but not yet relayed when Redis lost them are
/// lost with it: run Redis with `appendfsync always` to keep them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_flushed_while_a_crowd_grabs_is_rebuilt_and_the_campaign_settles_exactly() {
    use std::collections::{HashMap, HashSet};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let redis = PrivateRedis::start(&[]).await;
    let system = Arc::new(
        crate::helpers::spawn_system_on(&redis.url(), TestSwitches::default(), 500, |_| {}).await,
    );
    let (total, packets) = (60_000_i64, 600_i64);
    system.top_up("m1", 100_000).await;
    let id = system.create_campaign("m1", total, packets, 25_000).await;
    system.wait_for_status(&id, "active", 30).await;

    let granted = Arc::new(AtomicUsize::new(0));
    let statuses = Arc::new(std::sync::Mutex::new(HashMap::<(u16, String), usize>::new()));
    let crowd = {
        let (system, id, granted, statuses) = (
            system.clone(),
            id.clone(),
            granted.clone(),
            statuses.clone(),
        );
        tokio::spawn(async move {
            use futures::StreamExt;
            let url = format!("{}/campaigns/{id}/grab", system.campaign_url);
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
            futures::stream::iter(0..2_000)
                .map(|i| {
                    let (client, url, granted, statuses) = (
                        system.client.clone(),
                        url.clone(),
                        granted.clone(),
                        statuses.clone(),
                    );
                    async move {
                        // Each user tries until answered for good, as a real client would.
                        while tokio::time::Instant::now() < deadline {
                            let response = client
                                .post(&url)
                                .json(&serde_json::json!({"user_id": format!("u{}", i % 900)}))
                                .send()
                                .await
                                .unwrap();
                            let status = response.status().as_u16();
                            let body: serde_json::Value = response.json().await.unwrap();
                            let code = body["code"].as_str().unwrap_or("").to_owned();
                            *statuses.lock().unwrap().entry((status, code)).or_default() += 1;
                            if status == 200 {
                                granted.fetch_add(1, Ordering::SeqCst);
                            }
                            if status != 503 {
                                return;
                            }
                            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                        }
                    }
                })
                .buffer_unordered(8)
                .collect::<Vec<()>>()
                .await;
        })
    };
    while granted.load(Ordering::SeqCst) < 150 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    redis.run(&["FLUSHALL"]).await;
    crowd.await.unwrap();
    system.wait_for_status(&id, "settled", 60).await;

    let statuses = statuses.lock().unwrap().clone();
    for (status, code) in statuses.keys() {
        assert!(
            matches!(
                (*status, code.as_str()),
                (200, "")
                    | (503, "pool_rebuilding")
                    | (410, "sold_out" | "campaign_ended")
                    | (409, "limit_reached")
            ),
            "every answer is a grant, a fast 503 or a refusal: {statuses:?}"
        );
    }
    assert!(
        statuses.contains_key(&(503, "pool_rebuilding".to_owned())),
        "the loss was noticed: {statuses:?}"
    );
    let claims = system
        .campaigns
        .store()
        .claims_of_campaign(id.parse().unwrap(), None, 10_000)
        .await
        .unwrap();
    let mut seqs = HashSet::new();
    let mut users = HashSet::new();
    for claim in &claims {
        assert!(
            seqs.insert(claim.packet_seq),
            "packet {} held twice",
            claim.packet_seq
        );
        assert!(
            users.insert(claim.user_id.clone()),
            "{} over the limit",
            claim.user_id
        );
        assert_eq!(claim.status, "credited", "{claim:?}");
    }
    assert!(claims.len() > 150, "the crowd grabbed on after the rebuild");
    let stats = system.stats(&id).await;
    assert_eq!(stats["packets_in_flight"], 0, "{stats}");
    let credited: i64 = claims.iter().map(|claim| claim.amount).sum();
    assert_eq!(stats["amount_credited"], credited);
    assert_eq!(stats["amount_refunded"], total - credited, "{stats}");
    assert_eq!(system.balance(&format!("escrow:{id}")).await, 0);
    assert_eq!(system.balance("merchant:m1").await, 100_000 - credited);
    system.assert_ledger().await;
    Arc::into_inner(system).unwrap().stop().await;
}
