//! A circuit breaker per upstream: error ratio and slow-call ratio over a sliding window of the
//! last calls, open for a set time, then half-open with a few probes.
//!
//! The window counts calls, not seconds: a quiet upstream keeps its last verdicts until new
//! calls replace them, and a busy one is judged on fresh evidence. Ratios are integer
//! percentages so the decision is exact and reproducible.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redpacket_common::ConfigError;
use redpacket_common::config::ConfigSource;
use serde::Serialize;

/// The breaker's settings, shared by every upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// `RP_BREAKER_WINDOW` (default 50, 1-10,000): calls the ratios are computed over.
    pub window: u32,
    /// `RP_BREAKER_MIN_CALLS` (default 20): no verdict on fewer calls than this.
    pub min_calls: u32,
    /// `RP_BREAKER_FAILURE_PERCENT` (default 50): opens at this share of failed calls.
    pub failure_percent: u32,
    /// `RP_BREAKER_SLOW_PERCENT` (default 80): opens at this share of slow calls.
    pub slow_percent: u32,
    /// `RP_BREAKER_SLOW_MS` (default 1000): a call slower than this is slow.
    pub slow_call: Duration,
    /// `RP_BREAKER_OPEN_MS` (default 5000): how long it stays open before probing.
    pub open_for: Duration,
    /// `RP_BREAKER_PROBES` (default 3): calls let through half-open; all must succeed to close.
    pub probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window: 50,
            min_calls: 20,
            failure_percent: 50,
            slow_percent: 80,
            slow_call: Duration::from_millis(1000),
            open_for: Duration::from_millis(5000),
            probes: 3,
        }
    }
}

impl BreakerConfig {
    pub fn from_source(source: &ConfigSource) -> Result<Self, ConfigError> {
        let defaults = BreakerConfig::default();
        let bounded = |var: &str, default: u32, max: u32| -> Result<u32, ConfigError> {
            let value: u32 = source.or(var, default)?;
            if value == 0 || value > max {
                return Err(ConfigError::Malformed {
                    var: var.to_owned(),
                    shown: format!(" `{value}`"),
                    reason: format!("must be between 1 and {max}"),
                });
            }
            Ok(value)
        };
        let window = bounded("RP_BREAKER_WINDOW", defaults.window, 10_000)?;
        let config = BreakerConfig {
            window,
            min_calls: bounded(
                "RP_BREAKER_MIN_CALLS",
                defaults.min_calls.min(window),
                window,
            )?,
            failure_percent: bounded("RP_BREAKER_FAILURE_PERCENT", defaults.failure_percent, 100)?,
            slow_percent: bounded("RP_BREAKER_SLOW_PERCENT", defaults.slow_percent, 100)?,
            slow_call: Duration::from_millis(u64::from(bounded(
                "RP_BREAKER_SLOW_MS",
                1000,
                600_000,
            )?)),
            open_for: Duration::from_millis(u64::from(bounded(
                "RP_BREAKER_OPEN_MS",
                5000,
                3_600_000,
            )?)),
            probes: bounded("RP_BREAKER_PROBES", defaults.probes, 100)?,
        };
        Ok(config)
    }
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// The value of the `gateway_breaker_state` gauge.
    pub fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

/// How one call went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// A transport error, a timeout or a 5xx.
    pub failed: bool,
    /// Slower than the slow-call threshold.
    pub slow: bool,
}

/// The call may not go through; retry after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    pub retry_after: Duration,
}

/// Lets a call through; give it back with [`Breaker::record`].
#[derive(Debug)]
#[must_use = "record the call's outcome"]
pub struct Permit {
    /// Issued while half-open: its outcome decides the probe.
    probe: bool,
}

/// A snapshot for `/v1/admin/breakers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerSnapshot {
    pub state: BreakerState,
    pub calls: u32,
    pub failures: u32,
    pub slow: u32,
    /// Until when it stays open, from now.
    pub open_remaining: Option<Duration>,
    pub transitions: u64,
}

#[derive(Debug)]
enum State {
    Closed,
    Open {
        until: Instant,
    },
    HalfOpen {
        issued: u32,
        succeeded: u32,
        since: Instant,
    },
}

