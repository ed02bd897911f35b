//! Reverse protection on the OLD protected host ([`Agent::seed_reverse`]): after a
//! failover or move, each local protected disk of the VPG stops being served and
//! protected, and its image becomes — by a rename, never a copy — the pre-seeded replica
//! of the recovered disk that replaces it, in this host's receiver storage
//! (`<storage of new_host>/disk-<new_disk_id:016x>/replica.img`, sync state
//! `PreSeeded`). When the new protected host starts protecting that disk towards this
//! host, its Delta Sync compares the two and sends only the blocks that differ.
//!
//! Crash-safe order, per disk (each step is idempotent; running the command again after
//! a crash finishes the job):
//! 1. admit the command's fencing generation (recorded durably before anything acts);
//! 2. stop the disk here: protection (stream and sync task), NBD export, and the agent's
//!    handle on it;
//! 3. record the intent in `state/reverse-seeds.json` (old disk id → image, replica);
//! 4. write the replica's `sync.state` (`PreSeeded`), then rename the image into the
//!    replica (the commit point; directories fsynced) — `stream::preseed_move`;
//! 5. the caller removes the VM from the hypervisor once all its disks are seeds.
//!
//! A disk with an intent record is out of service here for good: at start the agent
//! leaves it (and a configured VM made of it) out, even while the configuration file
//! still names it ([`without_seeded_disks`]) — so a restart neither serves a recreated
//! empty image under the old name nor keeps a VM that now runs at the other site. (An
//! older agent could recreate an empty image at the old path after a crash between 4
//! and 5; a replica that exists together with its intent record means the move
//! happened, so such a leftover image is deleted instead of moved.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};

use serde::{Deserialize, Serialize};

use super::{config, valid_name, Agent, AgentError};
use crate::agent::crashsafe;
use crate::agent::stream::preseed_move;
use crate::proto::control::ReverseSeed;

/// The intent record under the state directory.
pub const REVERSE_SEEDS_FILE: &str = "reverse-seeds.json";

/// One seeded disk, as recorded and as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeededDisk {
    pub operation: String,
    pub vpg_id: String,
    /// The old protected disk here.
    pub disk_id: u64,
    pub vm: String,
    pub new_host: String,
    pub new_disk_id: u64,
    /// Where the image was, and the replica it became.
    pub image: PathBuf,
    pub replica: PathBuf,
    pub size: u64,
    /// Already done by an earlier run of the command (nothing moved this time).
    #[serde(default)]
    pub already: bool,
}

