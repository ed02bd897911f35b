//! Deleting recovery disks ("remove the VM / delete the VPG and its recovery disks"):
//! a replica can only go once its protected host has stopped streaming it, which happens
//! when that host applies a desired state without the disk. So a deletion is a pending
//! request, retried until the recovery host's agent accepts the `DropReplica` command
//! (it refuses while the disk still streams or syncs) or until it gives up, each outcome
//! an event. Pending requests live in memory: a manager restart forgets them and the
//! replica stays (kept is the safe side; an event says so at request time).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::ControlPlane;
use crate::manager::store::ReplicaTarget;
use crate::proto::control::{Command, CommandBody};

/// How long a deletion is retried before it is given up (with an event).
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(600);
const RETRY_EVERY: Duration = Duration::from_secs(2);

struct Pending {
    target: ReplicaTarget,
    since: Instant,
    next: Instant,
    last_error: Option<String>,
}

/// See the module documentation.
#[derive(Default)]
pub struct ReplicaDrops {
    pending: Mutex<Vec<Pending>>,
}

impl ReplicaDrops {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Pending>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks for these replicas to be deleted once their disks stopped streaming.
    pub fn request(&self, targets: Vec<ReplicaTarget>) {
        let now = Instant::now();
        let mut g = self.lock();
        for t in targets {
            if !g.iter().any(|p| p.target == t) {
                g.push(Pending {
                    target: t,
                    since: now,
                    next: now,
                    last_error: None,
                });
            }
        }
    }

    /// Replicas waiting to be deleted.
    pub fn pending(&self) -> Vec<ReplicaTarget> {
        self.lock().iter().map(|p| p.target.clone()).collect()
    }
}

/// Whether the protected host still replicates the disk to that recovery host, as far as
/// its last heartbeat says (a host not connected cannot be streaming through us, and
/// gets a desired state without the disk when it returns).
fn still_protected(cp: &ControlPlane, t: &ReplicaTarget) -> bool {
    cp.hub.live(&t.protected_host).is_some_and(|l| {
        l.heartbeat.as_ref().is_some_and(|hb| {
            hb.status.protected.iter().any(|d| {
                d.disk_id == t.disk_id && d.recovery_host.as_deref() == Some(&t.recovery_host)
            })
        })
    })
}

async fn attempt(cp: &ControlPlane, t: &ReplicaTarget) -> Result<(), String> {
    if still_protected(cp, t) {
        return Err(format!("{} still replicates the disk", t.protected_host));
    }
    let cmd = Command {
        id: uuid::Uuid::now_v7().to_string(),
        body: CommandBody::DropReplica {
            host: t.protected_host.clone(),
            disk_id: t.disk_id,
        },
    };
    match cp
        .hub
        .command(&t.recovery_host, cmd, Duration::from_secs(30))
        .await
    {
        Ok(r) if r.ok => Ok(()),
        Ok(r) => Err(r.error.unwrap_or_else(|| "refused".into())),
        Err(e) => Err(e.to_string()),
    }
}

/// Works through the pending deletions until `cancel`.
pub async fn run(cp: Arc<ControlPlane>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let due: Vec<ReplicaTarget> = {
            let now = Instant::now();
            cp.replicas
                .lock()
                .iter()
                .filter(|p| p.next <= now)
                .map(|p| p.target.clone())
                .collect()
        };
        for t in due {
            let outcome = attempt(&cp, &t).await;
            let (done, event) = {
                let mut g = cp.replicas.lock();
                let Some(i) = g.iter().position(|p| p.target == t) else {
                    continue;
                };
                match outcome {
                    Ok(()) => {
                        g.remove(i);
                        (true, Some(("vpg.recovery_disk_deleted", "info", None)))
                    }
                    Err(e) if g[i].since.elapsed() > GIVE_UP_AFTER => {
                        g.remove(i);
                        (
                            true,
                            Some(("vpg.recovery_disk_delete_failed", "warning", Some(e))),
                        )
                    }
                    Err(e) => {
                        g[i].next = Instant::now() + RETRY_EVERY;
                        g[i].last_error = Some(e);
                        (false, None)
                    }
                }
            };
            if let (true, Some((kind, severity, error))) = (done, event) {
                let msg = match &error {
                    None => format!(
                        "recovery disk of {} ({}) deleted at {}",
                        t.vm, t.disk, t.recovery_host
                    ),
                    Some(e) => format!(
                        "recovery disk of {} ({}) at {} could not be deleted: {e}; it is kept",
                        t.vm, t.disk, t.recovery_host
                    ),
                };
                let details = serde_json::json!({
                    "vm": t.vm, "disk": t.disk, "disk_id": t.disk_id,
                    "protected_host": t.protected_host, "recovery_host": t.recovery_host,
                    "error": error,
                });
                if let Err(e) = cp
                    .store
                    .vpg_event(&t.vpg_id, kind, severity, msg, details)
                    .await
                {
                    tracing::warn!(error = %e, "could not record a recovery disk deletion");
                }
            }
        }
    }
}
