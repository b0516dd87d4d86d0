//! The open model: requests arrive at a set rate whatever the answers' latency.
//!
//! Why not goose for this: goose users are a closed model (each waits for its answer before
//! the next request), so a slow server slows the load down and hides its own queueing (the
//! "coordinated omission" problem). Here a 1 ms ticker issues every arrival that is due by the
//! clock; each runs in its own task while a permit of the in-flight cap is free. An arrival
//! finding no permit is not queued (that would turn it back into a closed model) but counted
//! as `dropped`, so `asked = sent + dropped` always, and a harness that cannot keep up says so.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::recorder::per_second;

/// How often the scheduler wakes (tokio's timer resolution).
const TICK: Duration = Duration::from_millis(1);

/// The arrival schedule: the rate climbs linearly from 0 to `rate` per second over `ramp`,
/// then stays; at most `limit` arrivals in all.
#[derive(Debug, Clone)]
pub struct Arrivals {
    rate: u64,
    ramp: Duration,
    limit: Option<u64>,
    issued: u64,
}

impl Arrivals {
    pub fn new(rate: u64, ramp: Duration, limit: Option<u64>) -> Self {
        Arrivals {
            rate,
            ramp,
            limit,
            issued: 0,
        }
    }

    /// Arrivals due by `elapsed` in all: the integral of the rate, `rate·t²/2·ramp` during
    /// the ramp and `rate·ramp/2 + rate·(t − ramp)` after it.
    pub fn cumulative(&self, elapsed: Duration) -> u64 {
        let rate = u128::from(self.rate);
        let t = elapsed.as_micros();
        let ramp = self.ramp.as_micros();
        let due = if t < ramp {
            rate * t * t / (2 * ramp * 1_000_000)
        } else {
            rate * ramp / 2_000_000 + rate * (t - ramp) / 1_000_000
        };
        u64::try_from(due).unwrap_or(u64::MAX)
    }

    /// Arrivals due by `elapsed` that were not issued yet; marks them issued. Computed from
    /// the clock, not by counting ticks, so a late tick catches up instead of losing arrivals.
    pub fn due(&mut self, elapsed: Duration) -> u64 {
        let mut target = self.cumulative(elapsed);
        if let Some(limit) = self.limit {
            target = target.min(limit);
        }
        let due = target.saturating_sub(self.issued);
        self.issued = self.issued.max(target);
        due
    }

    /// Every arrival of a limited schedule was issued.
    pub fn finished(&self) -> bool {
        self.limit.is_some_and(|limit| self.issued >= limit)
    }

    pub fn issued(&self) -> u64 {
        self.issued
    }
}

/// How an open-model run went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenOutcome {
    /// The rate asked for, per second.
    pub rate_asked: u64,
    /// Arrivals the schedule produced.
    pub asked: u64,
    /// Arrivals sent (a permit was free).
    pub sent: u64,
    /// Arrivals not sent: the in-flight cap was full.
    pub dropped: u64,
    /// Sent arrivals still unanswered when the final wait gave up.
    pub abandoned: u64,
    /// From the first to the last arrival's time.
    pub send_window: Duration,
    pub max_in_flight: u64,
}

impl OpenOutcome {
    /// Arrivals sent per second of the send window.
    pub fn rate_achieved(&self) -> u64 {
        per_second(self.sent, self.send_window)
    }
}

/// What to run and for how long.
#[derive(Debug, Clone, Copy)]
pub struct OpenPlan {
    pub rate: u64,
    /// The rate climbs from 0 to `rate` over this long.
    pub ramp: Duration,
    /// Stop after this many arrivals.
    pub limit: Option<u64>,
    /// Stop issuing after this long.
    pub run_for: Option<Duration>,
    pub max_in_flight: usize,
    /// How long to wait for the last answers after the final arrival.
    pub grace: Duration,
}

