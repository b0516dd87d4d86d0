//! RabbitMQ: the topology, confirmed publishing, and a connection that comes back.
//!
//! | name | kind | role |
//! |---|---|---|
//! | `P.saga` | direct exchange | every saga message goes through it |
//! | `P.saga.work` | quorum queue (`work`) | what the workers consume |
//! | `P.saga.retry.N` | classic queue (`retry.N`) | holds a message `retry_base × 2^N`, then dead-letters it back to `work` |
//! | `P.saga.dead` | quorum queue (`dead`) | messages that exhausted their retries, for operators |
//!
//! Messages are persistent and every publish waits for the broker's confirm. Consumers ack
//! manually, at most `prefetch` unacknowledged at a time.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;

/// Retry delays: `retry_base × 2^n` for n in `0..RETRY_LEVELS` (default base below).
pub const DEFAULT_RETRY_BASE: Duration = Duration::from_millis(200);
/// Retry levels: `retry_base × 2^n`; a message retried more often stays at the last level until
/// its retry budget (`SagaConfig::retry_budget`) is spent, then goes to the dead queue.
pub const RETRY_LEVELS: u32 = 8;
/// The longest wait between two reconnection attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(5);
/// How long connecting, or waiting for a publish's confirm, may take: a connection that died
/// mid-way must not leave a caller waiting forever.
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker refused the message (negative confirm)")]
    Nacked,
    #[error("the broker did not answer within {BROKER_TIMEOUT:?}")]
    Timeout,
    #[error("local bus: {0}")]
    Local(String),
}

/// Names of one deployment's exchange and queues.
#[derive(Debug, Clone)]
pub struct Topology {
    pub exchange: String,
    pub work: String,
    pub dead: String,
    pub prefix: String,
    pub retry_base: Duration,
}

impl Topology {
    pub fn new(prefix: &str, retry_base: Duration) -> Self {
        Topology {
            exchange: format!("{prefix}.saga"),
            work: format!("{prefix}.saga.work"),
            dead: format!("{prefix}.saga.dead"),
            prefix: prefix.to_owned(),
            retry_base,
        }
    }

    pub fn retry_queue(&self, level: u32) -> String {
        format!("{}.saga.retry.{level}", self.prefix)
    }

    /// The delay of a retry level: the longest a message waits there.
    pub fn retry_delay(&self, level: u32) -> Duration {
        self.retry_base * 2_u32.saturating_pow(level.min(RETRY_LEVELS))
    }

    /// A retry level's delay with jitter: uniform in its upper half, so that sagas failed
    /// together (a whole batch, every saga of an outage) do not come back together.
    pub fn jittered_retry_delay(&self, level: u32) -> Duration {
        self.retry_delay(level)
            .mul_f64(rand::random_range(0.5..=1.0))
    }
}

struct Live {
    connection: Arc<Connection>,
    publisher: Channel,
}

/// A broker connection shared by the publishers and consumers of one process; it reconnects
/// with backoff when the connection is lost.
#[derive(Clone)]
pub struct Broker {
    uri: Arc<str>,
    topology: Topology,
    live: Arc<Mutex<Option<Live>>>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("topology", &self.topology)
            .finish_non_exhaustive()
    }
}

fn properties() -> ConnectionProperties {
    ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio::current())
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in entries {
        table.insert(ShortString::from(*key), value.clone());
    }
    table
}

impl Broker {
    /// Connects and declares the topology (idempotently).
    pub async fn connect(
        uri: &str,
        prefix: &str,
        retry_base: Duration,
    ) -> Result<Self, BrokerError> {
        let broker = Broker {
            uri: uri.into(),
            topology: Topology::new(prefix, retry_base),
            live: Arc::default(),
        };
        broker.publisher().await?;
        Ok(broker)
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    async fn open(&self) -> Result<Live, BrokerError> {
        let connection = Connection::connect(&self.uri, properties()).await?;
        let channel = connection.create_channel().await?;
        declare(&channel, &self.topology).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Live {
            connection: Arc::new(connection),
            publisher: channel,
        })
    }

