//! Black-box tests of the campaign service through its HTTP API, on real Redis and
//! PostgreSQL, MariaDB or SQLite.

mod claims;
mod create;
mod grab;
mod helpers;
mod overload;
