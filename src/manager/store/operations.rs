//! Recovery operations in the database: the operation's task row (its plan, cursor and
//! state, persisted before each step acts), the VPG's `operation_id`/`operation_phase`
//! (one operation per VPG, enforced in the same transaction that starts one), the
//! fencing generation, the role swap of reverse protection, and the recovery reports.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, IntoActiveModel, QueryFilter, QueryOrder, Set,
    TransactionTrait,
};
use serde::{Deserialize, Serialize};

use super::entity::{disk, host, member, recovery_report, task, vm, vpg};
use super::vpgs::lifecycle_of;
use super::{new_id, now, u64_of, Actor, NewEvent, Store, StoreError};
use crate::model::operations::{CheckpointChoice, CommitPolicy, Decision, OperationKind, Step};
use crate::model::settings::{MemberSettings, VpgSettings};
use crate::model::status::Lifecycle;
use crate::proto::api::{Page, PageQuery, RecoveryReportView, TaskStep};
use crate::proto::control::RecoveryReport;

/// Everything an operation remembers between steps (the task's `params`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationState {
    pub kind: OperationKind,
    pub checkpoint: CheckpointChoice,
    /// Resolved by the prepare step (or the final checkpoint of a move).
    #[serde(default)]
    pub checkpoint_id: Option<u64>,
    #[serde(default)]
    pub checkpoint_at: Option<DateTime<Utc>>,
    /// A test of some VMs only (VM ids); all when empty.
    #[serde(default)]
    pub vm_ids: Vec<String>,
    #[serde(default)]
    pub commit_policy: CommitPolicy,
    /// For a commit the policy takes (the operator's commit says its own).
    #[serde(default)]
    pub reverse_protection: bool,
    /// Shut the protected VMs down first (failover; always for a move).
    #[serde(default = "yes")]
    pub shut_down_protected: bool,
    /// A test is stopped (with an alert) once it has run this long.
    #[serde(default)]
    pub max_duration_secs: Option<u64>,
    #[serde(default)]
    pub scratch_budget_bytes: Option<u64>,
    #[serde(default)]
    pub notes: String,
    pub plan: Vec<Step>,
    #[serde(default)]
    pub decision: Option<Decision>,
    #[serde(default)]
    pub decided_by: Option<String>,
    /// Why the decision was taken by the manager rather than an operator (policy,
    /// time box, a failed step).
    #[serde(default)]
    pub decision_reason: Option<String>,
    /// When the waiting step began (commit policy and test time box count from here).
    #[serde(default)]
    pub waiting_since: Option<DateTime<Utc>>,
    #[serde(default)]
    pub fencing_generation: Option<u64>,
    /// What each recovery host brought up.
    #[serde(default)]
    pub recovered: Vec<RecoveryReport>,
    /// When the last recovered VM was powered on (the end of the RTO).
    #[serde(default)]
    pub vms_up_at: Option<DateTime<Utc>>,
    /// Protected hosts that could not be reached to shut their VMs down.
    #[serde(default)]
    pub unreachable_hosts: Vec<String>,
    /// Test result as the operator recorded it at stop (`passed`/`failed`).
    #[serde(default)]
    pub test_result: Option<String>,
    /// The first step error, kept for the report when the operation rolled back.
    #[serde(default)]
    pub failure: Option<String>,
}

fn yes() -> bool {
    true
}

/// An operation's task row, decoded.
#[derive(Debug, Clone)]
pub struct Operation {
    pub id: String,
    pub vpg_id: String,
    pub state: String,
    pub steps: Vec<TaskStep>,
    pub current: usize,
    pub op: OperationState,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub error: Option<String>,
}

impl Operation {
    pub fn step(&self) -> Option<Step> {
        self.op.plan.get(self.current).copied()
    }

    /// Appends steps to the plan (a decision) with their pending rows.
    pub fn append(&mut self, steps: &[Step]) {
        for s in steps {
            self.op.plan.push(*s);
            self.steps.push(pending_step(*s));
        }
    }

    pub fn progress(&self) -> f64 {
        if self.op.plan.is_empty() {
            return 0.0;
        }
        let done = self
            .steps
            .iter()
            .filter(|s| s.state == "succeeded" || s.state == "skipped")
            .count();
        (done as f64 * 100.0 / self.op.plan.len() as f64).min(100.0)
    }
}

