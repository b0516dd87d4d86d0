//! What the gateway remembers between requests: each campaign's merchant (campaigns never
//! change hands, so ownership checks cost no upstream call after the first), and the last
//! statistics served per campaign, for degraded answers while the campaign service is down.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Campaigns whose merchant is remembered.
pub const MAX_OWNERS: usize = 100_000;
/// Campaigns whose last statistics are remembered.
pub const MAX_STATS: usize = 10_000;

/// A map that forgets arbitrary entries when full rather than grow without bound.
#[derive(Debug)]
struct Bounded<V> {
    max: usize,
    entries: Mutex<HashMap<Box<str>, V>>,
}

impl<V: Clone> Bounded<V> {
    fn new(max: usize) -> Self {
        Bounded {
            max,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, key: &str) -> Option<V> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    fn insert(&self, key: &str, value: V) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.max && !entries.contains_key(key) {
            // Drop a tenth at once so a full map does not pay this on every insert.
            let victims: Vec<Box<str>> = entries.keys().take(self.max / 10 + 1).cloned().collect();
            for victim in victims {
                entries.remove(&victim);
            }
        }
        entries.insert(key.into(), value);
    }
}

/// The gateway's memory.
#[derive(Debug)]
pub struct Cache {
    owners: Bounded<String>,
    stats: Bounded<(Instant, Bytes)>,
}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            owners: Bounded::new(MAX_OWNERS),
            stats: Bounded::new(MAX_STATS),
        }
    }
}

impl Cache {
    pub fn owner(&self, campaign_id: &str) -> Option<String> {
        self.owners.get(campaign_id)
    }

    pub fn set_owner(&self, campaign_id: &str, merchant_id: &str) {
        self.owners.insert(campaign_id, merchant_id.to_owned());
    }

    /// The last statistics served and their age.
    pub fn stats(&self, campaign_id: &str) -> Option<(Duration, Bytes)> {
        self.stats
            .get(campaign_id)
            .map(|(at, body)| (at.elapsed(), body))
    }

    pub fn set_stats(&self, campaign_id: &str, body: Bytes) {
        self.stats.insert(campaign_id, (Instant::now(), body));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_map_stays_within_its_bound() {
        let map = Bounded::new(100);
        for i in 0..1000 {
            map.insert(&i.to_string(), i);
        }
        let len = map.entries.lock().unwrap().len();
        assert!(len <= 100, "{len}");
        assert_eq!(map.get("999"), Some(999), "the newest entry is kept");
    }
}
