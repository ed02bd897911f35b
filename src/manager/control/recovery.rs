//! Which checkpoints every journal of a VPG holds durably and recoverably, from the
//! recovery hosts' heartbeats.

use crate::proto::control::JournalReport;

#[derive(Default)]
pub struct RecoveryTracker {}

impl RecoveryTracker {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn on_journals(&self, host: &str, journals: &[JournalReport]) {
        let _ = (host, journals);
    }
}
