//! The message bus the sagas run on: RabbitMQ ([`crate::broker::Broker`]) in the distributed
//! system, a durable SQLite queue ([`LocalBus`]) in the embedded one. The sagas do not know
//! which: both deliver at least once, retry with the same growing delays and keep a dead list.
//!
//! Routing keys: `work` (what the consumer handles), `retry.N` (back to `work` after
//! `retry_base × 2^N`), `dead` (kept for operators).

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use redpacket_common::local_queue::LocalQueue;
use tokio_util::sync::CancellationToken;

use crate::broker::{BrokerError, RETRY_LEVELS, Topology};

/// Handles one delivered message; answers whether it was settled (acknowledge it) or not
/// (deliver it again).
pub type Handler = Arc<dyn Fn(Vec<u8>) -> BoxFuture<'static, bool> + Send + Sync>;

/// Publishing and consuming saga messages.
#[async_trait::async_trait]
pub trait Bus: Send + Sync + std::fmt::Debug {
    /// Publishes durably to `routing_key`; returns once the bus has them for good.
    async fn publish_all(
        &self,
        routing_key: &str,
        messages: &[(String, Vec<u8>)],
    ) -> Result<(), BrokerError>;

    /// Publishes one message.
    async fn publish(
        &self,
        routing_key: &str,
        message_id: &str,
        payload: &[u8],
    ) -> Result<(), BrokerError> {
        self.publish_all(routing_key, &[(message_id.to_owned(), payload.to_vec())])
            .await
    }

    /// Delivers `work` messages to `handler`, at most `prefetch` at a time, until `shutdown`;
    /// then waits for the deliveries in flight.
    async fn consume(&self, prefetch: u16, handler: Handler, shutdown: CancellationToken);

    /// Waits until the bus answers again (after a failed publish).
    async fn reconnect(&self);
}

/// How long a claimed local message stays hidden: a consumer that died gives it back after
/// this long.
const VISIBILITY_MS: i64 = 30_000;
/// How often an idle local consumer looks for messages.
const POLL: Duration = Duration::from_millis(20);
/// How soon an unsettled local message comes back.
const REDELIVER_MS: i64 = 200;

/// The embedded bus: a durable queue table in SQLite.
#[derive(Debug, Clone)]
pub struct LocalBus {
    queue: LocalQueue,
    topology: Topology,
    wakeup: Arc<tokio::sync::Notify>,
}

impl LocalBus {
    pub fn new(queue: LocalQueue, retry_base: Duration) -> Self {
        LocalBus {
            queue,
            topology: Topology::new("local", retry_base),
            wakeup: Arc::default(),
        }
    }

    pub fn queue(&self) -> &LocalQueue {
        &self.queue
    }

    /// Messages in the dead list.
    pub async fn dead_count(&self) -> Result<i64, BrokerError> {
        self.queue.len("dead").await.map_err(local)
    }
}

fn local(err: sea_orm::DbErr) -> BrokerError {
    BrokerError::Local(err.to_string())
}

#[async_trait::async_trait]
impl Bus for LocalBus {
    async fn publish_all(
        &self,
        routing_key: &str,
        messages: &[(String, Vec<u8>)],
    ) -> Result<(), BrokerError> {
        let now = redpacket_common::time::now_ms();
        // A retry level is a delay before the message is `work` again, as RabbitMQ's TTL
        // queues dead-letter it back.
        let (queue, available_at) = match routing_key.strip_prefix("retry.") {
            Some(level) => {
                let level: u32 = level
                    .parse()
                    .map_err(|_| BrokerError::Local(format!("no queue `{routing_key}`")))?;
                let delay = self.topology.jittered_retry_delay(level.min(RETRY_LEVELS));
                let delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
                ("work", now.saturating_add(delay_ms))
            }
            None if routing_key == "work" || routing_key == "dead" => (routing_key, now),
            None => return Err(BrokerError::Local(format!("no queue `{routing_key}`"))),
        };
        let messages: Vec<(String, String)> = messages
            .iter()
            .map(|(id, body)| (id.clone(), String::from_utf8_lossy(body).into_owned()))
            .collect();
        self.queue
            .push_all(queue, &messages, available_at)
            .await
            .map_err(local)?;
        if queue == "work" {
            self.wakeup.notify_one();
        }
        Ok(())
    }

    async fn consume(&self, prefetch: u16, handler: Handler, shutdown: CancellationToken) {
        let permits = Arc::new(tokio::sync::Semaphore::new(usize::from(prefetch.max(1))));
        let in_flight = tokio_util::task::TaskTracker::new();
        while !shutdown.is_cancelled() {
            let free = u32::try_from(permits.available_permits()).unwrap_or(u32::MAX);
            let claimed = if free == 0 {
                Vec::new()
            } else {
                match self.queue.claim("work", free, VISIBILITY_MS).await {
                    Ok(claimed) => claimed,
                    Err(err) => {
                        tracing::warn!(error = %err, "local bus: claiming failed");
                        Vec::new()
                    }
                }
            };
            if claimed.is_empty() {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = self.wakeup.notified() => {}
                    () = tokio::time::sleep(POLL) => {}
                }
                continue;
            }
            for message in claimed {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                let (queue, handler) = (self.queue.clone(), handler.clone());
                in_flight.spawn(async move {
                    let settled = handler(message.body.into_bytes()).await;
                    let done = if settled {
                        queue.ack(message.id).await
                    } else {
                        queue.nack(message.id, REDELIVER_MS).await
                    };
                    if let Err(err) = done {
                        // The row comes back after its visibility timeout: at least once.
                        tracing::warn!(error = %err, "local bus: settling a message failed");
                    }
                    drop(permit);
                });
            }
        }
        in_flight.close();
        in_flight.wait().await;
    }

    async fn reconnect(&self) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
