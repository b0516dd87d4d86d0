//! The saga worker's tables (see `redpacket-migrations`).

pub mod dead_letter;
pub mod saga;
