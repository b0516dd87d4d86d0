//! The campaign service's tables (see `redpacket-migrations`). Never serialized: the API has
//! its own DTOs.

pub mod campaign;
pub mod claim;
pub mod event;
pub mod packet;
pub mod stats;
