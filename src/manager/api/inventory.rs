//! Handlers for sites, hosts, VMs and disks.

use super::error::ApiError;
use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use super::{created, AppState};
use crate::manager::control::vms::{self, VmCommandError};
use crate::model::access::Role;
use crate::proto::api::{
    ConsoleQuery, Disk, DiskCreate, Host, HostCreate, HostPatch, HostQuery, Page, PageQuery,
    Problem, Site, SiteCreate, SitePatch, SiteQuery, Vm, VmConsole, VmCreate, VmPatch, VmQuery,
    CONSOLE_MAX_BYTES,
};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;

#[utoipa::path(get, path = "/api/v1/sites", tag = "inventory", params(SiteQuery, PageQuery),
    responses((status = 200, body = Page<Site>), (status = 401, body = Problem)), security(("bearer" = [])))]
pub async fn list_sites(
    State(s): State<AppState>,
    c: Caller,
    ApiQuery(q): ApiQuery<SiteQuery>,
    ApiQuery(p): ApiQuery<PageQuery>,
) -> Result<ApiJson<Page<Site>>, ApiError> {
    c.require(Role::Viewer)?;
    Ok(ApiJson(s.store.list_sites(&q, &p).await?))
}

#[utoipa::path(post, path = "/api/v1/sites", tag = "inventory", request_body = SiteCreate,
    responses((status = 201, body = Site), (status = 409, body = Problem), (status = 422, body = Problem)), security(("bearer" = [])))]
pub async fn create_site(
    State(s): State<AppState>,
    c: Caller,
    ApiJson(body): ApiJson<SiteCreate>,
) -> Result<Response, ApiError> {
    c.require(Role::Admin)?;
    let site = s.store.create_site(&c.actor(), body).await?;
    Ok(created(format!("/api/v1/sites/{}", site.id), site))
}

#[utoipa::path(get, path = "/api/v1/sites/{id}", tag = "inventory", params(("id" = String, Path)),
    responses((status = 200, body = Site), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn get_site(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<Site>, ApiError> {
    c.require(Role::Viewer)?;
    Ok(ApiJson(s.store.get_site(&id).await?))
}

#[utoipa::path(patch, path = "/api/v1/sites/{id}", tag = "inventory", params(("id" = String, Path)), request_body = SitePatch,
    responses((status = 200, body = Site), (status = 404, body = Problem), (status = 422, body = Problem)), security(("bearer" = [])))]
pub async fn update_site(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<SitePatch>,
) -> Result<ApiJson<Site>, ApiError> {
    c.require(Role::Admin)?;
    let site = s.store.update_site(&c.actor(), &id, body).await?;
    // The bandwidth limit is part of every desired state of the site's hosts: recompute
    // them now rather than at the next tick.
    s.control.config_changed();
    Ok(ApiJson(site))
}

#[utoipa::path(delete, path = "/api/v1/sites/{id}", tag = "inventory", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = Problem), (status = 409, body = Problem)), security(("bearer" = [])))]
pub async fn delete_site(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    c.require(Role::Admin)?;
    s.store.delete_site(&c.actor(), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/hosts", tag = "inventory", params(HostQuery, PageQuery),
    responses((status = 200, body = Page<Host>), (status = 401, body = Problem)), security(("bearer" = [])))]
pub async fn list_hosts(
    State(s): State<AppState>,
    c: Caller,
    ApiQuery(q): ApiQuery<HostQuery>,
    ApiQuery(p): ApiQuery<PageQuery>,
) -> Result<ApiJson<Page<Host>>, ApiError> {
    c.require(Role::Viewer)?;
    Ok(ApiJson(s.store.list_hosts(&q, &p).await?))
}

#[utoipa::path(post, path = "/api/v1/hosts", tag = "inventory", request_body = HostCreate,
    responses((status = 201, body = Host), (status = 409, body = Problem), (status = 422, body = Problem)), security(("bearer" = [])))]
