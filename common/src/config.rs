//! Layered configuration: defaults → optional TOML file → `RP_*` environment variables.
//!
//! A service asks for exactly the variables it uses, each by its environment name
//! (`RP_DATABASE_URL`), so an error always names the variable an operator has to fix. The file,
//! named by `RP_CONFIG_FILE`, uses the same names in lower case without the prefix
//! (`database_url = "..."`); the environment wins over the file, the file over the defaults.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// The prefix of every variable.
pub const PREFIX: &str = "RP_";
/// The variable that names an optional TOML file.
pub const CONFIG_FILE_VAR: &str = "RP_CONFIG_FILE";

/// A configuration problem that stops start-up.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var} is required but not set (environment variable or `{key}` in the config file)")]
    Missing { var: String, key: String },
    #[error("{var} has an invalid value{shown}: {reason}")]
    Malformed {
        var: String,
        /// The offending value, or nothing when the variable is a secret.
        shown: String,
        reason: String,
    },
    #[error("config file {path} (from {CONFIG_FILE_VAR}) cannot be used: {reason}")]
    File { path: String, reason: String },
}

/// A value that must never be printed: Debug and Display show `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The merged view of the file and the environment.
#[derive(Clone, Default)]
pub struct ConfigSource {
    values: BTreeMap<String, String>,
}

impl fmt::Debug for ConfigSource {
    /// Only the names: values may be secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.values.keys()).finish()
    }
}

impl ConfigSource {
    /// Reads `RP_CONFIG_FILE` (when set) and the process environment.
    pub fn load() -> Result<Self, ConfigError> {
        Self::from_environment(std::env::vars())
    }

    /// Builds a source from explicit environment pairs (the file is still read when the pairs
    /// name one). Tests use it to avoid touching the process environment.
    pub fn from_environment(
        environment: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let environment: BTreeMap<String, String> = environment
            .into_iter()
            .filter(|(name, _)| name.starts_with(PREFIX))
            .collect();
        let mut values = BTreeMap::new();
        if let Some(path) = environment.get(CONFIG_FILE_VAR) {
            values.extend(read_file(path)?);
        }
        values.extend(environment);
        Ok(ConfigSource { values })
    }

    /// Sets a value, as if it came from the environment (used by the embedded mode).
    pub fn set(&mut self, var: &str, value: impl Into<String>) {
        self.values.insert(var.to_owned(), value.into());
    }

    /// Whether a variable has a non-empty value.
    pub fn is_set(&self, var: &str) -> bool {
        self.raw(var).is_some()
    }

    fn raw(&self, var: &str) -> Option<&str> {
        self.values
            .get(var)
            .map(String::as_str)
            .filter(|value| !value.is_empty())
    }

    /// A variable that must be set.
    pub fn required<T>(&self, var: &str) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        self.optional(var)?.ok_or_else(|| missing(var))
    }

    /// A variable that may be absent.
    pub fn optional<T>(&self, var: &str) -> Result<Option<T>, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        self.raw(var)
            .map(|raw| {
                raw.parse().map_err(|err: T::Err| ConfigError::Malformed {
                    var: var.to_owned(),
                    shown: format!(" `{raw}`"),
                    reason: err.to_string(),
                })
            })
            .transpose()
    }

    /// A variable with a default.
    pub fn or<T>(&self, var: &str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        Ok(self.optional(var)?.unwrap_or(default))
    }

    /// `RP_WORKER_ID`, required: 0-1023, unique per running process (part of every id).
    pub fn worker_id(&self) -> Result<u32, ConfigError> {
        let worker_id: u32 = self.required("RP_WORKER_ID")?;
        if worker_id > u32::from(crate::ids::MAX_WORKER_ID) {
            return Err(ConfigError::Malformed {
                var: "RP_WORKER_ID".into(),
                shown: format!(" `{worker_id}`"),
                reason: format!("must be between 0 and {}", crate::ids::MAX_WORKER_ID),
            });
        }
        Ok(worker_id)
    }

    /// A secret string that must be set; its value never appears in an error.
    pub fn required_secret(&self, var: &str) -> Result<Secret<String>, ConfigError> {
        self.raw(var)
            .map(|raw| Secret(raw.to_owned()))
            .ok_or_else(|| missing(var))
    }

    /// A secret that must be set and satisfy `check`; the message never shows the value.
    pub fn required_secret_checked(
        &self,
        var: &str,
        check: impl FnOnce(&str) -> Result<(), String>,
    ) -> Result<Secret<String>, ConfigError> {
        let secret = self.required_secret(var)?;
        check(secret.expose()).map_err(|reason| ConfigError::Malformed {
            var: var.to_owned(),
            shown: String::new(),
            reason,
        })?;
        Ok(secret)
    }
}

