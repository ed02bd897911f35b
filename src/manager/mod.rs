//! The control plane: configuration in a database, the REST API, and (as they land)
//! agent control, checkpoint rounds, SLA evaluation and recovery operations.

pub mod api;
pub mod bench;
pub mod bench_move;
pub mod bench_rto;
pub mod bench_scale;
pub mod config;
pub mod control;
pub mod live;
pub mod metrics;
pub mod ops;
pub mod server;
pub mod store;
pub mod webhooks;
