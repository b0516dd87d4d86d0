//! The run's own report: the summary JSON, the SVG plots beside it, and the tables printed at
//! the end. Everything is integers (microseconds, milliseconds, per second); ratios are
//! fixed-point decimals with two places.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::{Value, json};

use super::baseline::Baselines;
use super::drain::Drain;
use super::histogram::{Histogram, P50, P90, P99, P99_9};
use super::open_model::OpenOutcome;
use super::recorder::{KindTotals, Recording, per_second};
use super::rss::{RssDrift, RssSeries};
use super::svg::{self, LineChart, PALETTE, Series};
use super::verify::{RunFacts, Verdict};
use super::workload::kind;

/// `numerator / denominator` as a JSON number with two decimals (`null` when undefined).
pub fn ratio_number(numerator: u64, denominator: u64) -> Value {
    if denominator == 0 {
        return Value::Null;
    }
    let hundredths = u128::from(numerator) * 100 / u128::from(denominator);
    let text = format!("{}.{:02}", hundredths / 100, hundredths % 100);
    serde_json::Number::from_str(&text).map_or(Value::Null, Value::Number)
}

/// The grab→credited lags and the credit rate, from the claims' own timestamps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credits {
    pub credited: u64,
    pub compensated: u64,
    pub lag_ms: Histogram,
    /// Credited claims per second, from the first grab to the last credit.
    pub credits_per_sec: u64,
}

/// Reads the claims of every campaign of the run.
pub fn credits(facts: &RunFacts) -> Credits {
    let mut lag_ms = Histogram::fine();
    let (mut credited, mut compensated) = (0, 0);
    let (mut first_grab, mut last_credit) = (i64::MAX, i64::MIN);
    for claim in facts.campaigns.iter().flat_map(|c| c.claims.iter()) {
        let created = parse_ms(&claim.created_at);
        match claim.status.as_str() {
            "credited" => {
                credited += 1;
                if let (Some(created), Some(at)) =
                    (created, claim.credited_at.as_deref().and_then(parse_ms))
                {
                    lag_ms.record(u64::try_from(at - created).unwrap_or(0));
                    first_grab = first_grab.min(created);
                    last_credit = last_credit.max(at);
                }
            }
            "compensated" => compensated += 1,
            _ => {}
        }
    }
    let span_ms = u64::try_from(last_credit.saturating_sub(first_grab)).unwrap_or(0);
    Credits {
        credited,
        compensated,
        lag_ms,
        credits_per_sec: (credited * 1_000).checked_div(span_ms).unwrap_or(0),
    }
}

fn parse_ms(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|at| at.timestamp_millis())
}

fn quantiles(histogram: &Histogram) -> Value {
    json!({
        "p50": histogram.quantile(P50),
        "p90": histogram.quantile(P90),
        "p99": histogram.quantile(P99),
        "p99_9": histogram.quantile(P99_9),
        "max": histogram.max(),
    })
}

fn kind_json(totals: &KindTotals, recording: &Recording) -> Value {
    let statuses: BTreeMap<String, u64> = totals
        .statuses
        .iter()
        .map(|(status, count)| (status.to_string(), *count))
        .collect();
    json!({
        "count": totals.count(),
        "success": totals.successes(),
        "per_sec": per_second(totals.count(), recording.active),
        "latency_us": quantiles(&totals.latency_us),
        "statuses": statuses,
        "codes": totals.codes,
    })
}

/// Everything the summary is made of.
#[derive(Debug)]
pub struct RunReport<'a> {
    pub scenario: &'a str,
    pub model: &'a str,
    pub host: &'a str,
    pub started_at: String,
    pub settings: Value,
    pub recording: &'a Recording,
    pub open: Option<&'a OpenOutcome>,
    pub goose: Option<Value>,
    pub baseline: Option<&'a Baselines>,
    pub drain: &'a Drain,
    pub facts: &'a RunFacts,
    pub verdict: &'a Verdict,
    pub rss: &'a [RssSeries],
    pub files: Vec<PathBuf>,
    pub unreadable_200: u64,
}