pub fn pending_step(s: Step) -> TaskStep {
    TaskStep {
        name: s.as_str().to_string(),
        state: "pending".into(),
        started_at: None,
        finished_at: None,
        message: None,
    }
}

/// A checkpoint row, for choosing the one to recover to.
#[derive(Debug, Clone)]
pub struct OpCheckpoint {
    pub id: u64,
    pub kind: crate::proto::control::CheckpointKind,
    pub tag: Option<String>,
    pub recoverable: bool,
    pub taken_at: DateTime<Utc>,
}

/// A member VM as an operation needs it.
#[derive(Debug, Clone)]
pub struct OpMember {
    pub vm_id: String,
    pub vm: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub protected_host_id: String,
    pub protected_host: String,
    pub recovery_host_id: Option<String>,
    pub recovery_host: Option<String>,
    pub settings: MemberSettings,
    /// (name, agent disk id, size) in name order.
    pub disks: Vec<(String, Option<u64>, u64)>,
    /// How the VM boots (its recovered VM boots the same way); None when not known.
    pub boot: Option<crate::proto::control::Boot>,
}

/// A VPG as an operation needs it.
#[derive(Debug, Clone)]
pub struct OpVpg {
    pub id: String,
    pub name: String,
    pub lifecycle: Lifecycle,
    pub paused: bool,
    pub settings: VpgSettings,
    pub fencing_generation: u64,
    pub operation_id: Option<String>,
    pub protected_site_id: Option<String>,
    pub recovery_site_id: String,
    pub last_test_at: Option<DateTime<Utc>>,
    pub members: Vec<OpMember>,
}

fn decode(m: task::Model) -> Result<Operation, StoreError> {
    let op: OperationState = serde_json::from_value(m.params).map_err(|e| {
        StoreError::conflict(
            "operation.corrupt",
            format!("operation {} cannot be read: {e}", m.id),
        )
    })?;
    let steps: Vec<TaskStep> = serde_json::from_value(m.steps).unwrap_or_default();
    Ok(Operation {
        vpg_id: m.vpg_id.unwrap_or_default(),
        state: m.state,
        current: usize::try_from(m.current_step).unwrap_or(0),
        steps,
        op,
        created_by: m.created_by,
        created_at: m.created_at,
        error: m.error,
        id: m.id,
    })
}

fn json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

impl Store {
    /// A VPG with its members, for planning an operation.
    pub async fn op_vpg(&self, id: &str) -> Result<OpVpg, StoreError> {
        let v = vpg::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .ok_or_else(|| StoreError::not_found("vpg", id))?;
        let members = member::Entity::find()
            .filter(member::Column::VpgId.eq(id))
            .all(&self.db)
            .await?;
        let mut out = Vec::with_capacity(members.len());
        for m in members {
            let Some(vm) = vm::Entity::find_by_id(&m.vm_id).one(&self.db).await? else {
                continue;
            };
            let ph = host::Entity::find_by_id(&vm.host_id).one(&self.db).await?;
            let rh = match &m.recovery_host_id {
                Some(r) => host::Entity::find_by_id(r).one(&self.db).await?,
                None => None,
            };
            let disks = disk::Entity::find()
                .filter(disk::Column::VmId.eq(&vm.id))
                .order_by_asc(disk::Column::Name)
                .all(&self.db)
                .await?
                .into_iter()
                .map(|d| (d.name, d.device_id.map(u64_of), u64_of(d.size_bytes)))
                .collect();
            let mut settings: MemberSettings =
                serde_json::from_value(m.settings.clone()).unwrap_or_default();
            settings.vm_id.clone_from(&m.vm_id);
            settings.recovery_host_id.clone_from(&m.recovery_host_id);
            out.push(OpMember {
                vm_id: vm.id.clone(),
                vm: vm.name.clone(),
                cpus: u32::try_from(vm.cpus).unwrap_or(1),
                memory_mib: u64_of(vm.memory_mib),
                protected_host_id: vm.host_id.clone(),
                protected_host: ph.map(|h| h.name).unwrap_or_default(),
                recovery_host_id: m.recovery_host_id.clone(),
                recovery_host: rh.map(|h| h.name),
                settings,
                disks,
                boot: super::inventory::boot_of(vm.boot.as_deref()),
            });
        }
        out.sort_by(|a, b| a.vm.cmp(&b.vm));
        Ok(OpVpg {
            name: v.name,
            lifecycle: lifecycle_of(&v.lifecycle),
            paused: v.paused,
            settings: serde_json::from_value(v.settings).unwrap_or_default(),
            fencing_generation: u64_of(v.fencing_generation),
            operation_id: v.operation_id,
            protected_site_id: v.protected_site_id,
            recovery_site_id: v.recovery_site_id,
            last_test_at: v.last_test_at,
            members: out,
            id: v.id,
        })
    }