pub async fn create_host(
    State(s): State<AppState>,
    c: Caller,
    ApiJson(body): ApiJson<HostCreate>,
) -> Result<Response, ApiError> {
    c.require(Role::Admin)?;
    let host = s.store.create_host(&c.actor(), body).await?;
    Ok(created(format!("/api/v1/hosts/{}", host.id), host))
}

#[utoipa::path(get, path = "/api/v1/hosts/{id}", tag = "inventory", params(("id" = String, Path)),
    responses((status = 200, body = Host), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn get_host(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<Host>, ApiError> {
    c.require(Role::Viewer)?;
    Ok(ApiJson(s.store.get_host(&id).await?))
}

#[utoipa::path(patch, path = "/api/v1/hosts/{id}", tag = "inventory", params(("id" = String, Path)), request_body = HostPatch,
    responses((status = 200, body = Host), (status = 404, body = Problem), (status = 422, body = Problem)), security(("bearer" = [])))]
pub async fn update_host(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<HostPatch>,
) -> Result<ApiJson<Host>, ApiError> {
    c.require(Role::Admin)?;
    Ok(ApiJson(s.store.update_host(&c.actor(), &id, body).await?))
}

#[utoipa::path(delete, path = "/api/v1/hosts/{id}", tag = "inventory", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = Problem), (status = 409, body = Problem)), security(("bearer" = [])))]
pub async fn delete_host(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    c.require(Role::Admin)?;
    s.store.delete_host(&c.actor(), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/vms", tag = "inventory", params(VmQuery, PageQuery),
    responses((status = 200, body = Page<Vm>), (status = 401, body = Problem)), security(("bearer" = [])))]
pub async fn list_vms(
    State(s): State<AppState>,
    c: Caller,
    ApiQuery(q): ApiQuery<VmQuery>,
    ApiQuery(p): ApiQuery<PageQuery>,
) -> Result<ApiJson<Page<Vm>>, ApiError> {
    c.require(Role::Viewer)?;
    Ok(ApiJson(s.store.list_vms(&q, &p).await?))
}

impl From<VmCommandError> for ApiError {
    fn from(e: VmCommandError) -> Self {
        let detail = e.to_string();
        match e {
            VmCommandError::Store(s) => s.into(),
            VmCommandError::HostUnreachable(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "host.unreachable", detail)
            }
            VmCommandError::Timeout { .. } => {
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, "host.timeout", detail)
            }
            VmCommandError::ConsoleUnavailable { .. } => {
                ApiError::new(StatusCode::CONFLICT, "vm.console_unavailable", detail)
            }
            VmCommandError::CreateRefused { .. } => {
                ApiError::new(StatusCode::CONFLICT, "vm.create_refused", detail)
            }
            VmCommandError::BadAnswer { .. } => {
                ApiError::new(StatusCode::BAD_GATEWAY, "host.bad_answer", detail)
            }
        }
    }
}

/// Creates a VM. On a host with an agent the agent creates it (disks, NICs, boot) and
/// starts it, and the answer is the VM as the agent reports it; the host's agent must be
/// connected (503 otherwise). On a host no agent ever registered for, the VM is recorded.
#[utoipa::path(post, path = "/api/v1/vms", tag = "inventory", request_body = VmCreate,
    responses((status = 201, body = Vm), (status = 409, body = Problem, description = "Name taken, or the agent refused"),
        (status = 422, body = Problem), (status = 503, body = Problem, description = "The host's agent is not connected"),
        (status = 504, body = Problem)), security(("bearer" = [])))]
pub async fn create_vm(
    State(s): State<AppState>,
    c: Caller,
    ApiJson(body): ApiJson<VmCreate>,
) -> Result<Response, ApiError> {
    c.require(Role::Admin)?;
    let vm = vms::create_vm(&s.control, &c.actor(), body).await?;
    Ok(created(format!("/api/v1/vms/{}", vm.id), vm))
}

