//! What the control plane's round scheduler and evaluator read and write: each VPG's
//! members with their hosts and agent disk ids, the checkpoint rows of completed rounds,
//! their recoverability and thinning, the cached status and the VPG's lifecycle.
//!
//! Checkpoint rows are records the rounds produce every few seconds, like metrics: a
//! scheduled one writes no audit event (the events table would be mostly checkpoints),
//! while a tagged one an operator asked for does, and so does every status or lifecycle
//! change.

use super::entity::{checkpoint, disk, host, member, vm, vpg};
use super::vpgs::{lifecycle_of, member_settings};
use super::{now, u64_of, Actor, NewEvent, Store, StoreError};
use crate::model::membership::member_needs_configuration;
use crate::model::settings::VpgSettings;
use crate::model::status::{Lifecycle, VpgStatus, VpgSubStatus};
use crate::proto::api::Checkpoint;
use crate::proto::control::{CheckpointKind, QuiesceMethod};
use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseTransaction, DbErr, EntityTrait,
    QueryFilter, QueryOrder, QuerySelect, Set, Statement, TransactionTrait,
};
use std::collections::HashMap;

/// A member VM as the control plane needs it.
#[derive(Debug, Clone)]
pub struct LiveMember {
    pub vm_id: String,
    pub vm_name: String,
    /// Name of the host the VM runs on (its protected host).
    pub host: Option<String>,
    /// Name of the member's recovery host, if set.
    pub recovery_host: Option<String>,
    /// Hosts of this member (protected, recovery) that never had an agent: nothing runs
    /// there that a deletion would have to wait for.
    pub never_enrolled: Vec<String>,
    /// The agent disk id of each of the VM's disks (`None`: not reported by an agent).
    pub devices: Vec<Option<u64>>,
    pub needs_configuration: bool,
}

/// The stored checkpoints of a VPG, summarised.
#[derive(Debug, Clone, Default)]
pub struct CheckpointSummary {
    /// Ids of rows not (yet) recoverable, ascending.
    pub pending: Vec<u64>,
    /// `taken_at` of each of `pending`, in the same order (the evaluator keeps the
    /// summary in memory and moves a row's time into the span when it becomes
    /// recoverable).
    pub pending_at: Vec<DateTime<Utc>>,
    pub newest_recoverable: Option<DateTime<Utc>>,
    pub oldest_recoverable: Option<DateTime<Utc>>,
    /// How many rows are recoverable.
    pub recoverable: u64,
}

/// One VPG as the control plane sees it.
#[derive(Debug, Clone)]
pub struct LiveVpg {
    pub id: String,
    pub name: String,
    pub lifecycle: Lifecycle,
    pub paused: bool,
    pub settings: VpgSettings,
    pub status: String,
    pub sub_status: String,
    pub rpo_actual_ms: Option<i64>,
    pub history_actual_secs: Option<i64>,
    pub journal_bytes: i64,
    pub protected_since: Option<DateTime<Utc>>,
    /// Start of the history the VPG can have with its current members.
    pub history_since: Option<DateTime<Utc>>,
    pub newest_recoverable_at: Option<DateTime<Utc>>,
    /// The phase of the recovery operation running on the VPG, if any.
    pub operation: Option<crate::model::status::OperationPhase>,
    pub members: Vec<LiveMember>,
    /// Filled only when asked for.
    pub checkpoints: CheckpointSummary,
}

/// The cached status columns the evaluator writes.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusUpdate {
    pub status: VpgStatus,
    pub sub_status: VpgSubStatus,
    pub rpo_actual_ms: Option<i64>,
    pub history_actual_secs: Option<i64>,
    pub journal_bytes: i64,
    pub newest_recoverable_at: Option<DateTime<Utc>>,
}

/// A VPG as `GET /api/v1/vpgs` lists it, with what its RPO is computed from at read
/// time.
#[derive(Debug, Clone)]
pub struct ListedVpg {
    pub vpg: crate::proto::api::Vpg,
    pub newest_recoverable_at: Option<DateTime<Utc>>,
    pub rpo_actual_ms: Option<i64>,
}

impl ListedVpg {
    /// The item as a read at `now` shows it (the RPO is exact at every read).
    pub fn at(&self, now: DateTime<Utc>) -> crate::proto::api::Vpg {
        let mut v = self.vpg.clone();
        v.rpo_actual_secs =
            super::vpgs::rpo_secs(self.newest_recoverable_at, self.rpo_actual_ms, now);
        v
    }

