//! Handlers for recovery operations on a VPG (failover test, failover, move, commit,
//! rollback), pause / resume / force sync, and the recovery reports. Starting or
//! deciding an operation answers 202 with its task; the task's steps show its progress
//! (`GET /api/v1/tasks/{id}`, and live on the stream).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use super::AppState;
use crate::manager::ops::{self, DecisionRequest};
use crate::model::access::Role;
use crate::model::operations::{Decision, OperationKind};
use crate::proto::api::{
    CommitRequest, FailoverStart, FailoverTestStart, FailoverTestStop, Page, PageQuery, Problem,
    RecoveryReportView, ReportQuery, Task, Vpg,
};

fn accepted(t: Task) -> Response {
    let loc = format!("/api/v1/tasks/{}", t.id);
    (
        StatusCode::ACCEPTED,
        [(axum::http::header::LOCATION, loc)],
        ApiJson(t),
    )
        .into_response()
}

/// Starts a failover test: the VMs (or the chosen ones) come up as "<vm> - Test" at the
/// recovery site from the chosen checkpoint, on the test network, while protection goes
/// on. Stopped by `…/failover-test/stop` or by its time box.
#[utoipa::path(post, path = "/api/v1/vpgs/{id}/failover-test", tag = "operations", params(("id" = String, Path)),
    request_body = FailoverTestStart,
    responses((status = 202, body = Task), (status = 400, body = Problem), (status = 404, body = Problem),
        (status = 409, body = Problem, description = "Another operation runs, or nothing is recoverable")),
    security(("bearer" = [])))]
pub async fn start_test(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<FailoverTestStart>,
) -> Result<Response, ApiError> {
    c.require(Role::Operator)?;
    Ok(accepted(
        ops::start_test(&s.control, &c.actor(), &id, body).await?,
    ))
}

/// Stops the running failover test: the test VMs are removed and the test is recorded
/// (result, who, when, notes) for the test reminder.
#[utoipa::path(post, path = "/api/v1/vpgs/{id}/failover-test/stop", tag = "operations", params(("id" = String, Path)),
    request_body = FailoverTestStop,
    responses((status = 202, body = Task), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = [])))]
pub async fn stop_test(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    c.require(Role::Operator)?;
    let body: FailoverTestStop = optional_json(&body, "a test stop request")?;
    let req = DecisionRequest {
        decision: Decision::Stop,
        test_result: Some(body.result.unwrap_or_else(|| "passed".into())),
        notes: body.notes,
    };
    Ok(accepted(
        ops::decide(&s.control, &c.actor(), &id, req).await?,
    ))
}

/// Fails the VPG over to a checkpoint (latest by default): the protected VMs are shut
/// down where reachable, the VMs come up at the recovery site, and the VPG waits in
/// "Failing over – before commit" for commit or rollback (or its commit policy).
#[utoipa::path(post, path = "/api/v1/vpgs/{id}/failover", tag = "operations", params(("id" = String, Path)),
    request_body = FailoverStart,
    responses((status = 202, body = Task), (status = 400, body = Problem), (status = 404, body = Problem),
        (status = 409, body = Problem)),
    security(("bearer" = [])))]
pub async fn failover(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<FailoverStart>,
) -> Result<Response, ApiError> {
    c.require(Role::Operator)?;
    Ok(accepted(
        ops::start_failover(&s.control, &c.actor(), &id, OperationKind::Failover, body).await?,
    ))
}

/// Moves the VPG (planned migration): the protected VMs shut down cleanly, a final
/// checkpoint after their last write (RPO 0), the VMs come up at the recovery site;
/// refused while a sync runs or a host is unreachable.
#[utoipa::path(post, path = "/api/v1/vpgs/{id}/move", tag = "operations", params(("id" = String, Path)),
    request_body = FailoverStart,
    responses((status = 202, body = Task), (status = 400, body = Problem), (status = 404, body = Problem),
        (status = 409, body = Problem)),
    security(("bearer" = [])))]
pub async fn move_vpg(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<FailoverStart>,
) -> Result<Response, ApiError> {
    c.require(Role::Operator)?;
    Ok(accepted(
        ops::start_failover(&s.control, &c.actor(), &id, OperationKind::Move, body).await?,
    ))
}

/// Commits the failover or move: the journals are promoted into the replica disks and,
/// with reverse protection, the roles swap and a Delta Sync runs back.
#[utoipa::path(post, path = "/api/v1/vpgs/{id}/commit", tag = "operations", params(("id" = String, Path)),
    request_body = CommitRequest,
    responses((status = 202, body = Task), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = [])))]