fn missing(var: &str) -> ConfigError {
    ConfigError::Missing {
        var: var.to_owned(),
        key: var.trim_start_matches(PREFIX).to_ascii_lowercase(),
    }
}

fn read_file(path: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let file_error = |reason: String| ConfigError::File {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|err| file_error(err.to_string()))?;
    let table: toml::Table = text.parse().map_err(|err| file_error(format!("{err}")))?;
    table
        .into_iter()
        .map(|(key, value)| {
            let value = match value {
                toml::Value::String(text) => text,
                toml::Value::Integer(number) => number.to_string(),
                toml::Value::Boolean(flag) => flag.to_string(),
                other => {
                    return Err(file_error(format!(
                        "`{key}` must be a string, an integer or a boolean, not {}",
                        other.type_str()
                    )));
                }
            };
            Ok((format!("{PREFIX}{}", key.to_ascii_uppercase()), value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn source(pairs: &[(&str, &str)]) -> ConfigSource {
        ConfigSource::from_environment(
            pairs
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string())),
        )
        .unwrap()
    }

    #[test]
    fn a_missing_variable_is_named() {
        let err = source(&[])
            .required::<String>("RP_DATABASE_URL")
            .unwrap_err();
        let message = err.to_string();
        assert!(message.contains("RP_DATABASE_URL"), "{message}");
        assert!(message.contains("database_url"), "{message}");
    }

    #[test]
    fn a_malformed_variable_is_named_with_the_reason() {
        let err = source(&[("RP_LISTEN", "nowhere")])
            .required::<SocketAddr>("RP_LISTEN")
            .unwrap_err();
        assert!(err.to_string().contains("RP_LISTEN"), "{err}");
        assert!(err.to_string().contains("nowhere"), "{err}");
    }

    #[test]
    fn secrets_never_print() {
        let config = source(&[("RP_AUTH_SECRET", "hunter2-hunter2")]);
        let secret = config.required_secret("RP_AUTH_SECRET").unwrap();
        assert_eq!(format!("{secret:?} {secret}"), "[redacted] [redacted]");
        assert!(!format!("{config:?}").contains("hunter2"));
        let err = config
            .required_secret_checked("RP_AUTH_SECRET", |_| Err("too short".into()))
            .unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(err.to_string().contains("RP_AUTH_SECRET"), "{err}");
    }

    #[test]
    fn environment_overrides_file_overrides_default() {
        let dir = std::env::temp_dir().join(format!("rp-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:9000\"\nworker_id = 5\n").unwrap();
        let path = path.to_str().unwrap();
        let config = source(&[(CONFIG_FILE_VAR, path), ("RP_WORKER_ID", "9")]);
        assert_eq!(
            config.required::<SocketAddr>("RP_LISTEN").unwrap(),
            "127.0.0.1:9000".parse().unwrap()
        );
        assert_eq!(config.required::<u32>("RP_WORKER_ID").unwrap(), 9);
        assert_eq!(config.or::<u32>("RP_DB_MAX_CONNECTIONS", 16).unwrap(), 16);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_bad_file_is_reported_with_its_path() {
        let err = ConfigSource::from_environment([(
            CONFIG_FILE_VAR.to_string(),
            "/nonexistent/rp.toml".to_string(),
        )])
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/rp.toml"), "{err}");
    }
}
