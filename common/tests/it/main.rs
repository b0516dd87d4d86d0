//! Lease locks against a real Redis.

use std::sync::Arc;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_excludes_concurrent_read_modify_writes() {
    let connection = redis().await;
    let leases = LeaseManager::new(connection.clone());
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

#[tokio::test]
async fn a_holder_that_dies_frees_the_lock_after_the_ttl() {
    let leases = LeaseManager::new(redis().await);
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

#[tokio::test]
async fn a_working_holder_keeps_its_lease_through_renewal() {
    let leases = LeaseManager::new(redis().await);
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

#[tokio::test]
async fn a_holder_that_stops_renewing_is_told_and_its_fenced_write_is_rejected() {
    let mut connection = redis().await;
    let leases = LeaseManager::new(connection.clone());
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

#[tokio::test]
async fn a_lost_lease_cancels_its_token_at_once() {
    let mut connection = redis().await;
    let leases = LeaseManager::new(connection.clone());
    let lock = key("lost");
    let ttl = Duration::from_millis(300);
    let lease = leases.try_acquire(&lock, ttl).await.unwrap().unwrap();
    let lost = lease.lost();
    // Someone deletes the key behind the holder's back: the next renewal notices.
    let _: () = connection.del(&lock).await.unwrap();
    tokio::time::timeout(ttl, lost.cancelled())
        .await
        .expect("the holder is told within one renewal period");
    assert!(lease.is_lost());
}

#[tokio::test]
async fn extend_and_release_by_a_non_owner_are_refused() {
    let leases = Arc::new(LeaseManager::new(redis().await));
    let lock = key("owned");
    let ttl = Duration::from_secs(2);
    let lease = leases.try_acquire(&lock, ttl).await.unwrap().unwrap();
    assert!(!leases.extend(&lock, "not-the-token", ttl).await.unwrap());
    assert!(!leases.release(&lock, "not-the-token").await.unwrap());
    assert!(leases.try_acquire(&lock, ttl).await.unwrap().is_none());
    assert!(lease.release().await.unwrap());
}
