//! The VPG status that follows from the facts: lifecycle, members, live sync state,
//! connectivity, recoverable checkpoints, RPO and history.
//!
//! Every second, and whenever configuration or an agent's report changes, each VPG's
//! facts are gathered from the database (definition, stored checkpoints) and from what
//! the agents report (heartbeats in the hub, journals in the recovery tracker), then:
//! - lifecycle: creating → protecting once every member disk is protected by its host
//!   in the VPG's group; deleting ↔ waiting_removal while one of its hosts is away;
//!   a deleting VPG is removed once no heartbeat lists a disk of its group;
//! - checkpoints every journal holds are marked recoverable, and checkpoints no journal
//!   can recover any more are deleted (never for want of reports);
//! - `model::status::derive_status` gives status and sub-status, cached on the row with
//!   RPO, history and journal size, and an event when the status changes.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::recovery::DiskKey;
use super::{ControlPlane, HostLive};
use crate::manager::metrics::VpgSample;
use crate::manager::store::rpo_history::RpoRecorder;
use crate::manager::store::{Actor, LiveVpg, StatusUpdate, StoreError};
use crate::model::rpo_history::Sample as RpoSample;
use crate::model::status::{
    derive_status, derive_vm_state, vpg_sync, DiskSyncFact, Lifecycle, SyncKind, VmFacts,
    VmReplicationState, VpgFacts,
};
use crate::model::sync::SyncReason;
use crate::proto::agent::{ProtectedDiskStatus, ReplicationMode, SyncPhase};

/// Evaluation period when nothing pokes.
const EVERY: Duration = Duration::from_secs(1);
/// Heartbeats of many agents poke often; passes are at least this far apart.
const MIN_SPACING: Duration = Duration::from_millis(100);

pub async fn run(cp: Arc<ControlPlane>, cancel: CancellationToken) {
    cp.recovery.attach(cp.hub.clone());
    let mut state = EvalState {
        rpo: Some(RpoRecorder::spawn(cp.store.clone(), &cp.metrics)),
        ..Default::default()
    };
    loop {
        // Armed before the pass, so a change during it is not missed.
        let notified = cp.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Err(e) = evaluate_all(&cp, &mut state).await {
            tracing::warn!(error = %e, "VPG evaluation failed");
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(EVERY) => {}
            _ = &mut notified => tokio::time::sleep(MIN_SPACING).await,
        }
    }
    // Stores the RPO history still buffered (open minute and hour buckets included).
    if let Some(rpo) = state.rpo.take() {
        rpo.close().await;
    }
}

/// The replication state of every member VM as the last pass derived it from live
/// facts (`model::status::derive_vm_state`); the API lays it over the stored
/// definition, which alone can only tell configured from not.
#[derive(Default)]
pub struct VmStates(Mutex<HashMap<String, VmReplicationState>>);

impl VmStates {
    pub fn get(&self, vm_id: &str) -> Option<VmReplicationState> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(vm_id)
            .copied()
    }

    fn replace(&self, states: HashMap<String, VmReplicationState>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = states;
    }
}

/// What the evaluator remembers between passes.
#[derive(Default)]
struct EvalState {
    /// Per VPG, the checkpoint floor already applied (thinning deletes once per floor).
    thinned: HashMap<String, u64>,
    /// The SLA alert state machines.
    alerts: super::alerts::AlertEngine,
    /// SLA figures that moved in this pass, for the live stream.
    samples: Vec<crate::proto::live::VpgSample>,
    /// Status columns to rewrite, in one transaction per chunk at the end of the pass.
    status_writes: Vec<(String, StatusUpdate)>,
    /// The RPO history writer (`store::rpo_history`), fed once per pass.
    rpo: Option<RpoRecorder>,
    /// This pass's RPO history samples, one per VPG.
    rpo_samples: Vec<RpoSample>,
}

/// VPGs per status transaction: one commit for many, but no write lock held for long.
const STATUS_CHUNK: usize = 250;

