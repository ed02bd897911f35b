//! The operation runner: starts failover tests, failovers and moves, takes the
//! operator's decisions (commit, rollback, stop), and drives each operation's plan
//! (`model::operations`) step by step, persisting the plan and cursor before every step
//! acts (`store::operations`). A manager killed at any point resumes every unfinished
//! operation at start (`resume_all`): the step that was running runs again, and every
//! step is idempotent towards the agents (commands carry the operation id; the agents
//! answer a repeated recovery with the one they run).
//!
//! Failure handling: a step that fails before the decision rolls the operation back
//! (a test is stopped) and the operation ends `failed`; a step that fails after the
//! decision leaves the operation `failed` with the VPG still claimed, and the same
//! decision, asked again, retries from that step. Transient errors (a host reconnecting,
//! a journal still busy) are retried with back-off within each step's bound.
//!
//! Fault injection for the crash tests: `BULWARK_FAULT_STEP=<step>:<before|after>`
//! aborts the process at that step boundary; `<step>:fail` makes that step fail.

mod steps;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::Notify;

use crate::manager::control::ControlPlane;
use crate::manager::store::operations::{OpVpg, Operation, OperationState};
use crate::manager::store::{Actor, StoreError};
use crate::model::alerts::{AlertKind, Severity};
use crate::model::operations::{
    self as plan, CheckpointCandidate, CheckpointChoice, CommitPolicy, Decision, OperationKind,
    Step,
};
use crate::model::status::Lifecycle;
use crate::model::ValidationError;
use crate::proto::api::{
    CommitPolicyAction, FailoverStart, FailoverTestStart, RecoveryReportView, Task,
};

/// Default time box of a failover test.
pub const DEFAULT_TEST_DURATION: Duration = Duration::from_secs(8 * 3600);

/// Why a step did not succeed.
#[derive(Debug)]
pub(crate) enum StepError {
    /// Worth another attempt (a host reconnecting, a journal still busy).
    Retry(String),
    /// Will not get better by waiting.
    Fatal(String),
}

impl From<StoreError> for StepError {
    fn from(e: StoreError) -> Self {
        StepError::Retry(e.to_string())
    }
}

/// The runner's shared state (one per manager).
pub struct Operations {
    /// Wakes an operation's driver (a decision arrived).
    wakers: Mutex<HashMap<String, Arc<Notify>>>,
    /// Serialises a driver's and a request's read-modify-write of one operation.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    fault: Option<(Step, Fault)>,
}

/// What an armed fault does at its step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    AbortBefore,
    AbortAfter,
    Fail,
}

impl Default for Operations {
    fn default() -> Self {
        Self::new()
    }
}

impl Operations {
    pub fn new() -> Self {
        let fault = std::env::var("BULWARK_FAULT_STEP").ok().and_then(|v| {
            let (step, when) = v.split_once(':')?;
            let f = match when {
                "before" => Fault::AbortBefore,
                "after" => Fault::AbortAfter,
                "fail" => Fault::Fail,
                _ => return None,
            };
            Some((Step::parse(step)?, f))
        });
        if let Some((s, f)) = fault {
            tracing::warn!(step = s.as_str(), fault = ?f, "fault injection armed");
        }
        Self {
            wakers: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            fault,
        }
    }

    fn waker(&self, id: &str) -> Arc<Notify> {
        let mut g = self.wakers.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(g.entry(id.to_string()).or_default())
    }

    fn lock_of(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut g = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(g.entry(id.to_string()).or_default())
    }

    fn forget(&self, id: &str) {
        self.wakers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        self.locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    /// Whether an injected fault makes `step` fail.
    fn fails(&self, step: Step) -> bool {
        self.fault == Some((step, Fault::Fail))
    }

    fn fault_at(&self, step: Step, after: bool) {
        let armed = if after {
            Fault::AbortAfter
        } else {
            Fault::AbortBefore
        };
        if self.fault == Some((step, armed)) {
            tracing::error!(
                step = step.as_str(),
                after,
                "fault injection: aborting the manager"
            );
            std::process::abort();
        }
    }
}

fn invalid(code: &'static str, field: &str, message: impl Into<String>) -> StoreError {
    StoreError::Invalid(ValidationError::new(code, field, message))
}

/// The phase string stored for the VPG while `o` runs its current step.
fn phase_of(o: &Operation) -> &'static str {
    let step = o
        .step()
        .or_else(|| o.op.plan.last().copied())
        .unwrap_or(Step::Prepare);
    plan::phase(o.op.kind, step, o.op.decision).as_str()
}

