//! Checkpoint rounds: every checkpoint interval per VPG, across every protected host of
//! the VPG, with the consistency barrier of DESIGN §4 (hold, marker, report, release),
//! bounded; user-tagged and app-consistent rounds on request.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::ControlPlane;
use crate::proto::control::{RoundHeld, RoundReleased};

#[derive(Default)]
pub struct Rounds {}

impl Rounds {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn on_held(&self, host: &str, held: RoundHeld) {
        let _ = (host, held);
    }

    pub fn on_released(&self, host: &str, released: RoundReleased) {
        let _ = (host, released);
    }
}

pub async fn run(cp: Arc<ControlPlane>, cancel: CancellationToken) {
    let _ = cp;
    cancel.cancelled().await;
}
