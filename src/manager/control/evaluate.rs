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
//! - the pass's writes (checkpoints found recoverable, status columns that changed) go
//!   in one transaction per chunk at the end of the pass, not one per VPG.
//!
//! Cost per pass at 1,000 VPGs (the busiest loop of the manager): one read of the
//! `vpgs` table and one primary-key range read of the newest checkpoint rows. Members
//! are re-read when the configuration generation moves (or every [`MEMBERS_MAX_AGE`]);
//! each VPG's checkpoint summary (pending rows, recoverable span and count) is kept in
//! memory, updated from what the pass itself marks or thins, and re-read from the
//! database for a slice of the VPGs every second ([`REFRESH_CYCLE`]) so that anything
//! written behind the evaluator's back is picked up. Passes poked by heartbeats are at
//! least as far apart as the last pass took, so the evaluator stays under half a core.
//! - `model::status::derive_status` gives status and sub-status, cached on the row with
//!   RPO, history and journal size, and an event when the status changes.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::recovery::DiskKey;
use super::{ControlPlane, HostLive};
use crate::manager::metrics::VpgSample;
use crate::manager::store::rpo_history::RpoRecorder;
use crate::manager::store::{
    Actor, CheckpointSummary, ListedVpg, LiveMember, LiveVpg, RecoverableMark, StatusUpdate, Store,
    StoreError, VpgFingerprint,
};
use crate::model::rpo_history::Sample as RpoSample;
use crate::model::status::{
    derive_status, derive_vm_state, vpg_sync, DiskSyncFact, Lifecycle, SyncKind, VmFacts,
    VmReplicationState, VpgFacts,
};
use crate::model::sync::SyncReason;
use crate::proto::agent::{ProtectedDiskStatus, ReplicationMode, SyncPhase};
use crate::proto::api::{Page, PageQuery, Vpg, VpgQuery};

/// Evaluation period when nothing pokes.
const EVERY: Duration = Duration::from_secs(1);
/// Heartbeats of many agents poke often; passes are at least this far apart (and at
/// least as far apart as the last pass took).
const MIN_SPACING: Duration = Duration::from_millis(100);
/// VPGs evaluated between two yields to the runtime.
const YIELD_EVERY: usize = 64;
/// Members are re-read at least this often even when the configuration generation did
/// not move (as the round scheduler's plans).
const MEMBERS_MAX_AGE: Duration = Duration::from_secs(10);
/// Every VPG's checkpoint summary is re-read from the database within this long.
const REFRESH_CYCLE: Duration = Duration::from_secs(120);
/// The pending-row scan starts this far (in round ids: microseconds) below the newest
/// id it saw, for rows of rounds that started earlier but were stored later.
const PENDING_LAG_IDS: u64 = 5_000_000;

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
        let started = Instant::now();
        if let Err(e) = evaluate_all(&cp, &mut state).await {
            tracing::warn!(error = %e, "VPG evaluation failed");
        }
        let spacing = MIN_SPACING.max(started.elapsed()).min(EVERY);
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(EVERY) => {}
            _ = &mut notified => tokio::time::sleep(spacing).await,
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

/// `GET /api/v1/vpgs` from memory: the list as the evaluator's last pass left the
/// database. A page is served from it only while it is provably current: the
/// configuration generation has not moved (every REST change moves it before it
/// answers), the `vpgs` table's fingerprint (rows, newest `updated_at`, sum of versions:
/// everything but the evaluator's own status columns) is what the pass read, and the
/// pass is at most [`LIST_MAX_AGE`] old. Otherwise the caller reads the database.
#[derive(Default)]
pub struct VpgList(Mutex<Option<Arc<ListSnapshot>>>);

/// The longest a list snapshot is served after the pass that made it.
const LIST_MAX_AGE: Duration = Duration::from_secs(2);

pub struct ListSnapshot {
    generation: u64,
    fingerprint: VpgFingerprint,
    made: Instant,
    /// In id order.
    items: Vec<ListedVpg>,
}

