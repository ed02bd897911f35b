//! Handlers for VPGs, their members and checkpoints.

use super::error::ApiError;
use super::extract::{etag, if_match, ApiJson, ApiPath, ApiQuery, Caller};
use super::{created, AppState};
use crate::manager::control::rounds::{RoundError, RoundRequest};
use crate::manager::store::VpgDeletion;
use crate::model::access::Role;
use crate::model::checkpoints::check_tag;
use crate::model::settings::MemberSettings;
use crate::proto::agent::ProtectedDiskStatus;
use crate::proto::api::{
    Checkpoint, CheckpointCreate, CheckpointQuery, Member, MemberRemoveQuery, Page, PageQuery,
    Problem, RpoHistory, RpoHistoryQuery, Vpg, VpgCreate, VpgDeleteQuery, VpgDisk, VpgDiskSync,
    VpgDiskSyncProgress, VpgPatch, VpgQuery, VpgReplace,
};
use crate::proto::control::CheckpointKind;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, TimeDelta, Utc};

/// Members' replication state as the evaluator last derived it from live facts (the
/// stored definition alone only tells configured from not).
fn live_member_states<'a>(s: &AppState, members: impl Iterator<Item = &'a mut Member>) {
    for m in members {
        if let Some(state) = s.control.vm_states.get(&m.settings.vm_id) {
            m.replication_state = state;
        }
    }
}

fn with_etag(v: Vpg) -> Response {
    ([etag(v.version)], ApiJson(v)).into_response()
}

#[utoipa::path(get, path = "/api/v1/vpgs", tag = "vpgs", params(VpgQuery, PageQuery),
    responses((status = 200, body = Page<Vpg>), (status = 401, body = Problem)), security(("bearer" = [])))]
pub async fn list_vpgs(
    State(s): State<AppState>,
    c: Caller,
    ApiQuery(q): ApiQuery<VpgQuery>,
    ApiQuery(p): ApiQuery<PageQuery>,
) -> Result<ApiJson<Page<Vpg>>, ApiError> {
    c.require(Role::Viewer)?;
    // From the evaluator's snapshot while it is provably current, else the database.
    let generation = s.control.config_generation();
    if let Some(page) = s
        .control
        .vpg_list
        .page(&s.store, generation, &q, &p)
        .await?
    {
        return Ok(ApiJson(page));
    }
    Ok(ApiJson(s.store.list_vpgs(&q, &p).await?))
}

#[utoipa::path(post, path = "/api/v1/vpgs", tag = "vpgs", request_body = VpgCreate,
    responses((status = 201, body = Vpg), (status = 409, body = Problem), (status = 422, body = Problem)), security(("bearer" = [])))]
pub async fn create_vpg(
    State(s): State<AppState>,
    c: Caller,
    ApiJson(body): ApiJson<VpgCreate>,
) -> Result<Response, ApiError> {
    c.require(Role::Admin)?;
    let v = s.store.create_vpg(&c.actor(), body).await?;
    s.control.config_changed();
    let tag = etag(v.version);
    let mut res = created(format!("/api/v1/vpgs/{}", v.id), v);
    res.headers_mut().insert(tag.0, tag.1);
    Ok(res)
}