    /// The evaluator's status columns, as the row now holds them.
    pub fn apply(&mut self, u: &StatusUpdate) {
        self.vpg.status = u.status;
        self.vpg.sub_status = u.sub_status;
        self.vpg.history_actual_secs = u.history_actual_secs.map(u64_of);
        self.vpg.journal_bytes = u64_of(u.journal_bytes);
        self.newest_recoverable_at = u.newest_recoverable_at;
        self.rpo_actual_ms = u.rpo_actual_ms;
    }
}

/// See [`Store::vpg_fingerprint`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VpgFingerprint {
    pub count: i64,
    pub max_updated_at: Option<DateTime<Utc>>,
    pub version_sum: i64,
}

/// Checkpoints of one VPG an evaluator pass found recoverable.
#[derive(Debug, Clone)]
pub struct RecoverableMark {
    pub vpg_id: String,
    pub ids: Vec<u64>,
}

/// A completed round, to be stored.
#[derive(Debug, Clone)]
pub struct NewCheckpoint {
    pub id: u64,
    pub vpg_id: String,
    pub taken_at: DateTime<Utc>,
    pub kind: CheckpointKind,
    pub tag: Option<String>,
    /// How the round's guests were quiesced; None when it did not quiesce.
    pub quiesce: Option<QuiesceMethod>,
}

/// One end of a VPG's recoverable span.
type Span = Option<DateTime<Utc>>;

pub(crate) fn lifecycle_str(l: Lifecycle) -> &'static str {
    match l {
        Lifecycle::Creating => "creating",
        Lifecycle::Protecting => "protecting",
        Lifecycle::Deleting => "deleting",
        Lifecycle::WaitingRemoval => "waiting_removal",
        Lifecycle::Recovered => "recovered",
    }
}

/// Ids per `IN (…)` list: SQLite caps bound parameters.
const IN_CHUNK: usize = 500;

fn i64_id(id: u64) -> i64 {
    // Round ids are microseconds since the epoch: far below i64::MAX until the year
    // 294,000; saturate rather than wrap should anything else feed one in.
    i64::try_from(id).unwrap_or(i64::MAX)
}

impl Store {
    /// The largest checkpoint id ever stored (round ids continue above it).
    pub async fn max_checkpoint_id(&self) -> Result<u64, StoreError> {
        let max: Option<Option<i64>> = checkpoint::Entity::find()
            .select_only()
            .column_as(checkpoint::Column::Id.max(), "m")
            .into_tuple()
            .one(&self.db)
            .await?;
        Ok(max.flatten().map(u64_of).unwrap_or(0))
    }

    /// Every VPG (or one) with its members; with the checkpoint summary when asked.
    pub async fn live_vpgs(
        &self,
        only: Option<&str>,
        with_checkpoints: bool,
    ) -> Result<Vec<LiveVpg>, StoreError> {
        let mut vpgs = self.live_vpg_heads(only).await?;
        if vpgs.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = vpgs.iter().map(|v| v.id.clone()).collect();
        let mut by_vpg = self.live_members(&ids).await?;
        let mut summaries = if with_checkpoints {
            self.checkpoint_summaries(&ids).await?
        } else {
            HashMap::new()
        };
        for v in &mut vpgs {
            v.members = by_vpg.remove(&v.id).unwrap_or_default();
            v.checkpoints = summaries.remove(&v.id).unwrap_or_default();
        }
        Ok(vpgs)
    }

    /// Every VPG (or one) as [`Store::live_vpgs`] gives it, without members and
    /// checkpoint summary: one read of the `vpgs` table (the evaluator reads this every
    /// pass and keeps members and checkpoints itself).
    pub async fn live_vpg_heads(&self, only: Option<&str>) -> Result<Vec<LiveVpg>, StoreError> {
        Ok(self
            .vpg_heads(only)
            .await?
            .into_iter()
            .map(|(v, _)| v)
            .collect())
    }

    /// [`Store::live_vpg_heads`] of every VPG, each with its list item as
    /// `GET /api/v1/vpgs` shows it (member count 0: the caller knows the members) and
    /// the [`VpgFingerprint`] of what was read.
    pub async fn live_vpg_heads_listed(
        &self,
    ) -> Result<(Vec<(LiveVpg, ListedVpg)>, VpgFingerprint), StoreError> {
        let rows = self.vpg_heads(None).await?;
        let mut fp = VpgFingerprint {
            count: i64::try_from(rows.len()).unwrap_or(i64::MAX),
            ..VpgFingerprint::default()
        };
        for (_, l) in &rows {
            fp.max_updated_at = fp.max_updated_at.max(Some(l.vpg.updated_at));
            fp.version_sum = fp
                .version_sum
                .saturating_add(i64::try_from(l.vpg.version).unwrap_or(i64::MAX));
        }
        Ok((rows, fp))
    }

