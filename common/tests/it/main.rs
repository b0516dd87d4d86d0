//! Lease-lock contract tests, run against both lease stores: Redis and the embedded mode's
//! in-process one (the resources the holders write live in a real Redis either way); and the
//! HTTP front.

mod db;
mod front;

use std::time::Duration;

use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use redpacket_common::lease::{LeaseManager, fenced_set};

async fn redis() -> ConnectionManager {
    let url =
        std::env::var("RP_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    redis::Client::open(url)
        .unwrap()
        .get_connection_manager()
        .await
        .expect("the Redis test server must be running")
}

fn key(name: &str) -> String {
    format!("rpt:{}:{name}", uuid::Uuid::new_v4().simple())
}

async fn the_lock_excludes_concurrent_read_modify_writes(leases: LeaseManager) {
    let connection = redis().await;
    let lock = key("lock");
    let counter = key("counter");
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (leases, lock, counter, mut connection) = (
                leases.clone(),
                lock.clone(),
                counter.clone(),
                connection.clone(),
            );
            tokio::spawn(async move {
                for _ in 0..10 {
                    let lease = leases
                        .acquire(
                            &lock,
                            Duration::from_secs(2),
                            Duration::from_millis(2),
                            Duration::from_secs(30),
                        )
                        .await
                        .unwrap()
                        .expect("the lock within 30 s");
                    // A deliberately non-atomic read-modify-write with a pause in the middle.
                    let value: i64 = connection.get(&counter).await.unwrap_or(0);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    let _: () = connection.set(&counter, value + 1).await.unwrap();
                    assert!(lease.release().await.unwrap());
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let mut connection = connection;
    let total: i64 = connection.get(&counter).await.unwrap();
    assert_eq!(total, 160);
    let _: () = connection
        .del(&[&counter, &format!("{lock}:fence")])
        .await
        .unwrap();
}

async fn a_holder_that_dies_frees_the_lock_after_the_ttl(leases: LeaseManager) {
    let lock = key("dies");
    let ttl = Duration::from_millis(300);
    let first = leases.try_acquire(&lock, ttl).await.unwrap().unwrap();
    // Dropped without release: the watchdog stops and the key expires.
    drop(first);
    assert!(
        leases.try_acquire(&lock, ttl).await.unwrap().is_none(),
        "still held before the ttl"
    );
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    let second = leases
        .try_acquire(&lock, ttl)
        .await
        .unwrap()
        .expect("free after the ttl");
    second.release().await.unwrap();
}

async fn a_working_holder_keeps_its_lease_through_renewal(leases: LeaseManager) {
    let lock = key("renewed");
    let ttl = Duration::from_millis(300);
    let lease = leases.try_acquire(&lock, ttl).await.unwrap().unwrap();
    tokio::time::sleep(ttl * 4).await;
    assert!(!lease.is_lost());
    assert!(
        leases.try_acquire(&lock, ttl).await.unwrap().is_none(),
        "still held after four ttls"
    );
    assert!(lease.release().await.unwrap());
}

async fn a_holder_that_stops_renewing_is_told_and_its_fenced_write_is_rejected(
    leases: LeaseManager,
) {
    let mut connection = redis().await;
    let lock = key("stale");
    let resource = key("resource");
    let ttl = Duration::from_millis(300);
    let stale = leases.try_acquire(&lock, ttl).await.unwrap().unwrap();
    assert!(
        fenced_set(&mut connection, &resource, stale.fence(), "first")
            .await
            .unwrap()
    );

    // The holder stalls: its lease expires and someone else takes it.
    stale.stop_renewing();
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    let fresh = leases
        .try_acquire(&lock, ttl)
        .await
        .unwrap()
        .expect("taken over");
    assert!(fresh.fence() > stale.fence());
    assert!(
        fenced_set(&mut connection, &resource, fresh.fence(), "second")
            .await
            .unwrap()
    );

    // The stale holder wakes up: its write is refused and its lease is not its own anymore.
    assert!(
        !fenced_set(&mut connection, &resource, stale.fence(), "stale")
            .await
            .unwrap()
    );
    let value: String = connection.get(&resource).await.unwrap();
    assert_eq!(value, "second");
    assert!(!leases.extend(&lock, stale.token(), ttl).await.unwrap());
    assert!(
        !stale.release().await.unwrap(),
        "releasing someone else's lease is refused"
    );
    assert!(fresh.release().await.unwrap());
}

async fn a_lost_lease_cancels_its_token_at_once(leases: LeaseManager) {
    let lock = key("lost");
    let ttl = Duration::from_millis(300);
    let lease = leases.try_acquire(&lock, ttl).await.unwrap().unwrap();
    let lost = lease.lost();
    // The lease disappears behind the holder's back: the next renewal notices.
    assert!(leases.release(&lock, lease.token()).await.unwrap());
    tokio::time::timeout(ttl, lost.cancelled())
        .await
        .expect("the holder is told within one renewal period");
    assert!(lease.is_lost());
}

async fn extend_and_release_by_a_non_owner_are_refused(leases: LeaseManager) {
    let lock = key("owned");
    let ttl = Duration::from_secs(2);
    let lease = leases.try_acquire(&lock, ttl).await.unwrap().unwrap();
    assert!(!leases.extend(&lock, "not-the-token", ttl).await.unwrap());
    assert!(!leases.release(&lock, "not-the-token").await.unwrap());
    assert!(leases.try_acquire(&lock, ttl).await.unwrap().is_none());
    assert!(lease.release().await.unwrap());
}

async fn a_lease_set_takes_the_free_keys_under_one_fence_and_keeps_them(leases: LeaseManager) {
    let keys: Vec<String> = (0..5).map(|i| key(&format!("set{i}"))).collect();
    let ttl = Duration::from_millis(300);
    let single = leases.try_acquire(&keys[2], ttl).await.unwrap().unwrap();
    let set = leases.try_acquire_many(&keys, ttl).await.unwrap();
    assert_eq!(set.granted(), &[true, true, false, true, true]);
    assert!(
        set.fence() > single.fence(),
        "one fence for the set, newer than every earlier grant"
    );
    // Renewed together past several ttls.
    tokio::time::sleep(ttl * 3).await;
    assert!(!set.lost().is_cancelled());
    for (i, lock) in keys.iter().enumerate() {
        assert!(
            leases.try_acquire(lock, ttl).await.unwrap().is_none(),
            "key {i} still held"
        );
    }
    assert!(single.release().await.unwrap());
    assert!(!leases.release(&keys[0], "not-the-token").await.unwrap());
    set.stop_renewing();
    tokio::time::timeout(ttl * 2, async {
        while leases.try_acquire(&keys[0], ttl).await.unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("a set that stopped renewing frees its keys after the ttl");
    // A fresh set over keys nobody holds releases them all at once.
    let fresh: Vec<String> = (0..3).map(|i| key(&format!("fresh{i}"))).collect();
    let set = leases.try_acquire_many(&fresh, ttl).await.unwrap();
    assert_eq!(set.granted(), &[true, true, true]);
    set.release().await.unwrap();
    let again = leases.try_acquire_many(&fresh, ttl).await.unwrap();
    assert_eq!(again.granted(), &[true, true, true]);
    again.release().await.unwrap();
}

async fn a_lease_set_is_told_when_one_of_its_leases_is_lost(leases: LeaseManager) {
    let keys: Vec<String> = (0..3).map(|i| key(&format!("lost{i}"))).collect();
    let ttl = Duration::from_millis(300);
    let set = leases.try_acquire_many(&keys, ttl).await.unwrap();
    let lost = set.lost();
    // One lease of the set disappears behind the holder's back: the next renewal notices.
    assert!(leases.release(&keys[1], set.token()).await.unwrap());
    tokio::time::timeout(ttl, lost.cancelled())
        .await
        .expect("the holder is told within one renewal period");
    set.release().await.unwrap();
}

/// Runs every contract test against one lease store.
macro_rules! contract {
    ($store:ident, $make:expr) => {
        mod $store {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn the_lock_excludes_concurrent_read_modify_writes() {
                super::the_lock_excludes_concurrent_read_modify_writes($make).await;
            }

            #[tokio::test]
            async fn a_holder_that_dies_frees_the_lock_after_the_ttl() {
                super::a_holder_that_dies_frees_the_lock_after_the_ttl($make).await;
            }

            #[tokio::test]
            async fn a_working_holder_keeps_its_lease_through_renewal() {
                super::a_working_holder_keeps_its_lease_through_renewal($make).await;
            }

            #[tokio::test]
            async fn a_holder_that_stops_renewing_is_told_and_its_fenced_write_is_rejected() {
                super::a_holder_that_stops_renewing_is_told_and_its_fenced_write_is_rejected($make)
                    .await;
            }

            #[tokio::test]
            async fn a_lost_lease_cancels_its_token_at_once() {
                super::a_lost_lease_cancels_its_token_at_once($make).await;
            }

            #[tokio::test]
            async fn a_lease_set_takes_the_free_keys_under_one_fence_and_keeps_them() {
                super::a_lease_set_takes_the_free_keys_under_one_fence_and_keeps_them($make).await;
            }

            #[tokio::test]
            async fn a_lease_set_is_told_when_one_of_its_leases_is_lost() {
                super::a_lease_set_is_told_when_one_of_its_leases_is_lost($make).await;
            }

            #[tokio::test]
            async fn extend_and_release_by_a_non_owner_are_refused() {
                super::extend_and_release_by_a_non_owner_are_refused($make).await;
            }
        }
    };
}

contract!(in_redis, LeaseManager::new(redis().await));
contract!(in_process, LeaseManager::local());

/// Fencing tokens never go backwards, whatever Redis lost: the counter deleted (a restart
/// without persistence, a failover to a replica behind it) or set back to a small value.
#[tokio::test]
async fn fencing_tokens_never_go_backwards_when_redis_loses_the_counter() {
    let mut connection = redis().await;
    let counter = key("fence");
    let leases = LeaseManager::with_fence_key(connection.clone(), &counter);
    let lock = key("lock");
    let ttl = Duration::from_secs(5);
    let first = leases.try_acquire(&lock, ttl).await.unwrap().unwrap();
    let set = leases
        .try_acquire_many(&[key("a"), key("b")], ttl)
        .await
        .unwrap();
    assert!(set.fence() > first.fence());
    let mut highest = set.fence();
    first.release().await.unwrap();
    set.release().await.unwrap();

    let _: () = connection.del(&counter).await.unwrap();
    let after_loss = leases.try_acquire(&lock, ttl).await.unwrap().unwrap();
    assert!(
        after_loss.fence() > highest,
        "a deleted counter restarts above"
    );
    highest = after_loss.fence();
    after_loss.release().await.unwrap();

    // Another process (no memory of the tokens) after the counter went back to 1, started at
    // least a millisecond later (the clock floor moves by the millisecond).
    tokio::time::sleep(Duration::from_millis(5)).await;
    let _: () = connection.set(&counter, 1).await.unwrap();
    let fresh = LeaseManager::with_fence_key(connection.clone(), &counter);
    let other = fresh.try_acquire(&lock, ttl).await.unwrap().unwrap();
    assert!(
        other.fence() > highest,
        "the clock floor holds for a new process"
    );
    let other_fence = other.fence();
    other.release().await.unwrap();

    // A floor far ahead of the clock (the highest fence the saga rows carry) is respected.
    let floor = other_fence + 10_000_000_000;
    fresh.raise_floor(floor);
    let _: () = connection.del(&counter).await.unwrap();
    let raised = fresh.try_acquire(&lock, ttl).await.unwrap().unwrap();
    assert!(raised.fence() > floor);
    let next = fresh
        .try_acquire(&key("other"), ttl)
        .await
        .unwrap()
        .unwrap();
    assert!(
        next.fence() > raised.fence(),
        "the counter continues from the floor"
    );
    let _: () = connection.del(&counter).await.unwrap();
}

#[tokio::test]
async fn the_in_process_fence_respects_a_raised_floor() {
    let leases = LeaseManager::local();
    let ttl = Duration::from_secs(5);
    let before = leases.try_acquire("a", ttl).await.unwrap().unwrap();
    let floor = before.fence() + 1_000_000;
    leases.raise_floor(floor);
    let after = leases.try_acquire("b", ttl).await.unwrap().unwrap();
    assert!(after.fence() > floor);
}