/// The end of the VM's serial console log, read now from its host (operator: a console
/// may show what viewers should not see).
#[utoipa::path(get, path = "/api/v1/vms/{id}/console", tag = "inventory", params(("id" = String, Path), ConsoleQuery),
    responses((status = 200, body = VmConsole), (status = 400, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 409, body = Problem, description = "The host cannot read this VM's console (`vm.console_unavailable`)"),
        (status = 503, body = Problem, description = "The host's agent is not connected (`host.unreachable`)"),
        (status = 504, body = Problem, description = "The host did not answer within 15 s")),
    security(("bearer" = [])))]
pub async fn vm_console(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<ConsoleQuery>,
) -> Result<ApiJson<VmConsole>, ApiError> {
    c.require(Role::Operator)?;
    let max_bytes = q.max_bytes.unwrap_or(CONSOLE_MAX_BYTES);
    if !(1..=CONSOLE_MAX_BYTES).contains(&max_bytes) {
        let mut a = ApiError::bad_request(
            "request.invalid_max_bytes",
            format!("max_bytes must be 1 to {CONSOLE_MAX_BYTES}"),
        );
        a.field = Some("max_bytes".into());
        return Err(a);
    }
    Ok(ApiJson(
        vms::read_console(&s.control, &id, max_bytes).await?,
    ))
}

#[utoipa::path(get, path = "/api/v1/vms/{id}", tag = "inventory", params(("id" = String, Path)),
    responses((status = 200, body = Vm), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn get_vm(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<Vm>, ApiError> {
    c.require(Role::Viewer)?;
    Ok(ApiJson(s.store.get_vm(&id).await?))
}

#[utoipa::path(patch, path = "/api/v1/vms/{id}", tag = "inventory", params(("id" = String, Path)), request_body = VmPatch,
    responses((status = 200, body = Vm), (status = 404, body = Problem), (status = 422, body = Problem)), security(("bearer" = [])))]
pub async fn update_vm(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<VmPatch>,
) -> Result<ApiJson<Vm>, ApiError> {
    c.require(Role::Admin)?;
    Ok(ApiJson(s.store.update_vm(&c.actor(), &id, body).await?))
}

#[utoipa::path(delete, path = "/api/v1/vms/{id}", tag = "inventory", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = Problem), (status = 409, body = Problem)), security(("bearer" = [])))]
pub async fn delete_vm(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    c.require(Role::Admin)?;
    s.store.delete_vm(&c.actor(), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/vms/{id}/disks", tag = "inventory", params(("id" = String, Path)),
    responses((status = 200, body = Vec<Disk>), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn list_disks(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<Vec<Disk>>, ApiError> {
    c.require(Role::Viewer)?;
    Ok(ApiJson(s.store.list_disks(&id).await?))
}

#[utoipa::path(post, path = "/api/v1/vms/{id}/disks", tag = "inventory", params(("id" = String, Path)), request_body = DiskCreate,
    responses((status = 201, body = Disk), (status = 404, body = Problem), (status = 422, body = Problem)), security(("bearer" = [])))]
pub async fn add_disk(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<DiskCreate>,
) -> Result<Response, ApiError> {
    c.require(Role::Admin)?;
    let d = s.store.add_disk(&c.actor(), &id, body).await?;
    Ok(created(format!("/api/v1/vms/{id}/disks/{}", d.id), d))
}

#[utoipa::path(delete, path = "/api/v1/vms/{id}/disks/{disk_id}", tag = "inventory",
    params(("id" = String, Path), ("disk_id" = String, Path)),
    responses((status = 204), (status = 404, body = Problem), (status = 409, body = Problem)), security(("bearer" = [])))]
pub async fn delete_disk(
    State(s): State<AppState>,
    c: Caller,
    ApiPath((id, disk_id)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    c.require(Role::Admin)?;
    s.store.delete_disk(&c.actor(), &id, &disk_id).await?;
    Ok(StatusCode::NO_CONTENT)
}
