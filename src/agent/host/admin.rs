//! The agent's local admin endpoint: loopback only, no authentication (the config refuses
//! any other address). `GET /v1/status`, `POST /v1/checkpoints` (the checkpoint trigger
//! until the manager drives rounds), `POST /v1/disks/{name}/sync` (resume a held sync,
//! Force Sync, Full Sync), `GET /v1/received/{host}/{disk_id}/checkpoints` (with their
//! recoverability), `GET /healthz`; the simulated hypervisor's VMs (`GET /v1/vms`,
//! `POST /v1/vms`, `POST /v1/vms/{name}/power`) and the control channel's state
//! (`GET /v1/control`); recoveries (`GET /v1/recoveries`, `POST /v1/recoveries`:
//! break-glass recovery of a VPG from the persisted desired state, and
//! `POST /v1/recoveries/{operation}/end`: commit or discard one). Errors are problem-details JSON with a stable `code`, like the
//! manager's API.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRef, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{Agent, AgentError};
use crate::agent::control::ControlClient;
use crate::agent::hypervisor::{HostVms, HypervisorError, VmSpec};
use crate::proto::agent::{
    AgentStatus, CheckpointReport, CheckpointRequest, ControlStatus, PowerRequest,
    ReceivedCheckpoint, SyncRequest,
};
use crate::proto::api::Problem;
use crate::proto::control::{Inventory, InventoryVm};

struct AdminError(StatusCode, &'static str, String);

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let AdminError(status, code, detail) = self;
        let body = Problem {
            type_: "about:blank".into(),
            title: status.canonical_reason().unwrap_or("error").into(),
            status: status.as_u16(),
            detail,
            code: code.into(),
            field: None,
        };
        (
            status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            serde_json::to_vec(&body).unwrap_or_default(),
        )
            .into_response()
    }
}

impl From<AgentError> for AdminError {
    fn from(e: AgentError) -> Self {
        match e {
            AgentError::NoSuchGroup(_) => {
                AdminError(StatusCode::NOT_FOUND, "agent.no_such_group", e.to_string())
            }
            AgentError::NoSuchDisk(_) => {
                AdminError(StatusCode::NOT_FOUND, "agent.no_such_disk", e.to_string())
            }
            AgentError::Disk { .. } => AdminError(
                StatusCode::CONFLICT,
                "agent.disk_not_replicated",
                e.to_string(),
            ),
            AgentError::ShuttingDown => AdminError(
                StatusCode::SERVICE_UNAVAILABLE,
                "agent.shutting_down",
                e.to_string(),
            ),
            other => AdminError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "agent.internal",
                other.to_string(),
            ),
        }
    }
}

impl From<HypervisorError> for AdminError {
    fn from(e: HypervisorError) -> Self {
        match e {
            HypervisorError::NoSuchVm(_) => {
                AdminError(StatusCode::NOT_FOUND, "vm.not_found", e.to_string())
            }
            HypervisorError::DuplicateVm(_) => {
                AdminError(StatusCode::CONFLICT, "vm.name_taken", e.to_string())
            }
            HypervisorError::DuplicateDisk(_) => {
                AdminError(StatusCode::CONFLICT, "vm.disk_name_taken", e.to_string())
            }
            HypervisorError::Invalid { .. } => AdminError(
                StatusCode::UNPROCESSABLE_ENTITY,
                "vm.invalid",
                e.to_string(),
            ),
            HypervisorError::Agent(a) => a.into(),
            HypervisorError::Prepared(_) | HypervisorError::Recovered(_) => {
                AdminError(StatusCode::CONFLICT, "vm.locked", e.to_string())
            }
            HypervisorError::Unsupported(_) => {
                AdminError(StatusCode::CONFLICT, "vm.unsupported", e.to_string())
            }
            HypervisorError::Qemu { .. } => AdminError(
                StatusCode::BAD_GATEWAY,
                "vm.hypervisor_failed",
                e.to_string(),
            ),
            other => AdminError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "vm.internal",
                other.to_string(),
            ),
        }
    }
}

/// What the admin endpoint serves: the agent, and when the process runs them, the
/// hypervisor's VMs and the control channel.
#[derive(Clone)]
pub struct AdminState {
    pub agent: Arc<Agent>,
    pub vms: Option<Arc<HostVms>>,
    pub control: Option<Arc<ControlClient>>,
}

impl AdminState {
    pub fn new(agent: Arc<Agent>) -> AdminState {
        AdminState {
            agent,
            vms: None,
            control: None,
        }
    }
}

impl FromRef<AdminState> for Arc<Agent> {
    fn from_ref(s: &AdminState) -> Arc<Agent> {
        Arc::clone(&s.agent)
    }
}

/// A JSON body, or the problem that says why it is not one.
fn parsed<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, AdminError> {
    body.map(|Json(t)| t).map_err(|e| {
        AdminError(
            StatusCode::BAD_REQUEST,
            "request.invalid_body",
            e.body_text(),
        )
    })
}