impl RunReport<'_> {
    /// The scenario's throughput: grabs answered per second when it grabs, else requests.
    pub fn throughput(&self) -> u64 {
        if self.recording.kinds.contains_key(kind::GRAB) {
            self.recording.kind_per_sec(kind::GRAB)
        } else {
            self.recording.requests_per_sec()
        }
    }

    pub fn to_json(&self) -> Value {
        let recording = self.recording;
        let grabs = recording.kinds.get(kind::GRAB);
        let granted = grabs.map_or(0, |g| g.statuses.get(&200).copied().unwrap_or(0));
        let credits = credits(self.facts);
        let mut errors: BTreeMap<String, u64> = BTreeMap::new();
        for totals in recording.kinds.values() {
            for (status, count) in &totals.statuses {
                if !(200..300).contains(status) {
                    *errors.entry(status.to_string()).or_default() += count;
                }
            }
        }
        let kinds: BTreeMap<&str, Value> = recording
            .kinds
            .iter()
            .map(|(name, totals)| (*name, kind_json(totals, recording)))
            .collect();
        let throughput = self.throughput();
        json!({
            "scenario": self.scenario,
            "model": self.model,
            "host": self.host,
            "started_at": self.started_at,
            "settings": self.settings,
            "active_ms": u64::try_from(recording.active.as_millis()).unwrap_or(u64::MAX),
            "requests": recording.requests(),
            "requests_per_sec": recording.requests_per_sec(),
            "grabs_per_sec": recording.kind_per_sec(kind::GRAB),
            "grants": granted,
            "grants_per_sec": per_second(granted, recording.active),
            "grab_answers_unreadable": self.unreadable_200,
            "kinds": kinds,
            "errors_by_status": errors,
            "credits": {
                "credited": credits.credited,
                "compensated": credits.compensated,
                "credits_per_sec": credits.credits_per_sec,
                "lag_ms": quantiles(&credits.lag_ms),
            },
            "open_model": self.open.map(|open| json!({
                "rate_asked": open.rate_asked,
                "rate_achieved": open.rate_achieved(),
                "arrivals": open.asked,
                "sent": open.sent,
                "dropped": open.dropped,
                "abandoned": open.abandoned,
                "max_in_flight": open.max_in_flight,
                "send_window_ms": u64::try_from(open.send_window.as_millis()).unwrap_or(u64::MAX),
            })),
            "goose": self.goose,
            "baseline": self.baseline.map(|baseline| json!({
                "concurrency": baseline.concurrency,
                "seconds": baseline.seconds,
                "redis_grab_per_sec": baseline.redis_grab_per_sec,
                "ping_per_sec": baseline.ping_per_sec,
                "scenario_per_sec": throughput,
                "ratio_to_redis_grab": ratio_number(throughput, baseline.redis_grab_per_sec),
                "ratio_to_ping": ratio_number(throughput, baseline.ping_per_sec),
            })),
            "drain": self.drain,
            "campaigns": self.facts.campaigns.iter().map(|c| json!({
                "id": c.id,
                "per_user_limit": c.per_user_limit,
                "granted": c.granted.len(),
                "claims": c.claims.len(),
                "stats": c.stats.as_ref().map(|s| json!({
                    "packets_total": s.packets_total,
                    "packets_grabbed": s.packets_grabbed,
                    "packets_credited": s.packets_credited,
                    "packets_compensated": s.packets_compensated,
                    "amount_total": s.amount_total,
                    "amount_credited": s.amount_credited,
                })),
            })).collect::<Vec<_>>(),
            "rss": self.rss.iter().filter_map(RssSeries::drift).collect::<Vec<RssDrift>>(),
            "verdict": self.verdict,
            "files": self.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
        })
    }

    /// The tables printed at the end of a run.
    pub fn text(&self) -> String {
        let recording = self.recording;
        let mut out = String::new();
        out.push_str(&format!(
            "\n{} ({} model) against {}: {} requests in {} ms, {}/s\n\n",
            self.scenario,
            self.model,
            self.host,
            recording.requests(),
            recording.active.as_millis(),
            recording.requests_per_sec()
        ));
        out.push_str("| kind | requests | 2xx | per s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | statuses |\n");
        out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
        for (name, totals) in &recording.kinds {
            let statuses: Vec<String> = totals
                .statuses
                .iter()
                .map(|(status, count)| format!("{status}: {count}"))
                .collect();
            let ms = |q| svg::micros_as_ms(totals.latency_us.quantile(q));
            out.push_str(&format!(
                "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                totals.count(),
                totals.successes(),
                per_second(totals.count(), recording.active),
                ms(P50),
                ms(P90),
                ms(P99),
                ms(P99_9),
                svg::micros_as_ms(totals.latency_us.max()),
                statuses.join(", ")
            ));
        }
        let credits = credits(self.facts);
        out.push_str(&format!(
            "\ncredits: {} credited, {} compensated, {}/s; grab→credited lag p50 {} ms, p99 {} ms, max {} ms\n",
            credits.credited,
            credits.compensated,
            credits.credits_per_sec,
            credits.lag_ms.quantile(P50),
            credits.lag_ms.quantile(P99),
            credits.lag_ms.max()
        ));
        if let Some(open) = self.open {
            out.push_str(&format!(
                "open model: asked {}/s, achieved {}/s; {} arrivals, {} sent, {} dropped (in-flight cap {}), {} unanswered at the end\n",
                open.rate_asked,
                open.rate_achieved(),
                open.asked,
                open.sent,
                open.dropped,
                open.max_in_flight,
                open.abandoned
            ));
        }
        if let Some(baseline) = self.baseline {
            let throughput = self.throughput();
            out.push_str(&format!(
                "baseline at concurrency {}: raw Redis grab script {}/s, GET /v1/ping {}/s; scenario {}/s = {} of the script, {} of ping\n",
                baseline.concurrency,
                baseline.redis_grab_per_sec,
                baseline.ping_per_sec,
                throughput,
                crate::ratio(throughput, baseline.redis_grab_per_sec),
                crate::ratio(throughput, baseline.ping_per_sec)
            ));
        }
        for drift in self.rss.iter().filter_map(RssSeries::drift) {
            out.push_str(&format!(
                "rss {} (pid {}): {} → {} MiB, max {} MiB, drift {} KiB ({} KiB/min) over {} samples\n",
                drift.name,
                drift.pid,
                svg::kib_as_mib(drift.first_kib),
                svg::kib_as_mib(drift.last_kib),
                svg::kib_as_mib(drift.max_kib),
                drift.drift_kib,
                drift.drift_kib_per_min,
                drift.samples
            ));
        }
        for file in &self.files {
            out.push_str(&format!("wrote {}\n", file.display()));
        }
        out
    }
}