/// Checks shared by every operation's start: the VPG can be recovered now.
fn check_recoverable(v: &OpVpg) -> Result<(), StoreError> {
    match v.lifecycle {
        Lifecycle::Protecting => {}
        Lifecycle::Creating => {
            return Err(StoreError::conflict(
                "vpg.not_recoverable",
                format!(
                    "VPG `{}` has not finished its initial sync: nothing can be recovered yet",
                    v.name
                ),
            ))
        }
        Lifecycle::Recovered => {
            return Err(StoreError::conflict(
                "vpg.recovered",
                format!(
                    "VPG `{}` was failed over and committed without reverse protection",
                    v.name
                ),
            ))
        }
        Lifecycle::Deleting | Lifecycle::WaitingRemoval => {
            return Err(StoreError::conflict(
                "vpg.deleting",
                format!("VPG `{}` is being deleted", v.name),
            ))
        }
    }
    if let Some(op) = &v.operation_id {
        return Err(StoreError::conflict(
            "vpg.operation_running",
            format!(
                "VPG `{}` already runs operation {op}: commit, roll it back or stop it first",
                v.name
            ),
        ));
    }
    if v.members.is_empty() {
        return Err(StoreError::conflict(
            "vpg.no_vms",
            format!("VPG `{}` has no VMs", v.name),
        ));
    }
    if let Some(m) = v.members.iter().find(|m| m.recovery_host.is_none()) {
        return Err(StoreError::conflict(
            "vpg.needs_configuration",
            format!("VM `{}` has no recovery host", m.vm),
        ));
    }
    if let Some(m) = v
        .members
        .iter()
        .find(|m| m.disks.iter().any(|d| d.1.is_none()))
    {
        return Err(StoreError::conflict(
            "vpg.needs_configuration",
            format!("a disk of VM `{}` was never reported by its host", m.vm),
        ));
    }
    Ok(())
}

async fn resolve_checkpoint(
    cp: &ControlPlane,
    vpg_id: &str,
    choice: &CheckpointChoice,
) -> Result<(u64, chrono::DateTime<Utc>), StoreError> {
    let rows = cp.store.operation_checkpoints(vpg_id).await?;
    let cands: Vec<CheckpointCandidate> = rows
        .iter()
        .map(|c| CheckpointCandidate {
            id: c.id,
            kind: c.kind,
            tag: c.tag.clone(),
            recoverable: c.recoverable,
        })
        .collect();
    let id = plan::choose_checkpoint(choice, &cands)
        .map_err(|m| StoreError::conflict("vpg.no_checkpoint", m))?;
    let at = rows
        .iter()
        .find(|c| c.id == id)
        .map(|c| c.taken_at)
        .unwrap_or_else(Utc::now);
    Ok((id, at))
}

fn parse_choice(s: Option<&str>) -> Result<CheckpointChoice, StoreError> {
    CheckpointChoice::parse(s.unwrap_or("latest"))
        .map_err(|m| invalid("operation.bad_checkpoint", "checkpoint", m))
}

fn new_state(kind: OperationKind, checkpoint: CheckpointChoice) -> OperationState {
    OperationState {
        kind,
        checkpoint,
        checkpoint_id: None,
        checkpoint_at: None,
        vm_ids: Vec::new(),
        commit_policy: CommitPolicy::None,
        reverse_protection: kind == OperationKind::Move,
        shut_down_protected: true,
        max_duration_secs: None,
        scratch_budget_bytes: None,
        notes: String::new(),
        plan: plan::initial_plan(kind),
        decision: None,
        decided_by: None,
        decision_reason: None,
        waiting_since: None,
        fencing_generation: None,
        recovered: Vec::new(),
        vms_up_at: None,
        unreachable_hosts: Vec::new(),
        test_result: None,
        failure: None,
    }
}