#[derive(Debug)]
struct Inner {
    state: State,
    window: VecDeque<Outcome>,
    failures: u32,
    slow: u32,
    transitions: u64,
}

/// One upstream's breaker.
#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

/// A state change, for the caller to log and count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: BreakerState,
    pub to: BreakerState,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Breaker {
            config,
            inner: Mutex::new(Inner {
                state: State::Closed,
                window: VecDeque::with_capacity(config.window as usize),
                failures: 0,
                slow: 0,
                transitions: 0,
            }),
        }
    }

    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The state is a few counters, consistent after every statement: a panic elsewhere
        // cannot leave it half-written, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks to make a call at `now`.
    pub fn try_acquire(&self, now: Instant) -> (Result<Permit, Rejected>, Option<Transition>) {
        let mut inner = self.lock();
        match inner.state {
            State::Closed => (Ok(Permit { probe: false }), None),
            State::Open { until } if now < until => (
                Err(Rejected {
                    retry_after: until - now,
                }),
                None,
            ),
            State::Open { .. } => {
                let transition = inner.enter(State::HalfOpen {
                    issued: 1,
                    succeeded: 0,
                    since: now,
                });
                (Ok(Permit { probe: true }), transition)
            }
            State::HalfOpen {
                ref mut issued,
                ref mut succeeded,
                ref mut since,
            } => {
                if *issued < self.config.probes {
                    *issued += 1;
                    (Ok(Permit { probe: true }), None)
                } else if now.duration_since(*since) > self.config.open_for {
                    // Probes whose callers went away never report: start probing afresh
                    // rather than stay half-open for ever.
                    *issued = 1;
                    *succeeded = 0;
                    *since = now;
                    (Ok(Permit { probe: true }), None)
                } else {
                    // Probes are out; others wait for their verdict.
                    (
                        Err(Rejected {
                            retry_after: Duration::from_secs(1),
                        }),
                        None,
                    )
                }
            }
        }
    }

    /// Records how a permitted call went at `now`.
    pub fn record(&self, permit: Permit, outcome: Outcome, now: Instant) -> Option<Transition> {
        let mut inner = self.lock();
        let bad = outcome.failed || outcome.slow;
        match inner.state {
            State::HalfOpen {
                ref mut succeeded, ..
            } if permit.probe => {
                if bad {
                    let until = now + self.config.open_for;
                    return inner.enter(State::Open { until });
                }
                *succeeded += 1;
                if *succeeded >= self.config.probes {
                    inner.clear_window();
                    return inner.enter(State::Closed);
                }
                None
            }
            State::Closed => {
                inner.push(outcome, self.config.window);
                let calls = u32::try_from(inner.window.len()).unwrap_or(u32::MAX);
                if calls < self.config.min_calls {
                    return None;
                }
                let over = |count: u32, percent: u32| {
                    u64::from(count) * 100 >= u64::from(percent) * u64::from(calls)
                };
                if over(inner.failures, self.config.failure_percent)
                    || over(inner.slow, self.config.slow_percent)
                {
                    let until = now + self.config.open_for;
                    inner.clear_window();
                    return inner.enter(State::Open { until });
                }
                None
            }
            // A call permitted before the breaker opened, or a late non-probe: its verdict is
            // already stale.
            _ => None,
        }
    }

    pub fn snapshot(&self, now: Instant) -> BreakerSnapshot {
        let inner = self.lock();
        BreakerSnapshot {
            state: inner.public_state(),
            calls: u32::try_from(inner.window.len()).unwrap_or(u32::MAX),
            failures: inner.failures,
            slow: inner.slow,
            open_remaining: match inner.state {
                State::Open { until } => Some(until.saturating_duration_since(now)),
                _ => None,
            },
            transitions: inner.transitions,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.lock().public_state()
    }
}