    async fn vpg_heads(&self, only: Option<&str>) -> Result<Vec<(LiveVpg, ListedVpg)>, StoreError> {
        let mut sel = vpg::Entity::find().order_by_asc(vpg::Column::Id);
        if let Some(id) = only {
            sel = sel.filter(vpg::Column::Id.eq(id));
        }
        let vpgs = sel.all(&self.db).await?;
        Ok(vpgs
            .into_iter()
            .map(|v| {
                let live = LiveVpg {
                    members: Vec::new(),
                    checkpoints: CheckpointSummary::default(),
                    lifecycle: lifecycle_of(&v.lifecycle),
                    settings: serde_json::from_value(v.settings.clone()).unwrap_or_default(),
                    operation: v
                        .operation_phase
                        .as_deref()
                        .and_then(crate::model::status::OperationPhase::parse),
                    id: v.id.clone(),
                    name: v.name.clone(),
                    paused: v.paused,
                    status: v.status.clone(),
                    sub_status: v.sub_status.clone(),
                    rpo_actual_ms: v.rpo_actual_ms,
                    history_actual_secs: v.history_actual_secs,
                    journal_bytes: v.journal_bytes,
                    protected_since: v.protected_since,
                    history_since: v.history_since,
                    newest_recoverable_at: v.newest_recoverable_at,
                };
                let newest_recoverable_at = v.newest_recoverable_at;
                let rpo_actual_ms = v.rpo_actual_ms;
                let listed = ListedVpg {
                    vpg: super::vpgs::to_vpg(v, 0, None),
                    newest_recoverable_at,
                    rpo_actual_ms,
                };
                (live, listed)
            })
            .collect())
    }

    /// What changes in the `vpgs` table whenever anything but the evaluator's status
    /// columns change: rows, the newest `updated_at`, the sum of versions (every
    /// definition change bumps the version, every other write `updated_at`).
    pub async fn vpg_fingerprint(&self) -> Result<VpgFingerprint, StoreError> {
        let backend = self.backend();
        let row = self
            .db
            .query_one(Statement::from_string(
                backend,
                "SELECT COUNT(*) AS n, MAX(updated_at) AS m, \
                 CAST(COALESCE(SUM(version), 0) AS BIGINT) AS v FROM vpgs",
            ))
            .await?;
        let Some(row) = row else {
            return Ok(VpgFingerprint::default());
        };
        Ok(VpgFingerprint {
            count: row.try_get("", "n")?,
            max_updated_at: row.try_get("", "m")?,
            version_sum: row.try_get("", "v")?,
        })
    }