/// Latency p50 (solid) and p99 (dashed) per second, per request kind.
pub fn latency_chart(scenario: &str, recording: &Recording) -> LineChart {
    let mut series = Vec::new();
    for (index, name) in recording.kinds.keys().enumerate() {
        let color = PALETTE[index % PALETTE.len()];
        for (quantile, label, dashed) in [(P50, "p50", false), (P99, "p99", true)] {
            let points = recording
                .seconds
                .iter()
                .enumerate()
                .filter_map(|(second, kinds)| {
                    kinds.get(name).map(|slot| {
                        (
                            u64::try_from(second).unwrap_or(0),
                            slot.latency_us.quantile(quantile),
                        )
                    })
                })
                .collect();
            series.push(Series {
                name: format!("{name} {label}"),
                color,
                dashed,
                points,
            });
        }
    }
    LineChart {
        title: format!("{scenario}: latency per second (p50 solid, p99 dashed)"),
        x_label: "second of the run".to_owned(),
        y_label: "latency (ms)".to_owned(),
        y_format: svg::micros_as_ms,
        series,
    }
}

/// Requests answered per second, per kind, plus the non-2xx ones and the asked rate.
pub fn throughput_chart(scenario: &str, recording: &Recording, asked: Option<u64>) -> LineChart {
    let seconds = recording.seconds.len();
    let mut series = Vec::new();
    for (index, name) in recording.kinds.keys().enumerate() {
        let points = (0..seconds)
            .map(|second| {
                let count = recording.seconds[second]
                    .get(name)
                    .map_or(0, |slot| slot.latency_us.count());
                (u64::try_from(second).unwrap_or(0), count)
            })
            .collect();
        series.push(Series {
            name: (*name).to_owned(),
            color: PALETTE[index % PALETTE.len()],
            dashed: false,
            points,
        });
    }
    series.push(Series {
        name: "not 2xx".to_owned(),
        color: "#000000",
        dashed: true,
        points: (0..seconds)
            .map(|second| {
                let failed = recording.seconds[second]
                    .values()
                    .map(|slot| slot.non_success)
                    .sum();
                (u64::try_from(second).unwrap_or(0), failed)
            })
            .collect(),
    });
    if let Some(rate) = asked
        && seconds > 0
    {
        series.push(Series {
            name: format!("asked {rate}/s"),
            color: "#7f7f7f",
            dashed: true,
            points: vec![(0, rate), (u64::try_from(seconds - 1).unwrap_or(0), rate)],
        });
    }
    LineChart {
        title: format!("{scenario}: requests per second (by start second)"),
        x_label: "second of the run".to_owned(),
        y_label: "requests / s".to_owned(),
        y_format: svg::plain,
        series,
    }
}