async fn evaluate_all(cp: &ControlPlane, state: &mut EvalState) -> Result<(), StoreError> {
    let vpgs = cp.store.live_vpgs(None, true).await?;
    let live: HashMap<String, HostLive> = cp
        .hub
        .all_live()
        .into_iter()
        .map(|l| (l.host_name.clone(), l))
        .collect();
    let mut keys: HashSet<DiskKey> = HashSet::new();
    for v in &vpgs {
        keys.extend(disk_keys(v).into_iter().flatten());
    }
    cp.recovery.retain(&keys);
    state
        .thinned
        .retain(|id, _| vpgs.iter().any(|v| &v.id == id));
    let mut vm_states = HashMap::new();
    let mut observed = Vec::new();
    let ids: Vec<String> = vpgs.iter().map(|v| v.id.clone()).collect();
    for v in vpgs {
        let id = v.id.clone();
        if let Err(e) = evaluate_one(cp, state, v, &live, &mut vm_states, &mut observed).await {
            tracing::warn!(vpg = %id, error = %e, "VPG evaluation failed");
        }
    }
    cp.vm_states.replace(vm_states);
    // Handed over before the writes below can fail, so a pass's samples never linger.
    let rpo_samples = std::mem::take(&mut state.rpo_samples);
    if let Some(rpo) = &state.rpo {
        rpo.record(rpo_samples);
    }
    for chunk in std::mem::take(&mut state.status_writes).chunks(STATUS_CHUNK) {
        cp.store.write_statuses(chunk).await?;
    }
    cp.live.add_samples(std::mem::take(&mut state.samples));
    // Series of VPGs gone since the last pass (a VPG removed within this pass keeps its
    // series one more pass, until it is no longer listed).
    cp.metrics
        .retain_vpgs(&ids.iter().map(String::as_str).collect());
    super::alerts::pass(cp, &mut state.alerts, observed, &live, Utc::now()).await
}