    /// The members of these VPGs, by VPG id, as [`Store::live_vpgs`] gives them.
    pub async fn live_members(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, Vec<LiveMember>>, StoreError> {
        let mut members = Vec::new();
        for chunk in ids.chunks(IN_CHUNK) {
            members.extend(
                member::Entity::find()
                    .filter(member::Column::VpgId.is_in(chunk.iter().cloned()))
                    .order_by_asc(member::Column::BootGroup)
                    .order_by_asc(member::Column::Id)
                    .all(&self.db)
                    .await?,
            );
        }
        let vm_ids: Vec<String> = members.iter().map(|m| m.vm_id.clone()).collect();
        let mut vms: HashMap<String, (String, String)> = HashMap::new();
        let mut devices: HashMap<String, Vec<Option<u64>>> = HashMap::new();
        for chunk in vm_ids.chunks(IN_CHUNK) {
            vms.extend(
                vm::Entity::find()
                    .filter(vm::Column::Id.is_in(chunk.iter().cloned()))
                    .select_only()
                    .column(vm::Column::Id)
                    .column(vm::Column::Name)
                    .column(vm::Column::HostId)
                    .into_tuple::<(String, String, String)>()
                    .all(&self.db)
                    .await?
                    .into_iter()
                    .map(|(id, name, host)| (id, (name, host))),
            );
            let mut rows: Vec<(String, String, Option<i64>)> = disk::Entity::find()
                .filter(disk::Column::VmId.is_in(chunk.iter().cloned()))
                .select_only()
                .column(disk::Column::VmId)
                .column(disk::Column::Id)
                .column(disk::Column::DeviceId)
                .into_tuple()
                .all(&self.db)
                .await?;
            rows.sort_by(|a, b| a.1.cmp(&b.1));
            for (vm_id, _, dev) in rows {
                devices.entry(vm_id).or_default().push(dev.map(u64_of));
            }
        }
        let mut host_ids: Vec<String> = vms.values().map(|(_, h)| h.clone()).collect();
        host_ids.extend(members.iter().filter_map(|m| m.recovery_host_id.clone()));
        host_ids.sort();
        host_ids.dedup();
        let mut hosts: HashMap<String, (String, bool)> = HashMap::new();
        for chunk in host_ids.chunks(IN_CHUNK) {
            hosts.extend(
                host::Entity::find()
                    .filter(host::Column::Id.is_in(chunk.iter().cloned()))
                    .all(&self.db)
                    .await?
                    .into_iter()
                    .map(|h| {
                        let enrolled = h.enrolled_at.is_some() || h.last_seen_at.is_some();
                        (h.id, (h.name, enrolled))
                    }),
            );
        }
        let host_name = |id: &str| hosts.get(id).map(|(n, _)| n.clone());
        let mut by_vpg: HashMap<String, Vec<LiveMember>> = HashMap::new();
        for m in &members {
            let vm = vms.get(&m.vm_id);
            let settings = member_settings(m);
            let never_enrolled = vm
                .map(|(_, h)| h.as_str())
                .into_iter()
                .chain(m.recovery_host_id.as_deref())
                .filter_map(|h| hosts.get(h))
                .filter(|(_, enrolled)| !enrolled)
                .map(|(n, _)| n.clone())
                .collect();
            by_vpg
                .entry(m.vpg_id.clone())
                .or_default()
                .push(LiveMember {
                    vm_id: m.vm_id.clone(),
                    vm_name: vm.map(|(n, _)| n.clone()).unwrap_or_default(),
                    host: vm.and_then(|(_, h)| host_name(h)),
                    recovery_host: m.recovery_host_id.as_deref().and_then(host_name),
                    never_enrolled,
                    devices: devices.get(&m.vm_id).cloned().unwrap_or_default(),
                    needs_configuration: member_needs_configuration(&settings),
                });
        }
        Ok(by_vpg)
    }

    /// The checkpoint summaries of these VPGs, in two grouped reads over their rows.
    pub async fn checkpoint_summaries(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, CheckpointSummary>, StoreError> {
        let mut summaries: HashMap<String, CheckpointSummary> = HashMap::new();
        for chunk in ids.chunks(IN_CHUNK) {
            let pending: Vec<(String, i64, DateTime<Utc>)> = pending_rows()
                .filter(checkpoint::Column::VpgId.is_in(chunk.iter().cloned()))
                .into_tuple()
                .all(&self.db)
                .await?;
            for (v, id, at) in pending {
                let s = summaries.entry(v).or_default();
                s.pending.push(u64_of(id));
                s.pending_at.push(at);
            }
            let spans: Vec<(String, Span, Span, i64)> = checkpoint::Entity::find()
                .filter(checkpoint::Column::VpgId.is_in(chunk.iter().cloned()))
                .filter(checkpoint::Column::Recoverable.eq(true))
                .select_only()
                .column(checkpoint::Column::VpgId)
                .column_as(checkpoint::Column::TakenAt.min(), "oldest")
                .column_as(checkpoint::Column::TakenAt.max(), "newest")
                .column_as(checkpoint::Column::Id.count(), "n")
                .group_by(checkpoint::Column::VpgId)
                .into_tuple()
                .all(&self.db)
                .await?;
            for (v, oldest, newest, n) in spans {
                let s = summaries.entry(v).or_default();
                s.recoverable = u64::try_from(n).unwrap_or(0);
                s.oldest_recoverable = oldest;
                s.newest_recoverable = newest;
            }
        }
        Ok(summaries)
    }

    /// Checkpoint rows not recoverable with an id above `above`, in id order, through
    /// the primary key (the evaluator's per-pass look for new rows): (VPG, id, taken).
    pub async fn pending_checkpoints_above(
        &self,
        above: u64,
    ) -> Result<Vec<(String, u64, DateTime<Utc>)>, StoreError> {
        let rows: Vec<(String, i64, DateTime<Utc>)> = pending_rows()
            .filter(checkpoint::Column::Id.gt(i64_id(above)))
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(v, id, at)| (v, u64_of(id), at))
            .collect())
    }

