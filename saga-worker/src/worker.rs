//! The consumer: takes messages off the work queue, drives their sagas, and acknowledges each
//! only once its outcome is safe: done, re-published to a retry queue, or dead-lettered.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions};
use lapin::types::FieldTable;
use redpacket_common::ids::SnowflakeGenerator;
use redpacket_common::messages::Envelope;
use tokio_util::sync::CancellationToken;

use crate::broker::{BROKER_TIMEOUT, Broker, RETRY_LEVELS};
use crate::engine::{Engine, Outcome};

/// Counters of what the consumer did (exposed as metrics).
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub done: AtomicU64,
    pub retried: AtomicU64,
    pub dead: AtomicU64,
}

/// Settles one message's outcome with the broker and the saga store; `Ok` means the delivery
/// may be acknowledged.
pub async fn settle(
    engine: &Engine,
    broker: &Broker,
    ids: &SnowflakeGenerator,
    stats: &WorkerStats,
    envelope: Option<&Envelope>,
    raw: &[u8],
    outcome: Outcome,
) -> anyhow::Result<()> {
    match (outcome, envelope) {
        (Outcome::Done, _) => {
            stats.done.fetch_add(1, Ordering::Relaxed);
        }
        (Outcome::Retry(reason), Some(envelope)) if envelope.attempt < RETRY_LEVELS => {
            let mut again = envelope.clone();
            again.attempt += 1;
            tracing::debug!(
                saga = envelope.event.saga_id(),
                attempt = again.attempt,
                reason,
                "retrying"
            );
            broker
                .publish(
                    &format!("retry.{}", envelope.attempt),
                    &again.message_id,
                    &again.to_bytes(),
                )
                .await?;
            stats.retried.fetch_add(1, Ordering::Relaxed);
        }
        (Outcome::Retry(reason) | Outcome::Dead(reason), envelope) => {
            let saga_id = envelope.map_or_else(|| "unreadable".to_owned(), |e| e.event.saga_id());
            tracing::error!(saga = saga_id, reason, "dead-lettering a saga message");
            let letter = ids
                .next_id()
                .map(u64::cast_signed)
                .map_err(anyhow::Error::msg)?;
            engine
                .store
                .bury(letter, &saga_id, &String::from_utf8_lossy(raw), &reason)
                .await?;
            broker
                .publish("dead", &format!("dead:{letter}"), raw)
                .await?;
            stats.dead.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Consumes the work queue until `shutdown`, reconnecting when the broker goes away.
pub async fn consume(
    engine: Engine,
    broker: Broker,
    ids: Arc<SnowflakeGenerator>,
    stats: Arc<WorkerStats>,
    prefetch: u16,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let channel = match broker.consumer_channel(prefetch).await {
            Ok(channel) => channel,
            Err(err) => {
                tracing::warn!(error = %err, "cannot open a consumer channel");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = broker.reconnect() => continue,
                }
            }
        };
        let tag = format!("worker-{}", uuid::Uuid::new_v4().simple());
        let mut consumer = match channel
            .basic_consume(
                &broker.topology().work,
                &tag,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        {
            Ok(consumer) => consumer,
            Err(err) => {
                tracing::warn!(error = %err, "cannot consume");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
        };
        // Deliveries are handled concurrently (the prefetch bounds how many); each is
        // acknowledged on its own once settled.
        let in_flight = tokio_util::task::TaskTracker::new();
        let mut health = tokio::time::interval(std::time::Duration::from_millis(500));
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
            let (engine, broker, ids, stats) =
                (engine.clone(), broker.clone(), ids.clone(), stats.clone());
            in_flight.spawn(async move {
                let parsed = Envelope::from_bytes(&delivery.data);
                let outcome = match &parsed {
                    Ok(envelope) => {
                        let span = tracing::info_span!("saga", saga = %envelope.event.saga_id(), request_id = envelope.request_id.as_deref().unwrap_or(""));
                        tracing::Instrument::instrument(engine.handle(envelope), span).await
                    }
                    Err(reason) => Outcome::Dead(format!("unreadable message: {reason}")),
                };
                match settle(&engine, &broker, &ids, &stats, parsed.as_ref().ok(), &delivery.data, outcome).await {
                    Ok(()) => {
                        let acked = tokio::time::timeout(BROKER_TIMEOUT, delivery.ack(BasicAckOptions::default())).await;
                        if !matches!(acked, Ok(Ok(_))) {
                            tracing::warn!("ack failed; the message will come again");
                        }
                    }
                    Err(err) => {
                        // Not settled: give it back to the broker for another try.
                        tracing::warn!(error = %err, "could not settle a message; requeueing");
                        let _ = tokio::time::timeout(
                            BROKER_TIMEOUT,
                            delivery.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }),
                        )
                        .await;
                    }
                }
            });
        }
        in_flight.close();
        in_flight.wait().await;
        let _ = tokio::time::timeout(BROKER_TIMEOUT, channel.close(200, "consumer stopping")).await;
        if !shutdown.is_cancelled() {
            broker.reconnect().await;
        }
    }
}