async fn status(State(agent): State<Arc<Agent>>) -> Json<AgentStatus> {
    Json(agent.status())
}

async fn checkpoint(
    State(agent): State<Arc<Agent>>,
    body: Result<Json<CheckpointRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<CheckpointReport>), AdminError> {
    let req = parsed(body)?;
    if req
        .tag
        .as_ref()
        .is_some_and(|t| t.is_empty() || t.len() > 255)
    {
        return Err(AdminError(
            StatusCode::UNPROCESSABLE_ENTITY,
            "checkpoint.tag_invalid",
            "a tag has 1 to 255 bytes".into(),
        ));
    }
    let report = agent.checkpoint(&req)?;
    Ok((StatusCode::CREATED, Json(report)))
}

async fn sync(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    body: Result<Json<SyncRequest>, JsonRejection>,
) -> Result<StatusCode, AdminError> {
    let req = parsed(body)?;
    agent.request_sync(&name, req.action)?;
    Ok(StatusCode::ACCEPTED)
}

async fn received_checkpoints(
    State(agent): State<Arc<Agent>>,
    Path((host, disk_id)): Path<(String, u64)>,
) -> Result<Json<Vec<ReceivedCheckpoint>>, AdminError> {
    // Takes the journal's lock: off the reactor.
    let a = Arc::clone(&agent);
    let h = host.clone();
    let cps = tokio::task::spawn_blocking(move || a.received_checkpoints(&h, disk_id))
        .await
        .map_err(|e| {
            AdminError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "agent.internal",
                e.to_string(),
            )
        })?;
    cps.map(Json).ok_or_else(|| {
        AdminError(
            StatusCode::NOT_FOUND,
            "agent.no_such_received_disk",
            format!("no disk {disk_id} from host `{host}` is received here"),
        )
    })
}

fn vms_of(s: &AdminState) -> Result<&Arc<HostVms>, AdminError> {
    s.vms.as_ref().ok_or_else(|| {
        AdminError(
            StatusCode::NOT_FOUND,
            "vm.no_hypervisor",
            "this agent runs no hypervisor driver".into(),
        )
    })
}

async fn list_vms(State(s): State<AdminState>) -> Result<Json<Inventory>, AdminError> {
    Ok(Json(vms_of(&s)?.inventory()))
}

async fn create_vm(
    State(s): State<AdminState>,
    body: Result<Json<VmSpec>, JsonRejection>,
) -> Result<(StatusCode, Json<InventoryVm>), AdminError> {
    let spec = parsed(body)?;
    let vm = vms_of(&s)?.create(spec).await?;
    Ok((StatusCode::CREATED, Json(vm)))
}

async fn power(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    body: Result<Json<PowerRequest>, JsonRejection>,
) -> Result<Json<InventoryVm>, AdminError> {
    let req = parsed(body)?;
    let change = vms_of(&s)?.set_power(&name, req.state).await?;
    Ok(Json(change.vm))
}

/// `?max_bytes=` of the console route.
#[derive(Debug, serde::Deserialize)]
struct ConsoleQuery {
    max_bytes: Option<u64>,
}

/// Most of a serial log one request returns.
const CONSOLE_MAX_BYTES: u64 = 64 << 10;

/// `GET /v1/vms/{name}/console`: the end of the VM's serial console log.
async fn console(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    axum::extract::Query(q): axum::extract::Query<ConsoleQuery>,
) -> Result<Json<crate::proto::control::ConsoleTail>, AdminError> {
    let max = q.max_bytes.unwrap_or(CONSOLE_MAX_BYTES);
    if max == 0 || max > CONSOLE_MAX_BYTES {
        return Err(AdminError(
            StatusCode::BAD_REQUEST,
            "vm.invalid",
            format!("max_bytes must be 1 to {CONSOLE_MAX_BYTES}"),
        ));
    }
    Ok(Json(vms_of(&s)?.console(&name, max).await?))
}

/// Body of `POST /v1/vms/{name}/quiesce`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct QuiesceRequest {
    /// How long the guest gets (default 5000).
    within_ms: Option<u64>,
}

/// `POST /v1/vms/{name}/quiesce`: freezes the guest's filesystems (guest agent) or
/// pauses the VM, until `POST …/thaw`. Answers `{ "quiesce": "guest_agent" | "paused" }`.
async fn quiesce(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    body: Option<Json<QuiesceRequest>>,
) -> Result<Json<serde_json::Value>, AdminError> {
    let req = body.map(|Json(b)| b).unwrap_or_default();
    let within = std::time::Duration::from_millis(req.within_ms.unwrap_or(5000).clamp(1, 60_000));
    let method = vms_of(&s)?.quiesce(&name, within).await?;
    Ok(Json(serde_json::json!({ "vm": name, "quiesce": method })))
}

