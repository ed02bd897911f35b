//! VM requests that go through the VM's host: creating a VM (the host's agent makes it,
//! disks, NICs and boot included, and reports it in its inventory) and reading the end of
//! a VM's serial console. Each is one command over the control channel with a fresh id,
//! bounded in time; an agent's refusal comes back with its own words.

use std::time::Duration;

use super::{ControlPlane, HubError};
use crate::manager::store::{check_vm_create, new_id, Actor, StoreError};
use crate::proto::api::{Connectivity, PageQuery, Vm, VmConsole, VmCreate, VmQuery};
use crate::proto::control::{self, Command, CommandBody, ConsoleTail, NewDisk};

/// How long a console read may take (the agent reads the end of a file).
pub const CONSOLE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long creating a VM may take (sparse disks, then the hypervisor starts it).
pub const CREATE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a VM request through its host failed.
#[derive(Debug, thiserror::Error)]
pub enum VmCommandError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The host's agent is not connected (or too slow to take messages).
    #[error("host {0} is not connected")]
    HostUnreachable(String),
    #[error("host {host} did not answer within {} s", .after.as_secs())]
    Timeout { host: String, after: Duration },
    /// The agent could not read the console (no such VM there, a hypervisor without a
    /// console log).
    #[error("{host}: {message}")]
    ConsoleUnavailable { host: String, message: String },
    /// The agent refused to create the VM.
    #[error("{host}: {message}")]
    CreateRefused { host: String, message: String },
    /// The agent answered with something this manager does not understand.
    #[error("host {host} answered with an unreadable {what}: {error}")]
    BadAnswer {
        host: String,
        what: &'static str,
        error: String,
    },
}

impl VmCommandError {
    fn from_hub(e: HubError, after: Duration) -> Self {
        match e {
            HubError::NotConnected(h) | HubError::Slow(h) => VmCommandError::HostUnreachable(h),
            HubError::Timeout(host, _) => VmCommandError::Timeout { host, after },
        }
    }
}

/// Sends one command to `host` and waits for its result (ok or the agent's error).
async fn run(
    cp: &ControlPlane,
    host: &str,
    id: String,
    body: CommandBody,
    after: Duration,
) -> Result<Result<serde_json::Value, String>, VmCommandError> {
    if !cp.hub.is_connected(host) {
        return Err(VmCommandError::HostUnreachable(host.to_string()));
    }
    let r = cp
        .hub
        .command(host, Command { id, body }, after)
        .await
        .map_err(|e| VmCommandError::from_hub(e, after))?;
    Ok(if r.ok {
        Ok(r.output)
    } else {
        Err(r.error.unwrap_or_else(|| "refused without a reason".into()))
    })
}

/// The last `max_bytes` of the VM's serial console log, read by its host's agent.
pub async fn read_console(
    cp: &ControlPlane,
    vm_id: &str,
    max_bytes: u64,
) -> Result<VmConsole, VmCommandError> {
    let vm = cp.store.get_vm(vm_id).await?;
    let host = cp.store.get_host(&vm.host_id).await?;
    let body = CommandBody::ReadConsole {
        vm: vm.name.clone(),
        max_bytes,
    };
    let id = format!("console:{}", new_id());
    let output = run(cp, &host.name, id, body, CONSOLE_TIMEOUT)
        .await?
        .map_err(|message| VmCommandError::ConsoleUnavailable {
            host: host.name.clone(),
            message,
        })?;
    let tail: ConsoleTail =
        serde_json::from_value(output).map_err(|e| VmCommandError::BadAnswer {
            host: host.name.clone(),
            what: "console tail",
            error: e.to_string(),
        })?;
    Ok(VmConsole {
        vm_id: vm.id,
        vm: vm.name,
        text: tail.text,
        total_bytes: tail.total_bytes,
        truncated: tail.truncated,
    })
}

/// Creates a VM. On a host an agent has registered for, the agent creates it (`CreateVm`
/// with disks, NICs and boot; it starts powered on) and the manager records what the
/// agent then reports; the host must be connected. A host no agent ever registered for
/// has nothing to create the VM on: the VM is only recorded.
pub async fn create_vm(
    cp: &ControlPlane,
    actor: &Actor,
    input: VmCreate,
) -> Result<Vm, VmCommandError> {
    let name = check_vm_create(&input)?;
    let host = match cp.store.get_host(&input.host_id).await {
        Ok(h) => h,
        Err(StoreError::NotFound { .. }) => {
            return Err(
                StoreError::from(crate::manager::store::unknown_host(&input.host_id)).into(),
            )
        }
        Err(e) => return Err(e.into()),
    };
    if host.connectivity == Connectivity::Unknown {
        return Ok(cp.store.create_vm(actor, input).await?);
    }
    if !cp.hub.is_connected(&host.name) {
        return Err(VmCommandError::HostUnreachable(host.name));
    }
    let q = VmQuery {
        host: Some(host.id.clone()),
        name: Some(name.clone()),
        ..VmQuery::default()
    };
    if !cp
        .store
        .list_vms(&q, &PageQuery::default())
        .await?
        .items
        .is_empty()
    {
        return Err(StoreError::conflict(
            "vm.name_taken",
            format!("the host already has a VM named `{name}`"),
        )
        .into());
    }
    let body = CommandBody::CreateVm {
        name,
        cpus: input.cpus,
        memory_mib: input.memory_mib,
        disks: input
            .disks
            .iter()
            .map(|d| NewDisk {
                name: d.name.trim().to_string(),
                size_bytes: d.size_bytes,
            })
            .collect(),
        boot: input.boot.clone().map(Into::into),
        nics: input
            .nics
            .iter()
            .map(|n| control::Nic {
                network: n.network.clone(),
                mac: n.mac.clone(),
            })
            .collect(),
    };
    let id = format!("create-vm:{}", new_id());
    run(cp, &host.name, id, body, CREATE_TIMEOUT)
        .await?
        .map_err(|message| VmCommandError::CreateRefused {
            host: host.name.clone(),
            message,
        })?;
    // The agent sent its inventory (with the new VM) before this answer, and the channel
    // applied it before routing the answer here.
    Ok(cp.store.record_created_vm(actor, input).await?)
}
