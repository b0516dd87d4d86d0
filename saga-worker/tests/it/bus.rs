//! The bus contract, run against both buses: RabbitMQ and the embedded SQLite queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redpacket_common::local_queue::LocalQueue;
use redpacket_saga_worker::broker::Broker;
use redpacket_saga_worker::bus::{Bus, Handler, LocalBus};
use tokio_util::sync::CancellationToken;

use crate::helpers::{amqp_url, delete_topology};

const RETRY_BASE: Duration = Duration::from_millis(300);

/// A bus under test and what to clean up after it.
enum Under {
    Rabbit(Broker),
    Local(LocalBus, std::path::PathBuf),
}

impl Under {
    async fn rabbit() -> Under {
        let prefix = format!("rpt.{}", uuid::Uuid::new_v4().simple());
        Under::Rabbit(
            Broker::connect(&amqp_url(), &prefix, RETRY_BASE)
                .await
                .unwrap(),
        )
    }

    async fn local() -> Under {
        let path =
            std::env::temp_dir().join(format!("rp-bus-{}.sqlite", uuid::Uuid::new_v4().simple()));
        let db = redpacket_common::db::connect(&format!("sqlite://{}?mode=rwc", path.display()), 1)
            .await
            .unwrap();
        Under::Local(
            LocalBus::new(LocalQueue::open(db).await.unwrap(), RETRY_BASE),
            path,
        )
    }

    fn bus(&self) -> Arc<dyn Bus> {
        match self {
            Under::Rabbit(broker) => Arc::new(broker.clone()),
            Under::Local(bus, _) => Arc::new(bus.clone()),
        }
    }

    async fn clean(self) {
        match self {
            Under::Rabbit(broker) => delete_topology(&broker).await,
            Under::Local(_, path) => {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Records every delivery: the body, when, and how many handlers ran at once.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<(String, Instant)>>,
    running: AtomicUsize,
    most_at_once: AtomicUsize,
    /// Bodies whose first delivery is refused (not settled).
    refuse_once: Mutex<HashMap<String, bool>>,
}

fn handler(recorder: Arc<Recorder>, hold: Duration) -> Handler {
    Arc::new(move |body: Vec<u8>| {
        let recorder = recorder.clone();
        Box::pin(async move {
            let now = recorder.running.fetch_add(1, Ordering::SeqCst) + 1;
            recorder.most_at_once.fetch_max(now, Ordering::SeqCst);
            let body = String::from_utf8(body).unwrap();
            recorder
                .seen
                .lock()
                .unwrap()
                .push((body.clone(), Instant::now()));
            tokio::time::sleep(hold).await;
            recorder.running.fetch_sub(1, Ordering::SeqCst);
            let mut refuse = recorder.refuse_once.lock().unwrap();
            match refuse.get_mut(&body) {
                Some(first) if *first => {
                    *first = false;
                    false
                }
                _ => true,
            }
        })
    })
}

async fn wait_for(recorder: &Recorder, count: usize) {
    for _ in 0..200 {
        if recorder.seen.lock().unwrap().len() >= count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "only {} of {count} deliveries",
        recorder.seen.lock().unwrap().len()
    );
}

async fn contract(under: Under) {
    let bus = under.bus();
    let recorder = Arc::new(Recorder::default());
    recorder
        .refuse_once
        .lock()
        .unwrap()
        .insert("refused".into(), true);
    let stop = CancellationToken::new();
    let consumer = tokio::spawn({
        let (bus, stop) = (bus.clone(), stop.clone());
        let handler = handler(recorder.clone(), Duration::from_millis(30));
        async move { bus.consume(4, handler, stop).await }
    });

    // Twenty messages, at most four handled at once, each once.
    let messages: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| (format!("m{i}"), format!("body-{i}").into_bytes()))
        .collect();
    bus.publish_all("work", &messages).await.unwrap();
    wait_for(&recorder, 20).await;
    assert!(
        recorder.most_at_once.load(Ordering::SeqCst) <= 4,
        "the prefetch bound holds"
    );

    // A refused delivery comes again; a settled one does not.
    bus.publish("work", "r", b"refused").await.unwrap();
    wait_for(&recorder, 22).await;
    // A retry level delays delivery by its delay; the dead list is not consumed.
    let sent = Instant::now();
    bus.publish("retry.1", "late", b"late").await.unwrap();
    bus.publish("dead", "gone", b"dead-letter").await.unwrap();
    wait_for(&recorder, 23).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    consumer.await.unwrap();

    let seen = recorder.seen.lock().unwrap().clone();
    let count = |body: &str| seen.iter().filter(|(b, _)| b == body).count();
    for i in 0..20 {
        assert_eq!(count(&format!("body-{i}")), 1, "body-{i} delivered once");
    }
    assert_eq!(count("refused"), 2, "refused once, delivered again");
    assert_eq!(
        count("dead-letter"),
        0,
        "dead letters are kept, not consumed"
    );
    let late = seen.iter().find(|(b, _)| b == "late").unwrap().1;
    // Jittered: between half the level's delay and all of it.
    assert!(
        late.duration_since(sent) >= RETRY_BASE - Duration::from_millis(50),
        "retry.1 waits at least retry_base × 2 / 2, waited {:?}",
        late.duration_since(sent)
    );
    assert_eq!(seen.len(), 23);
    under.clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rabbitmq_bus_keeps_the_contract() {
    contract(Under::rabbit().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_bus_keeps_the_contract() {
    contract(Under::local().await).await;
}

#[tokio::test]
async fn the_local_bus_keeps_messages_across_a_restart() {
    let Under::Local(bus, path) = Under::local().await else {
        unreachable!()
    };
    bus.publish("work", "kept", b"kept").await.unwrap();
    drop(bus);
    let db = redpacket_common::db::connect(&format!("sqlite://{}?mode=rwc", path.display()), 1)
        .await
        .unwrap();
    let reopened = LocalBus::new(LocalQueue::open(db).await.unwrap(), RETRY_BASE);
    let recorder = Arc::new(Recorder::default());
    let stop = CancellationToken::new();
    let consumer = tokio::spawn({
        let (bus, stop) = (reopened.clone(), stop.clone());
        let handler = handler(recorder.clone(), Duration::ZERO);
        async move { bus.consume(4, handler, stop).await }
    });
    wait_for(&recorder, 1).await;
    stop.cancel();
    consumer.await.unwrap();
    assert_eq!(recorder.seen.lock().unwrap()[0].0, "kept");
    let _ = std::fs::remove_file(path);
}