/// One key per member disk; `None` where the VM's host or the agent's disk id is not
/// known.
fn disk_keys(v: &LiveVpg) -> Vec<Option<DiskKey>> {
    v.members
        .iter()
        .flat_map(|m| {
            m.devices
                .iter()
                .map(|d| Some((m.host.clone()?, (*d)?)))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The protected disk as the member's host reports it in this VPG's group.
fn reported<'a>(
    live: &'a HashMap<String, HostLive>,
    vpg_id: &str,
    key: &Option<DiskKey>,
) -> Option<&'a ProtectedDiskStatus> {
    let (host, disk) = key.as_ref()?;
    live.get(host)?
        .heartbeat
        .as_ref()?
        .status
        .protected
        .iter()
        .find(|p| p.disk_id == *disk && p.group == vpg_id)
}

fn since(now: DateTime<Utc>, t: Option<DateTime<Utc>>) -> Option<Duration> {
    t.map(|t| (now - t).to_std().unwrap_or(Duration::ZERO))
}

async fn evaluate_one(
    cp: &ControlPlane,
    state: &mut EvalState,
    mut v: LiveVpg,
    live: &HashMap<String, HostLive>,
    vm_states: &mut HashMap<String, VmReplicationState>,
    observed: &mut Vec<crate::model::alerts::VpgAlertFacts>,
) -> Result<(), StoreError> {
    let protected_hosts: BTreeSet<&str> =
        v.members.iter().filter_map(|m| m.host.as_deref()).collect();
    let recovery_hosts: BTreeSet<&str> = v
        .members
        .iter()
        .filter_map(|m| m.recovery_host.as_deref())
        .collect();
    let keys = disk_keys(&v);

    if matches!(v.lifecycle, Lifecycle::Deleting | Lifecycle::WaitingRemoval) {
        let never: HashSet<&str> = v
            .members
            .iter()
            .flat_map(|m| m.never_enrolled.iter().map(String::as_str))
            .collect();
        let away: Vec<&str> = protected_hosts
            .iter()
            .chain(recovery_hosts.iter())
            .copied()
            .filter(|h| !never.contains(h))
            .filter(|h| live.get(*h).is_none_or(|l| l.heartbeat.is_none()))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if away.is_empty() {
            let still_protected = live.values().any(|l| {
                l.heartbeat
                    .as_ref()
                    .is_some_and(|hb| hb.status.protected.iter().any(|p| p.group == v.id))
            });
            if !still_protected {
                cp.store
                    .remove_vpg(
                        &Actor::system(),
                        &v.id,
                        "vpg.deleted",
                        format!("VPG {} deleted: no host protects it any more", v.name),
                    )
                    .await?;
                return Ok(());
            }
            if v.lifecycle == Lifecycle::WaitingRemoval
                && cp
                    .store
                    .set_lifecycle(
                        &v.id,
                        Lifecycle::WaitingRemoval,
                        Lifecycle::Deleting,
                        "vpg.deleting",
                        format!("VPG {}: every host is back, deletion continues", v.name),
                    )
                    .await?
            {
                v.lifecycle = Lifecycle::Deleting;
            }
        } else if v.lifecycle == Lifecycle::Deleting
            && cp
                .store
                .set_lifecycle(
                    &v.id,
                    Lifecycle::Deleting,
                    Lifecycle::WaitingRemoval,
                    "vpg.waiting_removal",
                    format!(
                        "VPG {} waiting to be removed: {} not connected (remove it by force if the host is gone)",
                        v.name,
                        away.join(", ")
                    ),
                )
                .await?
        {
            v.lifecycle = Lifecycle::WaitingRemoval;
        }
    }

    // Creating → protecting once every host runs what the manager asked for.
    if v.lifecycle == Lifecycle::Creating
        && !keys.is_empty()
        && keys.iter().all(|k| reported(live, &v.id, k).is_some())
        && cp
            .store
            .set_lifecycle(
                &v.id,
                Lifecycle::Creating,
                Lifecycle::Protecting,
                "vpg.protecting",
                format!("VPG {}: every host protects its disks", v.name),
            )
            .await?
    {
        v.lifecycle = Lifecycle::Protecting;
    }

    let protecting = matches!(v.lifecycle, Lifecycle::Creating | Lifecycle::Protecting);
    if protecting {
        let verdict = cp.recovery.judge(&v.checkpoints.pending, &keys);
        let mut changed = false;
        if !verdict.newly_recoverable.is_empty() {
            cp.store
                .mark_recoverable(&v.id, &verdict.newly_recoverable)
                .await?;
            changed = true;
        }
        if let Some(floor) = verdict.delete_below {
            if state.thinned.get(&v.id).is_none_or(|&f| f < floor) {
                let n = cp.store.thin_checkpoints(&v.id, floor).await?;
                if n > 0 {
                    tracing::debug!(vpg = %v.id, floor, deleted = n, "checkpoints thinned");
                    changed = true;
                }
                state.thinned.insert(v.id.clone(), floor);
            }
        }
        if changed {
            if let Some((summary, protected_since, history_since)) =
                cp.store.checkpoint_summary(&v.id).await?
            {
                v.checkpoints = summary;
                v.protected_since = protected_since;
                v.history_since = history_since;
            }
        }
    }

    let now = Utc::now();
    let disks: Vec<Option<&ProtectedDiskStatus>> =
        keys.iter().map(|k| reported(live, &v.id, k)).collect();
    let sync_facts: Vec<DiskSyncFact> = disks
        .iter()
        .flatten()
        .map(|p| DiskSyncFact {
            running: p.sync.running.as_ref().map(|r| r.kind),
            forced: p
                .sync
                .running
                .as_ref()
                .is_some_and(|r| r.reason == SyncReason::ForceSync.describe()),
            pending: matches!(
                p.sync.phase,
                SyncPhase::Required | SyncPhase::Queued | SyncPhase::WaitingForPeer
            ),
        })
        .collect();
    let (sync, sync_pending) = vpg_sync(&sync_facts, v.protected_since.is_some());
    let connected = |h: &str| live.contains_key(h);
    let peers_up = protected_hosts.iter().all(|h| {
        live.get(*h)
            .and_then(|l| l.heartbeat.as_ref())
            .is_none_or(|hb| {
                hb.status
                    .peers
                    .iter()
                    .filter(|p| recovery_hosts.contains(p.host_name.as_str()))
                    .all(|p| p.connected)
            })
    });
    let journals = cp.recovery.facts(&keys);
    let members_not_protected = if v.lifecycle == Lifecycle::Protecting {
        v.members
            .iter()
            .filter(|m| {
                let Some(h) = m.host.as_deref() else {
                    return true;
                };
                // A host that is away says nothing about its VMs (that is a site
                // disconnection, not an unprotected VM).
                if live.get(h).is_none_or(|l| l.heartbeat.is_none()) {
                    return false;
                }
                m.devices.is_empty()
                    || m.devices.iter().any(|d| {
                        let key = d.map(|d| (h.to_string(), d));
                        reported(live, &v.id, &key)
                            .is_none_or(|p| p.mode == ReplicationMode::Unprotected)
                    })
            })
            .count()
    } else {
        0
    };
    let newest = v.checkpoints.newest_recoverable;
    let oldest = v.checkpoints.oldest_recoverable;
    let rpo_actual = since(now, newest);
    let history_actual = match (newest, oldest) {
        (Some(n), Some(o)) => (n - o).to_std().unwrap_or(Duration::ZERO),
        _ => Duration::ZERO,
    };
    let facts = VpgFacts {
        lifecycle: v.lifecycle,
        members: v.members.len(),
        members_needing_configuration: v.members.iter().filter(|m| m.needs_configuration).count(),
        members_not_protected,
        operation: v.operation,
        paused: v.paused,
        sync,
        sync_pending,
        protected_site_connected: protected_hosts.iter().all(|h| connected(h)),
        recovery_site_connected: recovery_hosts.iter().all(|h| connected(h)) && peers_up,
        journal_storage_error: journals.storage_error.is_some(),
        recovery_storage_error: false,
        error: false,
        has_recoverable_checkpoint: newest.is_some(),
        rpo_actual,
        rpo_target: Duration::from_secs(u64::from(v.settings.rpo_target_secs)),
        history_actual,
        history_target: Duration::from_secs(u64::from(v.settings.journal_history_secs)),
        // How long the VPG, as composed now, could have kept history: the target is
        // capped by it (a young VPG, or one a VM just joined, is not short of history).
        protected_for: since(now, v.history_since).unwrap_or(Duration::ZERO),
    };
    let (status, sub_status) = derive_status(&facts);
    observed.push(super::alerts::observe(
        &v,
        &facts,
        journals.bytes,
        disks
            .iter()
            .flatten()
            .any(|p| p.sync.phase == SyncPhase::Required),
    ));
    for m in &v.members {
        let keys: Vec<Option<DiskKey>> = m
            .devices
            .iter()
            .map(|d| Some((m.host.clone()?, (*d)?)))
            .collect();
        let disks: Vec<Option<&ProtectedDiskStatus>> =
            keys.iter().map(|k| reported(live, &v.id, k)).collect();
        let running = |f: fn(SyncKind) -> bool| {
            disks
                .iter()
                .flatten()
                .any(|p| p.sync.running.as_ref().is_some_and(|r| f(r.kind)))
        };

        let vm = VmFacts {
            protected: protecting,
            initial_sync_done: v.protected_since.is_some()
                && !keys.is_empty()
                && disks.iter().all(Option::is_some)
                && !running(|k| k == SyncKind::Initial),
            syncing: running(|k| k != SyncKind::Initial),
            sync_pending: disks
                .iter()
                .flatten()
                .any(|p| p.sync.phase == SyncPhase::Required),
            sync_interrupted: disks.iter().flatten().any(|p| {
                p.sync.running.is_none()
                    && (p.sync.phase == SyncPhase::Failed
                        || (p.sync.phase == SyncPhase::WaitingForPeer
                            && p.sync
                                .last
                                .as_ref()
                                .is_some_and(|l| l.result == "interrupted")))
            }),
            paused: v.paused,
            error: cp.recovery.facts(&keys).storage_error.is_some(),
            prepared_for_move: false,
            failed_over: v.lifecycle == Lifecycle::Recovered,
        };
        vm_states.insert(m.vm_id.clone(), derive_vm_state(&vm));
    }
    let update = StatusUpdate {
        status,
        sub_status,
        // Whole seconds: the column is rewritten once a second at most, not every pass.
        rpo_actual_ms: rpo_actual.map(|d| i64::try_from(d.as_secs() * 1000).unwrap_or(i64::MAX)),
        history_actual_secs: newest
            .map(|_| i64::try_from(history_actual.as_secs()).unwrap_or(i64::MAX)),
        // Kept as it was while some journal is not reported (e.g. after a restart).
        journal_bytes: journals
            .bytes
            .map_or(v.journal_bytes, |b| i64::try_from(b).unwrap_or(i64::MAX)),
        newest_recoverable_at: newest,
    };
    let stored = StatusUpdate {
        status: crate::model::status::VpgStatus::parse(&v.status).unwrap_or(status),
        sub_status: crate::model::status::VpgSubStatus::parse(&v.sub_status).unwrap_or(sub_status),
        rpo_actual_ms: v.rpo_actual_ms,
        history_actual_secs: v.history_actual_secs,
        journal_bytes: v.journal_bytes,
        newest_recoverable_at: v.newest_recoverable_at,
    };
    cp.metrics.set_vpg(&VpgSample {
        id: &v.id,
        name: &v.name,
        rpo: rpo_actual,
        history: history_actual,
        journal_bytes: update.journal_bytes,
        status: status.as_str(),
        sub_status: sub_status.as_str(),
        recoverable_checkpoints: v.checkpoints.recoverable,
    });
    state.rpo_samples.push(RpoSample {
        vpg_id: v.id.clone(),
        at: now.timestamp(),
        rpo_ms: update.rpo_actual_ms,
        history_secs: update.history_actual_secs,
        status,
    });
    if update != stored || v.status != status.as_str() || v.sub_status != sub_status.as_str() {
        cp.store.write_status(&v.id, &update).await?;
    }
    if (
        update.rpo_actual_ms,
        update.history_actual_secs,
        update.journal_bytes,
    ) != (
        stored.rpo_actual_ms,
        stored.history_actual_secs,
        stored.journal_bytes,
    ) {
        state.samples.push(crate::proto::live::VpgSample {
            id: v.id.clone(),
            at: now,
            rpo_actual_secs: rpo_actual.map(|d| d.as_secs_f64()),
            history_actual_secs: update
                .history_actual_secs
                .map(|s| u64::try_from(s).unwrap_or(0)),
            journal_bytes: u64::try_from(update.journal_bytes).unwrap_or(0),
        });
    }
    Ok(())
}
