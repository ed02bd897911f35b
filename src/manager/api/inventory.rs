//! Handlers for sites, hosts, VMs and disks.

use super::error::ApiError;
use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use super::{created, AppState};
use crate::model::access::Role;
use crate::proto::api::{
    Disk, DiskCreate, Host, HostCreate, HostPatch, HostQuery, Page, PageQuery, Problem, Site,
    SiteCreate, SitePatch, SiteQuery, Vm, VmCreate, VmPatch, VmQuery,
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

#[utoipa::path(post, path = "/api/v1/vms", tag = "inventory", request_body = VmCreate,
    responses((status = 201, body = Vm), (status = 409, body = Problem), (status = 422, body = Problem)), security(("bearer" = [])))]
pub async fn create_vm(
    State(s): State<AppState>,
    c: Caller,
    ApiJson(body): ApiJson<VmCreate>,
) -> Result<Response, ApiError> {
    c.require(Role::Admin)?;
    let vm = s.store.create_vm(&c.actor(), body).await?;
    Ok(created(format!("/api/v1/vms/{}", vm.id), vm))
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
