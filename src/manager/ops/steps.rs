//! What each step of an operation does. Every step is idempotent: it may run again
//! after a manager restart, and the agents answer a repeated command (same operation
//! id) with what they already did.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use super::StepError;
use crate::manager::control::rounds::RoundRequest;
use crate::manager::control::ControlPlane;
use crate::manager::store::operations::{OpMember, OpVpg, Operation};
use crate::model::operations::{
    boot_order, recovered_name, recovery_ip, recovery_network, OperationKind, Step,
};
use crate::model::settings::VpgSettings;
use crate::proto::control::{
    CheckpointKind, Command, CommandBody, PowerState, RecoverDisk, RecoverVm, RecoveredVm,
    RecoveryEnd, RecoveryReport, ReverseSeed,
};

const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// A commit promotes the journal into the replica: bounded by the journal's size.
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(1800);

pub(super) async fn run(
    cp: &Arc<ControlPlane>,
    o: &mut Operation,
    step: Step,
) -> Result<String, StepError> {
    let v = cp.store.op_vpg(&o.vpg_id).await?;
    match step {
        Step::Prepare => prepare(cp, o, &v).await,
        Step::TagTestStart => tag_test_start(cp, o).await,
        Step::BumpFencing => bump_fencing(cp, o, &v).await,
        Step::ShutDownProtected => shut_down(cp, o, &v).await,
        Step::FinalCheckpoint => final_checkpoint(cp, o).await,
        Step::Recover => recover(cp, o, &v).await,
        Step::PowerOn => power_on(cp, o, &v).await,
        Step::StopProtection => stop_protection(cp, o, &v).await,
        Step::Promote => promote(cp, o, &v).await,
        Step::SeedReverse => seed_reverse(cp, o, &v).await,
        Step::ReverseProtection => reverse_protection(cp, o, &v).await,
        Step::MarkRecovered => Ok("the VPG is Recovered: its VMs run at the recovery site".into()),
        Step::Discard => discard(cp, o, &v).await,
        Step::RestartProtected => restart_protected(cp, o, &v).await,
        Step::RecordTest => Ok(format!(
            "test recorded ({})",
            o.op.test_result.as_deref().unwrap_or("passed")
        )),
        Step::BeforeCommit | Step::Testing => Ok("waited".into()),
    }
}

/// The members the operation acts on (a test may cover some VMs only).
fn members<'a>(o: &Operation, v: &'a OpVpg) -> Vec<&'a OpMember> {
    v.members
        .iter()
        .filter(|m| o.op.vm_ids.is_empty() || o.op.vm_ids.contains(&m.vm_id))
        .collect()
}

fn is_test(o: &Operation) -> bool {
    o.op.kind == OperationKind::FailoverTest
}

fn fencing(o: &Operation, v: &OpVpg) -> u64 {
    // Tests do not bump: they carry the generation in force.
    o.op.fencing_generation
        .unwrap_or(v.fencing_generation)
        .max(v.fencing_generation)
}

/// Sends one command and waits for its answer. `key` makes the id stable across
/// retries and restarts, so an agent that already ran it answers from memory.
async fn command(
    cp: &ControlPlane,
    host: &str,
    key: String,
    body: CommandBody,
    timeout: Duration,
) -> Result<serde_json::Value, StepError> {
    if !cp.hub.is_connected(host) {
        return Err(StepError::Retry(format!("host {host} is not connected")));
    }
    let cmd = Command { id: key, body };
    match cp.hub.command(host, cmd, timeout).await {
        Ok(r) if r.ok => Ok(r.output),
        Ok(r) => {
            let e = r.error.unwrap_or_else(|| "refused".into());
            // A fenced command never gets better by waiting.
            if e.contains("fenced") {
                Err(StepError::Fatal(format!("{host}: {e}")))
            } else {
                Err(StepError::Retry(format!("{host}: {e}")))
            }
        }
        Err(e) => Err(StepError::Retry(e.to_string())),
    }
}