    /// Starts an operation: its task row and the VPG's claim on it, in one
    /// transaction. Refused (409 `vpg.operation_running`) while another runs.
    pub async fn begin_operation(
        &self,
        actor: &Actor,
        vpg_id: &str,
        op: OperationState,
        phase: &str,
    ) -> Result<Operation, StoreError> {
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let v = vpg::Entity::find_by_id(vpg_id)
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::not_found("vpg", vpg_id))?;
        super::vpgs::refuse_during_operation(&v, "start another operation")?;
        let id = new_id();
        let t = now();
        let steps: Vec<TaskStep> = op.plan.iter().map(|s| pending_step(*s)).collect();
        task::ActiveModel {
            id: Set(id.clone()),
            vpg_id: Set(Some(vpg_id.to_string())),
            kind: Set(op.kind.as_str().to_string()),
            state: Set("running".into()),
            progress: Set(0.0),
            steps: Set(json(&steps)),
            current_step: Set(0),
            params: Set(json(&op)),
            result: Set(None),
            error: Set(None),
            created_by: Set(actor.0.clone()),
            created_at: Set(t),
            started_at: Set(Some(t)),
            finished_at: Set(None),
            updated_at: Set(t),
        }
        .insert(&txn)
        .await?;
        // The claim is conditional on nobody else having claimed meanwhile (two
        // managers, or two requests racing on PostgreSQL's read committed).
        let res = vpg::Entity::update_many()
            .col_expr(vpg::Column::OperationId, Expr::value(id.clone()))
            .col_expr(vpg::Column::OperationPhase, Expr::value(phase))
            .col_expr(vpg::Column::UpdatedAt, Expr::value(t))
            .filter(vpg::Column::Id.eq(vpg_id))
            .filter(vpg::Column::OperationId.is_null())
            .exec(&txn)
            .await?;
        if res.rows_affected == 0 {
            return Err(StoreError::conflict(
                "vpg.operation_running",
                format!("VPG `{}` started another operation meanwhile", v.name),
            ));
        }
        NewEvent::info(
            "operation.started",
            "task",
            &id,
            format!("{} of VPG {} started", op.kind.as_str(), v.name),
        )
        .vpg(vpg_id)
        .details(serde_json::json!({
            "kind": op.kind.as_str(),
            "checkpoint": op.checkpoint.describe(),
        }))
        .write(&txn, actor)
        .await?;
        self.commit(txn).await?;
        self.operation(&id).await
    }

    pub async fn operation(&self, id: &str) -> Result<Operation, StoreError> {
        let m = task::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .ok_or_else(|| StoreError::not_found("task", id))?;
        decode(m)
    }

    /// Operations that have not ended (to resume after a restart).
    pub async fn unfinished_operations(&self) -> Result<Vec<Operation>, StoreError> {
        let kinds = [
            OperationKind::FailoverTest,
            OperationKind::Failover,
            OperationKind::Move,
        ]
        .map(|k| k.as_str());
        task::Entity::find()
            .filter(task::Column::Kind.is_in(kinds))
            .filter(task::Column::State.is_in(["running", "waiting"]))
            .order_by_asc(task::Column::CreatedAt)
            .all(&self.db)
            .await?
            .into_iter()
            .map(decode)
            .collect()
    }

    /// Persists the operation's plan, cursor, steps and state, and the VPG's phase, with
    /// an optional event, in one transaction.
    pub async fn save_operation(
        &self,
        o: &Operation,
        phase: &str,
        event: Option<(&str, &'static str, String)>,
    ) -> Result<(), StoreError> {
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let t = now();
        task::Entity::update_many()
            .col_expr(task::Column::State, Expr::value(o.state.clone()))
            .col_expr(task::Column::Progress, Expr::value(o.progress()))
            .col_expr(task::Column::Steps, Expr::value(json(&o.steps)))
            .col_expr(
                task::Column::CurrentStep,
                Expr::value(i32::try_from(o.current).unwrap_or(i32::MAX)),
            )
            .col_expr(task::Column::Params, Expr::value(json(&o.op)))
            .col_expr(task::Column::Error, Expr::value(o.error.clone()))
            .col_expr(task::Column::UpdatedAt, Expr::value(t))
            .filter(task::Column::Id.eq(&o.id))
            .exec(&txn)
            .await?;
        vpg::Entity::update_many()
            .col_expr(vpg::Column::OperationPhase, Expr::value(phase))
            .col_expr(vpg::Column::UpdatedAt, Expr::value(t))
            .filter(vpg::Column::Id.eq(&o.vpg_id))
            .filter(vpg::Column::OperationId.eq(&o.id))
            .exec(&txn)
            .await?;
        if let Some((kind, severity, message)) = event {
            let mut ev = NewEvent::info(kind, "task", &o.id, message)
                .vpg(&o.vpg_id)
                .details(serde_json::json!({"operation": o.op.kind.as_str()}));
            ev.severity = severity;
            ev.write(&txn, &Actor::system()).await?;
        }
        self.commit(txn).await?;
        Ok(())
    }

    /// Records an operator's (or the policy's) decision, once: the operation's plan
    /// grows by what the caller computed. Returns the saved operation.
    pub async fn decide_operation(
        &self,
        actor: &Actor,
        mut o: Operation,
        phase: &str,
    ) -> Result<Operation, StoreError> {
        let d = o.op.decision.map(|d| d.as_str()).unwrap_or("none");
        o.op.decided_by = Some(actor.0.clone());
        self.save_operation(
            &o,
            phase,
            Some((
                "operation.decided",
                "info",
                format!("{} of operation {}: {d}", o.op.kind.as_str(), o.id),
            )),
        )
        .await?;
        Ok(o)
    }

    /// Ends an operation: the task's final state, the VPG released (and, as the end
    /// dictates, its lifecycle / last test time changed), the report written, all in
    /// one transaction.
    pub async fn finish_operation(
        &self,
        o: &Operation,
        lifecycle: Option<Lifecycle>,
        tested_at: Option<DateTime<Utc>>,
        report: RecoveryReportView,
    ) -> Result<(), StoreError> {
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let t = now();
        task::Entity::update_many()
            .col_expr(task::Column::State, Expr::value(o.state.clone()))
            .col_expr(task::Column::Progress, Expr::value(100.0))
            .col_expr(task::Column::Steps, Expr::value(json(&o.steps)))
            .col_expr(
                task::Column::CurrentStep,
                Expr::value(i32::try_from(o.current).unwrap_or(i32::MAX)),
            )
            .col_expr(task::Column::Params, Expr::value(json(&o.op)))
            .col_expr(task::Column::Error, Expr::value(o.error.clone()))
            .col_expr(task::Column::Result, Expr::value(json(&report)))
            .col_expr(task::Column::FinishedAt, Expr::value(t))
            .col_expr(task::Column::UpdatedAt, Expr::value(t))
            .filter(task::Column::Id.eq(&o.id))
            .exec(&txn)
            .await?;
        let mut upd = vpg::Entity::update_many()
            .col_expr(vpg::Column::OperationId, Expr::value(None::<String>))
            .col_expr(vpg::Column::OperationPhase, Expr::value(None::<String>))
            .col_expr(vpg::Column::UpdatedAt, Expr::value(t));
        if let Some(l) = lifecycle {
            upd = upd.col_expr(
                vpg::Column::Lifecycle,
                Expr::value(super::checkpoints::lifecycle_str(l)),
            );
        }
        if let Some(at) = tested_at {
            upd = upd.col_expr(vpg::Column::LastTestAt, Expr::value(at));
        }
        upd.filter(vpg::Column::Id.eq(&o.vpg_id))
            .filter(vpg::Column::OperationId.eq(&o.id))
            .exec(&txn)
            .await?;
        let severity = if o.state == "succeeded" {
            "info"
        } else {
            "error"
        };
        let mut ev = NewEvent::info(
            "operation.ended",
            "task",
            &o.id,
            format!(
                "{} of VPG {} ended: {}",
                o.op.kind.as_str(),
                report.vpg_name,
                report.result
            ),
        )
        .vpg(&o.vpg_id)
        .details(serde_json::json!({"report": report.id, "result": report.result}));
        ev.severity = severity;
        ev.write(&txn, &Actor::system()).await?;
        recovery_report::ActiveModel {
            id: Set(report.id.clone()),
            vpg_id: Set(report.vpg_id.clone()),
            vpg_name: Set(report.vpg_name.clone()),
            kind: Set(report.kind.clone()),
            result: Set(report.result.clone()),
            checkpoint_id: Set(report
                .checkpoint_id
                .map(|c| i64::try_from(c).unwrap_or(i64::MAX))),
            checkpoint_at: Set(report.checkpoint_at),
            created_by: Set(report.created_by.clone()),
            started_at: Set(report.started_at),
            ended_at: Set(report.ended_at),
            rto_ms: Set(report.rto_ms.map(|r| i64::try_from(r).unwrap_or(i64::MAX))),
            notes: Set(report.notes.clone()),
            steps: Set(json(&report.steps)),
            details: Set(report.details.clone()),
        }
        .insert(&txn)
        .await?;
        self.commit(txn).await?;
        Ok(())
    }

    /// Bumps the VPG's fencing generation (once per operation: `expect` is the value
    /// the operation read, so a re-run after a restart does not bump twice). Returns the
    /// generation now in force.
    pub async fn bump_fencing(
        &self,
        vpg_id: &str,
        operation_id: &str,
        expect: u64,
    ) -> Result<u64, StoreError> {
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let next = i64::try_from(expect.saturating_add(1)).unwrap_or(i64::MAX);
        let res = vpg::Entity::update_many()
            .col_expr(vpg::Column::FencingGeneration, Expr::value(next))
            .col_expr(vpg::Column::UpdatedAt, Expr::value(now()))
            .filter(vpg::Column::Id.eq(vpg_id))
            .filter(vpg::Column::OperationId.eq(operation_id))
            .filter(vpg::Column::FencingGeneration.eq(i64::try_from(expect).unwrap_or(i64::MAX)))
            .exec(&txn)
            .await?;
        let now_gen = vpg::Entity::find_by_id(vpg_id)
            .one(&txn)
            .await?
            .map(|v| u64_of(v.fencing_generation))
            .ok_or_else(|| StoreError::not_found("vpg", vpg_id))?;
        if res.rows_affected > 0 {
            NewEvent::info(
                "vpg.fencing_bumped",
                "vpg",
                vpg_id,
                format!("fencing generation {expect} → {now_gen}"),
            )
            .vpg(vpg_id)
            .write(&txn, &Actor::system())
            .await?;
        }
        self.commit(txn).await?;
        Ok(now_gen)
    }

    /// Reverse protection: the VPG's roles swap. Each member now stands for the
    /// recovered VM (`new_vm_ids[i]` replaces `members[i].vm_id`) and recovers to the
    /// old protected host; the sites swap; the VPG starts over as Creating (a Delta Sync
    /// against the pre-seeded replicas brings it to Meeting SLA).
    pub async fn reverse_roles(
        &self,
        vpg_id: &str,
        swaps: &[(String, String, String)],
    ) -> Result<(), StoreError> {
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let v = vpg::Entity::find_by_id(vpg_id)
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::not_found("vpg", vpg_id))?;
        for (old_vm, new_vm, new_recovery_host) in swaps {
            let Some(m) = member::Entity::find()
                .filter(member::Column::VpgId.eq(vpg_id))
                .filter(member::Column::VmId.eq(old_vm))
                .one(&txn)
                .await?
            else {
                // Already swapped (a re-run after a restart).
                continue;
            };
            let mut settings: MemberSettings =
                serde_json::from_value(m.settings.clone()).unwrap_or_default();
            settings.vm_id.clone_from(new_vm);
            settings.recovery_host_id = Some(new_recovery_host.clone());
            settings.recovery_storage_path = None;
            let mut am = m.into_active_model();
            am.vm_id = Set(new_vm.clone());
            am.recovery_host_id = Set(Some(new_recovery_host.clone()));
            am.settings = Set(json(&settings));
            am.updated_at = Set(now());
            am.update(&txn).await?;
            // The old VM's disks became the reverse-protection seeds and its host no
            // longer reports it: the row goes (a row still reported goes at the host's
            // next inventory, now that it is no member).
            if let Some(old) = vm::Entity::find_by_id(old_vm).one(&txn).await? {
                if old.power_state == crate::proto::api::PowerState::Missing.as_str() {
                    disk::Entity::delete_many()
                        .filter(disk::Column::VmId.eq(old_vm.as_str()))
                        .exec(&txn)
                        .await?;
                    vm::Entity::delete_by_id(old_vm.as_str()).exec(&txn).await?;
                    NewEvent::info(
                        "vm.removed",
                        "vm",
                        old_vm,
                        format!(
                            "VM {} removed: its disks are the replicas of reverse protection",
                            old.name
                        ),
                    )
                    .vpg(vpg_id)
                    .write(&txn, &Actor::system())
                    .await?;
                }
            }
        }
        let (protected, recovery) = (v.protected_site_id.clone(), v.recovery_site_id.clone());
        let mut am = v.into_active_model();
        if let Some(p) = protected {
            am.protected_site_id = Set(Some(recovery));
            am.recovery_site_id = Set(p);
        }
        am.lifecycle = Set("creating".into());
        am.protected_since = Set(None);
        am.history_since = Set(None);
        am.newest_recoverable_at = Set(None);
        am.updated_at = Set(now());
        am.update(&txn).await?;
        NewEvent::info(
            "vpg.reverse_protection",
            "vpg",
            vpg_id,
            "roles swapped: the recovered VMs are protected now, towards the old protected site"
                .into(),
        )
        .vpg(vpg_id)
        .write(&txn, &Actor::system())
        .await?;
        self.commit(txn).await?;
        Ok(())
    }

    /// The VM row of `name` on host `host_id`, once the host's inventory reported it.
    pub async fn vm_on_host(
        &self,
        host_id: &str,
        name: &str,
    ) -> Result<Option<String>, StoreError> {
        Ok(vm::Entity::find()
            .filter(vm::Column::HostId.eq(host_id))
            .filter(vm::Column::Name.eq(name))
            .one(&self.db)
            .await?
            .map(|v| v.id))
    }

    /// Whether checkpoint `id` of the VPG is recoverable (durable in every journal).
    pub async fn checkpoint_recoverable(
        &self,
        vpg_id: &str,
        id: u64,
    ) -> Result<Option<(bool, DateTime<Utc>)>, StoreError> {
        use super::entity::checkpoint;
        Ok(
            checkpoint::Entity::find_by_id(i64::try_from(id).unwrap_or(i64::MAX))
                .filter(checkpoint::Column::VpgId.eq(vpg_id))
                .one(&self.db)
                .await?
                .map(|c| (c.recoverable, c.taken_at)),
        )
    }

    /// "User paused protection" on or off. Refused while an operation runs.
    pub async fn set_paused(
        &self,
        actor: &Actor,
        vpg_id: &str,
        paused: bool,
    ) -> Result<crate::proto::api::Vpg, StoreError> {
        {
            let _w = self.write_guard().await;
            let txn = self.db.begin().await?;
            let v = vpg::Entity::find_by_id(vpg_id)
                .one(&txn)
                .await?
                .ok_or_else(|| StoreError::not_found("vpg", vpg_id))?;
            super::vpgs::refuse_during_operation(&v, "be paused or resumed")?;
            if !matches!(
                lifecycle_of(&v.lifecycle),
                Lifecycle::Creating | Lifecycle::Protecting
            ) {
                return Err(StoreError::conflict(
                    "vpg.not_protecting",
                    format!("VPG `{}` is not protecting", v.name),
                ));
            }
            if v.paused != paused {
                let name = v.name.clone();
                let version = v.version;
                let mut am = v.into_active_model();
                am.paused = Set(paused);
                am.version = Set(version + 1);
                am.updated_at = Set(now());
                am.update(&txn).await?;
                let (kind, what) = if paused {
                    ("vpg.paused", "paused")
                } else {
                    ("vpg.resumed", "resumed")
                };
                NewEvent::info(
                    kind,
                    "vpg",
                    vpg_id,
                    format!("protection of VPG {name} {what}"),
                )
                .vpg(vpg_id)
                .write(&txn, actor)
                .await?;
            }
            self.commit(txn).await?;
        }
        self.get_vpg(vpg_id).await
    }

    /// Every checkpoint of a VPG, for choosing the one to recover to.
    pub async fn operation_checkpoints(
        &self,
        vpg_id: &str,
    ) -> Result<Vec<OpCheckpoint>, StoreError> {
        use super::entity::checkpoint;
        Ok(checkpoint::Entity::find()
            .filter(checkpoint::Column::VpgId.eq(vpg_id))
            .all(&self.db)
            .await?
            .into_iter()
            .filter_map(|c| {
                Some(OpCheckpoint {
                    id: u64::try_from(c.id).ok()?,
                    kind: crate::proto::control::CheckpointKind::parse(&c.kind)?,
                    tag: c.tag,
                    recoverable: c.recoverable,
                    taken_at: c.taken_at,
                })
            })
            .collect())
    }

    /// Recovery reports, newest first (by when the operation ended).
    pub async fn list_reports(
        &self,
        vpg_id: Option<&str>,
        p: &PageQuery,
    ) -> Result<Page<RecoveryReportView>, StoreError> {
        use sea_orm::QuerySelect;
        let limit = super::page_limit(p.limit)?;
        // Ids are UUIDv7, written when the operation ends: their order is that time's.
        let mut q = recovery_report::Entity::find().order_by_desc(recovery_report::Column::Id);
        if let Some(v) = vpg_id {
            q = q.filter(recovery_report::Column::VpgId.eq(v));
        }
        if let Some(c) = &p.cursor {
            q = q.filter(recovery_report::Column::Id.lt(c.as_str()));
        }
        let mut items: Vec<RecoveryReportView> = q
            .limit(limit + 1)
            .all(&self.db)
            .await?
            .into_iter()
            .map(report_view)
            .collect();
        let more = items.len() as u64 > limit;
        items.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let next_cursor = if more {
            items.last().map(|r| r.id.clone())
        } else {
            None
        };
        Ok(Page { items, next_cursor })
    }

    pub async fn get_report(&self, id: &str) -> Result<RecoveryReportView, StoreError> {
        recovery_report::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .map(report_view)
            .ok_or_else(|| StoreError::not_found("report", id))
    }
}