impl Inner {
    fn public_state(&self) -> BreakerState {
        match self.state {
            State::Closed => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    fn enter(&mut self, state: State) -> Option<Transition> {
        let from = self.public_state();
        self.state = state;
        let to = self.public_state();
        (from != to).then(|| {
            self.transitions += 1;
            Transition { from, to }
        })
    }

    fn push(&mut self, outcome: Outcome, window: u32) {
        if self.window.len() >= window as usize
            && let Some(old) = self.window.pop_front()
        {
            self.failures -= u32::from(old.failed);
            self.slow -= u32::from(old.slow);
        }
        self.failures += u32::from(outcome.failed);
        self.slow += u32::from(outcome.slow);
        self.window.push_back(outcome);
    }

    fn clear_window(&mut self) {
        self.window.clear();
        self.failures = 0;
        self.slow = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: Outcome = Outcome {
        failed: false,
        slow: false,
    };
    const FAILED: Outcome = Outcome {
        failed: true,
        slow: false,
    };
    const SLOW: Outcome = Outcome {
        failed: false,
        slow: true,
    };

    fn config() -> BreakerConfig {
        BreakerConfig {
            window: 10,
            min_calls: 4,
            failure_percent: 50,
            slow_percent: 50,
            slow_call: Duration::from_millis(100),
            open_for: Duration::from_secs(5),
            probes: 2,
        }
    }

    fn call(breaker: &Breaker, outcome: Outcome, now: Instant) -> Option<Transition> {
        let (permit, _) = breaker.try_acquire(now);
        breaker.record(permit.expect("permitted"), outcome, now)
    }

    #[test]
    fn no_verdict_below_the_minimum_number_of_calls() {
        let breaker = Breaker::new(config());
        let now = Instant::now();
        for _ in 0..3 {
            assert_eq!(call(&breaker, FAILED, now), None);
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(
            call(&breaker, FAILED, now),
            Some(Transition {
                from: BreakerState::Closed,
                to: BreakerState::Open
            })
        );
    }

    #[test]
    fn the_ratio_is_over_the_sliding_window_only() {
        let breaker = Breaker::new(config());
        let now = Instant::now();
        // Ten good calls, then four failures: 4 of 10 in the window is under 50 %.
        for _ in 0..10 {
            call(&breaker, OK, now);
        }
        for _ in 0..4 {
            call(&breaker, FAILED, now);
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
        // A fifth failure pushes out a good call: 5 of 10 opens it.
        call(&breaker, FAILED, now);
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    #[test]
    fn slow_calls_open_it_too() {
        let breaker = Breaker::new(config());
        let now = Instant::now();
        call(&breaker, OK, now);
        call(&breaker, OK, now);
        call(&breaker, SLOW, now);
        assert_eq!(breaker.state(), BreakerState::Closed);
        call(&breaker, SLOW, now);
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    #[test]
    fn open_rejects_until_its_time_then_probes_close_it() {
        let breaker = Breaker::new(config());
        let start = Instant::now();
        for _ in 0..4 {
            call(&breaker, FAILED, start);
        }
        let (rejected, _) = breaker.try_acquire(start + Duration::from_secs(1));
        assert_eq!(
            rejected.unwrap_err().retry_after,
            Duration::from_secs(4),
            "tells how long it stays open"
        );
        let later = start + Duration::from_secs(5);
        let (first, transition) = breaker.try_acquire(later);
        assert_eq!(transition.unwrap().to, BreakerState::HalfOpen);
        let (second, _) = breaker.try_acquire(later);
        let (third, _) = breaker.try_acquire(later);
        assert!(third.is_err(), "only `probes` calls pass half-open");
        assert_eq!(breaker.record(first.unwrap(), OK, later), None);
        let closed = breaker.record(second.unwrap(), OK, later);
        assert_eq!(closed.unwrap().to, BreakerState::Closed);
        assert!(breaker.try_acquire(later).0.is_ok());
    }

    #[test]
    fn a_failed_probe_opens_it_again() {
        let breaker = Breaker::new(config());
        let start = Instant::now();
        for _ in 0..4 {
            call(&breaker, FAILED, start);
        }
        let later = start + Duration::from_secs(6);
        let (probe, _) = breaker.try_acquire(later);
        let reopened = breaker.record(probe.unwrap(), SLOW, later);
        assert_eq!(reopened.unwrap().to, BreakerState::Open);
        assert!(
            breaker
                .try_acquire(later + Duration::from_secs(1))
                .0
                .is_err()
        );
        assert_eq!(breaker.snapshot(later).transitions, 3);
    }
}