#[utoipa::path(get, path = "/api/v1/vpgs/{id}", tag = "vpgs", params(("id" = String, Path)),
    responses((status = 200, body = Vpg, headers(("ETag" = String))), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn get_vpg(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    c.require(Role::Viewer)?;
    let mut v = s.store.get_vpg(&id).await?;
    live_member_states(&s, v.members.iter_mut().flatten());
    Ok(with_etag(v))
}

#[utoipa::path(patch, path = "/api/v1/vpgs/{id}", tag = "vpgs", params(("id" = String, Path), ("If-Match" = Option<String>, Header)),
    request_body = VpgPatch,
    responses((status = 200, body = Vpg), (status = 404, body = Problem), (status = 412, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn update_vpg(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<VpgPatch>,
) -> Result<Response, ApiError> {
    c.require(Role::Admin)?;
    let v = s
        .store
        .update_vpg(&c.actor(), &id, if_match(&headers)?, body)
        .await?;
    s.control.config_changed();
    Ok(with_etag(v))
}

#[utoipa::path(put, path = "/api/v1/vpgs/{id}", tag = "vpgs", params(("id" = String, Path), ("If-Match" = Option<String>, Header)),
    request_body = VpgReplace,
    responses((status = 200, body = Vpg), (status = 404, body = Problem), (status = 412, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn replace_vpg(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<VpgReplace>,
) -> Result<Response, ApiError> {
    c.require(Role::Admin)?;
    let v = s
        .store
        .replace_vpg(&c.actor(), &id, if_match(&headers)?, body)
        .await?;
    s.control.config_changed();
    Ok(with_etag(v))
}

#[utoipa::path(delete, path = "/api/v1/vpgs/{id}", tag = "vpgs", params(("id" = String, Path), ("If-Match" = Option<String>, Header), VpgDeleteQuery),
    responses((status = 202, body = Vpg, description = "Deletion started: hosts stop protecting, then the VPG goes"),
        (status = 204, description = "Removed by force"), (status = 404, body = Problem), (status = 412, body = Problem)),
    security(("bearer" = [])))]
pub async fn delete_vpg(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<VpgDeleteQuery>,
) -> Result<Response, ApiError> {
    c.require(Role::Admin)?;
    let force = q.force.unwrap_or(false);
    let drop_replicas = if q.keep_recovery_disks == Some(false) {
        s.store.replica_targets(&id, None).await?
    } else {
        Vec::new()
    };
    let outcome = s
        .store
        .delete_vpg(&c.actor(), &id, if_match(&headers)?, force)
        .await?;
    s.control.replicas.request(drop_replicas);
    s.control.config_changed();
    Ok(match outcome {
        VpgDeletion::Started(v) => {
            let mut res = with_etag(*v);
            *res.status_mut() = StatusCode::ACCEPTED;
            res
        }
        VpgDeletion::Removed => StatusCode::NO_CONTENT.into_response(),
    })
}

#[utoipa::path(get, path = "/api/v1/vpgs/{id}/members", tag = "vpgs", params(("id" = String, Path)),
    responses((status = 200, body = Vec<Member>), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn list_members(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<Vec<Member>>, ApiError> {
    c.require(Role::Viewer)?;
    let mut members = s.store.get_vpg(&id).await?.members.unwrap_or_default();
    live_member_states(&s, members.iter_mut());
    Ok(ApiJson(members))
}

/// Every disk of the VPG's VMs with what its protected host reports now: replication
/// mode, lag, queue, dirty bytes, write throughput and IOPS, sync progress.
#[utoipa::path(get, path = "/api/v1/vpgs/{id}/disks", tag = "vpgs", params(("id" = String, Path)),
    responses((status = 200, body = Vec<VpgDisk>), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn list_disks(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<Vec<VpgDisk>>, ApiError> {
    c.require(Role::Viewer)?;
    let members = s.store.get_vpg(&id).await?.members.unwrap_or_default();
    let ids: Vec<String> = members.iter().map(|m| m.settings.vm_id.clone()).collect();
    let vms = s.store.vms_by_ids(&ids).await?;
    let mut host_ids: Vec<String> = vms.iter().map(|v| v.host_id.clone()).collect();
    host_ids.sort();
    host_ids.dedup();
    let hosts = s.store.hosts_by_ids(&host_ids).await?;
    let mut out = Vec::new();
    // In the members' order (boot order as configured), disks in the VM's order.
    for m in &members {
        let Some(vm) = vms.iter().find(|v| v.id == m.settings.vm_id) else {
            continue;
        };
        let host_name = hosts
            .iter()
            .find(|h| h.id == vm.host_id)
            .map_or_else(|| vm.host_id.clone(), |h| h.name.clone());
        let heartbeat = s.control.hub.live(&host_name).and_then(|l| l.heartbeat);
        for d in &vm.disks {
            let reported = heartbeat.as_ref().and_then(|hb| {
                let device = d.device_id?;
                hb.status
                    .protected
                    .iter()
                    .find(|p| p.disk_id == device && p.group == id)
            });
            out.push(vpg_disk(vm, d, &host_name, reported));
        }
    }
    Ok(ApiJson(out))
}

/// One disk's live figures from its host's report (`None`: not reported in this VPG).
fn vpg_disk(
    vm: &crate::proto::api::Vm,
    d: &crate::proto::api::Disk,
    host_name: &str,
    p: Option<&ProtectedDiskStatus>,
) -> VpgDisk {
    VpgDisk {
        vm_id: vm.id.clone(),
        vm_name: vm.name.clone(),
        disk_id: d.id.clone(),
        disk_name: d.name.clone(),
        size_bytes: d.size_bytes,
        host_id: vm.host_id.clone(),
        host_name: host_name.to_string(),
        reported: p.is_some(),
        mode: p.map(|p| p.mode),
        lag_secs: p.map(|p| p.oldest_unacked_ms as f64 / 1000.0),
        queued_bytes: p.map_or(0, |p| p.queued_bytes + p.spilled_bytes),
        dirty_bytes: p.map_or(0, |p| {
            p.dirty_regions
                .saturating_mul(p.region_size)
                .min(p.size_bytes)
        }),
        throughput_bytes_per_sec: p.map_or(0.0, |p| p.writes.bytes_per_sec()),
        iops: p.map_or(0.0, |p| p.writes.writes_per_sec()),
        sync: p.map(|p| VpgDiskSync {
            phase: p.sync.phase,
            detail: p.sync.detail.clone(),
            running: p.sync.running.as_ref().map(|r| VpgDiskSyncProgress {
                kind: r.kind,
                reason: r.reason.clone(),
                percent: r.percent,
                bytes_done: r.bytes_done,
                bytes_total: r.bytes_total,
                bytes_per_sec: r.bytes_per_sec,
                eta_secs: r.eta_secs,
            }),
        }),
    }
}

#[utoipa::path(post, path = "/api/v1/vpgs/{id}/members", tag = "vpgs", params(("id" = String, Path), ("If-Match" = Option<String>, Header)),
    request_body = MemberSettings,
    responses((status = 200, body = Vpg), (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn add_member(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<MemberSettings>,
) -> Result<Response, ApiError> {
    c.require(Role::Admin)?;
    let v = s
        .store
        .add_member(&c.actor(), &id, if_match(&headers)?, body)
        .await?;
    s.control.config_changed();
    Ok(with_etag(v))
}

#[utoipa::path(put, path = "/api/v1/vpgs/{id}/members/{vm_id}", tag = "vpgs",
    params(("id" = String, Path), ("vm_id" = String, Path), ("If-Match" = Option<String>, Header)),
    request_body = MemberSettings,
    responses((status = 200, body = Vpg), (status = 404, body = Problem), (status = 422, body = Problem)), security(("bearer" = [])))]
pub async fn update_member(
    State(s): State<AppState>,
    c: Caller,
    ApiPath((id, vm_id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<MemberSettings>,
) -> Result<Response, ApiError> {
    c.require(Role::Admin)?;
    let v = s
        .store
        .update_member(&c.actor(), &id, &vm_id, if_match(&headers)?, body)
        .await?;
    s.control.config_changed();
    Ok(with_etag(v))
}

#[utoipa::path(delete, path = "/api/v1/vpgs/{id}/members/{vm_id}", tag = "vpgs",
    params(("id" = String, Path), ("vm_id" = String, Path), ("If-Match" = Option<String>, Header), MemberRemoveQuery),
    responses((status = 200, body = Vpg), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn remove_member(
    State(s): State<AppState>,
    c: Caller,
    ApiPath((id, vm_id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<MemberRemoveQuery>,
) -> Result<Response, ApiError> {
    c.require(Role::Admin)?;
    let keep = q.keep_recovery_disks.unwrap_or(true);
    let drop_replicas = if keep {
        Vec::new()
    } else {
        s.store.replica_targets(&id, Some(&vm_id)).await?
    };
    let v = s
        .store
        .remove_member(&c.actor(), &id, &vm_id, if_match(&headers)?, keep)
        .await?;
    s.control.replicas.request(drop_replicas);
    s.control.config_changed();
    Ok(with_etag(v))
}

#[utoipa::path(get, path = "/api/v1/vpgs/{id}/checkpoints", tag = "vpgs",
    params(("id" = String, Path), CheckpointQuery, PageQuery),
    responses((status = 200, body = Page<Checkpoint>), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn list_checkpoints(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<CheckpointQuery>,
    ApiQuery(p): ApiQuery<PageQuery>,
) -> Result<ApiJson<Page<Checkpoint>>, ApiError> {
    c.require(Role::Viewer)?;
    Ok(ApiJson(s.store.list_checkpoints(&id, &q, &p).await?))
}

/// Most samples one RPO history answer holds.
const RPO_HISTORY_MAX_POINTS: u32 = 5000;
const RPO_HISTORY_DEFAULT_POINTS: u32 = 720;

/// An RFC 3339 time of the query string. An unencoded `+` of the offset arrives as a
/// space: that one is taken back.
fn query_time(v: Option<&str>, field: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
    let Some(v) = v else { return Ok(None) };
    let parse = |s: &str| DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc));
    parse(v)
        .or_else(|e| match v.rfind(' ') {
            Some(i) if i > 10 => parse(&format!("{}+{}", &v[..i], &v[i + 1..])),
            _ => Err(e),
        })
        .map(Some)
        .map_err(|e| {
            let mut a = ApiError::bad_request(
                "request.invalid_time",
                format!("{field} must be an RFC 3339 time ({e})"),
            );
            a.field = Some(field.to_string());
            a
        })
}

/// The VPG's RPO, history and status over a time range, for charts and SLA reports.
/// Long ranges come from coarser tiers (raw seconds for two hours, minutes for seven
/// days, hours for 400 days); each bucket keeps the worst of what it covers.
#[utoipa::path(get, path = "/api/v1/vpgs/{id}/rpo-history", tag = "vpgs",
    params(("id" = String, Path), RpoHistoryQuery),
    responses((status = 200, body = RpoHistory), (status = 400, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = [])))]
pub async fn rpo_history(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<RpoHistoryQuery>,
) -> Result<ApiJson<RpoHistory>, ApiError> {
    c.require(Role::Viewer)?;
    let now = Utc::now();
    let until = query_time(q.until.as_deref(), "until")?.unwrap_or(now);
    let since = match query_time(q.since.as_deref(), "since")? {
        Some(t) => t,
        None => until
            .checked_sub_signed(TimeDelta::hours(1))
            .ok_or_else(|| {
                ApiError::bad_request("request.invalid_time", "until is out of range")
            })?,
    };
    if since >= until {
        let mut a = ApiError::bad_request("request.invalid_range", "since must be before until");
        a.field = Some("since".into());
        return Err(a);
    }
    let max_points = q.max_points.unwrap_or(RPO_HISTORY_DEFAULT_POINTS);
    if !(1..=RPO_HISTORY_MAX_POINTS).contains(&max_points) {
        let mut a = ApiError::bad_request(
            "request.invalid_max_points",
            format!("max_points must be 1 to {RPO_HISTORY_MAX_POINTS}"),
        );
        a.field = Some("max_points".into());
        return Err(a);
    }
    Ok(ApiJson(
        s.store
            .rpo_history(&id, since, until, max_points, now)
            .await?,
    ))
}

impl From<RoundError> for ApiError {
    fn from(e: RoundError) -> Self {
        let detail = e.to_string();
        match e {
            RoundError::Store(s) => s.into(),
            RoundError::NotProtecting(_) => {
                ApiError::new(StatusCode::CONFLICT, "vpg.not_protecting", detail)
            }
            RoundError::Paused => ApiError::new(StatusCode::CONFLICT, "vpg.paused", detail),
            RoundError::NoHosts => {
                ApiError::new(StatusCode::CONFLICT, "vpg.no_protected_hosts", detail)
            }
            RoundError::NotReady { .. } => ApiError::new(
                StatusCode::CONFLICT,
                "checkpoint.protection_not_ready",
                detail,
            ),
            RoundError::HostUnreachable(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "checkpoint.host_unreachable",
                detail,
            ),
            RoundError::Aborted { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "checkpoint.round_aborted",
                detail,
            ),
        }
    }
}

/// Takes a user-tagged (or app-consistent) checkpoint now: one checkpoint round across
/// every protected host of the VPG. The checkpoint is not recoverable until every
/// journal reports it.
#[utoipa::path(post, path = "/api/v1/vpgs/{id}/checkpoints", tag = "vpgs", params(("id" = String, Path)),
    request_body = CheckpointCreate,
    responses((status = 201, body = Checkpoint), (status = 400, body = Problem), (status = 404, body = Problem),
        (status = 409, body = Problem, description = "The VPG is not protecting (deleted, paused, not applied yet)"),
        (status = 503, body = Problem, description = "A host is unreachable or the round aborted; retry")),
    security(("bearer" = [])))]
pub async fn create_checkpoint(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<CheckpointCreate>,
) -> Result<Response, ApiError> {
    c.require(Role::Operator)?;
    let tag = check_tag(&body.tag).map_err(|e| {
        let mut a = ApiError::bad_request(e.code, e.message);
        a.field = Some(e.field);
        a
    })?;
    let req = RoundRequest {
        kind: if body.app_consistent {
            CheckpointKind::AppConsistent
        } else {
            CheckpointKind::UserTagged
        },
        tag: Some(tag),
        quiesce: body.app_consistent,
    };
    let cp = s
        .control
        .rounds
        .run_round(&s.control, &id, req, Some(&c.actor()))
        .await?;
    s.control.changed.notify_waiters();
    // No Location: checkpoints are listed per VPG, not addressed one by one.
    Ok((StatusCode::CREATED, ApiJson(cp)).into_response())
}
