//! A log-linear latency histogram (the HDR idea, in integers).
//!
//! Why not keep every sample: a soak at a few thousand requests a second for an hour is tens
//! of millions of samples; this keeps a few thousand counters whatever the run's length, and
//! the per-second series of the plots stay small too. Why not floats: the workspace forbids
//! float arithmetic (money code shares the lints), and integers are exact anyway.
//!
//! Values below `2^precision` have a bucket each (exact). Above, each power of two is cut into
//! `2^(precision-1)` buckets, so a value is known within `2^-(precision-1)` of itself: about
//! 0.8 % at precision 8 (the run totals), 6 % at precision 5 (the per-second plots).

/// Counts of values (microseconds, in this harness) in log-linear buckets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Histogram {
    precision: u32,
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

/// Quantiles in parts per million, so `P99_9` is exact in integers.
pub const P50: u64 = 500_000;
pub const P90: u64 = 900_000;
pub const P99: u64 = 990_000;
pub const P99_9: u64 = 999_000;
pub const P100: u64 = 1_000_000;

impl Histogram {
    /// A histogram that keeps values within `2^-(precision-1)`; `precision` is 2 to 16.
    pub fn new(precision: u32) -> Self {
        Histogram {
            precision: precision.clamp(2, 16),
            counts: Vec::new(),
            total: 0,
            max: 0,
        }
    }

    /// Precision 8: within 0.8 %, for a run's totals.
    pub fn fine() -> Self {
        Histogram::new(8)
    }

    /// Precision 5: within 6 %, for the per-second series.
    pub fn coarse() -> Self {
        Histogram::new(5)
    }

    pub fn record(&mut self, value: u64) {
        let index = self.index_of(value);
        if index >= self.counts.len() {
            self.counts.resize(index + 1, 0);
        }
        self.counts[index] += 1;
        self.total += 1;
        self.max = self.max.max(value);
    }

    /// Adds another histogram of the same precision (else its values are re-bucketed by their
    /// buckets' highest values).
    pub fn merge(&mut self, other: &Histogram) {
        if other.precision == self.precision {
            if other.counts.len() > self.counts.len() {
                self.counts.resize(other.counts.len(), 0);
            }
            for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
                *mine += theirs;
            }
            self.total += other.total;
        } else {
            for (index, count) in other.counts.iter().enumerate() {
                if *count > 0 {
                    let value = other.highest_in(index);
                    let mine = self.index_of(value);
                    if mine >= self.counts.len() {
                        self.counts.resize(mine + 1, 0);
                    }
                    self.counts[mine] += count;
                    self.total += count;
                }
            }
        }
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at quantile `ppm` (parts per million) by nearest rank: the smallest recorded
    /// value (as its bucket's highest value, never above the maximum) with at least
    /// `ceil(ppm × count / 10^6)` values at or below it. Zero when empty.
    pub fn quantile(&self, ppm: u64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let ppm = ppm.min(P100);
        let product = u128::from(self.total) * u128::from(ppm);
        let rank = u64::try_from(product.div_ceil(1_000_000))
            .unwrap_or(u64::MAX)
            .max(1);
        let mut seen = 0;
        for (index, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return self.highest_in(index).min(self.max);
            }
        }
        self.max
    }

    fn index_of(&self, value: u64) -> usize {
        let exact = 1u64 << self.precision;
        if value < exact {
            return usize::try_from(value).unwrap_or(usize::MAX);
        }
        let log2 = 63 - value.leading_zeros();
        let shift = log2 - self.precision + 1;
        let half = exact >> 1;
        let mantissa = value >> shift; // in [half, exact)
        let index = exact + u64::from(shift - 1) * half + (mantissa - half);
        usize::try_from(index).unwrap_or(usize::MAX)
    }

    /// The highest value that falls in bucket `index`.
    fn highest_in(&self, index: usize) -> u64 {
        let index = index as u64;
        let exact = 1u64 << self.precision;
        if index < exact {
            return index;
        }
        let half = exact >> 1;
        let shift = (index - exact) / half + 1;
        let mantissa = (index - exact) % half + half;
        if shift >= 64 {
            return u64::MAX;
        }
        let highest = (u128::from(mantissa) + 1) << shift;
        u64::try_from(highest - 1).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_values_are_exact_and_ranks_are_nearest() {
        let mut histogram = Histogram::fine();
        for value in 1..=100 {
            histogram.record(value);
        }
        assert_eq!(histogram.count(), 100);
        assert_eq!(histogram.quantile(P50), 50);
        assert_eq!(histogram.quantile(P90), 90);
        assert_eq!(histogram.quantile(P99), 99);
        assert_eq!(histogram.quantile(P99_9), 100);
        assert_eq!(histogram.quantile(P100), 100);
        assert_eq!(histogram.quantile(0), 1);
    }

    #[test]
    fn large_values_stay_within_the_precision() {
        for precision in [5, 8] {
            let mut histogram = Histogram::new(precision);
            for value in [300, 1_000, 12_345, 999_999, 3_600_000_000] {
                histogram = Histogram::new(precision);
                histogram.record(value);
                let seen = histogram.quantile(P50);
                assert!(seen >= value, "{seen} < {value}");
                // Within 2^-(precision-1) above the value.
                assert!(
                    (seen - value) << (precision - 1) <= value,
                    "precision {precision}: {seen} for {value}"
                );
            }
            assert_eq!(histogram.max(), 3_600_000_000);
        }
    }

    #[test]
    fn quantiles_never_exceed_the_maximum_and_empty_is_zero() {
        let mut histogram = Histogram::coarse();
        assert_eq!(histogram.quantile(P99), 0);
        histogram.record(1_000_001);
        assert_eq!(histogram.quantile(P99), 1_000_001);
        histogram.record(u64::MAX);
        assert_eq!(histogram.quantile(P100), u64::MAX);
    }

    #[test]
    fn merging_adds_counts_at_either_precision() {
        let mut a = Histogram::fine();
        let mut b = Histogram::fine();
        for value in 0..1_000 {
            a.record(value);
            b.record(value + 1_000);
        }
        a.merge(&b);
        assert_eq!(a.count(), 2_000);
        assert_eq!(a.max(), 1_999);
        let p50 = a.quantile(P50);
        assert!((999..=1_007).contains(&p50), "{p50}");

        let mut coarse = Histogram::coarse();
        coarse.merge(&a);
        assert_eq!(coarse.count(), 2_000);
        assert_eq!(coarse.max(), 1_999);
    }

    #[test]
    fn a_bimodal_tail_shows_at_p99_9() {
        let mut histogram = Histogram::fine();
        for _ in 0..9_990 {
            histogram.record(1_000);
        }
        for _ in 0..10 {
            histogram.record(500_000);
        }
        assert!(histogram.quantile(P99) <= 1_004);
        assert!(histogram.quantile(P100) == 500_000);
        assert!(histogram.quantile(P99_9) <= 1_004);
        histogram.record(500_000);
        assert!(histogram.quantile(P99_9) >= 500_000);
    }
}
