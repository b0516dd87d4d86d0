//! Splitting a campaign's total into packets, once, at creation.
//!
//! Every split is reproducible from its seed (ChaCha8, whose stream is fixed by its
//! specification), sums exactly to the total, has exactly `count` packets, and keeps every
//! packet within `[min, max]`. Only integer arithmetic is used.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The most packets one campaign may have.
pub const MAX_PACKETS: u32 = 10_000_000;

/// How the total is divided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitMode {
    /// Equal packets; the remainder is spread one minor unit at a time over the first packets.
    Fixed,
    /// Each draw uniform in `[min, 2 × remaining / packets left]`; the last takes the rest.
    DoubleMean,
    /// Each draw uniform within the merchant's `[min, max]`; the last takes the rest.
    Bounded,
}

impl SplitMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SplitMode::Fixed => "fixed",
            SplitMode::DoubleMean => "double_mean",
            SplitMode::Bounded => "bounded",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "fixed" => Some(SplitMode::Fixed),
            "double_mean" => Some(SplitMode::DoubleMean),
            "bounded" => Some(SplitMode::Bounded),
            _ => None,
        }
    }
}

/// A validated split request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitSpec {
    pub mode: SplitMode,
    pub total: i64,
    pub count: u32,
    pub min: i64,
    pub max: i64,
    pub seed: u64,
}

/// Why a split is impossible; each names the request field to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    #[error("packet_count must be between 1 and {MAX_PACKETS}, not {0}")]
    Count(u32),
    #[error("min_amount must be at least 1, not {0}")]
    Min(i64),
    #[error("max_amount {max} is below min_amount {min}")]
    MaxBelowMin { min: i64, max: i64 },
    #[error("bounded mode needs max_amount")]
    MissingMax,
    #[error("total_amount {total} cannot give {count} packets at least {min} each")]
    TotalTooSmall { total: i64, count: u32, min: i64 },
    #[error("total_amount {total} cannot fit in {count} packets at most {max} each")]
    TotalTooLarge { total: i64, count: u32, max: i64 },
}

impl SplitError {
    /// The request field at fault.
    pub fn field(&self) -> &'static str {
        match self {
            SplitError::Count(_) => "packet_count",
            SplitError::Min(_) => "split.min_amount",
            SplitError::MaxBelowMin { .. } | SplitError::MissingMax => "split.max_amount",
            SplitError::TotalTooSmall { .. } | SplitError::TotalTooLarge { .. } => "total_amount",
        }
    }
}

impl SplitSpec {
    /// Checks that a split exists. `min` defaults to 1; `max` to the total (no upper bound),
    /// except in bounded mode, which needs it.
    pub fn new(
        mode: SplitMode,
        total: i64,
        count: u32,
        min: Option<i64>,
        max: Option<i64>,
        seed: u64,
    ) -> Result<Self, SplitError> {
        if count == 0 || count > MAX_PACKETS {
            return Err(SplitError::Count(count));
        }
        let min = min.unwrap_or(1);
        if min < 1 {
            return Err(SplitError::Min(min));
        }
        if mode == SplitMode::Bounded && max.is_none() {
            return Err(SplitError::MissingMax);
        }
        let max = max.unwrap_or(total.max(min));
        if max < min {
            return Err(SplitError::MaxBelowMin { min, max });
        }
        let count_wide = i128::from(count);
        if i128::from(total) < count_wide * i128::from(min) {
            return Err(SplitError::TotalTooSmall { total, count, min });
        }
        if i128::from(total) > count_wide * i128::from(max) {
            return Err(SplitError::TotalTooLarge { total, count, max });
        }
        if mode == SplitMode::Fixed {
            // Equal shares differ by at most one unit; both must lie in [min, max].
            let low = total / i64::from(count);
            let high = low + i64::from(total % i64::from(count) != 0);
            if low < min {
                return Err(SplitError::TotalTooSmall { total, count, min });
            }
            if high > max {
                return Err(SplitError::TotalTooLarge { total, count, max });
            }
        }
        Ok(SplitSpec {
            mode,
            total,
            count,
            min,
            max,
            seed,
        })
    }

