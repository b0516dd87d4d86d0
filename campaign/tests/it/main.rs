//! Black-box tests of the campaign service through its HTTP API, on real Redis and
//! PostgreSQL, MariaDB or SQLite.

mod claims;
mod create;
mod exact_ids;
mod grab;
mod helpers;
mod overload;
mod pool_loss;
mod redis_settings;
mod repair;