impl VpgList {
    fn publish(&self, generation: u64, fingerprint: VpgFingerprint, items: Vec<ListedVpg>) {
        let snap = ListSnapshot {
            generation,
            fingerprint,
            made: Instant::now(),
            items,
        };
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(snap));
    }

    fn clear(&self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// A page as `Store::list_vpgs` would give it, or None when the snapshot may be
    /// stale (see the type's docs).
    pub async fn page(
        &self,
        store: &Store,
        generation: u64,
        q: &VpgQuery,
        p: &PageQuery,
    ) -> Result<Option<Page<Vpg>>, StoreError> {
        let limit = crate::manager::store::page_limit(p.limit)?;
        let snap = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(snap) = snap else {
            return Ok(None);
        };
        if snap.generation != generation || snap.made.elapsed() > LIST_MAX_AGE {
            return Ok(None);
        }
        if store.vpg_fingerprint().await? != snap.fingerprint {
            return Ok(None);
        }
        let start = match &p.cursor {
            Some(c) => snap
                .items
                .partition_point(|l| l.vpg.id.as_str() <= c.as_str()),
            None => 0,
        };
        let now = Utc::now();
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let mut items = Vec::new();
        let mut more = false;
        for l in &snap.items[start..] {
            let v = &l.vpg;
            if q.status.is_some_and(|s| v.status != s)
                || q.site.as_deref().is_some_and(|site| {
                    v.protected_site_id.as_deref() != Some(site) && v.recovery_site_id != site
                })
                || q.name.as_deref().is_some_and(|n| v.name != n)
            {
                continue;
            }
            if items.len() >= limit {
                more = true;
                break;
            }
            items.push(l.at(now));
        }
        let next_cursor = if more {
            items.last().map(|v: &Vpg| v.id.clone())
        } else {
            None
        };
        Ok(Some(Page { items, next_cursor }))
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
    /// Rewrites that change a status or sub-status (each with its event): written
    /// first, in a transaction of their own, so the live stream carries them without
    /// waiting for the chunks of RPO and history figures.
    status_changes: Vec<(String, StatusUpdate)>,
    /// The RPO history writer (`store::rpo_history`), fed once per pass.
    rpo: Option<RpoRecorder>,
    /// This pass's RPO history samples, one per VPG.
    rpo_samples: Vec<RpoSample>,
    /// Checkpoints this pass found recoverable, written with the status columns.
    marks: Vec<RecoverableMark>,
    /// Members of every VPG as last read, with the generation and time of the read.
    members: HashMap<String, Vec<LiveMember>>,
    members_read: Option<(u64, Instant)>,
    /// Checkpoint summaries kept in memory.
    checkpoints: Checkpoints,
    /// Each VPG's write throughput and IOPS as last published.
    throughput: HashMap<String, (f64, f64)>,
}

/// Every VPG's checkpoint summary, kept between passes (see the module docs).
#[derive(Default)]
struct Checkpoints {
    by_vpg: HashMap<String, CheckpointSummary>,
    /// The highest id the pending-row scan returned.
    seen_max: u64,
    /// Where the rolling re-read continues (an index into the pass's VPGs), and when
    /// it last ran.
    refresh_next: usize,
    refreshed_at: Option<Instant>,
}

impl Checkpoints {
    /// Brings the summaries up to date for the VPGs of this pass (`ids`, in id order).
    async fn update(&mut self, cp: &ControlPlane, ids: &[String]) -> Result<(), StoreError> {
        let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
        self.by_vpg.retain(|id, _| wanted.contains(id.as_str()));
        let mut load: Vec<String> = ids
            .iter()
            .filter(|id| !self.by_vpg.contains_key(*id))
            .cloned()
            .collect();
        if self
            .refreshed_at
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.refreshed_at = Some(Instant::now());
            let n = ids
                .len()
                .div_ceil(REFRESH_CYCLE.as_secs().max(1) as usize)
                .min(ids.len());
            for k in 0..n {
                load.push(ids[(self.refresh_next + k) % ids.len()].clone());
            }
            self.refresh_next = (self.refresh_next + n) % ids.len().max(1);
        }
        if !load.is_empty() {
            load.sort();
            load.dedup();
            let mut loaded = cp.store.checkpoint_summaries(&load).await?;
            for id in load {
                let s = loaded.remove(&id).unwrap_or_default();
                self.by_vpg.insert(id, s);
            }
        }
        let above = self.seen_max.saturating_sub(PENDING_LAG_IDS);
        for (vpg, id, at) in cp.store.pending_checkpoints_above(above).await? {
            self.seen_max = self.seen_max.max(id);
            if let Some(s) = self.by_vpg.get_mut(&vpg) {
                if let Err(pos) = s.pending.binary_search(&id) {
                    s.pending.insert(pos, id);
                    s.pending_at.insert(pos, at);
                }
            }
        }
        Ok(())
    }
}

/// Moves checkpoints `ids` of a summary from pending into the recoverable span.
fn mark_in_memory(s: &mut CheckpointSummary, ids: &[u64]) {
    for id in ids {
        let Ok(pos) = s.pending.binary_search(id) else {
            continue;
        };
        s.pending.remove(pos);
        if pos < s.pending_at.len() {
            let at = s.pending_at.remove(pos);
            s.newest_recoverable = Some(s.newest_recoverable.map_or(at, |n| n.max(at)));
            s.oldest_recoverable = Some(s.oldest_recoverable.map_or(at, |o| o.min(at)));
        }
        s.recoverable += 1;
    }
}

