//! Real virtual machines (issue 19): protected VMs are QEMU guests whose disks are the
//! agent's NBD exports, recovered VMs are QEMU guests booted from the recovery host's
//! journal views, and the test guest's `/init` tells on its serial console whether every
//! file it wrote before the checkpoint is there (`scripts/guest/`).
//!
//! Everything runs under TCG (nested KVM hangs Linux guests on these machines), with a
//! real manager on PostgreSQL and real agents on loopback. One scenario per module;
//! they run one at a time.
#![allow(clippy::unwrap_used)]

mod agent_common;
mod orch_common;

#[path = "real_vms/guest.rs"]
mod guest;

#[path = "real_vms/agent_kill.rs"]
mod agent_kill;
#[path = "real_vms/demo.rs"]
mod demo;
#[path = "real_vms/failover_test.rs"]
mod failover_test;
#[path = "real_vms/firmware.rs"]
mod firmware;
#[path = "real_vms/live.rs"]
mod live;
#[path = "real_vms/power.rs"]
mod power;
#[path = "real_vms/quiesce.rs"]
mod quiesce;

/// Guests are heavy on two cores: one scenario at a time.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
