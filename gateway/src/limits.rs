//! Token-bucket rate limits: global, per subject (user or merchant), per campaign.
//!
//! The buckets live in this gateway replica's memory. Checking a shared bucket in Redis would
//! put one more network round trip on every grab and make Redis, already the grab's
//! bottleneck, carry the limiter's traffic too; with R replicas behind a balancer, configure
//! each with rate / R. Every bound here is exact within a replica.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redpacket_common::ConfigError;
use redpacket_common::config::ConfigSource;

/// Micro-tokens per token: refill arithmetic stays in integers.
const MICRO: u64 = 1_000_000;
/// Keyed buckets are spread over this many locks.
const SHARDS: usize = 64;
/// The most keys remembered per kind of limit (per replica); beyond it, idle buckets are
/// forgotten first.
pub const MAX_KEYS: usize = 1_000_000;

/// One limit's rate and burst; a rate of 0 turns it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: u64,
    /// The bucket's size: requests allowed at once after a quiet spell.
    pub burst: u64,
}

impl Rate {
    pub const OFF: Rate = Rate {
        per_second: 0,
        burst: 0,
    };

    pub fn is_off(self) -> bool {
        self.per_second == 0
    }

    fn from_source(
        source: &ConfigSource,
        var: &str,
        default_rate: u64,
        default_burst: u64,
    ) -> Result<Self, ConfigError> {
        let per_second: u64 = source.or(&format!("{var}_RPS"), default_rate)?;
        let burst_var = format!("{var}_BURST");
        let burst: u64 = source.or(&burst_var, default_burst.max(1))?;
        if per_second > 10_000_000 {
            return Err(ConfigError::Malformed {
                var: format!("{var}_RPS"),
                shown: format!(" `{per_second}`"),
                reason: "at most 10,000,000 (0 turns the limit off)".into(),
            });
        }
        if per_second > 0 && !(1..=10_000_000).contains(&burst) {
            return Err(ConfigError::Malformed {
                var: burst_var,
                shown: format!(" `{burst}`"),
                reason: "must be between 1 and 10,000,000".into(),
            });
        }
        Ok(Rate { per_second, burst })
    }
}

/// The three limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitConfig {
    /// `RP_LIMIT_GLOBAL_RPS` / `_BURST` (default 50,000 / 50,000): every `/v1` request.
    pub global: Rate,
    /// `RP_LIMIT_USER_RPS` / `_BURST` (default 20 / 40): per token subject.
    pub user: Rate,
    /// `RP_LIMIT_CAMPAIGN_RPS` / `_BURST` (default 20,000 / 20,000): grabs of one campaign.
    pub campaign: Rate,
}

impl LimitConfig {
    /// Defaults an honest crowd passes on one machine: a person taps a few times a second; a
    /// 2-core machine serves a few thousand grabs a second, far under the campaign limit.
    pub const DEFAULT: LimitConfig = LimitConfig {
        global: Rate {
            per_second: 50_000,
            burst: 50_000,
        },
        user: Rate {
            per_second: 20,
            burst: 40,
        },
        campaign: Rate {
            per_second: 20_000,
            burst: 20_000,
        },
    };