    /// The packets, in order.
    pub fn split(&self) -> Vec<i64> {
        let count = usize::try_from(self.count).unwrap_or(usize::MAX);
        let mut packets = Vec::with_capacity(count);
        match self.mode {
            SplitMode::Fixed => {
                let base = self.total / i64::from(self.count);
                let extra = self.total % i64::from(self.count);
                packets.extend((0..i64::from(self.count)).map(|i| base + i64::from(i < extra)));
            }
            SplitMode::DoubleMean | SplitMode::Bounded => {
                let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
                let mut remaining = self.total;
                for left in (1..=i64::from(self.count)).rev() {
                    if left == 1 {
                        packets.push(remaining);
                        break;
                    }
                    // What this draw may take so that the packets after it can still each get
                    // at least `min` and at most `max`.
                    let feasible_low = remaining - (left - 1) * self.max;
                    let feasible_high = remaining - (left - 1) * self.min;
                    let mode_high = match self.mode {
                        SplitMode::DoubleMean => (2 * remaining) / left,
                        _ => self.max,
                    };
                    let low = self.min.max(feasible_low);
                    let high = mode_high.min(self.max).min(feasible_high).max(low);
                    let draw = rng.random_range(low..=high);
                    packets.push(draw);
                    remaining -= draw;
                }
            }
        }
        debug_assert_eq!(packets.iter().sum::<i64>(), self.total);
        packets
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check(spec: &SplitSpec, packets: &[i64]) {
        assert_eq!(packets.len(), spec.count as usize);
        assert_eq!(packets.iter().sum::<i64>(), spec.total);
        assert!(
            packets.iter().all(|p| *p >= spec.min && *p <= spec.max),
            "{spec:?}"
        );
    }

    #[test]
    fn fixed_spreads_the_remainder_one_unit_at_a_time() {
        let spec = SplitSpec::new(SplitMode::Fixed, 10, 3, None, None, 0).unwrap();
        assert_eq!(spec.split(), vec![4, 3, 3]);
    }

    #[test]
    fn impossible_requests_name_their_field() {
        let err = SplitSpec::new(SplitMode::DoubleMean, 5, 10, None, None, 0).unwrap_err();
        assert_eq!(err.field(), "total_amount");
        let err = SplitSpec::new(SplitMode::Bounded, 1000, 10, Some(1), Some(50), 0).unwrap_err();
        assert!(matches!(err, SplitError::TotalTooLarge { .. }));
        let err = SplitSpec::new(SplitMode::Bounded, 1000, 10, None, None, 0).unwrap_err();
        assert_eq!(err.field(), "split.max_amount");
        let err = SplitSpec::new(SplitMode::Fixed, 1000, 0, None, None, 0).unwrap_err();
        assert_eq!(err.field(), "packet_count");
        let err = SplitSpec::new(SplitMode::Fixed, 100, 3, Some(1), Some(33), 0).unwrap_err();
        assert_eq!(err.field(), "total_amount");
        let err = SplitSpec::new(SplitMode::Fixed, 100, 3, Some(0), None, 0).unwrap_err();
        assert_eq!(err.field(), "split.min_amount");
    }

    #[test]
    fn a_million_packets_split_exactly() {
        let spec =
            SplitSpec::new(SplitMode::DoubleMean, 100_000_000, 1_000_000, None, None, 7).unwrap();
        check(&spec, &spec.split());
    }

    fn mode() -> impl Strategy<Value = SplitMode> {
        prop_oneof![
            Just(SplitMode::Fixed),
            Just(SplitMode::DoubleMean),
            Just(SplitMode::Bounded)
        ]
    }

    proptest! {
        #[test]
        fn every_possible_split_is_exact_bounded_and_reproducible(
            mode in mode(),
            count in 1_u32..400,
            min in 1_i64..50,
            spread in 0_i64..500,
            fill in 0_u32..=100,
            seed: u64,
        ) {
            let max = min + spread;
            // A total somewhere between the smallest and the largest possible.
            let low = i64::from(count) * min;
            let high = i64::from(count) * max;
            let total = low + (high - low) * i64::from(fill) / 100;
            let bounded_max = (mode == SplitMode::Bounded || spread % 2 == 0).then_some(max);
            match SplitSpec::new(mode, total, count, Some(min), bounded_max, seed) {
                Ok(spec) => {
                    let packets = spec.split();
                    check(&spec, &packets);
                    prop_assert_eq!(packets, spec.split());
                }
                Err(err) => {
                    // Only fixed splits may be refused inside [low, high]: their equal shares
                    // can miss a narrow [min, max].
                    prop_assert_eq!(mode, SplitMode::Fixed, "{}", err);
                }
            }
        }

        #[test]
        fn different_seeds_usually_give_different_random_splits(seed: u64) {
            let a = SplitSpec::new(SplitMode::DoubleMean, 10_000, 100, None, None, seed).unwrap();
            let b = SplitSpec::new(SplitMode::DoubleMean, 10_000, 100, None, None, seed ^ 1).unwrap();
            prop_assert_ne!(a.split(), b.split());
        }
    }
}