async fn launch(
    cp: &Arc<ControlPlane>,
    actor: &Actor,
    v: &OpVpg,
    mut st: OperationState,
) -> Result<Task, StoreError> {
    st.fencing_generation = Some(v.fencing_generation);
    let phase = plan::phase(st.kind, Step::Prepare, None).as_str();
    let o = cp.store.begin_operation(actor, &v.id, st, phase).await?;
    cp.changed.notify_waiters();
    spawn_driver(cp, o.id.clone());
    cp.store.get_task(&o.id).await
}

/// `POST /vpgs/{id}/failover-test`.
pub async fn start_test(
    cp: &Arc<ControlPlane>,
    actor: &Actor,
    vpg_id: &str,
    req: FailoverTestStart,
) -> Result<Task, StoreError> {
    let v = cp.store.op_vpg(vpg_id).await?;
    check_recoverable(&v)?;
    for id in &req.vm_ids {
        if !v.members.iter().any(|m| &m.vm_id == id) {
            return Err(invalid(
                "operation.not_a_member",
                "vm_ids",
                format!("VM {id} is not a member of VPG `{}`", v.name),
            ));
        }
    }
    if req.max_duration_secs == Some(0) {
        return Err(invalid(
            "operation.bad_duration",
            "max_duration_secs",
            "a test must be allowed to run at least one second",
        ));
    }
    let choice = parse_choice(req.checkpoint.as_deref())?;
    let (id, at) = resolve_checkpoint(cp, &v.id, &choice).await?;
    let mut st = new_state(OperationKind::FailoverTest, choice);
    st.checkpoint_id = Some(id);
    st.checkpoint_at = Some(at);
    st.vm_ids = req.vm_ids;
    st.max_duration_secs = Some(
        req.max_duration_secs
            .unwrap_or(DEFAULT_TEST_DURATION.as_secs()),
    );
    st.scratch_budget_bytes = Some(
        req.scratch_budget_bytes
            .unwrap_or(v.settings.journal_hard_limit_bytes / 10),
    );
    st.notes = req.notes.unwrap_or_default();
    launch(cp, actor, &v, st).await
}

/// `POST /vpgs/{id}/failover` and `POST /vpgs/{id}/move`.
pub async fn start_failover(
    cp: &Arc<ControlPlane>,
    actor: &Actor,
    vpg_id: &str,
    kind: OperationKind,
    req: FailoverStart,
) -> Result<Task, StoreError> {
    let v = cp.store.op_vpg(vpg_id).await?;
    check_recoverable(&v)?;
    let policy = match (req.commit_policy, req.commit_after_secs) {
        (CommitPolicyAction::None, _) => CommitPolicy::None,
        (CommitPolicyAction::Commit, Some(s)) => CommitPolicy::Commit { after_secs: s },
        (CommitPolicyAction::Rollback, Some(s)) => CommitPolicy::Rollback { after_secs: s },
        (_, None) => {
            return Err(invalid(
                "operation.bad_commit_policy",
                "commit_after_secs",
                "a commit or rollback policy needs commit_after_secs",
            ))
        }
    };
    let mut st;
    if kind == OperationKind::Move {
        if req.checkpoint.is_some() {
            return Err(invalid(
                "operation.bad_checkpoint",
                "checkpoint",
                "a move recovers to its own final checkpoint, taken after the VMs shut down",
            ));
        }
        // A move needs both sides up and a steady VPG: it promises RPO 0.
        let mut hosts: Vec<&str> = Vec::new();
        for m in &v.members {
            hosts.push(&m.protected_host);
            if let Some(r) = &m.recovery_host {
                hosts.push(r);
            }
        }
        if let Some(h) = hosts.iter().find(|h| !cp.hub.is_connected(h)) {
            return Err(StoreError::conflict(
                "vpg.peer_unreachable",
                format!("host {h} is not connected: a move needs every host of the VPG"),
            ));
        }
        let row = cp.store.get_vpg(&v.id).await?;
        if row.sub_status.as_str().contains("sync") {
            return Err(StoreError::conflict(
                "vpg.sync_running",
                format!(
                    "VPG `{}` is syncing ({}): a move waits until it is steady",
                    v.name,
                    row.sub_status.as_str()
                ),
            ));
        }
        st = new_state(kind, CheckpointChoice::Latest);
    } else {
        let choice = parse_choice(req.checkpoint.as_deref())?;
        let (id, at) = resolve_checkpoint(cp, &v.id, &choice).await?;
        st = new_state(kind, choice);
        st.checkpoint_id = Some(id);
        st.checkpoint_at = Some(at);
        st.shut_down_protected = req.shut_down_protected.unwrap_or(true);
        if !st.shut_down_protected {
            st.plan.retain(|s| *s != Step::ShutDownProtected);
        }
    }
    st.commit_policy = policy;
    if let Some(r) = req.reverse_protection {
        st.reverse_protection = r;
    }
    st.notes = req.notes.unwrap_or_default();
    launch(cp, actor, &v, st).await
}