    /// One VPG's checkpoint summary and protection ages, as [`Store::live_vpgs`] gives
    /// them, in three indexed reads (the evaluator re-reads this after marking or
    /// thinning, every pass for every protecting VPG).
    pub async fn checkpoint_summary(
        &self,
        vpg_id: &str,
    ) -> Result<
        Option<(
            CheckpointSummary,
            Option<DateTime<Utc>>,
            Option<DateTime<Utc>>,
        )>,
        StoreError,
    > {
        let Some(v) = vpg::Entity::find_by_id(vpg_id).one(&self.db).await? else {
            return Ok(None);
        };
        let pending: Vec<(i64, DateTime<Utc>)> = checkpoint::Entity::find()
            .filter(checkpoint::Column::VpgId.eq(vpg_id))
            .filter(checkpoint::Column::Recoverable.eq(false))
            .select_only()
            .column(checkpoint::Column::Id)
            .column(checkpoint::Column::TakenAt)
            .order_by_asc(checkpoint::Column::Id)
            .into_tuple()
            .all(&self.db)
            .await?;
        let span: Option<(Span, Span, i64)> = checkpoint::Entity::find()
            .filter(checkpoint::Column::VpgId.eq(vpg_id))
            .filter(checkpoint::Column::Recoverable.eq(true))
            .select_only()
            .column_as(checkpoint::Column::TakenAt.min(), "oldest")
            .column_as(checkpoint::Column::TakenAt.max(), "newest")
            .column_as(checkpoint::Column::Id.count(), "n")
            .into_tuple()
            .one(&self.db)
            .await?;
        let mut summary = CheckpointSummary {
            pending: pending.iter().map(|(id, _)| u64_of(*id)).collect(),
            pending_at: pending.into_iter().map(|(_, at)| at).collect(),
            ..CheckpointSummary::default()
        };
        if let Some((oldest, newest, n)) = span {
            summary.recoverable = u64::try_from(n).unwrap_or(0);
            summary.oldest_recoverable = oldest;
            summary.newest_recoverable = newest;
        }
        Ok(Some((summary, v.protected_since, v.history_since)))
    }

    /// One VPG as [`Store::live_vpgs`] gives it.
    pub async fn live_vpg(&self, id: &str) -> Result<LiveVpg, StoreError> {
        self.live_vpgs(Some(id), false)
            .await?
            .pop()
            .ok_or_else(|| StoreError::not_found("vpg", id))
    }

    /// Stores the checkpoint of a completed round (not recoverable yet). A tagged one an
    /// operator asked for is audited with its actor.
    pub async fn insert_checkpoint(
        &self,
        c: NewCheckpoint,
        actor: Option<&Actor>,
    ) -> Result<Checkpoint, StoreError> {
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let m = checkpoint::ActiveModel {
            id: Set(i64_id(c.id)),
            vpg_id: Set(c.vpg_id.clone()),
            taken_at: Set(c.taken_at),
            kind: Set(c.kind.as_str().to_string()),
            tag: Set(c.tag.clone()),
            recoverable: Set(false),
            quiesce: Set(c.quiesce.map(|q| q.as_str().to_string())),
        }
        .insert(&txn)
        .await?;
        if let Some(actor) = actor {
            let id = m.id.to_string();
            NewEvent::info(
                "checkpoint.created",
                "checkpoint",
                &id,
                match &c.tag {
                    Some(t) => format!("checkpoint `{t}` taken ({})", c.kind.as_str()),
                    None => format!("checkpoint taken ({})", c.kind.as_str()),
                },
            )
            .vpg(&c.vpg_id)
            .details(
                serde_json::json!({"id": m.id, "kind": c.kind.as_str(), "tag": c.tag,
                "quiesce": c.quiesce.map(QuiesceMethod::as_str)}),
            )
            .write(&txn, actor)
            .await?;
        }
        self.commit(txn).await?;
        Ok(super::records::to_checkpoint(m))
    }

    /// Marks checkpoints recoverable; the first one ever starts the VPG's protection age.
    pub async fn mark_recoverable(&self, vpg_id: &str, ids: &[u64]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        checkpoint::Entity::update_many()
            .col_expr(checkpoint::Column::Recoverable, Expr::value(true))
            .filter(checkpoint::Column::VpgId.eq(vpg_id))
            .filter(checkpoint::Column::Id.is_in(ids.iter().map(|&i| i64_id(i))))
            .exec(&txn)
            .await?;
        vpg::Entity::update_many()
            .col_expr(vpg::Column::HistorySince, Expr::value(now()))
            .filter(vpg::Column::Id.eq(vpg_id))
            .filter(vpg::Column::HistorySince.is_null())
            .exec(&txn)
            .await?;
        let first = vpg::Entity::update_many()
            .col_expr(vpg::Column::ProtectedSince, Expr::value(now()))
            .filter(vpg::Column::Id.eq(vpg_id))
            .filter(vpg::Column::ProtectedSince.is_null())
            .exec(&txn)
            .await?;
        if first.rows_affected > 0 {
            first_recoverable_event(&txn, vpg_id).await?;
        }
        self.commit(txn).await?;
        Ok(())
    }

