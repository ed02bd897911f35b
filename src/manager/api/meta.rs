//! Health, readiness, metrics, lookups and the OpenAPI document.

use super::error::ApiError;
use super::extract::{ApiJson, Caller};
use super::AppState;
use crate::model::access::Role;
use crate::model::settings::Priority;
use crate::model::status::{SyncKind, VmReplicationState, VpgStatus, VpgSubStatus};
use crate::proto::agent::{ReplicationMode, SyncPhase};
use crate::proto::api::{Connectivity, Health, LookupValue, Lookups, Problem};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

#[utoipa::path(get, path = "/healthz", tag = "meta", responses((status = 200, body = Health)))]
pub async fn healthz() -> ApiJson<Health> {
    ApiJson(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

#[utoipa::path(get, path = "/readyz", tag = "meta",
    responses((status = 200, body = Health), (status = 503, body = Problem)))]
pub async fn readyz(State(s): State<AppState>) -> Result<ApiJson<Health>, ApiError> {
    match s.store.ping().await {
        Ok(()) => Ok(ApiJson(Health {
            status: "ready".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        })),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check: database unreachable");
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "manager.database_unreachable",
                "the database does not answer",
            ))
        }
    }
}

#[utoipa::path(get, path = "/metrics", tag = "meta",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain")))]
pub async fn metrics(State(s): State<AppState>) -> Result<Response, ApiError> {
    let counts = s.store.metric_counts().await?;
    let body = s
        .metrics
        .render(&counts, &s.control.hub.all_live(), &s.control.live.stats());
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response())
}

fn values<T: Copy>(
    all: &[T],
    f: impl Fn(T) -> (&'static str, &'static str, &'static str),
) -> Vec<LookupValue> {
    all.iter()
        .map(|v| {
            let (id, label, description) = f(*v);
            LookupValue {
                id: id.into(),
                label: label.into(),
                description: description.into(),
            }
        })
        .collect()
}

fn fixed(rows: &[(&str, &str, &str)]) -> Vec<LookupValue> {
    rows.iter()
        .map(|(id, label, description)| LookupValue {
            id: (*id).into(),
            label: (*label).into(),
            description: (*description).into(),
        })
        .collect()
}

fn mode_words(m: ReplicationMode) -> (&'static str, &'static str) {
    match m {
        ReplicationMode::Streaming => ("Streaming", "every write goes to the recovery journal"),
        ReplicationMode::BitmapOnly => (
            "Tracking changes",
            "writes are only marked in the dirty bitmap; a Bitmap Sync will send them",
        ),
        ReplicationMode::Unprotected => ("Not replicated", "the disk has no recovery host"),
    }
}

fn phase_words(p: SyncPhase) -> (&'static str, &'static str) {
    match p {
        SyncPhase::Idle => ("Idle", "nothing owed: the stream keeps the replica level"),
        SyncPhase::WaitingForPeer => (
            "Waiting for the recovery host",
            "a sync is owed; the recovery host is not reachable",
        ),
        SyncPhase::Required => (
            "Resynchronization required",
            "the resync policy holds the sync until resumed or the off-peak window opens",
        ),
        SyncPhase::Queued => ("Queued", "waiting for a free sync slot"),
        SyncPhase::Running => ("Running", "a sync pass is running"),
        SyncPhase::Failed => ("Failed", "the last attempt failed; it is retried"),
    }
}

#[utoipa::path(get, path = "/api/v1/lookups", tag = "meta",
    responses((status = 200, body = Lookups), (status = 401, body = Problem)), security(("bearer" = [])))]
pub async fn lookups(c: Caller) -> Result<ApiJson<Lookups>, ApiError> {
    c.require(Role::Viewer)?;
    Ok(ApiJson(Lookups {
        vpg_statuses: values(VpgStatus::ALL, |s| (s.as_str(), s.label(), s.description())),
        vpg_sub_statuses: values(VpgSubStatus::ALL, |s| {
            (s.as_str(), s.label(), s.description())
        }),
        vm_replication_states: values(VmReplicationState::ALL, |s| {
            (s.as_str(), s.label(), s.description())
        }),
        sync_kinds: values(SyncKind::ALL, |s| (s.as_str(), s.label(), s.description())),
        replication_modes: values(&ReplicationMode::ALL, |m| {
            let (label, description) = mode_words(m);
            (m.as_str(), label, description)
        }),
        sync_phases: values(&SyncPhase::ALL, |p| {
            let (label, description) = phase_words(p);
            (p.as_str(), label, description)
        }),
        priorities: values(&Priority::ALL, |p| {
            (p.as_str(), p.as_str(), p.description())
        }),
        roles: values(&Role::ALL, |r| (r.as_str(), r.as_str(), r.description())),
        connectivity: values(&Connectivity::ALL, |c| {
            let d = match c {
                Connectivity::Unknown => "no agent has registered for this host yet",
                Connectivity::Connected => "the host's agent is heard from",
                Connectivity::Disconnected => "the host's agent missed its heartbeats",
            };
            (c.as_str(), c.as_str(), d)
        }),
        resync_modes: fixed(&[
            ("automatic", "Automatic", "a needed sync starts at once"),
            ("manual", "Manual", "a needed sync waits for an operator"),
            (
                "window",
                "Off-peak window",
                "a needed sync starts only inside the daily window",
            ),
        ]),
        power_states: fixed(&[
            ("on", "On", "running"),
            ("off", "Off", "not running"),
            (
                "missing",
                "Missing",
                "no longer reported by its host's agent (kept: it is protected)",
            ),
        ]),
        checkpoint_kinds: fixed(&[
            ("scheduled", "Scheduled", "taken every checkpoint interval"),
            ("user_tagged", "Tagged", "taken on request with a name"),
            (
                "app_consistent",
                "App-consistent",
                "taken with every guest's file systems frozen by its guest agent",
            ),
        ]),
        quiesce_methods: fixed(&[
            (
                "guest_agent",
                "Guest agent",
                "the guest agent froze the file systems: application consistent",
            ),
            (
                "paused",
                "Paused",
                "the VM's CPUs were paused (no guest agent): crash consistent only",
            ),
        ]),
        boot_kinds: fixed(&[
            (
                "kernel",
                "Kernel",
                "direct kernel boot from files on the host that runs the VM",
            ),
            ("firmware", "Firmware", "the firmware boots the first disk"),
        ]),
        task_states: fixed(&[
            ("pending", "Pending", "accepted, not started"),
            ("running", "Running", "in progress"),
            (
                "waiting",
                "Waiting",
                "recovered VMs are up: waiting for commit, rollback or the end of the test",
            ),
            ("succeeded", "Succeeded", "finished as asked"),
            ("failed", "Failed", "stopped on an error"),
            ("cancelled", "Cancelled", "stopped on request"),
        ]),
        alert_severities: fixed(&[
            ("warning", "Warning", "attention needed soon"),
            ("error", "Error", "protection or recovery is at risk now"),
        ]),
    }))
}

pub async fn openapi(State(s): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        s.openapi_json.as_ref().clone(),
    )
        .into_response()
}
