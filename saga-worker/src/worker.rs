//! The consumer: takes messages off the work queue, drives their sagas, and acknowledges each
//! only once its outcome is safe: done, re-published to a retry queue, or dead-lettered.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use redpacket_common::ids::SnowflakeGenerator;
use redpacket_common::messages::{Delivery, Envelope, SagaEvent};
use tokio_util::sync::CancellationToken;

use crate::batcher::Batcher;
use crate::broker::RETRY_LEVELS;
use crate::bus::{Bus, Handler};
use crate::engine::{Engine, HELD_ELSEWHERE, Outcome};

/// The longest "what it waits for" kept on a waiting message.
const MAX_WAIT_REASON_CHARS: usize = 200;

/// The retry level a waiting saga looks again from (`retry_base × 2^3`: 1.6 s by default).
const WAIT_LEVEL: u32 = 3;

/// Batches of grab sagas driven at once by one worker. Grabs of a hot campaign all credit its
/// one escrow row, so two suffice: one in the wallet while the other records or marks claims.
const GRAB_BATCHES_IN_FLIGHT: usize = 2;

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
    broker: &dyn Bus,
    ids: &SnowflakeGenerator,
    stats: &WorkerStats,
    envelope: Option<&Envelope>,
    raw: &[u8],
    outcome: Outcome,
) -> anyhow::Result<()> {
    let now = engine.store.now_ms();
    let outcome = bounded(engine, envelope, outcome, now);
    match (outcome, envelope) {
        (Outcome::Done, _) => {
            stats.done.fetch_add(1, Ordering::Relaxed);
        }
        (Outcome::Retry(reason), Some(envelope)) => {
            // Doubling delays up to the last level's, which then repeats until the budget.
            let level = envelope.attempt.min(RETRY_LEVELS - 1);
            let mut again = envelope.clone();
            again.attempt = envelope.attempt.saturating_add(1);
            again.retrying_since_ms = Some(envelope.retrying_since_ms.unwrap_or(now));
            tracing::debug!(
                saga = envelope.event.saga_id(),
                attempt = again.attempt,
                reason,
                "retrying"
            );
            broker
                .publish(
                    &format!("retry.{level}"),
                    &again.message_id,
                    &again.to_bytes(),
                )
                .await?;
            stats.retried.fetch_add(1, Ordering::Relaxed);
        }
        (Outcome::Wait(reason), Some(envelope)) => {
            // Backing off like a retry up to WAIT_LEVEL, then a steady look at that level.
            let level = envelope.attempt.min(WAIT_LEVEL);
            let mut again = envelope.clone();
            again.attempt = (level + 1).min(WAIT_LEVEL);
            // The bound counts from the last change of what the saga waits for: a refund whose
            // claims in flight keep falling is moving, however long it takes.
            let (since, waiting_for) = waited(envelope, &reason, now);
            again.waiting_since_ms = Some(since);
            again.waiting_for = Some(waiting_for);
            // A wait is a call that succeeded: a later failure starts a new retry budget.
            again.retrying_since_ms = None;
            tracing::debug!(saga = envelope.event.saga_id(), reason, "waiting");
            broker
                .publish(
                    &format!("retry.{level}"),
                    &again.message_id,
                    &again.to_bytes(),
                )
                .await?;
            stats.retried.fetch_add(1, Ordering::Relaxed);
        }
        (Outcome::Retry(reason) | Outcome::Wait(reason) | Outcome::Dead(reason), envelope) => {
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

/// A retry past the message's retry budget, or a wait past the wait bound, gives up: the
/// saga is stuck with the reason, in the dead letters for an operator.
fn bounded(engine: &Engine, envelope: Option<&Envelope>, outcome: Outcome, now: i64) -> Outcome {
    let over = |since: Option<i64>, bound: std::time::Duration| {
        since.is_some_and(|since| {
            now.saturating_sub(since) >= i64::try_from(bound.as_millis()).unwrap_or(i64::MAX)
        })
    };
    match (outcome, envelope) {
        (Outcome::Retry(reason), Some(envelope))
            if over(envelope.retrying_since_ms, engine.retry_budget) =>
        {
            Outcome::Dead(format!(
                "out of retries after {} s: {reason}",
                engine.retry_budget.as_secs()
            ))
        }
        (Outcome::Wait(reason), Some(envelope)) => {
            wait_outcome(envelope, reason, now, engine.wait_max)
        }
        (outcome, _) => outcome,
    }
}

/// A wait within its bound goes on; past it the saga is stuck with what it waits for.
fn wait_outcome(
    envelope: &Envelope,
    reason: String,
    now: i64,
    wait_max: std::time::Duration,
) -> Outcome {
    let (since, waiting_for) = waited(envelope, &reason, now);
    if now.saturating_sub(since) < i64::try_from(wait_max.as_millis()).unwrap_or(i64::MAX) {
        Outcome::Wait(reason)
    } else if waiting_for == HELD_ELSEWHERE {
        // This copy never got to drive the saga: another executor held it at every look.
        // That executor's own message keeps the saga until it is settled (done, retried or
        // stuck, with the saga's own reason), so this one is a duplicate.
        Outcome::Done
    } else {
        Outcome::Dead(format!(
            "stuck: waited more than {} s without progress: {waiting_for}",
            wait_max.as_secs()
        ))
    }
}

/// Since when a saga has waited without progress, counting this look, and what it waits for
/// (as the message keeps it): a change of what it waits for is progress and restarts the count.
fn waited(envelope: &Envelope, reason: &str, now: i64) -> (i64, String) {
    // Another executor holding the saga (a duplicate of the message, running) says nothing
    // of progress: the count and what it waits for stay as they were.
    if reason == HELD_ELSEWHERE
        && let (Some(before), Some(since)) = (&envelope.waiting_for, envelope.waiting_since_ms)
    {
        return (since, before.clone());
    }
    let waiting_for: String = reason.chars().take(MAX_WAIT_REASON_CHARS).collect();
    let since = match (&envelope.waiting_for, envelope.waiting_since_ms) {
        (Some(before), Some(since)) if *before == waiting_for => since,
        _ => now,
    };
    (since, waiting_for)
}

/// What driving one saga message needs.
#[derive(Clone, Copy)]
struct Context<'a> {
    engine: &'a Engine,
    bus: &'a dyn Bus,
    ids: &'a SnowflakeGenerator,
    stats: &'a WorkerStats,
    grabs: Option<&'a Batcher<Envelope, Outcome>>,
}

impl Context<'_> {
    /// Drives one saga and settles its outcome; true when it is settled.
    async fn drive(self, envelope: &Envelope, raw: &[u8]) -> bool {
        let span = tracing::info_span!("saga", saga = %envelope.event.saga_id(), request_id = envelope.request_id.as_deref().unwrap_or(""));
        let handled = async {
            match self.grabs {
                Some(grabs) if matches!(envelope.event, SagaEvent::GrabClaimed { .. }) => grabs
                    .submit(envelope.clone())
                    .await
                    .unwrap_or_else(|| Outcome::Retry("the grab batcher dropped the saga".into())),
                _ => self.engine.handle(envelope).await,
            }
        };
        let outcome = tracing::Instrument::instrument(handled, span).await;
        self.settle(Some(envelope), raw, outcome).await
    }

    /// A message that is no saga's: dead-lettered as it came.
    async fn drive_unreadable(self, raw: &[u8], reason: String) -> bool {
        self.settle(
            None,
            raw,
            Outcome::Dead(format!("unreadable message: {reason}")),
        )
        .await
    }

    async fn settle(self, envelope: Option<&Envelope>, raw: &[u8], outcome: Outcome) -> bool {
        match settle(
            self.engine,
            self.bus,
            self.ids,
            self.stats,
            envelope,
            raw,
            outcome,
        )
        .await
        {
            Ok(()) => true,
            Err(err) => {
                // Not settled: the bus delivers it again.
                tracing::warn!(error = %err, "could not settle a message; requeueing");
                false
            }
        }
    }
}

/// Consumes the work queue until `shutdown`: each message drives its saga, then is settled
/// (done, sent to a retry level, or dead-lettered) before the bus may forget it.
pub async fn consume(
    engine: Engine,
    bus: Arc<dyn Bus>,
    ids: Arc<SnowflakeGenerator>,
    stats: Arc<WorkerStats>,
    prefetch: u16,
    shutdown: CancellationToken,
) {
    let publisher = bus.clone();
    // Grab sagas go through batches unless batching is off; the others one by one.
    let grabs = (engine.batch > 1).then(|| {
        let engine = engine.clone();
        Batcher::start(
            engine.batch,
            engine.linger,
            GRAB_BATCHES_IN_FLIGHT,
            move |envelopes| {
                let engine = engine.clone();
                async move { engine.handle_grabs(envelopes).await }
            },
        )
    });
    let handler: Handler = Arc::new(move |data: Vec<u8>| {
        let (engine, bus, ids, stats, grabs) = (
            engine.clone(),
            publisher.clone(),
            ids.clone(),
            stats.clone(),
            grabs.clone(),
        );
        Box::pin(async move {
            let context = Context {
                engine: &engine,
                bus: &*bus,
                ids: &ids,
                stats: &stats,
                grabs: grabs.as_ref(),
            };
            match Delivery::from_bytes(&data) {
                Ok(Delivery::One(envelope)) => context.drive(&envelope, &data).await,
                // Every saga of the message at once (so that the grab batcher gathers them),
                // each settled on its own; the message is done when all of them are. A saga
                // settled before a failure elsewhere in the message is driven again when the
                // message comes back, which every step allows.
                Ok(Delivery::Many(envelopes)) => {
                    let settled = futures::future::join_all(envelopes.iter().map(|envelope| {
                        let raw = envelope.to_bytes();
                        async move { context.drive(envelope, &raw).await }
                    }))
                    .await;
                    settled.into_iter().all(|ok| ok)
                }
                Err(reason) => context.drive_unreadable(&data, reason).await,
            }
        })
    });
    bus.consume(prefetch, handler, shutdown).await;
}

#[cfg(test)]
mod tests {
    use redpacket_common::messages::{Envelope, SagaEvent};

    use std::time::Duration;

    use crate::engine::Outcome;

    use super::{wait_outcome, waited};

    #[test]
    fn a_wait_counts_from_its_last_progress() {
        use super::HELD_ELSEWHERE;
        let mut envelope = Envelope::new(
            "m".into(),
            None,
            SagaEvent::CampaignEnded {
                campaign_id: "1".into(),
                merchant_id: "m".into(),
                currency: "CNY".into(),
                total_amount: 100,
            },
        );
        assert_eq!(
            waited(&envelope, "12 claims still in flight", 1_000).0,
            1_000
        );
        envelope.waiting_since_ms = Some(1_000);
        envelope.waiting_for = Some("12 claims still in flight".into());
        // The same thing waited for: the count goes on from the first look.
        assert_eq!(
            waited(&envelope, "12 claims still in flight", 9_000).0,
            1_000
        );
        // A duplicate holding the lease is no progress.
        assert_eq!(
            waited(&envelope, HELD_ELSEWHERE, 9_000),
            (1_000, "12 claims still in flight".to_owned())
        );
        // Fewer claims in flight: progress, the count starts again.
        assert_eq!(
            waited(&envelope, "11 claims still in flight", 9_000).0,
            9_000
        );
    }

    #[test]
    fn past_its_bound_a_wait_is_stuck_with_what_it_waits_for_and_a_mere_duplicate_is_dropped() {
        use super::HELD_ELSEWHERE;
        let bound = Duration::from_secs(3);
        let mut envelope = Envelope::new(
            "m".into(),
            None,
            SagaEvent::CampaignEnded {
                campaign_id: "1".into(),
                merchant_id: "m".into(),
                currency: "CNY".into(),
                total_amount: 100,
            },
        );
        envelope.waiting_since_ms = Some(1_000);
        envelope.waiting_for = Some("12 claims still in flight".into());
        assert_eq!(
            wait_outcome(&envelope, "12 claims still in flight".into(), 2_000, bound),
            Outcome::Wait("12 claims still in flight".into())
        );
        // Past the bound, even at a look where another executor held the saga: stuck with
        // what the saga waits for, not with the collision.
        assert_eq!(
            wait_outcome(&envelope, HELD_ELSEWHERE.into(), 5_000, bound),
            Outcome::Dead(
                "stuck: waited more than 3 s without progress: 12 claims still in flight".into()
            )
        );
        // A copy that only ever found the saga held: a duplicate of a message still driven.
        envelope.waiting_for = Some(HELD_ELSEWHERE.into());
        assert_eq!(
            wait_outcome(&envelope, HELD_ELSEWHERE.into(), 5_000, bound),
            Outcome::Done
        );
    }
}
