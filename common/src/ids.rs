//! Snowflake ids: 64-bit, time-ordered, unique across workers without coordination.
//!
//! Layout, most significant bit first: 1 unused sign bit, 41 bits of milliseconds since
//! [`EPOCH_MS`] (about 69 years), 10 bits of worker id (0–1023), 12 bits of sequence (4096 ids
//! per millisecond per worker).
//!
//! Two workers never share an id because the worker id is part of every id; the operator must
//! give every running process its own `RP_WORKER_ID`. Within one worker, ids strictly increase:
//! the generator never issues a timestamp older than the last one it used.
//!
//! When the clock steps back, the generator keeps issuing ids from the last timestamp it used
//! (using up that millisecond's sequence) and, once the sequence is exhausted, waits for the
//! clock to catch up, but only up to [`MAX_BACKWARD_WAIT_MS`]. A larger step back is an error
//! ([`IdError::ClockMovedBackwards`]) so that a badly broken clock fails loudly instead of
//! stalling every request.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// 2024-01-01T00:00:00Z in milliseconds since the Unix epoch.
pub const EPOCH_MS: u64 = 1_704_067_200_000;
/// Bits of worker id.
pub const WORKER_ID_BITS: u32 = 10;
/// Bits of per-millisecond sequence.
pub const SEQUENCE_BITS: u32 = 12;
/// Largest worker id.
pub const MAX_WORKER_ID: u16 = (1 << WORKER_ID_BITS) - 1;
const MAX_SEQUENCE: u64 = (1 << SEQUENCE_BITS) - 1;
const TIMESTAMP_BITS: u32 = 41;
/// How far back the clock may step before the generator refuses to issue ids.
pub const MAX_BACKWARD_WAIT_MS: u64 = 2_000;

/// A source of wall-clock milliseconds since the Unix epoch; injected so tests can step it.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> u64;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
    }
}

/// Why an id could not be issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("worker id {0} is above the maximum {MAX_WORKER_ID}")]
    WorkerIdOutOfRange(u32),
    #[error(
        "the clock moved back by {behind_ms} ms, more than the {MAX_BACKWARD_WAIT_MS} ms this \
         generator waits out"
    )]
    ClockMovedBackwards { behind_ms: u64 },
    #[error("the clock is before the id epoch or past the 41-bit range")]
    ClockOutOfRange,
}

#[derive(Debug)]
struct State {
    last_ms: u64,
    sequence: u64,
}

/// A thread-safe snowflake generator for one worker.
pub struct SnowflakeGenerator<C: Clock = SystemClock> {
    worker_id: u16,
    clock: C,
    state: Mutex<State>,
}

impl<C: Clock> std::fmt::Debug for SnowflakeGenerator<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnowflakeGenerator")
            .field("worker_id", &self.worker_id)
            .finish_non_exhaustive()
    }
}

impl SnowflakeGenerator<SystemClock> {
    /// A generator on the system clock.
    pub fn new(worker_id: u32) -> Result<Self, IdError> {
        Self::with_clock(worker_id, SystemClock)
    }
}

impl<C: Clock> SnowflakeGenerator<C> {
    /// A generator on an injected clock.
    pub fn with_clock(worker_id: u32, clock: C) -> Result<Self, IdError> {
        let worker_id = u16::try_from(worker_id)
            .ok()
            .filter(|id| *id <= MAX_WORKER_ID)
            .ok_or(IdError::WorkerIdOutOfRange(worker_id))?;
        Ok(SnowflakeGenerator {
            worker_id,
            clock,
            state: Mutex::new(State {
                last_ms: 0,
                sequence: 0,
            }),
        })
    }

    /// The worker id embedded in every id of this generator.
    pub fn worker_id(&self) -> u16 {
        self.worker_id
    }

    /// The next id. Blocks for at most about [`MAX_BACKWARD_WAIT_MS`] when the clock stepped
    /// back or a millisecond's sequence ran out.
    pub fn next_id(&self) -> Result<u64, IdError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let now = self.relative_now()?;
            if now > state.last_ms {
                state.last_ms = now;
                state.sequence = 0;
                return Ok(self.compose(now, 0));
            }
            let behind_ms = state.last_ms - now;
            if behind_ms > MAX_BACKWARD_WAIT_MS {
                return Err(IdError::ClockMovedBackwards { behind_ms });
            }
            if state.sequence < MAX_SEQUENCE {
                // Same millisecond, or a clock a little behind: keep counting on the last
                // timestamp so ids stay strictly increasing.
                state.sequence += 1;
                return Ok(self.compose(state.last_ms, state.sequence));
            }
            // The sequence of the last millisecond is used up: wait for the clock to pass it.
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn relative_now(&self) -> Result<u64, IdError> {
        let now = self
            .clock
            .now_ms()
            .checked_sub(EPOCH_MS)
            .ok_or(IdError::ClockOutOfRange)?;
        if now >= 1 << TIMESTAMP_BITS {
            return Err(IdError::ClockOutOfRange);
        }
        Ok(now)
    }