/// VPGs per status transaction: one commit for many, but no write lock held for long.
const STATUS_CHUNK: usize = 250;

async fn evaluate_all(cp: &ControlPlane, state: &mut EvalState) -> Result<(), StoreError> {
    // Read before the configuration, so a change during the read is seen next pass.
    let generation = cp.config_generation();
    let (heads, fingerprint) = cp.store.live_vpg_heads_listed().await?;
    let (mut vpgs, mut listed): (Vec<LiveVpg>, Vec<ListedVpg>) = heads.into_iter().unzip();
    let ids: Vec<String> = vpgs.iter().map(|v| v.id.clone()).collect();
    let members_stale = match state.members_read {
        Some((g, at)) => {
            g != generation
                || at.elapsed() >= MEMBERS_MAX_AGE
                || ids.iter().any(|id| !state.members.contains_key(id))
        }
        None => true,
    };
    if members_stale {
        let mut members = cp.store.live_members(&ids).await?;
        for id in &ids {
            members.entry(id.clone()).or_default();
        }
        state.members = members;
        state.members_read = Some((generation, Instant::now()));
    }
    for v in &mut vpgs {
        v.members = state.members.get(&v.id).cloned().unwrap_or_default();
    }
    if let Err(e) = state.checkpoints.update(cp, &ids).await {
        // Re-read whole at the next pass.
        state.checkpoints = Checkpoints::default();
        return Err(e);
    }
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
    let id_set: HashSet<&str> = ids.iter().map(String::as_str).collect();
    state.thinned.retain(|id, _| id_set.contains(id.as_str()));
    state
        .throughput
        .retain(|id, _| id_set.contains(id.as_str()));
    cp.live.retain_samples(&id_set);
    let mut vm_states = HashMap::new();
    let mut observed = Vec::new();
    let index = index_reported(&live);
    for (n, v) in vpgs.into_iter().enumerate() {
        if n % YIELD_EVERY == YIELD_EVERY - 1 {
            // Mostly CPU now: let the API and the control channels run in between.
            tokio::task::yield_now().await;
        }
        let id = v.id.clone();
        if let Err(e) =
            evaluate_one(cp, state, v, &live, &index, &mut vm_states, &mut observed).await
        {
            tracing::warn!(vpg = %id, error = %e, "VPG evaluation failed");
        }
    }
    cp.vm_states.replace(vm_states);
    // Handed over before the writes below can fail, so a pass's samples never linger.
    let rpo_samples = std::mem::take(&mut state.rpo_samples);
    if let Some(rpo) = &state.rpo {
        rpo.record(rpo_samples);
    }
    let marks = std::mem::take(&mut state.marks);
    let changes = std::mem::take(&mut state.status_changes);
    let mut writes = std::mem::take(&mut state.status_writes);
    let mut written = cp.store.write_pass(&marks, &changes).await;
    for chunk in writes.chunks(STATUS_CHUNK) {
        if written.is_err() {
            break;
        }
        written = cp.store.write_pass(&[], chunk).await;
    }
    if let Err(e) = written {
        // The summaries moved what was not stored: read them again.
        state.checkpoints = Checkpoints::default();
        cp.vpg_list.clear();
        return Err(e);
    }
    // The list as the database holds it now: the rows read at the start of the pass
    // with this pass's status writes (anything else written meanwhile moves the
    // fingerprint or the generation, and the API reads the database instead).
    writes.extend(changes);
    let updates: HashMap<&str, &StatusUpdate> =
        writes.iter().map(|(id, u)| (id.as_str(), u)).collect();
    for l in &mut listed {
        l.vpg.vm_count = state
            .members
            .get(&l.vpg.id)
            .map_or(0, |m| u32::try_from(m.len()).unwrap_or(u32::MAX));
        if let Some(u) = updates.get(l.vpg.id.as_str()) {
            l.apply(u);
        }
    }
    cp.vpg_list.publish(generation, fingerprint, listed);
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

/// Every protected disk the hosts report, by (host, agent disk id, group): built once
/// a pass so each VPG finds its disks without scanning its hosts' whole reports.
type Reported<'a> = HashMap<(&'a str, u64, &'a str), &'a ProtectedDiskStatus>;

fn index_reported(live: &HashMap<String, HostLive>) -> Reported<'_> {
    let mut out = HashMap::new();
    for (host, l) in live {
        let Some(hb) = l.heartbeat.as_ref() else {
            continue;
        };
        for p in &hb.status.protected {
            // The first report of a disk in a group wins, as a scan would find it.
            out.entry((host.as_str(), p.disk_id, p.group.as_str()))
                .or_insert(p);
        }
    }
    out
}