    /// Deletes a VPG's checkpoints below `id` (no journal holds them any more). Returns
    /// how many went.
    pub async fn thin_checkpoints(&self, vpg_id: &str, below: u64) -> Result<u64, StoreError> {
        let _w = self.write_guard().await;
        let res = checkpoint::Entity::delete_many()
            .filter(checkpoint::Column::VpgId.eq(vpg_id))
            .filter(checkpoint::Column::Id.lt(i64_id(below)))
            .exec(&self.db)
            .await?;
        Ok(res.rows_affected)
    }

    /// Deletes the VPG's checkpoints tagged `tag` that are not recoverable — rows an
    /// operation replaced by a new checkpoint (a move's final checkpoint that did not
    /// become recoverable in time): no operation will use them, and listed they would
    /// only look like recovery points that failed. One event per row, in the same
    /// transaction. A row that became recoverable meanwhile stays. Returns the ids.
    pub async fn discard_unrecoverable_tagged(
        &self,
        vpg_id: &str,
        tag: &str,
        why: &str,
    ) -> Result<Vec<i64>, StoreError> {
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let ids: Vec<i64> = checkpoint::Entity::find()
            .filter(checkpoint::Column::VpgId.eq(vpg_id))
            .filter(checkpoint::Column::Tag.eq(tag))
            .filter(checkpoint::Column::Recoverable.eq(false))
            .select_only()
            .column(checkpoint::Column::Id)
            .into_tuple()
            .all(&txn)
            .await?;
        if ids.is_empty() {
            return Ok(ids);
        }
        checkpoint::Entity::delete_many()
            .filter(checkpoint::Column::Id.is_in(ids.iter().copied()))
            .filter(checkpoint::Column::Recoverable.eq(false))
            .exec(&txn)
            .await?;
        for id in &ids {
            NewEvent::info(
                "checkpoint.discarded",
                "checkpoint",
                &id.to_string(),
                format!("checkpoint `{tag}` {id} discarded: {why}"),
            )
            .vpg(vpg_id)
            .details(serde_json::json!({"id": id, "tag": tag, "reason": why}))
            .write(&txn, &Actor::system())
            .await?;
        }
        self.commit(txn).await?;
        Ok(ids)
    }

    /// Rewrites the cached status columns; a change of status or sub-status is an event
    /// in the same transaction. `seen` is the (status, sub-status) the caller derived
    /// from: if another writer changed them meanwhile the update still applies (the
    /// newest derivation wins) and the event names what was really there.
    pub async fn write_status(&self, vpg_id: &str, u: &StatusUpdate) -> Result<(), StoreError> {
        self.write_statuses(&[(vpg_id.to_string(), u.clone())])
            .await
    }

    /// [`Store::write_status`] for many VPGs in one transaction (the evaluator's pass:
    /// one commit instead of one per VPG).
    pub async fn write_statuses(
        &self,
        writes: &[(String, StatusUpdate)],
    ) -> Result<(), StoreError> {
        self.write_pass(&[], writes).await
    }

    /// What an evaluator pass writes, in one transaction: the checkpoints it found
    /// recoverable (as [`Store::mark_recoverable`] for each VPG) and the cached status
    /// columns that changed (as [`Store::write_status`]), with their events.
    pub async fn write_pass(
        &self,
        marks: &[RecoverableMark],
        writes: &[(String, StatusUpdate)],
    ) -> Result<(), StoreError> {
        let marks: Vec<&RecoverableMark> = marks.iter().filter(|m| !m.ids.is_empty()).collect();
        if marks.is_empty() && writes.is_empty() {
            return Ok(());
        }
        let w = self.write_guard().await;
        // SQLite: what the events name is read under the write lock but before the
        // transaction. A transaction that reads first and then writes fails with
        // SQLITE_BUSY_SNAPSHOT (517, "database is locked", busy_timeout does not help)
        // when another connection committed in between; the guard keeps the other
        // writers of these rows out meanwhile. PostgreSQL reads inside the transaction.
        let mut before = HashMap::new();
        if w.is_some() {
            for chunk in writes.chunks(IN_CHUNK) {
                before.extend(current_statuses(&self.db, chunk).await?);
            }
        }
        let txn = self.db.begin().await?;
        if !marks.is_empty() {
            Self::mark_recoverable_in(&txn, &marks).await?;
        }
        for chunk in writes.chunks(IN_CHUNK) {
            if w.is_none() {
                before = current_statuses(&txn, chunk).await?;
            }
            for (vpg_id, u) in chunk {
                let Some((name, status, sub_status)) = before.get(vpg_id) else {
                    continue;
                };
                Self::write_status_in(&txn, vpg_id, u, name, status, sub_status).await?;
            }
        }
        self.commit(txn).await?;
        drop(w);
        Ok(())
    }