    pub fn from_source(source: &ConfigSource) -> Result<Self, ConfigError> {
        let d = Self::DEFAULT;
        Ok(LimitConfig {
            global: Rate::from_source(
                source,
                "RP_LIMIT_GLOBAL",
                d.global.per_second,
                d.global.burst,
            )?,
            user: Rate::from_source(source, "RP_LIMIT_USER", d.user.per_second, d.user.burst)?,
            campaign: Rate::from_source(
                source,
                "RP_LIMIT_CAMPAIGN",
                d.campaign.per_second,
                d.campaign.burst,
            )?,
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    micro_tokens: u64,
    last: Instant,
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Self {
        Bucket {
            micro_tokens: rate.burst * MICRO,
            last: now,
        }
    }

    /// Takes one token, or says how long until one is there.
    fn take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        let elapsed_us =
            u64::try_from(now.saturating_duration_since(self.last).as_micros()).unwrap_or(u64::MAX);
        // `per_second` tokens per second is `per_second` micro-tokens per microsecond.
        let refill = elapsed_us.saturating_mul(rate.per_second);
        self.micro_tokens = self
            .micro_tokens
            .saturating_add(refill)
            .min(rate.burst * MICRO);
        self.last = now;
        if self.micro_tokens >= MICRO {
            self.micro_tokens -= MICRO;
            Ok(())
        } else {
            let missing = MICRO - self.micro_tokens;
            Err(Duration::from_micros(missing.div_ceil(rate.per_second)))
        }
    }

    /// Whether, at `now`, it would be full again (so forgetting it changes nothing).
    fn idle(&self, rate: Rate, now: Instant) -> bool {
        let elapsed_us =
            u64::try_from(now.saturating_duration_since(self.last).as_micros()).unwrap_or(u64::MAX);
        self.micro_tokens
            .saturating_add(elapsed_us.saturating_mul(rate.per_second))
            >= rate.burst * MICRO
    }
}

/// One bucket for everything.
#[derive(Debug)]
pub struct SingleLimit {
    rate: Rate,
    bucket: Mutex<Bucket>,
}

impl SingleLimit {
    pub fn new(rate: Rate) -> Self {
        SingleLimit {
            rate,
            bucket: Mutex::new(Bucket::full(rate, Instant::now())),
        }
    }

    pub fn check(&self, now: Instant) -> Result<(), Duration> {
        if self.rate.is_off() {
            return Ok(());
        }
        self.bucket
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(self.rate, now)
    }
}

/// A bucket per key, over sharded locks.
#[derive(Debug)]
pub struct KeyedLimit {
    rate: Rate,
    max_keys_per_shard: usize,
    /// Hashed with foldhash, seeded at random per map: a few nanoseconds per short key where
    /// SipHash costs several times that on every grab, with the seed kept from clients.
    shards: Vec<Mutex<HashMap<Box<str>, Bucket, foldhash::fast::RandomState>>>,
}

impl KeyedLimit {
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        KeyedLimit {
            rate,
            max_keys_per_shard: max_keys.div_ceil(SHARDS).max(1),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::default()))
                .collect(),
        }
    }

    pub fn check(&self, key: &str, now: Instant) -> Result<(), Duration> {
        if self.rate.is_off() {
            return Ok(());
        }
        let shard =
            usize::try_from(redpacket_campaign::pool::fnv1a(key) % SHARDS as u64).unwrap_or(0);
        let mut buckets = self.shards[shard].lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bucket) = buckets.get_mut(key) {
            return bucket.take(self.rate, now);
        }
        if buckets.len() >= self.max_keys_per_shard {
            let rate = self.rate;
            buckets.retain(|_, bucket| !bucket.idle(rate, now));
            if buckets.len() >= self.max_keys_per_shard {
                // Every remembered key is busy: forget one at random rather than grow without
                // bound. The forgotten key starts again from a full bucket.
                if let Some(victim) = buckets.keys().next().cloned() {
                    buckets.remove(&victim);
                }
            }
        }
        let mut bucket = Bucket::full(self.rate, now);
        let taken = bucket.take(self.rate, now);
        buckets.insert(key.into(), bucket);
        taken
    }
}

/// The three limits of a gateway replica.
#[derive(Debug)]
pub struct Limits {
    pub global: SingleLimit,
    pub user: KeyedLimit,
    pub campaign: KeyedLimit,
}

impl Limits {
    pub fn new(config: LimitConfig) -> Self {
        Limits {
            global: SingleLimit::new(config.global),
            user: KeyedLimit::new(config.user, MAX_KEYS),
            campaign: KeyedLimit::new(config.campaign, MAX_KEYS),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let limit = SingleLimit::new(Rate {
            per_second: 10,
            burst: 3,
        });
        let start = Instant::now();
        for _ in 0..3 {
            assert!(limit.check(start).is_ok());
        }
        let wait = limit.check(start).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        assert!(limit.check(start + Duration::from_millis(99)).is_err());
        assert!(limit.check(start + Duration::from_millis(200)).is_ok());
        // The bucket never holds more than the burst, however long the quiet spell.
        let later = start + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(limit.check(later).is_ok());
        }
        assert!(limit.check(later).is_err());
    }

    #[test]
    fn keys_have_their_own_buckets_and_off_means_off() {
        let limit = KeyedLimit::new(
            Rate {
                per_second: 1,
                burst: 1,
            },
            100,
        );
        let now = Instant::now();
        assert!(limit.check("a", now).is_ok());
        assert!(limit.check("a", now).is_err());
        assert!(limit.check("b", now).is_ok());
        let off = KeyedLimit::new(Rate::OFF, 100);
        for _ in 0..1000 {
            assert!(off.check("a", now).is_ok());
        }
    }

    #[test]
    fn remembered_keys_are_bounded() {
        let limit = KeyedLimit::new(
            Rate {
                per_second: 1,
                burst: 1,
            },
            SHARDS,
        );
        let now = Instant::now();
        for i in 0..10_000 {
            let _ = limit.check(&format!("user-{i}"), now);
        }
        let remembered: usize = limit.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(remembered <= SHARDS, "{remembered} keys remembered");
    }
}