fn load(path: &Path) -> Result<BTreeMap<u64, SeededDisk>, AgentError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| AgentError::Disk {
            name: path.display().to_string(),
            reason: format!("not a reverse-seed record: {e}"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(AgentError::Io {
            what: "read",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

fn store(path: &Path, m: &BTreeMap<u64, SeededDisk>) -> Result<(), AgentError> {
    let body = serde_json::to_vec_pretty(m).map_err(|e| AgentError::Task(e.to_string()))?;
    crashsafe::write_atomically(path, &body).map_err(|e| AgentError::Io {
        what: "write",
        path: e.path,
        source: e.source,
    })
}

/// `cfg` without the disks that became reverse-protection seeds (see the module
/// documentation) and without the configured VMs made of them. Logs what it leaves out.
pub fn without_seeded_disks(
    mut cfg: config::AgentConfig,
) -> Result<config::AgentConfig, AgentError> {
    let seeds = load(&cfg.state_dir().join(REVERSE_SEEDS_FILE))?;
    if seeds.is_empty() {
        return Ok(cfg);
    }
    let mut gone = std::collections::BTreeSet::new();
    cfg.disks.retain(|d| match seeds.get(&d.id) {
        Some(s) => {
            tracing::warn!(disk = %d.name, id = d.id, new_host = %s.new_host, operation = %s.operation,
                "configured disk left out: it became the pre-seeded replica of a recovered disk \
                 (remove it from the configuration)");
            gone.insert(d.name.clone());
            false
        }
        None => true,
    });
    cfg.vms.retain(|v| {
        let keep = !v.disks.iter().any(|d| gone.contains(d));
        if !keep {
            tracing::warn!(vm = %v.name, "configured VM left out: its disks became reverse-protection seeds; it runs at another site now");
        }
        keep
    });
    Ok(cfg)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Task(e.to_string()))?
}

impl Agent {
    /// Runs `SeedReverse` on this (old protected) host: see the module documentation.
    /// Returns one entry per seed (`already` when an earlier run did it). Refused with
    /// [`AgentError::Fencing`] for a stale generation, [`AgentError::NotRecoveryHost`]
    /// without a replication listener, [`AgentError::ReplicaInUse`] while the new host
    /// already streams the disk here.
    pub async fn seed_reverse(
        &self,
        operation: &str,
        vpg_id: &str,
        fencing_generation: u64,
        seeds: &[ReverseSeed],
    ) -> Result<Vec<SeededDisk>, AgentError> {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(AgentError::ShuttingDown);
        }
        let r = self.receiver.clone().ok_or(AgentError::NotRecoveryHost)?;
        let _g = self.apply_lock.lock().await;
        {
            let f = Arc::clone(&self.fencing);
            let (v, g) = (vpg_id.to_string(), fencing_generation);
            blocking(move || f.admit(&v, g).map_err(AgentError::from)).await?;
        }
        let record = self.cfg.state_dir().join(REVERSE_SEEDS_FILE);
        let mut out = Vec::with_capacity(seeds.len());
        for seed in seeds {
            let bad = |reason: String| AgentError::Disk {
                name: format!("disk {}", seed.disk_id),
                reason,
            };
            if !valid_name(&seed.new_host) || seed.new_host == self.cfg.host_name {
                return Err(bad(format!(
                    "new host {:?} is not a valid peer name",
                    seed.new_host
                )));
            }
            if r.is_busy(&seed.new_host, seed.new_disk_id) {
                return Err(AgentError::ReplicaInUse {
                    host: seed.new_host.clone(),
                    disk_id: seed.new_disk_id,
                    reason: "the new protected host already streams it here".into(),
                });
            }
            let storage = r
                .allowed()
                .remove(&seed.new_host)
                .or_else(|| self.cfg.allow.get(&seed.new_host).cloned())
                .unwrap_or_else(|| self.cfg.storage.join(&seed.new_host));
            let replica = config::received_disk_dir(&storage, seed.new_disk_id).join("replica.img");
            let rec = record.clone();
            let mut intents = blocking(move || load(&rec)).await?;
            let done = intents
                .get(&seed.disk_id)
                .is_some_and(|i| i.replica == replica && i.new_disk_id == seed.new_disk_id)
                && replica.exists();

            // Step 2: nothing may write the disk any more.
            let local = self.disk_by_id(seed.disk_id);
            let (image, size) = match (&local, intents.get(&seed.disk_id)) {
                (Some(d), _) => (d.cfg.path.clone(), d.cfg.size),
                (None, Some(i)) => (i.image.clone(), i.size),
                (None, None) => {
                    return Err(bad("is not on this host".into()));
                }
            };
            if let Some(d) = local {
                self.unprotect(&d).await;
                self.registry.remove_and_drain(&d.cfg.name).await;
                self.disks
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .retain(|x| x.cfg.id != seed.disk_id);
                tracing::info!(disk = %d.cfg.name, new_host = %seed.new_host,
                    new_disk = seed.new_disk_id, "disk no longer served: it becomes a reverse-protection seed");
            }

            if done {
                // The move happened before; an image at the old path was recreated
                // empty by a restart in between and holds nothing of the guest's.
                let img = image.clone();
                blocking(move || match std::fs::remove_file(&img) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(AgentError::Io {
                        what: "remove",
                        path: img,
                        source: e,
                    }),
                })
                .await?;
                let mut s = intents[&seed.disk_id].clone();
                s.already = true;
                out.push(s);
                continue;
            }

            // Step 3, then 4.
            let entry = SeededDisk {
                operation: operation.to_string(),
                vpg_id: vpg_id.to_string(),
                disk_id: seed.disk_id,
                vm: seed.vm.clone(),
                new_host: seed.new_host.clone(),
                new_disk_id: seed.new_disk_id,
                image: image.clone(),
                replica: replica.clone(),
                size,
                already: false,
            };
            intents.insert(seed.disk_id, entry.clone());
            let rec = record.clone();
            let new_disk = seed.new_disk_id;
            let moved = blocking(move || {
                store(&rec, &intents)?;
                std::fs::create_dir_all(&storage).map_err(|e| AgentError::Io {
                    what: "create",
                    path: storage.clone(),
                    source: e,
                })?;
                Ok(preseed_move(&storage, new_disk, &image, size)?)
            })
            .await?;
            tracing::info!(disk = seed.disk_id, replica = %moved.display(), new_host = %seed.new_host,
                "disk image became the pre-seeded replica of the recovered disk");
            out.push(entry);
        }
        Ok(out)
    }
}
