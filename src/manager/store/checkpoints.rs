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
use crate::proto::control::CheckpointKind;
use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseTransaction, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, Set, TransactionTrait,
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

/// A completed round, to be stored.
#[derive(Debug, Clone)]
pub struct NewCheckpoint {
    pub id: u64,
    pub vpg_id: String,
    pub taken_at: DateTime<Utc>,
    pub kind: CheckpointKind,
    pub tag: Option<String>,
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
        let mut sel = vpg::Entity::find().order_by_asc(vpg::Column::Id);
        if let Some(id) = only {
            sel = sel.filter(vpg::Column::Id.eq(id));
        }
        let vpgs = sel.all(&self.db).await?;
        if vpgs.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = vpgs.iter().map(|v| v.id.clone()).collect();
        let members = member::Entity::find()
            .filter(member::Column::VpgId.is_in(ids.clone()))
            .order_by_asc(member::Column::BootGroup)
            .order_by_asc(member::Column::Id)
            .all(&self.db)
            .await?;
        let vm_ids: Vec<String> = members.iter().map(|m| m.vm_id.clone()).collect();
        let vms: HashMap<String, (String, String)> = vm::Entity::find()
            .filter(vm::Column::Id.is_in(vm_ids.clone()))
            .select_only()
            .column(vm::Column::Id)
            .column(vm::Column::Name)
            .column(vm::Column::HostId)
            .into_tuple::<(String, String, String)>()
            .all(&self.db)
            .await?
            .into_iter()
            .map(|(id, name, host)| (id, (name, host)))
            .collect();
        let mut devices: HashMap<String, Vec<Option<u64>>> = HashMap::new();
        let rows: Vec<(String, Option<i64>)> = disk::Entity::find()
            .filter(disk::Column::VmId.is_in(vm_ids))
            .select_only()
            .column(disk::Column::VmId)
            .column(disk::Column::DeviceId)
            .order_by_asc(disk::Column::Id)
            .into_tuple()
            .all(&self.db)
            .await?;
        for (vm_id, dev) in rows {
            devices.entry(vm_id).or_default().push(dev.map(u64_of));
        }
        let mut host_ids: Vec<String> = vms.values().map(|(_, h)| h.clone()).collect();
        host_ids.extend(members.iter().filter_map(|m| m.recovery_host_id.clone()));
        let hosts: HashMap<String, (String, bool)> = host::Entity::find()
            .filter(host::Column::Id.is_in(host_ids))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|h| {
                let enrolled = h.enrolled_at.is_some() || h.last_seen_at.is_some();
                (h.id, (h.name, enrolled))
            })
            .collect();
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
        let mut summaries: HashMap<String, CheckpointSummary> = HashMap::new();
        if with_checkpoints {
            let pending: Vec<(String, i64)> = checkpoint::Entity::find()
                .filter(checkpoint::Column::VpgId.is_in(ids.clone()))
                .filter(checkpoint::Column::Recoverable.eq(false))
                .select_only()
                .column(checkpoint::Column::VpgId)
                .column(checkpoint::Column::Id)
                .order_by_asc(checkpoint::Column::Id)
                .into_tuple()
                .all(&self.db)
                .await?;
            for (v, id) in pending {
                summaries.entry(v).or_default().pending.push(u64_of(id));
            }
            let spans: Vec<(String, Span, Span, i64)> = checkpoint::Entity::find()
                .filter(checkpoint::Column::VpgId.is_in(ids))
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
        Ok(vpgs
            .into_iter()
            .map(|v| LiveVpg {
                members: by_vpg.remove(&v.id).unwrap_or_default(),
                checkpoints: summaries.remove(&v.id).unwrap_or_default(),
                lifecycle: lifecycle_of(&v.lifecycle),
                settings: serde_json::from_value(v.settings).unwrap_or_default(),
                operation: v
                    .operation_phase
                    .as_deref()
                    .and_then(crate::model::status::OperationPhase::parse),
                id: v.id,
                name: v.name,
                paused: v.paused,
                status: v.status,
                sub_status: v.sub_status,
                rpo_actual_ms: v.rpo_actual_ms,
                history_actual_secs: v.history_actual_secs,
                journal_bytes: v.journal_bytes,
                protected_since: v.protected_since,
                history_since: v.history_since,
                newest_recoverable_at: v.newest_recoverable_at,
            })
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
        let pending: Vec<i64> = checkpoint::Entity::find()
            .filter(checkpoint::Column::VpgId.eq(vpg_id))
            .filter(checkpoint::Column::Recoverable.eq(false))
            .select_only()
            .column(checkpoint::Column::Id)
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
            pending: pending.into_iter().map(u64_of).collect(),
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
            .details(serde_json::json!({"id": m.id, "kind": c.kind.as_str(), "tag": c.tag}))
            .write(&txn, actor)
            .await?;
        }
        self.commit(txn).await?;
        Ok(Checkpoint {
            id: m.id,
            vpg_id: m.vpg_id,
            taken_at: m.taken_at,
            kind: m.kind,
            tag: m.tag,
            recoverable: m.recoverable,
        })
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
            NewEvent::info(
                "vpg.first_recoverable_checkpoint",
                "vpg",
                vpg_id,
                "the first checkpoint is recoverable: the VPG can be recovered".to_string(),
            )
            .vpg(vpg_id)
            .write(&txn, &Actor::system())
            .await?;
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
        if writes.is_empty() {
            return Ok(());
        }
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        for (vpg_id, u) in writes {
            Self::write_status_in(&txn, vpg_id, u).await?;
        }
        self.commit(txn).await?;
        Ok(())
    }

    async fn write_status_in(
        txn: &DatabaseTransaction,
        vpg_id: &str,
        u: &StatusUpdate,
    ) -> Result<(), StoreError> {
        let Some(cur) = vpg::Entity::find_by_id(vpg_id).one(txn).await? else {
            return Ok(());
        };
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
        if cur.status != u.status.as_str() || cur.sub_status != u.sub_status.as_str() {
            let from = (
                VpgStatus::parse(&cur.status).map_or(cur.status.clone(), |s| s.label().into()),
                VpgSubStatus::parse(&cur.sub_status)
                    .map_or(cur.sub_status.clone(), |s| s.label().into()),
            );
            let mut ev = NewEvent::info(
                "vpg.status_changed",
                "vpg",
                vpg_id,
                format!(
                    "VPG {}: {}{} → {}{}",
                    cur.name,
                    from.0,
                    paren(&from.1),
                    u.status.label(),
                    paren(u.sub_status.label())
                ),
            )
            .vpg(vpg_id)
            .details(serde_json::json!({
                "from": {"status": cur.status, "sub_status": cur.sub_status},
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