    async fn mark_recoverable_in(
        txn: &DatabaseTransaction,
        marks: &[&RecoverableMark],
    ) -> Result<(), StoreError> {
        // Ids are the table's primary key: one IN list per chunk whatever the VPG.
        let ids: Vec<i64> = marks
            .iter()
            .flat_map(|m| m.ids.iter().map(|&i| i64_id(i)))
            .collect();
        for chunk in ids.chunks(IN_CHUNK) {
            checkpoint::Entity::update_many()
                .col_expr(checkpoint::Column::Recoverable, Expr::value(true))
                .filter(checkpoint::Column::Id.is_in(chunk.iter().copied()))
                .exec(txn)
                .await?;
        }
        let vpg_ids: Vec<String> = marks.iter().map(|m| m.vpg_id.clone()).collect();
        let t = now();
        for chunk in vpg_ids.chunks(IN_CHUNK) {
            vpg::Entity::update_many()
                .col_expr(vpg::Column::HistorySince, Expr::value(t))
                .filter(vpg::Column::Id.is_in(chunk.iter().cloned()))
                .filter(vpg::Column::HistorySince.is_null())
                .exec(txn)
                .await?;
            // The first recoverable checkpoint ever is an event: rare, one VPG at a time.
            let first: Vec<String> = vpg::Entity::find()
                .filter(vpg::Column::Id.is_in(chunk.iter().cloned()))
                .filter(vpg::Column::ProtectedSince.is_null())
                .select_only()
                .column(vpg::Column::Id)
                .into_tuple()
                .all(txn)
                .await?;
            for vpg_id in first {
                let res = vpg::Entity::update_many()
                    .col_expr(vpg::Column::ProtectedSince, Expr::value(t))
                    .filter(vpg::Column::Id.eq(vpg_id.as_str()))
                    .filter(vpg::Column::ProtectedSince.is_null())
                    .exec(txn)
                    .await?;
                if res.rows_affected > 0 {
                    first_recoverable_event(txn, &vpg_id).await?;
                }
            }
        }
        Ok(())
    }

    async fn write_status_in(
        txn: &DatabaseTransaction,
        vpg_id: &str,
        u: &StatusUpdate,
        cur_name: &str,
        cur_status: &str,
        cur_sub_status: &str,
    ) -> Result<(), StoreError> {
        vpg::Entity::update_many()
            .col_expr(vpg::Column::Status, Expr::value(u.status.as_str()))
            .col_expr(vpg::Column::SubStatus, Expr::value(u.sub_status.as_str()))
            .col_expr(vpg::Column::RpoActualMs, Expr::value(u.rpo_actual_ms))
            .col_expr(
                vpg::Column::HistoryActualSecs,
                Expr::value(u.history_actual_secs),
            )
            .col_expr(vpg::Column::JournalBytes, Expr::value(u.journal_bytes))
            .col_expr(
                vpg::Column::NewestRecoverableAt,
                Expr::value(u.newest_recoverable_at),
            )
            .filter(vpg::Column::Id.eq(vpg_id))
            .exec(txn)
            .await?;
        if cur_status != u.status.as_str() || cur_sub_status != u.sub_status.as_str() {
            let from = (
                VpgStatus::parse(cur_status).map_or(cur_status.to_string(), |s| s.label().into()),
                VpgSubStatus::parse(cur_sub_status)
                    .map_or(cur_sub_status.to_string(), |s| s.label().into()),
            );
            let mut ev = NewEvent::info(
                "vpg.status_changed",
                "vpg",
                vpg_id,
                format!(
                    "VPG {}: {}{} → {}{}",
                    cur_name,
                    from.0,
                    paren(&from.1),
                    u.status.label(),
                    paren(u.sub_status.label())
                ),
            )
            .vpg(vpg_id)
            .details(serde_json::json!({
                "from": {"status": cur_status, "sub_status": cur_sub_status},
                "to": {"status": u.status.as_str(), "sub_status": u.sub_status.as_str()},
            }));
            if matches!(
                u.status,
                VpgStatus::NotMeetingSla
                    | VpgStatus::RpoNotMeetingSla
                    | VpgStatus::HistoryNotMeetingSla
            ) {
                ev.severity = "warning";
            }
            ev.write(txn, &Actor::system()).await?;
        }
        Ok(())
    }