    fn compose(&self, relative_ms: u64, sequence: u64) -> u64 {
        (relative_ms << (WORKER_ID_BITS + SEQUENCE_BITS))
            | (u64::from(self.worker_id) << SEQUENCE_BITS)
            | sequence
    }
}

/// The parts of a snowflake id, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnowflakeParts {
    pub unix_ms: u64,
    pub worker_id: u16,
    pub sequence: u16,
}

/// Splits an id into its parts.
pub fn decompose(id: u64) -> SnowflakeParts {
    let mask = |bits: u32| (1_u64 << bits) - 1;
    SnowflakeParts {
        unix_ms: (id >> (WORKER_ID_BITS + SEQUENCE_BITS)) + EPOCH_MS,
        worker_id: u16::try_from((id >> SEQUENCE_BITS) & mask(WORKER_ID_BITS)).unwrap_or(0),
        sequence: u16::try_from(id & mask(SEQUENCE_BITS)).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A clock whose reading the test sets.
    #[derive(Clone)]
    struct ManualClock(Arc<AtomicU64>);

    impl Clock for ManualClock {
        fn now_ms(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    const START: u64 = EPOCH_MS + 1_000_000;

    #[test]
    fn ids_carry_their_worker_and_time() {
        let clock = ManualClock(Arc::new(AtomicU64::new(START)));
        let generator = SnowflakeGenerator::with_clock(7, clock).unwrap();
        let parts = decompose(generator.next_id().unwrap());
        assert_eq!(parts.worker_id, 7);
        assert_eq!(parts.unix_ms, START);
        assert_eq!(parts.sequence, 0);
    }

    #[test]
    fn worker_ids_above_the_range_are_refused() {
        assert_eq!(
            SnowflakeGenerator::new(1024).unwrap_err(),
            IdError::WorkerIdOutOfRange(1024)
        );
    }

    #[test]
    fn a_large_step_back_fails_loudly() {
        let now = Arc::new(AtomicU64::new(START));
        let generator = SnowflakeGenerator::with_clock(1, ManualClock(now.clone())).unwrap();
        generator.next_id().unwrap();
        now.store(START - MAX_BACKWARD_WAIT_MS - 1, Ordering::SeqCst);
        assert!(matches!(
            generator.next_id(),
            Err(IdError::ClockMovedBackwards { .. })
        ));
    }

    #[test]
    fn the_real_clock_gives_unique_increasing_ids_across_threads() {
        let generator = Arc::new(SnowflakeGenerator::new(3).unwrap());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let generator = generator.clone();
                std::thread::spawn(move || {
                    let ids: Vec<u64> = (0..20_000).map(|_| generator.next_id().unwrap()).collect();
                    assert!(ids.windows(2).all(|w| w[0] < w[1]));
                    ids
                })
            })
            .collect();
        let mut all = HashSet::new();
        for handle in handles {
            for id in handle.join().unwrap() {
                assert!(all.insert(id), "duplicate id {id}");
            }
        }
    }

    proptest! {
        /// Whatever the clock does (small steps forward or back), every worker's ids strictly
        /// increase, and no two workers ever share an id.
        #[test]
        fn ids_are_unique_and_increase_per_worker_under_clock_steps(
            steps in proptest::collection::vec(-50_i64..50, 1..300),
            workers in proptest::collection::hash_set(0_u32..=u32::from(MAX_WORKER_ID), 1..4),
        ) {
            let mut seen = HashSet::new();
            for worker in workers {
                let now = Arc::new(AtomicU64::new(START));
                let generator = SnowflakeGenerator::with_clock(worker, ManualClock(now.clone())).unwrap();
                let mut last = 0;
                let mut latest = START;
                for step in &steps {
                    // Steps back accumulate, but stay within what the generator waits out.
                    let next = now
                        .load(Ordering::SeqCst)
                        .saturating_add_signed(*step)
                        .max(latest - MAX_BACKWARD_WAIT_MS / 2);
                    latest = latest.max(next);
                    now.store(next, Ordering::SeqCst);
                    let id = generator.next_id().unwrap();
                    prop_assert!(id > last, "ids must increase: {} then {}", last, id);
                    prop_assert_eq!(decompose(id).worker_id, u16::try_from(worker).unwrap());
                    prop_assert!(seen.insert(id));
                    last = id;
                }
            }
        }
    }
}
