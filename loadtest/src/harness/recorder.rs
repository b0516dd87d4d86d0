//! What every request of a run did: latency, status and problem code per request kind, as run
//! totals and per second of the run (for the plots).
//!
//! Both load models record here, so the summary and the plots read the same way whether goose
//! drove the run or the open-model scheduler did. Goose keeps its own metrics for its report;
//! this recorder measures in microseconds (goose's are milliseconds) and includes reading the
//! body.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::histogram::Histogram;

/// The status recorded when no HTTP answer came back (connect error, timeout, reset).
pub const TRANSPORT_ERROR: u16 = 0;

/// One request's outcome.
#[derive(Debug, Clone, Copy)]
pub struct Sample<'a> {
    /// The request kind (`grab`, `my_claims`, ...), a fixed name.
    pub kind: &'static str,
    /// When the request started.
    pub started: Instant,
    /// How long it took, the body read included.
    pub latency: Duration,
    /// The HTTP status, or [`TRANSPORT_ERROR`].
    pub status: u16,
    /// The problem+json `code` of an error answer, when it had one.
    pub code: Option<&'a str>,
}

/// A run's totals for one request kind.
#[derive(Debug, Clone)]
pub struct KindTotals {
    pub latency_us: Histogram,
    pub statuses: BTreeMap<u16, u64>,
    pub codes: BTreeMap<String, u64>,
}

impl KindTotals {
    fn new() -> Self {
        KindTotals {
            latency_us: Histogram::fine(),
            statuses: BTreeMap::new(),
            codes: BTreeMap::new(),
        }
    }

    /// Answers with a 2xx status.
    pub fn successes(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(status, _)| (200..300).contains(*status))
            .map(|(_, count)| count)
            .sum()
    }

    pub fn count(&self) -> u64 {
        self.latency_us.count()
    }
}

/// One second of the run for one request kind.
#[derive(Debug, Clone)]
pub struct SecondOfKind {
    pub latency_us: Histogram,
    /// Answers that were not 2xx, transport errors included.
    pub non_success: u64,
}

/// Everything recorded, as copied out at the end of a run.
#[derive(Debug, Clone, Default)]
pub struct Recording {
    pub kinds: BTreeMap<&'static str, KindTotals>,
    /// `seconds[s]` holds the requests that started in second `s` of the run.
    pub seconds: Vec<BTreeMap<&'static str, SecondOfKind>>,
    /// From the first request's start to the last answer.
    pub active: Duration,
}

impl Recording {
    /// Requests of all kinds.
    pub fn requests(&self) -> u64 {
        self.kinds.values().map(KindTotals::count).sum()
    }

    /// Requests of all kinds per second of [`Recording::active`].
    pub fn requests_per_sec(&self) -> u64 {
        per_second(self.requests(), self.active)
    }

    /// Requests of one kind per second of the run's active time.
    pub fn kind_per_sec(&self, kind: &str) -> u64 {
        per_second(
            self.kinds.get(kind).map_or(0, KindTotals::count),
            self.active,
        )
    }
}

/// `count / elapsed` in whole units per second.
pub fn per_second(count: u64, elapsed: Duration) -> u64 {
    let micros = u64::try_from(elapsed.as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    u64::try_from(u128::from(count) * 1_000_000 / u128::from(micros)).unwrap_or(u64::MAX)
}

#[derive(Debug, Default)]
struct Inner {
    recording: Recording,
    first_start: Option<Instant>,
    last_end: Option<Instant>,
}

/// Collects samples from many tasks (one short lock per request).
#[derive(Debug)]
pub struct Recorder {
    origin: Instant,
    inner: Mutex<Inner>,
}

impl Recorder {
    /// Seconds of the per-second series count from `origin`.
    pub fn new(origin: Instant) -> Self {
        Recorder {
            origin,
            inner: Mutex::default(),
        }
    }

    pub fn origin(&self) -> Instant {
        self.origin
    }

    pub fn record(&self, sample: Sample<'_>) {
        let micros = u64::try_from(sample.latency.as_micros()).unwrap_or(u64::MAX);
        let second = usize::try_from(
            sample
                .started
                .saturating_duration_since(self.origin)
                .as_secs(),
        )
        .unwrap_or(usize::MAX);
        let success = (200..300).contains(&sample.status);
        let end = sample.started + sample.latency;
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.first_start = Some(
            inner
                .first_start
                .map_or(sample.started, |first| first.min(sample.started)),
        );
        inner.last_end = Some(inner.last_end.map_or(end, |last| last.max(end)));
        let totals = inner
            .recording
            .kinds
            .entry(sample.kind)
            .or_insert_with(KindTotals::new);
        totals.latency_us.record(micros);
        *totals.statuses.entry(sample.status).or_default() += 1;
        if let Some(code) = sample.code {
            match totals.codes.get_mut(code) {
                Some(count) => *count += 1,
                None => {
                    totals.codes.insert(code.to_owned(), 1);
                }
            }
        }
        // A request that started before the origin counts in second 0; a bounded series even
        // if a clock misbehaves (a day of seconds at most).
        let second = second.min(86_400);
        let seconds = &mut inner.recording.seconds;
        if seconds.len() <= second {
            seconds.resize_with(second + 1, BTreeMap::new);
        }
        let slot = seconds[second]
            .entry(sample.kind)
            .or_insert_with(|| SecondOfKind {
                latency_us: Histogram::coarse(),
                non_success: 0,
            });
        slot.latency_us.record(micros);
        if !success {
            slot.non_success += 1;
        }
    }

    /// A copy of everything recorded so far.
    pub fn snapshot(&self) -> Recording {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut recording = inner.recording.clone();
        recording.active = match (inner.first_start, inner.last_end) {
            (Some(first), Some(last)) => last.saturating_duration_since(first),
            _ => Duration::ZERO,
        };
        recording
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::histogram::P50;

    fn sample(kind: &'static str, started: Instant, ms: u64, status: u16) -> Sample<'static> {
        Sample {
            kind,
            started,
            latency: Duration::from_millis(ms),
            status,
            code: (status >= 400).then_some("sold_out"),
        }
    }

    #[test]
    fn totals_and_seconds_are_kept_per_kind() {
        let origin = Instant::now();
        let recorder = Recorder::new(origin);
        recorder.record(sample("grab", origin, 2, 200));
        recorder.record(sample(
            "grab",
            origin + Duration::from_millis(1_500),
            4,
            410,
        ));
        recorder.record(sample(
            "my_wallet",
            origin + Duration::from_millis(2_100),
            1,
            200,
        ));
        let recording = recorder.snapshot();
        assert_eq!(recording.requests(), 3);
        let grab = &recording.kinds["grab"];
        assert_eq!(grab.successes(), 1);
        assert_eq!(grab.statuses[&410], 1);
        assert_eq!(grab.codes["sold_out"], 1);
        // 2 ms within the histogram's 0.8 %.
        assert!((2_000..=2_016).contains(&grab.latency_us.quantile(P50)));
        assert_eq!(recording.seconds.len(), 3);
        assert_eq!(recording.seconds[1]["grab"].non_success, 1);
        assert!(recording.seconds[2].contains_key("my_wallet"));
        // From the first start to the last answer: 2.1 s + 1 ms.
        assert_eq!(recording.active, Duration::from_millis(2_101));
    }

    #[test]
    fn per_second_divides_in_integers() {
        assert_eq!(per_second(1_000, Duration::from_millis(500)), 2_000);
        assert_eq!(per_second(7, Duration::from_secs(2)), 3);
        assert_eq!(per_second(5, Duration::ZERO), 5_000_000);
    }
}
