//! Black-box tests of the wallet through its HTTP API, on real PostgreSQL, MariaDB and SQLite.

mod api;
mod bad_input;
mod concurrency;
mod exact_ids;
mod helpers;
mod overload;