async fn thaw(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, AdminError> {
    vms_of(&s)?.thaw(&name).await?;
    Ok(Json(serde_json::json!({ "vm": name, "thawed": true })))
}

/// Body of `POST /v1/recoveries` (break-glass recovery, `bulwark agent recover`).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct BreakGlassRequest {
    /// The VPG's name (or id), as in the persisted desired state's `recovery` list.
    pub vpg: String,
    /// Checkpoint id; none: the newest recoverable in every journal of the VPG.
    #[serde(default)]
    pub checkpoint: Option<u64>,
    #[serde(default)]
    pub test: bool,
}

impl From<crate::agent::recovery::RecoveryError> for AdminError {
    fn from(e: crate::agent::recovery::RecoveryError) -> Self {
        use crate::agent::recovery::RecoveryError as R;
        let (status, code) = match &e {
            R::UnknownVpg { .. } => (StatusCode::NOT_FOUND, "recovery.unknown_vpg"),
            R::NoCheckpoint { .. } => (StatusCode::CONFLICT, "recovery.no_checkpoint"),
            R::NotRecoveryHost => (StatusCode::CONFLICT, "recovery.not_recovery_host"),
            R::Fencing(_) => (StatusCode::CONFLICT, "recovery.fenced"),
            R::Invalid(_) | R::Mismatch { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "recovery.invalid")
            }
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "recovery.failed"),
        };
        AdminError(status, code, e.to_string())
    }
}

async fn list_recoveries(
    State(s): State<AdminState>,
) -> Result<Json<Vec<crate::proto::control::RecoveryReport>>, AdminError> {
    let r = Arc::clone(vms_of(&s)?.recoveries());
    let reports = tokio::task::spawn_blocking(move || r.reports())
        .await
        .map_err(|e| {
            AdminError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "agent.internal",
                e.to_string(),
            )
        })?;
    Ok(Json(reports))
}

async fn break_glass_recovery(
    State(s): State<AdminState>,
    body: Result<Json<BreakGlassRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<crate::agent::recovery::BreakGlassReport>), AdminError> {
    let req = parsed(body)?;
    let report = vms_of(&s)?
        .recoveries()
        .break_glass(&req.vpg, req.checkpoint, req.test)
        .await?;
    Ok((StatusCode::CREATED, Json(report)))
}

/// Body of `POST /v1/recoveries/{operation}/end`.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct EndRecoveryRequest {
    pub end: crate::proto::control::RecoveryEnd,
}

/// Ends a running recovery here (commit or discard) under the generation this host
/// knows for its VPG: what a manager would send, for a recovery no manager runs.
async fn end_recovery(
    State(s): State<AdminState>,
    Path(operation): Path<String>,
    body: Result<Json<EndRecoveryRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, AdminError> {
    let req = parsed(body)?;
    let rec = vms_of(&s)?.recoveries();
    let Some(r) = rec.reports().into_iter().find(|r| r.operation == operation) else {
        return Err(AdminError(
            StatusCode::NOT_FOUND,
            "recovery.not_found",
            format!("no recovery {operation:?} runs on this host"),
        ));
    };
    let generation = s.agent.fencing().current(&r.vpg_id);
    let out = rec.end(&operation, &r.vpg_id, generation, req.end).await?;
    Ok(Json(out))
}

async fn control(State(s): State<AdminState>) -> Json<ControlStatus> {
    Json(match &s.control {
        Some(c) => c.status(),
        None => ControlStatus {
            state: "not_configured".into(),
            desired_version: s.agent.desired_version(),
            ..ControlStatus::default()
        },
    })
}

async fn not_found() -> AdminError {
    AdminError(
        StatusCode::NOT_FOUND,
        "route.not_found",
        "no such route".into(),
    )
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/status", get(status))
        .route("/v1/checkpoints", post(checkpoint))
        .route("/v1/disks/{name}/sync", post(sync))
        .route(
            "/v1/received/{host}/{disk_id}/checkpoints",
            get(received_checkpoints),
        )
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{name}/power", post(power))
        .route("/v1/vms/{name}/console", get(console))
        .route("/v1/vms/{name}/quiesce", post(quiesce))
        .route("/v1/vms/{name}/thaw", post(thaw))
        .route("/v1/control", get(control))
        .route(
            "/v1/recoveries",
            get(list_recoveries).post(break_glass_recovery),
        )
        .route("/v1/recoveries/{operation}/end", post(end_recovery))
        .fallback(not_found)
        .with_state(state)
}

/// Binds the admin endpoint; serve it with [`serve`].
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AgentError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Io {
            what: "bind admin endpoint",
            path: addr.to_string().into(),
            source,
        })
}

/// Serves until `cancel`.
pub async fn serve(listener: TcpListener, state: AdminState, cancel: CancellationToken) {
    let app = router(state);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "admin endpoint stopped");
    }
}