/// What an operation's task shows besides its steps (see `Task::details`).
pub(super) fn task_details(kind: &str, params: &serde_json::Value) -> Option<serde_json::Value> {
    OperationKind::parse(kind)?;
    let op: OperationState = serde_json::from_value(params.clone()).ok()?;
    let remaining = op.waiting_since.and_then(|since| {
        let waited = (Utc::now() - since).to_std().unwrap_or_default();
        match op.kind {
            OperationKind::FailoverTest => op
                .max_duration_secs
                .map(|m| m.saturating_sub(waited.as_secs())),
            _ => op.commit_policy.remaining(waited),
        }
    });
    Some(serde_json::json!({
        "checkpoint": op.checkpoint.describe(),
        "checkpoint_id": op.checkpoint_id,
        "checkpoint_at": op.checkpoint_at,
        "commit_policy": op.commit_policy,
        "reverse_protection": op.reverse_protection,
        "decision": op.decision.map(|d| d.as_str()),
        "decided_by": op.decided_by,
        "decision_reason": op.decision_reason,
        // Seconds until the commit policy acts, or until a test's time box ends.
        "countdown_secs": if op.decision.is_none() { remaining } else { None },
        "fencing_generation": op.fencing_generation,
        "unreachable_hosts": op.unreachable_hosts,
        "recovered": op.recovered,
        "vms_up_at": op.vms_up_at,
        "failure": op.failure,
    }))
}

fn report_view(m: recovery_report::Model) -> RecoveryReportView {
    RecoveryReportView {
        id: m.id,
        vpg_id: m.vpg_id,
        vpg_name: m.vpg_name,
        kind: m.kind,
        result: m.result,
        checkpoint_id: m.checkpoint_id.map(u64_of),
        checkpoint_at: m.checkpoint_at,
        created_by: m.created_by,
        started_at: m.started_at,
        ended_at: m.ended_at,
        rto_ms: m.rto_ms.map(u64_of),
        notes: m.notes,
        steps: serde_json::from_value(m.steps).unwrap_or_default(),
        details: m.details,
    }
}
