//! Time on the wire: every service stores epoch milliseconds and shows RFC 3339.

/// Epoch milliseconds as RFC 3339 UTC with milliseconds (`2026-11-26T04:08:26.002Z`).
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Now, in epoch milliseconds.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// RFC 3339 for `offset_ms` from now (negative: in the past).
pub fn rfc3339_in(offset_ms: i64) -> String {
    rfc3339(now_ms().saturating_add(offset_ms))
}

#[cfg(test)]
mod tests {
    #[test]
    fn milliseconds_format_as_utc() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            super::rfc3339(1_764_130_106_002),
            "2025-11-26T04:08:26.002Z"
        );
    }
}
