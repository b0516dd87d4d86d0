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
    let err = refused
        .err()
        .expect("an evicting Redis is refused")
        .to_string();
    assert!(err.contains("allkeys-random"), "{err}");
    system.stop().await;
}