/// Force Sync: every disk of the VPG runs a Delta Sync now (its protected host
/// decides the details; the sync appears in the VPG's status as it runs).
pub async fn force_sync(
    cp: &Arc<ControlPlane>,
    actor: &Actor,
    vpg_id: &str,
) -> Result<crate::proto::api::Vpg, StoreError> {
    let v = cp.store.op_vpg(vpg_id).await?;
    if !matches!(v.lifecycle, Lifecycle::Creating | Lifecycle::Protecting) {
        return Err(StoreError::conflict(
            "vpg.not_protecting",
            format!("VPG `{}` is not protecting", v.name),
        ));
    }
    if let Some(op) = &v.operation_id {
        return Err(StoreError::conflict(
            "vpg.operation_running",
            format!("VPG `{}` runs operation {op}", v.name),
        ));
    }
    if let Some(h) = v
        .members
        .iter()
        .map(|m| m.protected_host.as_str())
        .find(|h| !cp.hub.is_connected(h))
    {
        return Err(StoreError::conflict(
            "host.unreachable",
            format!("protected host {h} is not connected"),
        ));
    }
    let mut n = 0;
    for m in &v.members {
        for (name, id, _) in &m.disks {
            let Some(disk_id) = id else { continue };
            let cmd = crate::proto::control::Command {
                id: crate::manager::store::new_id(),
                body: crate::proto::control::CommandBody::Sync {
                    disk_id: *disk_id,
                    action: crate::proto::agent::SyncAction::Force,
                },
            };
            match cp
                .hub
                .command(&m.protected_host, cmd, Duration::from_secs(30))
                .await
            {
                Ok(r) if r.ok => n += 1,
                Ok(r) => {
                    return Err(StoreError::conflict(
                        "vpg.force_sync_refused",
                        format!(
                            "{} refused the sync of disk {name}: {}",
                            m.protected_host,
                            r.error.unwrap_or_default()
                        ),
                    ))
                }
                Err(e) => return Err(StoreError::conflict("host.unreachable", e.to_string())),
            }
        }
    }
    cp.store
        .vpg_event(
            vpg_id,
            "vpg.force_sync",
            "info",
            format!("Force Sync of {n} disks requested by {}", actor.0),
            serde_json::json!({"disks": n, "by": actor.0}),
        )
        .await?;
    cp.store.get_vpg(vpg_id).await
}

/// What an operator asks of a running operation.
#[derive(Debug, Clone)]
pub struct DecisionRequest {
    pub decision: Decision,
    pub test_result: Option<String>,
    pub notes: Option<String>,
}

