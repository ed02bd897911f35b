//! Handlers for API tokens and the caller's own session.

use super::error::ApiError;
use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use super::{created, AppState};
use crate::model::access::Role;
use crate::proto::api::{Page, PageQuery, Problem, Session, Token, TokenCreate, TokenCreated};
use axum::extract::State;
use axum::response::Response;

#[utoipa::path(get, path = "/api/v1/session", tag = "access",
    responses((status = 200, body = Session), (status = 401, body = Problem)), security(("bearer" = [])))]
pub async fn session(c: Caller) -> ApiJson<Session> {
    ApiJson(Session {
        token_id: c.0.id,
        name: c.0.name,
        role: c.0.role,
    })
}

#[utoipa::path(get, path = "/api/v1/tokens", tag = "access", params(PageQuery),
    responses((status = 200, body = Page<Token>), (status = 403, body = Problem)), security(("bearer" = [])))]
pub async fn list_tokens(
    State(s): State<AppState>,
    c: Caller,
    ApiQuery(p): ApiQuery<PageQuery>,
) -> Result<ApiJson<Page<Token>>, ApiError> {
    c.require(Role::Admin)?;
    Ok(ApiJson(s.store.list_tokens(&p).await?))
}

#[utoipa::path(post, path = "/api/v1/tokens", tag = "access", request_body = TokenCreate,
    responses((status = 201, body = TokenCreated), (status = 403, body = Problem), (status = 422, body = Problem)), security(("bearer" = [])))]
pub async fn create_token(
    State(s): State<AppState>,
    c: Caller,
    ApiJson(body): ApiJson<TokenCreate>,
) -> Result<Response, ApiError> {
    c.require(Role::Admin)?;
    let t = s.store.create_token(&c.actor(), body).await?;
    Ok(created(format!("/api/v1/tokens/{}", t.token.id), t))
}

#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "access", params(("id" = String, Path)),
    responses((status = 200, body = Token), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn revoke_token(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<Token>, ApiError> {
    c.require(Role::Admin)?;
    Ok(ApiJson(s.store.revoke_token(&c.actor(), &id).await?))
}
