//! Faults the product must survive, as real processes: a silent partition of the
//! replication link (network namespaces with a `blackhole` qdisc), a journal filesystem
//! that fills up and is freed again (a size-limited tmpfs mounted by the test), the
//! first checkpoints of a VPG racing its Initial Sync, and moves under guest load.
//!
//! Each scenario lives in its own module under `tests/faults/`; they share the process
//! harness of `agent_common` and `orch_common` and run one at a time.
#![allow(clippy::unwrap_used)]

mod agent_common;
mod orch_common;

#[path = "faults/first_sync.rs"]
mod first_sync;
#[path = "faults/journal_full.rs"]
mod journal_full;
#[path = "faults/move_load.rs"]
mod move_load;
#[path = "faults/partition.rs"]
mod partition;

/// These tests start several processes each; on two cores they run one at a time.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