async fn prepare(cp: &ControlPlane, o: &mut Operation, v: &OpVpg) -> Result<String, StepError> {
    if o.op.kind == OperationKind::Move {
        return Ok(format!(
            "{} VMs; the checkpoint is taken after shutdown",
            v.members.len()
        ));
    }
    let id =
        o.op.checkpoint_id
            .ok_or_else(|| StepError::Fatal("no checkpoint was chosen".into()))?;
    match cp.store.checkpoint_recoverable(&v.id, id).await? {
        Some((true, at)) => {
            o.op.checkpoint_at = Some(at);
            Ok(format!(
                "checkpoint {id} taken {} ({}), {} VMs",
                at.format("%Y-%m-%d %H:%M:%S%.3f UTC"),
                o.op.checkpoint.describe(),
                members(o, v).len()
            ))
        }
        Some((false, _)) => Err(StepError::Fatal(format!(
            "checkpoint {id} is no longer recoverable"
        ))),
        None => Err(StepError::Fatal(format!(
            "checkpoint {id} no longer exists"
        ))),
    }
}

async fn tag_test_start(cp: &Arc<ControlPlane>, o: &mut Operation) -> Result<String, StepError> {
    let short: String =
        o.id.chars()
            .rev()
            .take(8)
            .collect::<String>()
            .chars()
            .rev()
            .collect();
    let req = RoundRequest {
        kind: CheckpointKind::UserTagged,
        tag: Some(format!("failover test {short}")),
        quiesce: false,
    };
    // The tag marks the test in the journals; a test still runs without it (a host
    // of the protected site may be down — that may be what is being tested).
    match cp.rounds.run_round(cp, &o.vpg_id, req, None).await {
        Ok(c) => Ok(format!(
            "checkpoint {} tagged `failover test {short}`",
            c.id
        )),
        Err(e) => Ok(format!("skipped: the start could not be tagged ({e})")),
    }
}

async fn bump_fencing(
    cp: &ControlPlane,
    o: &mut Operation,
    v: &OpVpg,
) -> Result<String, StepError> {
    let expect = o.op.fencing_generation.unwrap_or(v.fencing_generation);
    let now = cp.store.bump_fencing(&v.id, &o.id, expect).await?;
    o.op.fencing_generation = Some(now);
    cp.config_changed();
    Ok(format!("fencing generation {now}"))
}

/// Protected hosts and their VMs (in the operation).
fn by_protected_host<'a>(ms: &[&'a OpMember]) -> BTreeMap<&'a str, Vec<&'a OpMember>> {
    let mut out: BTreeMap<&str, Vec<&OpMember>> = BTreeMap::new();
    for m in ms {
        out.entry(m.protected_host.as_str()).or_default().push(m);
    }
    out
}

fn by_recovery_host<'a>(ms: &[&'a OpMember]) -> BTreeMap<&'a str, Vec<&'a OpMember>> {
    let mut out: BTreeMap<&str, Vec<&OpMember>> = BTreeMap::new();
    for m in ms {
        if let Some(r) = &m.recovery_host {
            out.entry(r.as_str()).or_default().push(m);
        }
    }
    out
}

async fn shut_down(cp: &ControlPlane, o: &mut Operation, v: &OpVpg) -> Result<String, StepError> {
    let ms = members(o, v);
    let gen = fencing(o, v);
    let mut done = Vec::new();
    let mut unreachable = Vec::new();
    for (host, vms) in by_protected_host(&ms) {
        if !cp.hub.is_connected(host) {
            if o.op.kind == OperationKind::Move {
                return Err(StepError::Retry(format!(
                    "protected host {host} is not connected: a move shuts its VMs down cleanly"
                )));
            }
            unreachable.push(host.to_string());
            continue;
        }
        let body = CommandBody::PrepareFailover {
            operation: o.id.clone(),
            vpg_id: v.id.clone(),
            fencing_generation: gen,
            vms: vms.iter().map(|m| m.vm.clone()).collect(),
        };
        match command(
            cp,
            host,
            format!("{}:shutdown:{host}", o.id),
            body,
            COMMAND_TIMEOUT,
        )
        .await
        {
            Ok(_) => done.push(host.to_string()),
            // A failover goes on without a protected host that does not answer: that
            // is what a disaster looks like. Fencing keeps it out when it returns.
            Err(e) if o.op.kind == OperationKind::Failover => {
                tracing::warn!(host, error = ?e, "protected host did not shut its VMs down");
                unreachable.push(host.to_string());
            }
            Err(e) => return Err(e),
        }
    }
    o.op.unreachable_hosts = unreachable.clone();
    if unreachable.is_empty() {
        Ok(format!(
            "protected VMs shut down and locked on {}",
            done.join(", ")
        ))
    } else {
        Ok(format!(
            "protected VMs shut down on [{}]; not reachable: [{}]",
            done.join(", "),
            unreachable.join(", ")
        ))
    }
}