    /// The publishing channel, reconnecting when the connection is gone.
    async fn publisher(&self) -> Result<Channel, BrokerError> {
        let mut live = self.live.lock().await;
        if let Some(current) = live.as_ref()
            && current.connection.status().connected()
            && current.publisher.status().connected()
        {
            return Ok(current.publisher.clone());
        }
        let opened = tokio::time::timeout(BROKER_TIMEOUT, self.open())
            .await
            .map_err(|_| BrokerError::Timeout)??;
        let channel = opened.publisher.clone();
        *live = Some(opened);
        Ok(channel)
    }

    /// A new channel for a consumer with a bound on unacknowledged deliveries.
    pub async fn consumer_channel(&self, prefetch: u16) -> Result<Channel, BrokerError> {
        self.publisher().await?;
        let connection = {
            let live = self.live.lock().await;
            live.as_ref()
                .ok_or(BrokerError::Timeout)?
                .connection
                .clone()
        };
        tokio::time::timeout(BROKER_TIMEOUT, async {
            let channel = connection.create_channel().await?;
            channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await?;
            Ok(channel)
        })
        .await
        .map_err(|_| BrokerError::Timeout)?
    }

    /// Waits until the broker answers again, backing off between attempts.
    pub async fn reconnect(&self) {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.publisher().await {
                Ok(_) => return,
                Err(err) => {
                    tracing::warn!(error = %err, ?delay, "broker unreachable; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_RECONNECT_DELAY);
                }
            }
        }
    }

    /// Closes the connection (tests use it to play a broker that drops its clients).
    pub async fn close_connection(&self) {
        if let Some(live) = self.live.lock().await.take() {
            let _ = tokio::time::timeout(
                BROKER_TIMEOUT,
                live.connection.close(320, "closed on purpose"),
            )
            .await;
        }
    }

    /// Deletes this deployment's exchange and queues, over a connection of its own (the
    /// shared one may be closed): how tests and benchmarks leave nothing behind.
    pub async fn delete_topology(&self) -> Result<(), BrokerError> {
        use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
        let connection =
            tokio::time::timeout(BROKER_TIMEOUT, Connection::connect(&self.uri, properties()))
                .await
                .map_err(|_| BrokerError::Timeout)??;
        let channel = connection.create_channel().await?;
        let topology = &self.topology;
        let mut queues = vec![topology.work.clone(), topology.dead.clone()];
        queues.extend((0..RETRY_LEVELS).map(|level| topology.retry_queue(level)));
        for queue in queues {
            channel
                .queue_delete(&queue, QueueDeleteOptions::default())
                .await?;
        }
        channel
            .exchange_delete(&topology.exchange, ExchangeDeleteOptions::default())
            .await?;
        let _ = connection.close(200, "topology deleted").await;
        Ok(())
    }

    /// Publishes persistently to `routing_key` and waits for the broker's confirm.
    pub async fn publish(
        &self,
        routing_key: &str,
        message_id: &str,
        payload: &[u8],
    ) -> Result<(), BrokerError> {
        self.publish_all(routing_key, &[(message_id.to_owned(), payload.to_vec())])
            .await
    }

    /// Publishes many messages to `routing_key` and waits for all their confirms.
    pub async fn publish_all(
        &self,
        routing_key: &str,
        messages: &[(String, Vec<u8>)],
    ) -> Result<(), BrokerError> {
        let channel = self.publisher().await?;
        let mut confirms = Vec::with_capacity(messages.len());
        let level: Option<u32> = routing_key
            .strip_prefix("retry.")
            .and_then(|level| level.parse().ok());
        for (message_id, payload) in messages {
            let mut properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type(ShortString::from("application/json"))
                .with_message_id(ShortString::from(message_id.as_str()));
            // The queue's TTL is the level's delay; each message expires a little earlier
            // (jitter). A queue expires from its head, so a message never waits past the TTL.
            if let Some(level) = level {
                let delay = self.topology.jittered_retry_delay(level);
                properties =
                    properties.with_expiration(ShortString::from(delay.as_millis().to_string()));
            }
            confirms.push(
                channel
                    .basic_publish(
                        &self.topology.exchange,
                        routing_key,
                        BasicPublishOptions::default(),
                        payload,
                        properties,
                    )
                    .await?,
            );
        }
        for confirm in confirms {
            let confirmation = tokio::time::timeout(BROKER_TIMEOUT, confirm)
                .await
                .map_err(|_| BrokerError::Timeout)??;
            if confirmation.is_nack() {
                return Err(BrokerError::Nacked);
            }
        }
        Ok(())
    }
}

