//! Handlers for tasks, events and alerts (read side).

use super::error::ApiError;
use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use super::AppState;
use crate::model::access::Role;
use crate::proto::api::{
    Alert, AlertQuery, Event, EventQuery, Page, PageQuery, Problem, Task, TaskQuery,
};
use axum::extract::State;

#[utoipa::path(get, path = "/api/v1/tasks", tag = "records", params(TaskQuery, PageQuery),
    responses((status = 200, body = Page<Task>), (status = 401, body = Problem)), security(("bearer" = [])))]
pub async fn list_tasks(
    State(s): State<AppState>,
    c: Caller,
    ApiQuery(q): ApiQuery<TaskQuery>,
    ApiQuery(p): ApiQuery<PageQuery>,
) -> Result<ApiJson<Page<Task>>, ApiError> {
    c.require(Role::Viewer)?;
    Ok(ApiJson(s.store.list_tasks(&q, &p).await?))
}

#[utoipa::path(get, path = "/api/v1/tasks/{id}", tag = "records", params(("id" = String, Path)),
    responses((status = 200, body = Task), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn get_task(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<Task>, ApiError> {
    c.require(Role::Viewer)?;
    Ok(ApiJson(s.store.get_task(&id).await?))
}

#[utoipa::path(get, path = "/api/v1/events", tag = "records", params(EventQuery, PageQuery),
    responses((status = 200, body = Page<Event>), (status = 401, body = Problem)), security(("bearer" = [])))]
pub async fn list_events(
    State(s): State<AppState>,
    c: Caller,
    ApiQuery(q): ApiQuery<EventQuery>,
    ApiQuery(p): ApiQuery<PageQuery>,
) -> Result<ApiJson<Page<Event>>, ApiError> {
    c.require(Role::Viewer)?;
    Ok(ApiJson(s.store.list_events(&q, &p).await?))
}

#[utoipa::path(get, path = "/api/v1/alerts", tag = "records", params(AlertQuery, PageQuery),
    responses((status = 200, body = Page<Alert>), (status = 401, body = Problem)), security(("bearer" = [])))]
pub async fn list_alerts(
    State(s): State<AppState>,
    c: Caller,
    ApiQuery(q): ApiQuery<AlertQuery>,
    ApiQuery(p): ApiQuery<PageQuery>,
) -> Result<ApiJson<Page<Alert>>, ApiError> {
    c.require(Role::Viewer)?;
    Ok(ApiJson(s.store.list_alerts(&q, &p).await?))
}

#[utoipa::path(get, path = "/api/v1/alerts/{id}", tag = "records", params(("id" = String, Path)),
    responses((status = 200, body = Alert), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn get_alert(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<Alert>, ApiError> {
    c.require(Role::Viewer)?;
    Ok(ApiJson(s.store.get_alert(&id).await?))
}

#[utoipa::path(post, path = "/api/v1/alerts/{id}/acknowledge", tag = "records", params(("id" = String, Path)),
    responses((status = 200, body = Alert), (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 409, description = "already acknowledged (`alert.already_acknowledged`)", body = Problem)),
    security(("bearer" = [])))]
pub async fn acknowledge_alert(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<Alert>, ApiError> {
    c.require(Role::Operator)?;
    Ok(ApiJson(s.store.acknowledge_alert(&c.actor(), &id).await?))
}
