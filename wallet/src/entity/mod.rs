//! The wallet's tables (see `redpacket-migrations`). Never serialized: the API has its own DTOs.

pub mod account;
pub mod entry;
pub mod transfer;
