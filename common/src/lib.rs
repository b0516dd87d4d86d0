//! What every red-packet service shares: money, ids, configuration, telemetry, errors and the
//! HTTP edge.

pub mod accounts;
pub mod auth;
pub mod config;
pub mod db;
pub mod front;
pub mod http;
pub mod ids;
pub mod lease;
pub mod local_queue;
pub mod messages;
pub mod money;
pub mod problem;
pub mod redis_settings;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod time;
pub mod wire;

pub use accounts::{AccountKind, AccountName, NameError, TransferId};
pub use config::{ConfigError, ConfigSource, Secret};
pub use money::{Amount, Currency, MoneyError};
pub use problem::Problem;