/// `POST /vpgs/{id}/commit|rollback`, `POST /vpgs/{id}/failover-test/stop`.
pub async fn decide(
    cp: &Arc<ControlPlane>,
    actor: &Actor,
    vpg_id: &str,
    req: DecisionRequest,
) -> Result<Task, StoreError> {
    let v = cp.store.op_vpg(vpg_id).await?;
    let Some(op_id) = v.operation_id.clone() else {
        return Err(StoreError::conflict(
            "vpg.no_operation",
            format!(
                "VPG `{}` runs no operation to {}",
                v.name,
                req.decision.as_str()
            ),
        ));
    };
    if let Some(r) = &req.test_result {
        if r != "passed" && r != "failed" {
            return Err(invalid(
                "operation.bad_result",
                "result",
                "a test result is `passed` or `failed`",
            ));
        }
    }
    let lock = cp.ops.lock_of(&op_id);
    let _g = lock.lock().await;
    let mut o = cp.store.operation(&op_id).await?;
    let decision = req.decision;
    if o.state == "failed" {
        // Retry of the same decision after a step failed past the decision.
        if o.op.decision.map(|d| d.as_str()) == Some(decision.as_str()) {
            o.state = "running".into();
            o.error = None;
            cp.store
                .save_operation(
                    &o,
                    phase_of(&o),
                    Some((
                        "operation.retried",
                        "info",
                        format!("{} retried by {}", decision.as_str(), actor.0),
                    )),
                )
                .await?;
            drop(_g);
            spawn_driver(cp, o.id.clone());
            return cp.store.get_task(&o.id).await;
        }
    }
    if o.state != "waiting" {
        if let Some(d) = o.op.decision {
            return Err(StoreError::conflict(
                "operation.already_decided",
                format!("operation {} is already being ended ({})", o.id, d.as_str()),
            ));
        }
        return Err(StoreError::conflict(
            "operation.busy",
            format!(
                "operation {} is still bringing the VMs up (step {}): wait until it is {}",
                o.id,
                o.step().map(|s| s.as_str()).unwrap_or("?"),
                if o.op.kind == OperationKind::FailoverTest {
                    "testing"
                } else {
                    "before commit"
                }
            ),
        ));
    }
    let added = plan::decide(o.op.kind, o.op.decision, decision)
        .map_err(|e| StoreError::conflict("operation.bad_decision", e.to_string()))?;
    apply_decision(&mut o, decision, added, None);
    if let Some(r) = req.test_result {
        o.op.test_result = Some(r);
    }
    if let Some(n) = req.notes {
        if !o.op.notes.is_empty() {
            o.op.notes.push('\n');
        }
        o.op.notes.push_str(&n);
    }
    let o = cp
        .store
        .decide_operation(actor, o.clone(), phase_of(&o))
        .await?;
    cp.ops.waker(&o.id).notify_one();
    cp.changed.notify_waiters();
    cp.store.get_task(&o.id).await
}

/// The waiting step ends; the decision's steps follow it.
fn apply_decision(o: &mut Operation, d: Decision, added: Vec<Step>, reason: Option<String>) {
    o.op.decision = Some(d);
    o.op.decision_reason = reason;
    if let Some(s) = o.steps.get_mut(o.current) {
        s.state = "succeeded".into();
        s.finished_at = Some(Utc::now());
        s.message = Some(format!("decision: {}", d.as_str()));
    }
    o.current += 1;
    o.append(&added);
    o.state = "running".into();
}

