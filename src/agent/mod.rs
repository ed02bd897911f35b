//! The data path that runs on every hypervisor host: write interception over NBD,
//! the replication stream and, at the recovery site, the journal.

pub mod control;
pub mod crashsafe;
pub mod dirty;
pub mod fencing;
pub mod host;
pub mod hypervisor;
pub mod journal;
pub mod nbd;
pub mod recovery;
pub mod stream;
pub mod sync;
pub mod tls;
