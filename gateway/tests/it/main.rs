//! Black-box tests of the gateway: the real services behind it on PostgreSQL, Redis and
//! RabbitMQ, or a fake upstream a test controls.

mod auth;
mod connections;
mod flow;
mod idempotency;
mod repair;
mod resilience;
mod spec;
mod system;