/// Resumes every operation that had not ended when the manager stopped.
pub async fn resume_all(cp: Arc<ControlPlane>) {
    match cp.store.unfinished_operations().await {
        Ok(ops) => {
            for o in ops {
                tracing::info!(operation = %o.id, kind = o.op.kind.as_str(), step = ?o.step(), "resuming operation");
                spawn_driver(&cp, o.id);
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot read the unfinished operations"),
    }
}

fn spawn_driver(cp: &Arc<ControlPlane>, id: String) {
    let cp2 = Arc::clone(cp);
    cp.spawn_task(async move {
        drive(cp2, id).await;
    });
}

/// How long a step may keep failing transiently before it counts as failed.
fn retry_bound(step: Step) -> Duration {
    match step {
        // Waiting out a journal still in use, a host reconnecting after a restart.
        Step::Promote | Step::Discard | Step::RestartProtected | Step::SeedReverse => {
            Duration::from_secs(300)
        }
        // A few checkpoints, each waited for ~10 s, while a sync catches up.
        Step::FinalCheckpoint => Duration::from_secs(120),
        _ => Duration::from_secs(60),
    }
}

async fn drive(cp: Arc<ControlPlane>, id: String) {
    let cancel = cp.cancel_token();
    let waker = cp.ops.waker(&id);
    let mut attempt_since: Option<(Step, tokio::time::Instant, u32)> = None;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let lock = cp.ops.lock_of(&id);
        let guard = lock.lock().await;
        let mut o = match cp.store.operation(&id).await {
            Ok(o) => o,
            Err(e) => {
                drop(guard);
                tracing::warn!(operation = %id, error = %e, "cannot read the operation; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                }
            }
        };
        if o.state != "running" && o.state != "waiting" {
            drop(guard);
            cp.ops.forget(&id);
            return;
        }
        let Some(step) = o.step() else {
            let r = finish(&cp, &mut o).await;
            drop(guard);
            match r {
                Ok(()) => {
                    cp.ops.forget(&id);
                    cp.config_changed();
                    return;
                }
                Err(e) => {
                    tracing::warn!(operation = %id, error = %e, "cannot record the end of the operation; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                    }
                }
            }
        };
        if step.is_wait() {
            let due = wait_due(&mut o, step);
            if o.state != "waiting" {
                o.state = "waiting".into();
                let now = Utc::now();
                o.op.waiting_since.get_or_insert(now);
                if let Some(s) = o.steps.get_mut(o.current) {
                    s.state = "running".into();
                    s.started_at.get_or_insert(now);
                }
                let msg = format!(
                    "{} of VPG: the VMs are up ({})",
                    o.op.kind.as_str(),
                    step.as_str()
                );
                if let Err(e) = cp
                    .store
                    .save_operation(&o, phase_of(&o), Some(("operation.waiting", "info", msg)))
                    .await
                {
                    tracing::warn!(operation = %id, error = %e, "cannot save the operation");
                }
                cp.changed.notify_waiters();
            }
            if let Some((d, reason)) = due {
                if let Ok(added) = plan::decide(o.op.kind, o.op.decision, d) {
                    apply_decision(&mut o, d, added, Some(reason.clone()));
                    let actor = Actor::system();
                    if let Err(e) = cp
                        .store
                        .decide_operation(&actor, o.clone(), phase_of(&o))
                        .await
                    {
                        tracing::warn!(operation = %id, error = %e, "cannot save the decision");
                    }
                    if reason.contains("time box") {
                        let _ = cp
                            .store
                            .vpg_event(
                                &o.vpg_id,
                                "operation.test_time_box",
                                "warning",
                                format!(
                                    "failover test {} reached its time box and was stopped",
                                    o.id
                                ),
                                serde_json::json!({"operation": o.id}),
                            )
                            .await;
                    }
                    drop(guard);
                    continue;
                }
            }
            drop(guard);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = waker.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        // Persist before acting.
        let now = Utc::now();
        let mut started = None;
        if let Some(s) = o.steps.get_mut(o.current) {
            if s.state != "running" {
                s.state = "running".into();
                s.started_at = Some(now);
                s.message = None;
                // An event, so the live stream carries the step's start too.
                started = Some((
                    "operation.step_started",
                    "info",
                    format!("{} step {} started", o.op.kind.as_str(), s.name),
                ));
            }
        }
        if let Err(e) = cp.store.save_operation(&o, phase_of(&o), started).await {
            drop(guard);
            tracing::warn!(operation = %id, error = %e, "cannot save the operation; retrying");
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
            }
        }
        drop(guard);
        cp.changed.notify_waiters();
        cp.ops.fault_at(step, false);
        let started = tokio::time::Instant::now();
        let result = if cp.ops.fails(step) {
            Err(StepError::Fatal("fault injection: the step fails".into()))
        } else {
            steps::run(&cp, &mut o, step).await
        };
        let guard = lock.lock().await;
        let now = Utc::now();
        match result {
            Ok(msg) => {
                attempt_since = None;
                if let Some(s) = o.steps.get_mut(o.current) {
                    s.state = if msg.starts_with("skipped") {
                        "skipped".into()
                    } else {
                        "succeeded".into()
                    };
                    s.finished_at = Some(now);
                    s.message = Some(msg.clone());
                }
                o.current += 1;
                tracing::info!(operation = %id, step = step.as_str(), ms = started.elapsed().as_millis() as u64, "{msg}");
                let ev = (
                    "operation.step",
                    "info",
                    format!("{} step {}: {msg}", o.op.kind.as_str(), step.as_str()),
                );
                // The step acted: its completion must be recorded before anything else,
                // or a restart would run it again (harmless, but slower).
                let mut saved = cp
                    .store
                    .save_operation(&o, phase_of(&o), Some(ev.clone()))
                    .await;
                while let Err(e) = saved {
                    tracing::warn!(operation = %id, error = %e, "cannot save the operation; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    saved = cp
                        .store
                        .save_operation(&o, phase_of(&o), Some(ev.clone()))
                        .await;
                }
                drop(guard);
                cp.changed.notify_waiters();
                cp.ops.fault_at(step, true);
            }
            Err(StepError::Retry(e)) => {
                let (s0, since, n) = match attempt_since {
                    Some((s, t, n)) if s == step => (s, t, n + 1),
                    _ => (step, tokio::time::Instant::now(), 1),
                };
                attempt_since = Some((s0, since, n));
                if since.elapsed() < retry_bound(step) {
                    if let Some(s) = o.steps.get_mut(o.current) {
                        s.message = Some(format!("retrying ({n}): {e}"));
                    }
                    let _ = cp.store.save_operation(&o, phase_of(&o), None).await;
                    drop(guard);
                    let backoff = Duration::from_millis(500 * u64::from(n.min(10)));
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    continue;
                }
                attempt_since = None;
                fail_step(&cp, &mut o, step, e).await;
                drop(guard);
            }
            Err(StepError::Fatal(e)) => {
                attempt_since = None;
                fail_step(&cp, &mut o, step, e).await;
                drop(guard);
            }
        }
    }
}

/// A decision that is due by itself: the commit policy's timer, or a test's time box.
fn wait_due(o: &mut Operation, step: Step) -> Option<(Decision, String)> {
    let since = o.op.waiting_since?;
    let waited = (Utc::now() - since).to_std().unwrap_or_default();
    match step {
        Step::Testing => {
            let max = Duration::from_secs(o.op.max_duration_secs?);
            (waited >= max).then(|| {
                o.op.test_result.get_or_insert_with(|| "stopped".into());
                (
                    Decision::Stop,
                    format!("the test reached its time box of {} s", max.as_secs()),
                )
            })
        }
        Step::BeforeCommit => {
            o.op.commit_policy
                .due(waited, o.op.reverse_protection)
                .map(|d| (d, format!("commit policy after {} s", waited.as_secs())))
        }
        _ => None,
    }
}

async fn fail_step(cp: &Arc<ControlPlane>, o: &mut Operation, step: Step, e: String) {
    tracing::warn!(operation = %o.id, step = step.as_str(), error = %e, "operation step failed");
    if let Some(s) = o.steps.get_mut(o.current) {
        s.state = "failed".into();
        s.finished_at = Some(Utc::now());
        s.message = Some(e.clone());
    }
    let ev_msg = format!("{} step {} failed: {e}", o.op.kind.as_str(), step.as_str());
    if o.op.decision.is_none() {
        // Before the decision: undo what was brought up.
        o.op.failure = Some(ev_msg.clone());
        let d = if o.op.kind == OperationKind::FailoverTest {
            Decision::Stop
        } else {
            Decision::Rollback
        };
        o.op.decision = Some(d);
        o.op.decision_reason = Some(format!("step {} failed", step.as_str()));
        o.op.test_result = Some("failed".into());
        // The plan: what is done stays, the rest of the bring-up is dropped, the
        // rollback follows.
        o.op.plan.truncate(o.current + 1);
        o.steps.truncate(o.current + 1);
        o.current += 1;
        let mut undo = vec![Step::Discard];
        if d == Decision::Rollback {
            undo.push(Step::RestartProtected);
        }
        o.append(&undo);
        o.state = "running".into();
    } else {
        o.state = "failed".into();
        o.error = Some(ev_msg.clone());
        // Past the decision nothing undoes by itself: the operator must act.
        alert_failed(cp, o, &ev_msg).await;
    }
    let _ = cp
        .store
        .save_operation(
            o,
            phase_of(o),
            Some(("operation.step_failed", "error", ev_msg)),
        )
        .await;
    cp.changed.notify_waiters();
}

/// Ends the operation: final task state, the VPG released, the report.
async fn finish(cp: &Arc<ControlPlane>, o: &mut Operation) -> Result<(), StoreError> {
    let ended = Utc::now();
    let (result, lifecycle, tested) = match (o.op.kind, o.op.decision) {
        (_, _) if o.op.failure.is_some() => ("failed", None, None),
        (OperationKind::FailoverTest, _) => ("stopped", None, Some(ended)),
        (
            _,
            Some(Decision::Commit {
                reverse_protection: true,
            }),
        ) => ("committed_reverse_protected", None, None),
        (_, Some(Decision::Commit { .. })) => ("committed", Some(Lifecycle::Recovered), None),
        (_, Some(Decision::Rollback)) => ("rolled_back", None, None),
        _ => ("failed", None, None),
    };
    // Only a test that came up counts for the test reminder.
    let tested = if o.op.failure.is_some() { None } else { tested };
    o.state = if o.op.failure.is_some() {
        "failed".into()
    } else {
        "succeeded".into()
    };
    if o.op.failure.is_some() {
        o.error.clone_from(&o.op.failure);
    }
    let vpg_name = cp
        .store
        .op_vpg(&o.vpg_id)
        .await
        .map(|v| v.name)
        .unwrap_or_default();
    let rto_ms =
        o.op.vms_up_at
            .map(|up| (up - o.created_at).num_milliseconds().max(0) as u64);
    let report = RecoveryReportView {
        id: crate::manager::store::new_id(),
        vpg_id: o.vpg_id.clone(),
        vpg_name,
        kind: o.op.kind.as_str().into(),
        result: result.into(),
        checkpoint_id: o.op.checkpoint_id,
        checkpoint_at: o.op.checkpoint_at,
        created_by: o.created_by.clone(),
        started_at: o.created_at,
        ended_at: ended,
        rto_ms,
        notes: o.op.notes.clone(),
        steps: o.steps.clone(),
        details: serde_json::json!({
            "operation": o.id,
            "decision": o.op.decision.map(|d| d.as_str()),
            "decided_by": o.op.decided_by,
            "decision_reason": o.op.decision_reason,
            "test_result": o.op.test_result,
            "failure": o.op.failure,
            "unreachable_hosts": o.op.unreachable_hosts,
            "recovered": o.op.recovered,
            "fencing_generation": o.op.fencing_generation,
        }),
    };
    cp.store
        .finish_operation(o, lifecycle, tested, report)
        .await?;
    if let Some(f) = o.op.failure.clone() {
        alert_failed(cp, o, &f).await;
    } else {
        if let Err(e) = cp.store.clear_event_alerts(&o.vpg_id).await {
            tracing::warn!(operation = %o.id, error = %e, "cannot clear the VPG's operation alerts");
        }
        if o.op
            .decision_reason
            .as_deref()
            .is_some_and(|r| r.contains("time box"))
        {
            let msg = format!(
                "VPG {}: failover test {} reached its time box and was stopped",
                vpg_label(cp, &o.vpg_id).await,
                o.id
            );
            if let Err(e) = cp
                .store
                .raise_event_alert(
                    AlertKind::TestTimeBoxed,
                    &o.vpg_id,
                    Severity::Warning,
                    msg,
                    serde_json::json!({"operation": o.id}),
                )
                .await
            {
                tracing::warn!(operation = %o.id, error = %e, "cannot raise the time-box alert");
            }
        }
    }
    cp.changed.notify_waiters();
    Ok(())
}

/// The VPG's name for a message (its id if it cannot be read).
async fn vpg_label(cp: &ControlPlane, vpg_id: &str) -> String {
    cp.store
        .get_vpg(vpg_id)
        .await
        .map_or_else(|_| vpg_id.to_string(), |v| v.name)
}

/// Raises the VPG's `operation_failed` alert (once while open).
async fn alert_failed(cp: &Arc<ControlPlane>, o: &Operation, why: &str) {
    let msg = format!(
        "VPG {}: {} {} failed: {why}",
        vpg_label(cp, &o.vpg_id).await,
        o.op.kind.as_str(),
        o.id
    );
    let details = serde_json::json!({"operation": o.id, "kind": o.op.kind.as_str()});
    if let Err(e) = cp
        .store
        .raise_event_alert(
            AlertKind::OperationFailed,
            &o.vpg_id,
            Severity::Error,
            msg,
            details,
        )
        .await
    {
        tracing::warn!(operation = %o.id, error = %e, "cannot raise the operation alert");
    }
}
