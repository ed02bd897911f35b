//! Agents: enrolment tokens (admin) and the control WebSocket every agent dials. The
//! socket itself is served by `control::channel`; this module only upgrades.

use super::error::ApiError;
use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use super::{created, AppState};
use crate::manager::control::channel;
use crate::model::access::Role;
use crate::proto::api::{
    EnrolmentToken, EnrolmentTokenCreate, EnrolmentTokenCreated, Page, PageQuery, Problem,
};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

#[utoipa::path(get, path = "/api/v1/enrolment-tokens", tag = "agents", params(PageQuery),
    responses((status = 200, body = Page<EnrolmentToken>), (status = 403, body = Problem)), security(("bearer" = [])))]
pub async fn list_enrolment_tokens(
    State(s): State<AppState>,
    c: Caller,
    ApiQuery(p): ApiQuery<PageQuery>,
) -> Result<ApiJson<Page<EnrolmentToken>>, ApiError> {
    c.require(Role::Admin)?;
    Ok(ApiJson(s.store.list_enrolment_tokens(&p).await?))
}

/// Creates a token an agent exchanges once for its host key. The secret is in this
/// answer only.
#[utoipa::path(post, path = "/api/v1/enrolment-tokens", tag = "agents", request_body = EnrolmentTokenCreate,
    responses((status = 201, body = EnrolmentTokenCreated), (status = 403, body = Problem), (status = 422, body = Problem)), security(("bearer" = [])))]
pub async fn create_enrolment_token(
    State(s): State<AppState>,
    c: Caller,
    ApiJson(body): ApiJson<EnrolmentTokenCreate>,
) -> Result<Response, ApiError> {
    c.require(Role::Admin)?;
    let t = s.store.create_enrolment_token(&c.actor(), body).await?;
    Ok(created(
        format!("/api/v1/enrolment-tokens/{}", t.token.id),
        t,
    ))
}

/// Revokes a token: no host can enrol with it any more (hosts enrolled keep their keys).
#[utoipa::path(delete, path = "/api/v1/enrolment-tokens/{id}", tag = "agents", params(("id" = String, Path)),
    responses((status = 200, body = EnrolmentToken), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn revoke_enrolment_token(
    State(s): State<AppState>,
    c: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<EnrolmentToken>, ApiError> {
    c.require(Role::Admin)?;
    Ok(ApiJson(
        s.store.revoke_enrolment_token(&c.actor(), &id).await?,
    ))
}

/// The control channel (`proto::control`): a WebSocket of JSON text messages. No bearer
/// token: the agent authenticates in its first message (Hello) with an enrolment token
/// or its host key.
#[utoipa::path(get, path = "/api/v1/agents/connect", tag = "agents",
    responses(
        (status = 101, description = "Switching protocols: the control WebSocket"),
        (status = 400, body = Problem, description = "Not a WebSocket upgrade request"),
    ))]
pub async fn connect(
    State(s): State<AppState>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "agent.websocket_required",
                format!("this is the agents' control WebSocket: {e}"),
            )
            .into_response()
        }
    };
    let cp = Arc::clone(&s.control);
    ws.max_message_size(channel::MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| channel::serve(cp, socket))
}
