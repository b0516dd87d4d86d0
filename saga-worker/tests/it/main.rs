//! The sagas end to end: the wallet, the campaign service and the saga worker on port 0, on
//! real PostgreSQL, Redis and RabbitMQ.

mod bus;
mod faults;
mod helpers;
mod outage;
mod refusals;
mod sagas;
mod waits;
