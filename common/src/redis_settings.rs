//! What the Redis under the packet pool, the hand-off and the leases must be set to.
//!
//! Redis configured to evict keys (`maxmemory-policy` other than `noeviction`) would drop, under
//! memory pressure and without an error, a user's claims (breaking the per-user limit), a
//! pool's packets or a hand-off stream of answered grabs. So the services that keep such state
//! refuse to start on it, and report not ready if it is changed while they run. The append-only
//! file decides what a crash of Redis can lose; it is reported, not enforced (tests and the
//! embedded mode run without it), in the readiness detail.

use redis::aio::ConnectionLike;

/// Redis's settings that decide what it can lose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Durability {
    /// `maxmemory-policy`: must be `noeviction`.
    pub maxmemory_policy: String,
    /// Whether the append-only file is on.
    pub aof_enabled: bool,
    /// `appendfsync` (`always`, `everysec`, `no`), when the server lets `CONFIG GET` read it.
    pub appendfsync: Option<String>,
}

impl Durability {
    /// Reads the settings. `INFO` answers on every server; `CONFIG` may be renamed away on a
    /// managed one, so `appendfsync` is read only when it answers.
    pub async fn read<C: ConnectionLike + Send>(connection: &mut C) -> redis::RedisResult<Self> {
        let memory: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(connection)
            .await?;
        let persistence: String = redis::cmd("INFO")
            .arg("persistence")
            .query_async(connection)
            .await?;
        let appendfsync: Option<Vec<String>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("appendfsync")
            .query_async(connection)
            .await
            .ok();
        Ok(Durability {
            maxmemory_policy: info_field(&memory, "maxmemory_policy")
                .unwrap_or("unknown")
                .to_owned(),
            aof_enabled: info_field(&persistence, "aof_enabled") == Some("1"),
            appendfsync: appendfsync.and_then(|pair| pair.get(1).cloned()),
        })
    }

    /// Why the state cannot be kept in this Redis, if it cannot.
    pub fn refusal(&self) -> Option<String> {
        (self.maxmemory_policy != "noeviction").then(|| {
            format!(
                "Redis evicts keys (maxmemory-policy `{}`): claims, packets and answered grabs could be dropped silently; set `maxmemory-policy noeviction`",
                self.maxmemory_policy
            )
        })
    }

    /// One line for the readiness detail.
    pub fn describe(&self) -> String {
        let aof = match (&self.aof_enabled, &self.appendfsync) {
            (false, _) => {
                "aof off: a restart of Redis loses every pool and unrelayed grab".to_owned()
            }
            (true, Some(fsync)) => format!("aof on, appendfsync {fsync}"),
            (true, None) => "aof on".to_owned(),
        };
        format!("maxmemory-policy {}, {aof}", self.maxmemory_policy)
    }

    /// Reads the settings and answers their description, or why they are refused.
    pub async fn check<C: ConnectionLike + Send>(connection: &mut C) -> Result<String, String> {
        let durability = Self::read(connection)
            .await
            .map_err(|err| format!("redis: {err}"))?;
        match durability.refusal() {
            Some(refusal) => Err(refusal),
            None => Ok(durability.describe()),
        }
    }
}

fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        line.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_fields_are_read_by_exact_name() {
        let info = "# Memory\r\nmaxmemory:0\r\nmaxmemory_policy:allkeys-lru\r\n";
        assert_eq!(info_field(info, "maxmemory_policy"), Some("allkeys-lru"));
        assert_eq!(info_field(info, "maxmemory"), Some("0"));
        assert_eq!(info_field(info, "aof_enabled"), None);
    }

    #[test]
    fn only_noeviction_is_accepted() {
        let mut settings = Durability {
            maxmemory_policy: "noeviction".into(),
            aof_enabled: true,
            appendfsync: Some("always".into()),
        };
        assert_eq!(settings.refusal(), None);
        assert_eq!(
            settings.describe(),
            "maxmemory-policy noeviction, aof on, appendfsync always"
        );
        settings.maxmemory_policy = "volatile-lru".into();
        assert!(settings.refusal().unwrap().contains("volatile-lru"));
    }
}