/// Declares the exchange and queues; safe to repeat.
async fn declare(channel: &Channel, topology: &Topology) -> Result<(), BrokerError> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .exchange_declare(
            &topology.exchange,
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let quorum = table(&[(
        "x-queue-type",
        AMQPValue::LongString(LongString::from("quorum")),
    )]);
    for (queue, key) in [(&topology.work, "work"), (&topology.dead, "dead")] {
        channel
            .queue_declare(queue, durable, quorum.clone())
            .await?;
        channel
            .queue_bind(
                queue,
                &topology.exchange,
                key,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    for level in 0..RETRY_LEVELS {
        let ttl = i64::try_from(topology.retry_delay(level).as_millis()).unwrap_or(i64::MAX);
        let arguments = table(&[
            ("x-message-ttl", AMQPValue::LongLongInt(ttl)),
            (
                "x-dead-letter-exchange",
                AMQPValue::LongString(LongString::from(topology.exchange.as_str())),
            ),
            (
                "x-dead-letter-routing-key",
                AMQPValue::LongString(LongString::from("work")),
            ),
        ]);
        let queue = topology.retry_queue(level);
        channel.queue_declare(&queue, durable, arguments).await?;
        channel
            .queue_bind(
                &queue,
                &topology.exchange,
                &format!("retry.{level}"),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl crate::bus::Bus for Broker {
    async fn publish_all(
        &self,
        routing_key: &str,
        messages: &[(String, Vec<u8>)],
    ) -> Result<(), BrokerError> {
        Broker::publish_all(self, routing_key, messages).await
    }

    /// Consumes the work queue, reconnecting when the broker goes away. Deliveries are handled
    /// concurrently (the prefetch bounds how many); each is acknowledged on its own once
    /// settled, or given back to the broker.
    async fn consume(
        &self,
        prefetch: u16,
        handler: crate::bus::Handler,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        use futures::StreamExt;
        use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions};

        while !shutdown.is_cancelled() {
            let channel = match self.consumer_channel(prefetch).await {
                Ok(channel) => channel,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot open a consumer channel");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = self.reconnect() => continue,
                    }
                }
            };
            let tag = format!("worker-{}", uuid::Uuid::new_v4().simple());
            let mut consumer = match channel
                .basic_consume(
                    &self.topology.work,
                    &tag,
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
            {
                Ok(consumer) => consumer,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot consume");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let in_flight = tokio_util::task::TaskTracker::new();
            let mut health = tokio::time::interval(Duration::from_millis(500));
            loop {
                let delivery = tokio::select! {
                    () = shutdown.cancelled() => None,
                    next = consumer.next() => next,
                    // A consumer whose connection died does not always end its stream: look.
                    _ = health.tick() => {
                        if channel.status().connected() {
                            continue;
                        }
                        tracing::warn!("consumer channel closed; reconnecting");
                        None
                    }
                };
                let Some(delivery) = delivery else { break };
                let delivery = match delivery {
                    Ok(delivery) => delivery,
                    Err(err) => {
                        tracing::warn!(error = %err, "consumer failed; reconnecting");
                        break;
                    }
                };
                let handler = handler.clone();
                in_flight.spawn(async move {
                    if handler(delivery.data.clone()).await {
                        let acked = tokio::time::timeout(
                            BROKER_TIMEOUT,
                            delivery.ack(BasicAckOptions::default()),
                        )
                        .await;
                        if !matches!(acked, Ok(Ok(_))) {
                            tracing::warn!("ack failed; the message will come again");
                        }
                    } else {
                        let _ = tokio::time::timeout(
                            BROKER_TIMEOUT,
                            delivery.nack(BasicNackOptions {
                                requeue: true,
                                ..BasicNackOptions::default()
                            }),
                        )
                        .await;
                    }
                });
            }
            in_flight.close();
            in_flight.wait().await;
            let _ =
                tokio::time::timeout(BROKER_TIMEOUT, channel.close(200, "consumer stopping")).await;
            if !shutdown.is_cancelled() {
                self.reconnect().await;
            }
        }
    }

    async fn reconnect(&self) {
        Broker::reconnect(self).await;
    }
}