/// The tag of a move's final checkpoint.
pub(crate) const FINAL_CHECKPOINT_TAG: &str = "move: final checkpoint";

async fn final_checkpoint(cp: &Arc<ControlPlane>, o: &mut Operation) -> Result<String, StepError> {
    let id = match o.op.checkpoint_id {
        Some(id) => id,
        None => {
            // An earlier attempt's checkpoint that never became recoverable (retaken
            // below, or lost with a manager that stopped mid-step) is replaced by this
            // one: it must not stay listed as a recovery point that failed.
            discard_superseded(cp, &o.vpg_id).await?;
            let req = RoundRequest {
                kind: CheckpointKind::UserTagged,
                tag: Some(FINAL_CHECKPOINT_TAG.into()),
                quiesce: false,
            };
            let c = cp
                .rounds
                .run_round(cp, &o.vpg_id, req, None)
                .await
                .map_err(|e| StepError::Retry(e.to_string()))?;
            let id =
                u64::try_from(c.id).map_err(|_| StepError::Fatal("bad checkpoint id".into()))?;
            o.op.checkpoint_id = Some(id);
            o.op.checkpoint_at = Some(c.taken_at);
            id
        }
    };
    // Durable in every journal: the evaluator marks it from the recovery hosts'
    // heartbeats. The VMs are off, so that takes a heartbeat or two; longer means the
    // marker missed a journal (a disk fell back to its bitmap meanwhile, a sync ran
    // over it) and a new checkpoint, after the catch-up, is the way on.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some((true, _)) = cp.store.checkpoint_recoverable(&o.vpg_id, id).await? {
            return Ok(format!("final checkpoint {id} is durable in every journal"));
        }
        if tokio::time::Instant::now() >= deadline {
            // A new attempt takes a new checkpoint; this one is discarded now (also if
            // no attempt follows: the operation then fails and rolls back).
            o.op.checkpoint_id = None;
            o.op.checkpoint_at = None;
            discard_superseded(cp, &o.vpg_id).await?;
            return Err(StepError::Retry(format!(
                "checkpoint {id} did not become recoverable in time: discarded, a new one \
                 is taken"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Deletes the VPG's final checkpoints that are not recoverable (see
/// `Store::discard_unrecoverable_tagged`).
async fn discard_superseded(cp: &ControlPlane, vpg_id: &str) -> Result<(), StepError> {
    let ids = cp
        .store
        .discard_unrecoverable_tagged(
            vpg_id,
            FINAL_CHECKPOINT_TAG,
            "it did not become recoverable in time and a new final checkpoint replaces it",
        )
        .await?;
    if !ids.is_empty() {
        tracing::warn!(
            vpg = vpg_id,
            ?ids,
            "move: unrecoverable final checkpoints discarded"
        );
    }
    Ok(())
}

fn recover_vm(o: &Operation, m: &OpMember, s: &VpgSettings) -> RecoverVm {
    RecoverVm {
        name: recovered_name(&m.vm, is_test(o)),
        source_vm: m.vm.clone(),
        cpus: m.cpus,
        memory_mib: m.memory_mib,
        network: recovery_network(&m.settings, s, is_test(o)),
        ip_address: recovery_ip(&m.settings, is_test(o)),
        boot: m.boot.clone(),
        disks: m
            .disks
            .iter()
            .filter_map(|(name, id, _)| {
                Some(RecoverDisk {
                    host: m.protected_host.clone(),
                    disk_id: (*id)?,
                    name: name.clone(),
                })
            })
            .collect(),
    }
}

async fn recover(cp: &ControlPlane, o: &mut Operation, v: &OpVpg) -> Result<String, StepError> {
    let checkpoint =
        o.op.checkpoint_id
            .ok_or_else(|| StepError::Fatal("no checkpoint".into()))?;
    let ms = members(o, v);
    let gen = fencing(o, v);
    let mut reports = Vec::new();
    for (host, vms) in by_recovery_host(&ms) {
        let body = CommandBody::Recover {
            operation: o.id.clone(),
            vpg_id: v.id.clone(),
            fencing_generation: gen,
            checkpoint,
            test: is_test(o),
            scratch_budget_bytes: o.op.scratch_budget_bytes,
            vms: vms.iter().map(|m| recover_vm(o, m, &v.settings)).collect(),
        };
        let out = command(
            cp,
            host,
            format!("{}:recover:{host}", o.id),
            body,
            COMMAND_TIMEOUT,
        )
        .await?;
        let r: RecoveryReport = serde_json::from_value(out).map_err(|e| {
            StepError::Fatal(format!("{host} answered a recovery we cannot read: {e}"))
        })?;
        reports.push(r);
    }
    let n: usize = reports.iter().map(|r| r.vms.len()).sum();
    let exports: Vec<String> = reports
        .iter()
        .flat_map(|r| {
            r.vms
                .iter()
                .flat_map(|vm| vm.disks.iter().map(|d| d.export.clone()))
        })
        .collect();
    o.op.recovered = reports;
    Ok(format!(
        "{n} VMs recovered to checkpoint {checkpoint}; exports: {}",
        exports.join(", ")
    ))
}

/// Keeps the task's record of the recovered VMs' power in step with what was done to them.
fn note_power(o: &mut Operation, which: impl Fn(&RecoveredVm) -> bool, state: PowerState) {
    for v in o.op.recovered.iter_mut().flat_map(|r| r.vms.iter_mut()) {
        if which(v) {
            v.power_state = state;
        }
    }
}

async fn power_on(cp: &ControlPlane, o: &mut Operation, v: &OpVpg) -> Result<String, StepError> {
    let ms = members(o, v);
    let vms: Vec<((String, String), u32, u64)> = ms
        .iter()
        .filter_map(|m| {
            let host = m.recovery_host.clone()?;
            Some((
                (host, recovered_name(&m.vm, is_test(o))),
                m.settings.boot_group,
                u64::from(m.settings.boot_delay_secs),
            ))
        })
        .collect();
    let groups = boot_order(&vms);
    let n = groups.len();
    for (i, (group, delay)) in groups.into_iter().enumerate() {
        for (host, vm) in &group {
            command(
                cp,
                host,
                format!("{}:power_on:{host}:{vm}", o.id),
                CommandBody::PowerOn { vm: vm.clone() },
                COMMAND_TIMEOUT,
            )
            .await?;
            note_power(o, |v| v.name == *vm, PowerState::On);
        }
        if i + 1 < n && delay > 0 {
            tokio::time::sleep(Duration::from_secs(delay)).await;
        }
    }
    o.op.vms_up_at = Some(Utc::now());
    Ok(format!("{} VMs running, {n} boot groups", vms.len()))
}

async fn stop_protection(
    cp: &ControlPlane,
    o: &mut Operation,
    v: &OpVpg,
) -> Result<String, StepError> {
    // The phase saved before this step makes the desired states leave the VPG out.
    cp.config_changed();
    let ms = members(o, v);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let still: Vec<&str> = by_protected_host(&ms)
            .into_iter()
            .filter(|(host, vms)| {
                cp.hub.live(host).is_some_and(|l| {
                    l.heartbeat.as_ref().is_some_and(|hb| {
                        hb.status.protected.iter().any(|d| {
                            d.recovery_host.is_some()
                                && vms.iter().any(|m| {
                                    m.disks.iter().any(|(_, id, _)| *id == Some(d.disk_id))
                                })
                        })
                    })
                })
            })
            .map(|(h, _)| h)
            .collect();
        if still.is_empty() {
            return Ok("protection stopped".into());
        }
        if tokio::time::Instant::now() >= deadline {
            // Fencing refuses their streams anyway; the promotion checks the journals.
            return Ok(format!(
                "protection stopped (hosts still reporting it: {})",
                still.join(", ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn promote(cp: &ControlPlane, o: &mut Operation, v: &OpVpg) -> Result<String, StepError> {
    let ms = members(o, v);
    let gen = fencing(o, v);
    let mut reports = Vec::new();
    for host in by_recovery_host(&ms).keys() {
        let body = CommandBody::EndRecovery {
            operation: o.id.clone(),
            vpg_id: v.id.clone(),
            fencing_generation: gen,
            end: RecoveryEnd::Commit,
        };
        let out = command(
            cp,
            host,
            format!("{}:promote:{host}", o.id),
            body,
            PROMOTE_TIMEOUT,
        )
        .await?;
        if let Ok(r) = serde_json::from_value::<RecoveryReport>(out) {
            reports.push(r);
        }
    }
    if !reports.is_empty() {
        o.op.recovered = reports;
    }
    Ok("journals promoted to the checkpoint; the recovered VMs run on their replica disks".into())
}

async fn seed_reverse(
    cp: &ControlPlane,
    o: &mut Operation,
    v: &OpVpg,
) -> Result<String, StepError> {
    let ms = members(o, v);
    let gen = fencing(o, v);
    let mut n = 0;
    for (host, vms) in by_protected_host(&ms) {
        let mut seeds = Vec::new();
        for m in vms {
            let Some(rec_host) = &m.recovery_host else {
                continue;
            };
            let Some(rvm) =
                o.op.recovered
                    .iter()
                    .flat_map(|r| r.vms.iter())
                    .find(|r| r.source_vm == m.vm)
            else {
                return Err(StepError::Fatal(format!(
                    "the recovery of VM {} is not known",
                    m.vm
                )));
            };
            for (name, id, _) in &m.disks {
                let (Some(id), Some(rd)) = (id, rvm.disks.iter().find(|d| &d.name == name)) else {
                    continue;
                };
                let Some(new_id) = rd.disk_id else {
                    return Err(StepError::Fatal(format!(
                        "the committed disk {name} of VM {} has no disk id",
                        m.vm
                    )));
                };
                seeds.push(ReverseSeed {
                    disk_id: *id,
                    vm: m.vm.clone(),
                    new_host: rec_host.clone(),
                    new_disk_id: new_id,
                });
            }
        }
        n += seeds.len();
        let body = CommandBody::SeedReverse {
            operation: o.id.clone(),
            vpg_id: v.id.clone(),
            fencing_generation: gen,
            seeds,
        };
        command(
            cp,
            host,
            format!("{}:seed:{host}", o.id),
            body,
            PROMOTE_TIMEOUT,
        )
        .await?;
    }
    Ok(format!(
        "{n} old protected disks are the replicas' starting point"
    ))
}

async fn reverse_protection(
    cp: &ControlPlane,
    o: &mut Operation,
    v: &OpVpg,
) -> Result<String, StepError> {
    let ms = members(o, v);
    let mut swaps = Vec::new();
    for m in ms {
        let Some(rec_id) = &m.recovery_host_id else {
            continue;
        };
        // The recovered VM keeps the protected VM's name, on the recovery host.
        let Some(new_vm) = cp.store.vm_on_host(rec_id, &m.vm).await? else {
            return Err(StepError::Retry(format!(
                "the recovery host has not reported VM {} yet",
                m.vm
            )));
        };
        swaps.push((m.vm_id.clone(), new_vm, m.protected_host_id.clone()));
    }
    cp.store.reverse_roles(&v.id, &swaps).await?;
    cp.config_changed();
    Ok(format!(
        "{} VMs protected in reverse, towards the old protected site",
        swaps.len()
    ))
}

async fn discard(cp: &ControlPlane, o: &mut Operation, v: &OpVpg) -> Result<String, StepError> {
    let ms = members(o, v);
    let gen = fencing(o, v);
    let mut hosts = Vec::new();
    for host in by_recovery_host(&ms).keys() {
        let body = CommandBody::EndRecovery {
            operation: o.id.clone(),
            vpg_id: v.id.clone(),
            fencing_generation: gen,
            end: RecoveryEnd::Discard,
        };
        command(
            cp,
            host,
            format!("{}:discard:{host}", o.id),
            body,
            COMMAND_TIMEOUT,
        )
        .await?;
        hosts.push(host.to_string());
    }
    note_power(o, |_| true, PowerState::Off);
    Ok(format!(
        "recovered VMs removed and scratch discarded on {}",
        hosts.join(", ")
    ))
}

async fn restart_protected(
    cp: &ControlPlane,
    o: &mut Operation,
    v: &OpVpg,
) -> Result<String, StepError> {
    if !o.op.plan.contains(&Step::ShutDownProtected) {
        return Ok("skipped: the protected VMs were not shut down".into());
    }
    let ms = members(o, v);
    let gen = fencing(o, v);
    let mut hosts = Vec::new();
    for (host, vms) in by_protected_host(&ms) {
        let body = CommandBody::ReleaseFailover {
            operation: o.id.clone(),
            vpg_id: v.id.clone(),
            fencing_generation: gen,
            vms: vms.iter().map(|m| m.vm.clone()).collect(),
            power_on: true,
        };
        command(
            cp,
            host,
            format!("{}:restart:{host}", o.id),
            body,
            COMMAND_TIMEOUT,
        )
        .await?;
        hosts.push(host.to_string());
    }
    Ok(format!(
        "original VMs unlocked and running again on {}",
        hosts.join(", ")
    ))
}