pub async fn commit(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    c.require(Role::Operator)?;
    let body: CommitRequest = optional_json(&body, "a commit request")?;
    let reverse = match body.reverse_protection {
        Some(r) => r,
        None => default_reverse(&s.control, &id).await?,
    };
    let req = DecisionRequest {
        decision: Decision::Commit {
            reverse_protection: reverse,
        },
        test_result: None,
        notes: None,
    };
    Ok(accepted(
        ops::decide(&s.control, &c.actor(), &id, req).await?,
    ))
}

async fn default_reverse(
    cp: &Arc<crate::manager::control::ControlPlane>,
    vpg_id: &str,
) -> Result<bool, ApiError> {
    let v = cp.store.op_vpg(vpg_id).await?;
    let Some(op) = v.operation_id else {
        return Ok(false);
    };
    Ok(cp.store.operation(&op).await?.op.reverse_protection)
}

/// Rolls the failover or move back: the recovered VMs are removed, scratch discarded,
/// and the original VMs started again; protection continues as before.
#[utoipa::path(post, path = "/api/v1/vpgs/{id}/rollback", tag = "operations", params(("id" = String, Path)),
    responses((status = 202, body = Task), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = [])))]
pub async fn rollback(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    c.require(Role::Operator)?;
    let req = DecisionRequest {
        decision: Decision::Rollback,
        test_result: None,
        notes: None,
    };
    Ok(accepted(
        ops::decide(&s.control, &c.actor(), &id, req).await?,
    ))
}

/// "User paused protection": writes are tracked in the bitmap only until resumed.
#[utoipa::path(post, path = "/api/v1/vpgs/{id}/pause", tag = "operations", params(("id" = String, Path)),
    responses((status = 200, body = Vpg), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = [])))]
pub async fn pause(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    c.require(Role::Operator)?;
    let v = s.control.store.set_paused(&c.actor(), &id, true).await?;
    s.control.config_changed();
    Ok(ApiJson(v).into_response())
}

/// Resumes paused protection (a Bitmap Sync sends what changed meanwhile).
#[utoipa::path(post, path = "/api/v1/vpgs/{id}/resume", tag = "operations", params(("id" = String, Path)),
    responses((status = 200, body = Vpg), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = [])))]
pub async fn resume(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    c.require(Role::Operator)?;
    let v = s.control.store.set_paused(&c.actor(), &id, false).await?;
    s.control.config_changed();
    Ok(ApiJson(v).into_response())
}

/// Force Sync: a Delta Sync of every disk of the VPG, now.
#[utoipa::path(post, path = "/api/v1/vpgs/{id}/force-sync", tag = "operations", params(("id" = String, Path)),
    responses((status = 202, body = Vpg), (status = 404, body = Problem), (status = 409, body = Problem),
        (status = 503, body = Problem, description = "A protected host is not connected")),
    security(("bearer" = [])))]
pub async fn force_sync(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    c.require(Role::Operator)?;
    let v = ops::force_sync(&s.control, &c.actor(), &id).await?;
    s.control.changed.notify_waiters();
    Ok((StatusCode::ACCEPTED, ApiJson(v)).into_response())
}

/// Recovery reports, newest first (by when the operation ended), a page at a time.
#[utoipa::path(get, path = "/api/v1/reports", tag = "operations", params(ReportQuery, PageQuery),
    responses((status = 200, body = Page<RecoveryReportView>), (status = 400, body = Problem)),
    security(("bearer" = [])))]
pub async fn list_reports(
    State(s): State<AppState>,
    c: Caller,
    ApiQuery(q): ApiQuery<ReportQuery>,
    ApiQuery(p): ApiQuery<PageQuery>,
) -> Result<ApiJson<Page<RecoveryReportView>>, ApiError> {
    c.require(Role::Viewer)?;
    Ok(ApiJson(
        s.control.store.list_reports(q.vpg.as_deref(), &p).await?,
    ))
}

#[utoipa::path(get, path = "/api/v1/reports/{id}", tag = "operations", params(("id" = String, Path)),
    responses((status = 200, body = RecoveryReportView), (status = 404, body = Problem)),
    security(("bearer" = [])))]
pub async fn get_report(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    c.require(Role::Viewer)?;
    Ok(ApiJson(s.control.store.get_report(&id).await?).into_response())
}

/// An optional JSON body: an empty one is `T::default()` (the operation's defaults).
fn optional_json<T: serde::de::DeserializeOwned + Default>(
    body: &[u8],
    what: &str,
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request("request.bad_json", format!("the body is not {what}: {e}"))
    })
}