/// Resident memory of each sampled process, in tenths of MiB (so the axis has round MiB).
pub fn rss_chart(scenario: &str, rss: &[RssSeries]) -> LineChart {
    LineChart {
        title: format!("{scenario}: resident memory (VmRSS)"),
        x_label: "second of the run".to_owned(),
        y_label: "MiB".to_owned(),
        y_format: svg::tenths,
        series: rss
            .iter()
            .enumerate()
            .map(|(index, one)| Series {
                name: format!("{} ({})", one.name, one.pid),
                color: PALETTE[index % PALETTE.len()],
                dashed: false,
                points: one
                    .samples
                    .iter()
                    .map(|&(second, kib)| (second, kib * 10 / 1_024))
                    .collect(),
            })
            .collect(),
    }
}

/// The summary's path and the directory of the other files.
pub fn summary_path(scenario: &str, given: Option<&Path>) -> PathBuf {
    given.map_or_else(
        || PathBuf::from(format!("target/loadtest/{scenario}-summary.json")),
        Path::to_path_buf,
    )
}

/// `dir/{name}-{suffix}` beside the summary, where `name` is the summary's file name without
/// its extension and a trailing `-summary` (`seckill-summary.json` → `seckill-latency.svg`,
/// `run7.json` → `run7-latency.svg`), so runs with different summaries keep their own files.
pub fn beside(summary: &Path, suffix: &str) -> PathBuf {
    let stem = summary
        .file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = stem.strip_suffix("-summary").unwrap_or(&stem);
    summary
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!("{name}-{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::api::ClaimView;
    use crate::harness::verify::CampaignFacts;

    fn claim(created: &str, credited: Option<&str>, status: &str) -> ClaimView {
        ClaimView {
            id: created.to_owned(),
            campaign_id: "c".to_owned(),
            user_id: "u".to_owned(),
            amount: 1,
            status: status.to_owned(),
            created_at: created.to_owned(),
            credited_at: credited.map(str::to_owned),
        }
    }

    #[test]
    fn ratios_are_two_decimal_numbers() {
        assert_eq!(ratio_number(59, 100), json!(0.59));
        assert_eq!(ratio_number(300, 100), json!(3.0));
        assert_eq!(ratio_number(1, 3), json!(0.33));
        assert_eq!(ratio_number(1, 0), Value::Null);
    }

    #[test]
    fn lags_and_credit_rate_come_from_the_claims() {
        let facts = RunFacts {
            campaigns: vec![CampaignFacts {
                id: "c".to_owned(),
                per_user_limit: 1,
                stats: None,
                stats_unread: None,
                claims_unread: None,
                claims: vec![
                    claim(
                        "2026-11-26T00:00:00.000Z",
                        Some("2026-11-26T00:00:00.100Z"),
                        "credited",
                    ),
                    claim(
                        "2026-11-26T00:00:00.500Z",
                        Some("2026-11-26T00:00:01.000Z"),
                        "credited",
                    ),
                    claim("2026-11-26T00:00:00.600Z", None, "compensated"),
                ],
                granted: Vec::new(),
            }],
            ..RunFacts::default()
        };
        let credits = credits(&facts);
        assert_eq!(credits.credited, 2);
        assert_eq!(credits.compensated, 1);
        assert_eq!(credits.lag_ms.quantile(P50), 100);
        assert_eq!(credits.lag_ms.max(), 500);
        // Two credits from the first grab (0.000) to the last credit (1.000).
        assert_eq!(credits.credits_per_sec, 2);
    }

    #[test]
    fn files_go_beside_the_summary() {
        let summary = summary_path("seckill", None);
        assert_eq!(
            summary,
            PathBuf::from("target/loadtest/seckill-summary.json")
        );
        assert_eq!(
            beside(&summary, "latency.svg"),
            PathBuf::from("target/loadtest/seckill-latency.svg")
        );
        assert_eq!(
            beside(Path::new("out.json"), "rss.svg"),
            PathBuf::from("out-rss.svg")
        );
    }
}
