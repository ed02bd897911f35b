//! The pure domain model: VPG settings and their rules, statuses and their derivation,
//! the per-VM replication state, SLA arithmetic. Nothing here does I/O, reads a clock or
//! knows about HTTP or the database; callers pass facts in and get decisions out.

pub mod access;
pub mod alerts;
pub mod checkpoints;
pub mod desired;
pub mod machine;
pub mod membership;
pub mod names;
pub mod operations;
pub mod rpo_history;
pub mod settings;
pub mod status;
pub mod sync;
pub mod units;
pub mod validation;
pub mod webhooks;

pub use validation::ValidationError;