    /// Moves a VPG from one lifecycle to another if it is still in `from` (the caller
    /// decided on what it read), with its event. Returns whether it moved.
    pub async fn set_lifecycle(
        &self,
        vpg_id: &str,
        from: Lifecycle,
        to: Lifecycle,
        kind: &str,
        message: String,
    ) -> Result<bool, StoreError> {
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let res = vpg::Entity::update_many()
            .col_expr(vpg::Column::Lifecycle, Expr::value(lifecycle_str(to)))
            .col_expr(vpg::Column::UpdatedAt, Expr::value(now()))
            .filter(vpg::Column::Id.eq(vpg_id))
            .filter(vpg::Column::Lifecycle.eq(lifecycle_str(from)))
            .exec(&txn)
            .await?;
        if res.rows_affected == 0 {
            return Ok(false);
        }
        NewEvent::info(kind, "vpg", vpg_id, message)
            .vpg(vpg_id)
            .details(serde_json::json!({"from": lifecycle_str(from), "to": lifecycle_str(to)}))
            .write(&txn, &Actor::system())
            .await?;
        self.commit(txn).await?;
        Ok(true)
    }

    /// Removes a VPG whose deletion is complete (no host protects any of its disks any
    /// more) or forced: its members, checkpoints and the row, with the event.
    pub async fn remove_vpg(
        &self,
        actor: &Actor,
        id: &str,
        kind: &str,
        message: String,
    ) -> Result<bool, StoreError> {
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        if vpg::Entity::find_by_id(id).one(&txn).await?.is_none() {
            return Ok(false);
        }
        remove_rows(&txn, id).await?;
        NewEvent::info(kind, "vpg", id, message)
            .vpg(id)
            .write(&txn, actor)
            .await?;
        self.commit(txn).await?;
        Ok(true)
    }

    /// An event about a VPG that changes nothing else (e.g. a summary of aborted rounds).
    pub async fn vpg_event(
        &self,
        vpg_id: &str,
        kind: &str,
        severity: &'static str,
        message: String,
        details: serde_json::Value,
    ) -> Result<(), StoreError> {
        let mut ev = NewEvent::info(kind, "vpg", vpg_id, message)
            .vpg(vpg_id)
            .details(details);
        ev.severity = severity;
        ev.write(&self.db, &Actor::system()).await?;
        Ok(())
    }
}

/// The current (name, status, sub-status) of the VPGs of `writes`, by id, in one read.
async fn current_statuses(
    db: &impl ConnectionTrait,
    writes: &[(String, StatusUpdate)],
) -> Result<HashMap<String, (String, String, String)>, DbErr> {
    Ok(vpg::Entity::find()
        .filter(vpg::Column::Id.is_in(writes.iter().map(|(id, _)| id.clone())))
        .select_only()
        .column(vpg::Column::Id)
        .column(vpg::Column::Name)
        .column(vpg::Column::Status)
        .column(vpg::Column::SubStatus)
        .into_tuple::<(String, String, String, String)>()
        .all(db)
        .await?
        .into_iter()
        .map(|(id, name, status, sub)| (id, (name, status, sub)))
        .collect())
}

async fn first_recoverable_event(db: &impl ConnectionTrait, vpg_id: &str) -> Result<(), DbErr> {
    NewEvent::info(
        "vpg.first_recoverable_checkpoint",
        "vpg",
        vpg_id,
        "the first checkpoint is recoverable: the VPG can be recovered".to_string(),
    )
    .vpg(vpg_id)
    .write(db, &Actor::system())
    .await
}

fn paren(s: &str) -> String {
    if s.is_empty() {
        String::new()
    } else {
        format!(" ({s})")
    }
}

/// Deletes a VPG row with what hangs off it.
pub(crate) async fn remove_rows(db: &impl ConnectionTrait, id: &str) -> Result<(), StoreError> {
    checkpoint::Entity::delete_many()
        .filter(checkpoint::Column::VpgId.eq(id))
        .exec(db)
        .await?;
    member::Entity::delete_many()
        .filter(member::Column::VpgId.eq(id))
        .exec(db)
        .await?;
    vpg::Entity::delete_by_id(id).exec(db).await?;
    Ok(())
}

/// Checkpoint rows not recoverable yet, as (VPG, id, taken at), in id order.
fn pending_rows() -> sea_orm::Select<checkpoint::Entity> {
    checkpoint::Entity::find()
        .filter(checkpoint::Column::Recoverable.eq(false))
        .select_only()
        .column(checkpoint::Column::VpgId)
        .column(checkpoint::Column::Id)
        .column(checkpoint::Column::TakenAt)
        .order_by_asc(checkpoint::Column::Id)
}
