//! Handlers for webhook subscriptions (admin only): CRUD, secret rotation and the
//! delivery history. The secret appears only in the answers to create and rotate.

use super::error::ApiError;
use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use super::{created, AppState};
use crate::model::access::Role;
use crate::proto::api::{Page, PageQuery, Problem};
use crate::proto::webhooks::{
    Webhook, WebhookCreate, WebhookCreated, WebhookDelivery, WebhookUpdate,
};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;

#[utoipa::path(get, path = "/api/v1/webhooks", tag = "webhooks", params(PageQuery),
    responses((status = 200, body = Page<Webhook>), (status = 403, body = Problem)), security(("bearer" = [])))]
pub async fn list_webhooks(
    State(s): State<AppState>,
    c: Caller,
    ApiQuery(p): ApiQuery<PageQuery>,
) -> Result<ApiJson<Page<Webhook>>, ApiError> {
    c.require(Role::Admin)?;
    Ok(ApiJson(s.store.list_webhooks(&p).await?))
}

#[utoipa::path(post, path = "/api/v1/webhooks", tag = "webhooks", request_body = WebhookCreate,
    responses((status = 201, body = WebhookCreated), (status = 403, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)), security(("bearer" = [])))]
pub async fn create_webhook(
    State(s): State<AppState>,
    c: Caller,
    ApiJson(body): ApiJson<WebhookCreate>,
) -> Result<Response, ApiError> {
    c.require(Role::Admin)?;
    let w = s.store.create_webhook(&c.actor(), body).await?;
    Ok(created(format!("/api/v1/webhooks/{}", w.webhook.id), w))
}

#[utoipa::path(get, path = "/api/v1/webhooks/{id}", tag = "webhooks", params(("id" = String, Path)),
    responses((status = 200, body = Webhook), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn get_webhook(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<Webhook>, ApiError> {
    c.require(Role::Admin)?;
    Ok(ApiJson(s.store.get_webhook(&id).await?))
}

#[utoipa::path(patch, path = "/api/v1/webhooks/{id}", tag = "webhooks", params(("id" = String, Path)), request_body = WebhookUpdate,
    responses((status = 200, body = Webhook), (status = 404, body = Problem), (status = 422, body = Problem)), security(("bearer" = [])))]
pub async fn update_webhook(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<WebhookUpdate>,
) -> Result<ApiJson<Webhook>, ApiError> {
    c.require(Role::Admin)?;
    Ok(ApiJson(
        s.store.update_webhook(&c.actor(), &id, body).await?,
    ))
}

#[utoipa::path(delete, path = "/api/v1/webhooks/{id}", tag = "webhooks", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn delete_webhook(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    c.require(Role::Admin)?;
    s.store.delete_webhook(&c.actor(), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/webhooks/{id}/rotate-secret", tag = "webhooks", params(("id" = String, Path)),
    responses((status = 200, body = WebhookCreated), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn rotate_webhook_secret(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<WebhookCreated>, ApiError> {
    c.require(Role::Admin)?;
    Ok(ApiJson(
        s.store.rotate_webhook_secret(&c.actor(), &id).await?,
    ))
}

#[utoipa::path(get, path = "/api/v1/webhooks/{id}/deliveries", tag = "webhooks", params(("id" = String, Path), PageQuery),
    responses((status = 200, body = Page<WebhookDelivery>), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn list_deliveries(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(p): ApiQuery<PageQuery>,
) -> Result<ApiJson<Page<WebhookDelivery>>, ApiError> {
    c.require(Role::Admin)?;
    Ok(ApiJson(s.store.list_webhook_deliveries(&id, &p).await?))
}
