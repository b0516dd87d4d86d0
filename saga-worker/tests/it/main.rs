//! The sagas end to end: the wallet, the campaign service and the saga worker on port 0, on
//! real PostgreSQL, Redis and RabbitMQ; the saga store alone on every database.

mod bus;
mod exact_ids;
mod faults;
mod helpers;
mod outage;
mod redis_loss;
mod refusals;
mod repair;
mod replay;
mod sagas;
mod waits;