/// Runs `operation(arrival)` for every arrival of the plan (numbered from 0) and waits, at
/// most `grace`, for the last answers. Without `limit` or `run_for` it would never stop, so
/// one of them is required.
pub async fn run_open<F, Fut>(plan: OpenPlan, operation: F) -> OpenOutcome
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    assert!(
        plan.limit.is_some() || plan.run_for.is_some(),
        "an open-model run needs a limit or a duration"
    );
    let operation = Arc::new(operation);
    let cap = plan.max_in_flight.clamp(1, Semaphore::MAX_PERMITS);
    let permits = Arc::new(Semaphore::new(cap));
    let sent = Arc::new(AtomicU64::new(0));
    let mut dropped = 0;
    let mut arrivals = Arrivals::new(plan.rate, plan.ramp, plan.limit);
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let started = Instant::now();
    loop {
        ticker.tick().await;
        let mut elapsed = started.elapsed();
        let out_of_time = plan.run_for.is_some_and(|run_for| elapsed >= run_for);
        if let Some(run_for) = plan.run_for {
            elapsed = elapsed.min(run_for);
        }
        for _ in 0..arrivals.due(elapsed) {
            let arrival = sent.load(Ordering::Relaxed) + dropped;
            match permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    sent.fetch_add(1, Ordering::Relaxed);
                    let operation = operation.clone();
                    tokio::spawn(async move {
                        operation(arrival).await;
                        drop(permit);
                    });
                }
                Err(_) => dropped += 1,
            }
        }
        if out_of_time || arrivals.finished() {
            break;
        }
    }
    let send_window = started.elapsed();
    let cap_u32 = u32::try_from(cap).unwrap_or(u32::MAX);
    let abandoned = match tokio::time::timeout(plan.grace, permits.acquire_many(cap_u32)).await {
        Ok(_) => 0,
        Err(_) => u64::try_from(cap - permits.available_permits()).unwrap_or(0),
    };
    OpenOutcome {
        rate_asked: plan.rate,
        asked: arrivals.issued(),
        sent: sent.load(Ordering::Relaxed),
        dropped,
        abandoned,
        send_window,
        max_in_flight: u64::try_from(cap).unwrap_or(u64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_follow_the_clock_and_catch_up() {
        let mut arrivals = Arrivals::new(1_000, Duration::ZERO, None);
        assert_eq!(arrivals.due(Duration::from_micros(500)), 0);
        assert_eq!(arrivals.due(Duration::from_millis(1)), 1);
        assert_eq!(arrivals.due(Duration::from_millis(1)), 0);
        // A tick 50 ms late issues the 49 arrivals it missed at once.
        assert_eq!(arrivals.due(Duration::from_millis(50)), 49);
        assert_eq!(arrivals.due(Duration::from_secs(1)), 950);
        assert_eq!(arrivals.issued(), 1_000);
        assert!(!arrivals.finished());
    }

    #[test]
    fn a_limited_schedule_stops_at_its_limit() {
        let mut arrivals = Arrivals::new(7, Duration::ZERO, Some(10));
        assert_eq!(arrivals.due(Duration::from_secs(1)), 7);
        assert!(!arrivals.finished());
        assert_eq!(arrivals.due(Duration::from_secs(100)), 3);
        assert!(arrivals.finished());
        assert_eq!(arrivals.due(Duration::from_secs(200)), 0);
    }

    #[test]
    fn a_ramp_climbs_to_the_rate() {
        let arrivals = Arrivals::new(1_000, Duration::from_secs(10), None);
        // Half-way up the ramp the rate is 500/s and 1,250 have arrived (a quarter of the
        // ramp's 5,000).
        assert_eq!(arrivals.cumulative(Duration::from_secs(5)), 1_250);
        assert_eq!(arrivals.cumulative(Duration::from_secs(10)), 5_000);
        // Then the full rate.
        assert_eq!(arrivals.cumulative(Duration::from_secs(11)), 6_000);
        assert_eq!(arrivals.cumulative(Duration::ZERO), 0);
    }

    #[tokio::test]
    async fn arrivals_beyond_the_in_flight_cap_are_dropped_not_queued() {
        let answered = Arc::new(AtomicU64::new(0));
        let counter = answered.clone();
        let outcome = run_open(
            OpenPlan {
                rate: 1_000,
                ramp: Duration::ZERO,
                limit: None,
                run_for: Some(Duration::from_millis(200)),
                max_in_flight: 4,
                grace: Duration::from_secs(5),
            },
            move |_| {
                let counter = counter.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(40)).await;
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            },
        )
        .await;
        // Exactly rate × duration arrivals, each either sent or dropped.
        assert_eq!(outcome.asked, 200);
        assert_eq!(outcome.asked, outcome.sent + outcome.dropped);
        // Four in flight for 40 ms each: far fewer than 200 can be sent in 200 ms.
        assert!(outcome.sent <= 40, "{outcome:?}");
        assert!(outcome.dropped >= 160, "{outcome:?}");
        assert_eq!(outcome.abandoned, 0);
        assert_eq!(answered.load(Ordering::Relaxed), outcome.sent);
    }

    #[tokio::test]
    async fn a_fast_operation_is_sent_at_the_asked_rate() {
        let outcome = run_open(
            OpenPlan {
                rate: 2_000,
                ramp: Duration::ZERO,
                limit: Some(300),
                run_for: None,
                max_in_flight: 64,
                grace: Duration::from_secs(5),
            },
            |_| async {},
        )
        .await;
        assert_eq!(outcome.asked, 300);
        assert_eq!(outcome.sent, 300);
        assert_eq!(outcome.dropped, 0);
        // 300 arrivals at 2,000/s take 150 ms.
        assert!(outcome.send_window >= Duration::from_millis(150));
    }
}
