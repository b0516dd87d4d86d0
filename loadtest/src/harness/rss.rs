//! Memory of the system's processes during a soak: the resident set size of each given PID,
//! sampled every second from `/proc/PID/status`, to show whether memory drifts under steady
//! load (a leak grows with time, a cache levels off).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

/// How often the RSS is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// `VmRSS` of a `/proc/PID/status` text, in KiB.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix("VmRSS:")?;
        let mut words = rest.split_whitespace();
        let value: u64 = words.next()?.parse().ok()?;
        match words.next() {
            Some("kB") | None => Some(value),
            Some(_) => None,
        }
    })
}

/// Parses `NAME=PID` (the `--pid` flag).
pub fn parse_pid_arg(text: &str) -> Result<(String, u32), String> {
    let (name, pid) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}`: expected NAME=PID, e.g. gateway=1234"))?;
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| format!("`{text}`: `{pid}` is not a process id"))?;
    if name.trim().is_empty() {
        return Err(format!("`{text}`: the name is empty"));
    }
    Ok((name.trim().to_owned(), pid))
}

/// One process's samples: `(second of the run, KiB)`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RssSeries {
    pub name: String,
    pub pid: u32,
    pub samples: Vec<(u64, u64)>,
    /// Samples that could not be read (the process had exited, or no /proc).
    pub missed: u64,
}

/// What the summary says about one process's memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RssDrift {
    pub name: String,
    pub pid: u32,
    pub first_kib: u64,
    pub last_kib: u64,
    pub max_kib: u64,
    /// Mean of the last tenth of the samples minus the mean of the first tenth: robust to one
    /// noisy sample at either end.
    pub drift_kib: i64,
    /// `drift_kib` per minute of the sampled span.
    pub drift_kib_per_min: i64,
    pub samples: usize,
    pub missed: u64,
}

impl RssSeries {
    pub fn drift(&self) -> Option<RssDrift> {
        let first = self.samples.first()?;
        let last = self.samples.last()?;
        let tenth = (self.samples.len() / 10).max(1);
        let mean = |slice: &[(u64, u64)]| {
            let sum: u128 = slice.iter().map(|(_, kib)| u128::from(*kib)).sum();
            i64::try_from(sum / u128::try_from(slice.len().max(1)).unwrap_or(1)).unwrap_or(0)
        };
        let head = mean(&self.samples[..tenth]);
        let tail = mean(&self.samples[self.samples.len() - tenth..]);
        let drift = tail - head;
        let span_secs = i64::try_from(last.0.saturating_sub(first.0)).unwrap_or(0);
        Some(RssDrift {
            name: self.name.clone(),
            pid: self.pid,
            first_kib: first.1,
            last_kib: last.1,
            max_kib: self.samples.iter().map(|(_, kib)| *kib).max().unwrap_or(0),
            drift_kib: drift,
            drift_kib_per_min: if span_secs > 0 {
                drift * 60 / span_secs
            } else {
                0
            },
            samples: self.samples.len(),
            missed: self.missed,
        })
    }
}

/// Samples every process once a second until stopped.
#[derive(Debug)]
pub struct RssSampler {
    series: Arc<Mutex<Vec<RssSeries>>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    /// Starts sampling `pids` (name, pid); seconds count from `origin`.
    pub fn start(pids: &[(String, u32)], origin: Instant) -> Self {
        let series = Arc::new(Mutex::new(
            pids.iter()
                .map(|(name, pid)| RssSeries {
                    name: name.clone(),
                    pid: *pid,
                    ..RssSeries::default()
                })
                .collect::<Vec<_>>(),
        ));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let shared = series.clone();
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = stopped.changed() => return,
                }
                let second = origin.elapsed().as_secs();
                let mut all = shared.lock().unwrap_or_else(|p| p.into_inner());
                for one in all.iter_mut() {
                    let status = std::fs::read_to_string(format!("/proc/{}/status", one.pid));
                    match status.ok().as_deref().and_then(parse_vm_rss) {
                        Some(kib) => one.samples.push((second, kib)),
                        None => one.missed += 1,
                    }
                }
            }
        });
        RssSampler { series, stop, task }
    }

    /// Stops and returns the samples.
    pub async fn stop(self) -> Vec<RssSeries> {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        series.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_in_kib() {
        let status = "Name:\tredpacket\nVmPeak:\t  200000 kB\nVmRSS:\t   51234 kB\nThreads:\t9\n";
        assert_eq!(parse_vm_rss(status), Some(51_234));
        assert_eq!(parse_vm_rss("Name:\tkthreadd\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\t12 MB\n"), None);
    }

    #[test]
    fn the_own_process_has_a_resident_set() {
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            assert!(parse_vm_rss(&status).is_some_and(|kib| kib > 0));
        }
    }

    #[test]
    fn pid_arguments_name_a_process() {
        assert_eq!(parse_pid_arg("gateway=42"), Ok(("gateway".to_owned(), 42)));
        assert!(parse_pid_arg("42").is_err());
        assert!(parse_pid_arg("=42").is_err());
        assert!(parse_pid_arg("gateway=x").is_err());
    }

    #[test]
    fn drift_compares_the_first_and_last_tenths() {
        let series = RssSeries {
            name: "gateway".to_owned(),
            pid: 1,
            samples: (0..100).map(|s| (s, 1_000 + s * 10)).collect(),
            missed: 0,
        };
        let drift = series.drift().unwrap();
        assert_eq!(drift.first_kib, 1_000);
        assert_eq!(drift.last_kib, 1_990);
        assert_eq!(drift.max_kib, 1_990);
        // Means 1,045 and 1,945 over 99 seconds.
        assert_eq!(drift.drift_kib, 900);
        assert_eq!(drift.drift_kib_per_min, 900 * 60 / 99);
        assert!(RssSeries::default().drift().is_none());
    }
}
