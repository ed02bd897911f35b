//! The HTTP surface of the manager: REST under `/api/v1`, health, metrics, the OpenAPI
//! document and the static console. The only module that speaks HTTP. Handlers are
//! thin: authenticate, parse, call one store function, map the result.

mod agents;
mod error;
mod extract;
mod inventory;
mod live;
mod meta;
mod operations;
mod records;
mod tokens;
mod vpgs;
mod webhooks;

pub use error::ApiError;

use super::control::ControlPlane;
use super::metrics::Metrics;
use super::store::Store;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::services::ServeDir;
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub control: Arc<ControlPlane>,
    openapi_json: Arc<String>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Bulwark", description = "Disaster-recovery orchestration for groups of VMs. Errors are RFC 7807 problem documents with a stable `code`."),
    modifiers(&BearerAuth),
    tags(
        (name = "inventory", description = "Sites, hosts, VMs and disks"),
        (name = "vpgs", description = "Protection groups, their members and checkpoints"),
        (name = "operations", description = "Failover test, failover, move, commit, rollback, pause, resume, force sync; recovery reports"),
        (name = "records", description = "Tasks, events and alerts"),
        (name = "access", description = "API tokens"),
        (name = "agents", description = "Enrolment tokens and the agents' control channel"),
        (name = "webhooks", description = "Event subscriptions delivered to HTTP receivers, signed"),
        (name = "meta", description = "Health, metrics and lookups"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// Every documented route. Routes join the router only through here, so the
/// OpenAPI document lists exactly what is served.
fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(meta::healthz))
        .routes(routes!(meta::readyz))
        .routes(routes!(meta::metrics))
        .routes(routes!(meta::lookups))
        .routes(routes!(inventory::list_sites, inventory::create_site))
        .routes(routes!(
            inventory::get_site,
            inventory::update_site,
            inventory::delete_site
        ))
        .routes(routes!(inventory::list_hosts, inventory::create_host))
        .routes(routes!(
            inventory::get_host,
            inventory::update_host,
            inventory::delete_host
        ))
        .routes(routes!(inventory::list_vms, inventory::create_vm))
        .routes(routes!(
            inventory::get_vm,
            inventory::update_vm,
            inventory::delete_vm
        ))
        .routes(routes!(inventory::vm_console))
        .routes(routes!(inventory::list_disks, inventory::add_disk))
        .routes(routes!(inventory::delete_disk))
        .routes(routes!(vpgs::list_vpgs, vpgs::create_vpg))
        .routes(routes!(
            vpgs::get_vpg,
            vpgs::update_vpg,
            vpgs::replace_vpg,
            vpgs::delete_vpg
        ))
        .routes(routes!(vpgs::list_members, vpgs::add_member))
        .routes(routes!(vpgs::list_disks))
        .routes(routes!(vpgs::update_member, vpgs::remove_member))
        .routes(routes!(vpgs::list_checkpoints, vpgs::create_checkpoint))
        .routes(routes!(vpgs::rpo_history))
        .routes(routes!(operations::start_test))
        .routes(routes!(operations::stop_test))
        .routes(routes!(operations::failover))
        .routes(routes!(operations::move_vpg))
        .routes(routes!(operations::commit))
        .routes(routes!(operations::rollback))
        .routes(routes!(operations::pause))
        .routes(routes!(operations::resume))
        .routes(routes!(operations::force_sync))
        .routes(routes!(operations::list_reports))
        .routes(routes!(operations::get_report))
        .routes(routes!(records::list_tasks))
        .routes(routes!(records::get_task))
        .routes(routes!(records::list_events))
        .routes(routes!(records::list_alerts))
        .routes(routes!(records::get_alert))
        .routes(routes!(records::acknowledge_alert))
        .routes(routes!(live::stream))
        .routes(routes!(tokens::session))
        .routes(routes!(tokens::list_tokens, tokens::create_token))
        .routes(routes!(tokens::revoke_token))
        .routes(routes!(
            agents::list_enrolment_tokens,
            agents::create_enrolment_token
        ))
        .routes(routes!(agents::revoke_enrolment_token))
        .routes(routes!(agents::connect))
        .routes(routes!(webhooks::list_webhooks, webhooks::create_webhook))
        .routes(routes!(
            webhooks::get_webhook,
            webhooks::update_webhook,
            webhooks::delete_webhook
        ))
        .routes(routes!(webhooks::rotate_webhook_secret))
        .routes(routes!(webhooks::list_deliveries))
}

pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";

/// The OpenAPI document of everything [`router`] serves (the document's own route
/// included).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (_, mut doc) = api_routes().split_for_parts();
    let get = utoipa::openapi::path::OperationBuilder::new()
        .tag("meta")
        .summary(Some("This document"))
        .response("200", utoipa::openapi::Response::new("OpenAPI 3 document"))
        .build();
    doc.paths
        .add_path_operation(OPENAPI_PATH, vec![utoipa::openapi::HttpMethod::Get], get);
    doc.info.version = env!("CARGO_PKG_VERSION").into();
    doc
}

/// Largest accepted request body: a VPG of 1,000 members with settings fits easily.
pub const MAX_BODY_BYTES: usize = 1 << 20;

pub fn router(
    store: Store,
    metrics: Arc<Metrics>,
    control: Arc<ControlPlane>,
    web_dir: Option<&Path>,
) -> Router {
    let doc = openapi();
    let openapi_json = Arc::new(doc.to_json().unwrap_or_else(|_| "{}".into()));
    let state = AppState {
        store,
        metrics,
        control,
        openapi_json,
    };
    let (api, _) = api_routes().split_for_parts();
    let mut app = api
        .route(OPENAPI_PATH, axum::routing::get(meta::openapi))
        .route("/api", axum::routing::any(api_not_found))
        .route("/api/{*rest}", axum::routing::any(api_not_found));
    if let Some(dir) = web_dir {
        app = app.fallback_service(ServeDir::new(dir).append_index_html_on_directories(true));
    }
    app.layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        // Spans name the path only: a query string may hold a token (`access_token`).
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            tracing::debug_span!("request", method = %req.method(), path = %req.uri().path())
        }))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal().into_response()
        }))
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn api_not_found(method: Method) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "route.not_found",
        format!("no such API route for {method}; see {OPENAPI_PATH}"),
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "route.method_not_allowed",
        "this route does not take that method",
    )
}

/// Counts and times every request by route template (never by raw path, so ids do not
/// explode the label space).
async fn observe(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_string();
    let start = Instant::now();
    let res = next.run(req).await;
    s.metrics
        .observe_http(&method, &route, res.status().as_u16(), start.elapsed());
    res
}

/// `201 Created` with a `Location` header.
pub(crate) fn created<T: Serialize>(location: String, body: T) -> Response {
    let mut res = (StatusCode::CREATED, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    res
}