/// The protected disk as the member's host reports it in this VPG's group.
fn reported<'a>(
    index: &Reported<'a>,
    vpg_id: &str,
    key: &Option<DiskKey>,
) -> Option<&'a ProtectedDiskStatus> {
    let (host, disk) = key.as_ref()?;
    index.get(&(host.as_str(), *disk, vpg_id)).copied()
}

fn since(now: DateTime<Utc>, t: Option<DateTime<Utc>>) -> Option<Duration> {
    t.map(|t| (now - t).to_std().unwrap_or(Duration::ZERO))
}

async fn evaluate_one(
    cp: &ControlPlane,
    state: &mut EvalState,
    mut v: LiveVpg,
    live: &HashMap<String, HostLive>,
    index: &Reported<'_>,
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
        && keys.iter().all(|k| reported(index, &v.id, k).is_some())
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
        let summary = state.checkpoints.by_vpg.entry(v.id.clone()).or_default();
        let verdict = cp.recovery.judge(&summary.pending, &keys);
        if !verdict.newly_recoverable.is_empty() {
            // Stored with the pass's other writes; as `Store::mark_recoverable` does,
            // the first recoverable checkpoint starts the protection and history ages.
            mark_in_memory(summary, &verdict.newly_recoverable);
            let t = Utc::now();
            v.protected_since.get_or_insert(t);
            v.history_since.get_or_insert(t);
            state.marks.push(RecoverableMark {
                vpg_id: v.id.clone(),
                ids: verdict.newly_recoverable.clone(),
            });
        }
        if let Some(floor) = verdict.delete_below {
            if state.thinned.get(&v.id).is_none_or(|&f| f < floor) {
                // This VPG's marks first: the summary is read back after thinning.
                if let Some(i) = state.marks.iter().position(|m| m.vpg_id == v.id) {
                    let m = state.marks.swap_remove(i);
                    cp.store.mark_recoverable(&v.id, &m.ids).await?;
                }
                let n = cp.store.thin_checkpoints(&v.id, floor).await?;
                if n > 0 {
                    tracing::debug!(vpg = %v.id, floor, deleted = n, "checkpoints thinned");
                    if let Some((summary, protected_since, history_since)) =
                        cp.store.checkpoint_summary(&v.id).await?
                    {
                        state.checkpoints.by_vpg.insert(v.id.clone(), summary);
                        v.protected_since = protected_since;
                        v.history_since = history_since;
                    }
                }
                state.thinned.insert(v.id.clone(), floor);
            }
        }
    }
    if let Some(s) = state.checkpoints.by_vpg.get(&v.id) {
        v.checkpoints = s.clone();
    }

    let now = Utc::now();
    let disks: Vec<Option<&ProtectedDiskStatus>> =
        keys.iter().map(|k| reported(index, &v.id, k)).collect();
    let throughput = disks.iter().flatten().fold((0.0, 0.0), |(b, w), p| {
        (b + p.writes.bytes_per_sec(), w + p.writes.writes_per_sec())
    });
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
                        reported(index, &v.id, &key)
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
            keys.iter().map(|k| reported(index, &v.id, k)).collect();
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
            prepared_for_move: v.operation.is_some_and(|p| p.protected_vms_locked()),
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
    if v.status != status.as_str() || v.sub_status != sub_status.as_str() {
        state.status_changes.push((v.id.clone(), update.clone()));
    } else if update != stored {
        state.status_writes.push((v.id.clone(), update.clone()));
    }
    let last_throughput = state
        .throughput
        .insert(v.id.clone(), throughput)
        .unwrap_or((0.0, 0.0));
    if (
        update.rpo_actual_ms,
        update.history_actual_secs,
        update.journal_bytes,
    ) != (
        stored.rpo_actual_ms,
        stored.history_actual_secs,
        stored.journal_bytes,
    ) || throughput != last_throughput
    {
        state.samples.push(crate::proto::live::VpgSample {
            id: v.id.clone(),
            at: now,
            rpo_actual_secs: rpo_actual.map(|d| d.as_secs_f64()),
            history_actual_secs: update
                .history_actual_secs
                .map(|s| u64::try_from(s).unwrap_or(0)),
            journal_bytes: u64::try_from(update.journal_bytes).unwrap_or(0),
            throughput_bytes_per_sec: throughput.0,
            iops: throughput.1,
        });
    }
    Ok(())
}
