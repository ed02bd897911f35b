//! Extractors whose rejections are problem documents, the bearer-token caller, and the
//! `If-Match` / `ETag` pair used for safe concurrent updates.

use super::error::ApiError;
use super::AppState;
use crate::manager::store::{Actor, AuthenticatedToken};
use crate::model::access::Role;
use axum::extract::{FromRequest, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

impl<T: Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller(pub AuthenticatedToken);

impl Caller {
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.0.role.allows(role) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this needs the {role} role; token `{}` has {}",
                self.0.name, self.0.role
            )))
        }
    }

    pub fn actor(&self) -> Actor {
        Actor(format!("token:{}", self.0.name))
    }
}

impl Caller {
    /// The caller named by an `Authorization: Bearer` header.
    pub async fn from_headers(state: &AppState, headers: &HeaderMap) -> Result<Self, ApiError> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::unauthorized(
                "auth.missing_token",
                "send an API token as `Authorization: Bearer <token>`",
            ));
        };
        let secret = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "auth.invalid_token",
                    "the Authorization header is not a bearer token",
                )
            })?;
        Self::authenticate(state, secret).await
    }

    /// The caller owning this token secret.
    pub async fn authenticate(state: &AppState, secret: &str) -> Result<Self, ApiError> {
        match state.store.authenticate(secret).await? {
            Some(t) => Ok(Caller(t)),
            None => Err(ApiError::unauthorized(
                "auth.invalid_token",
                "the token is unknown, revoked or expired",
            )),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Caller::from_headers(state, &parts.headers).await
    }
}

/// The version an `If-Match` header asks for: `"7"`, `W/"7"` or `7`; `*` means any.
pub fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let s = v.to_str().unwrap_or("").trim();
    if s == "*" {
        return Ok(None);
    }
    let s = s.strip_prefix("W/").unwrap_or(s).trim_matches('"');
    s.parse().map(Some).map_err(|_| {
        ApiError::bad_request(
            "request.invalid_if_match",
            "If-Match must be the ETag of the resource, e.g. \"7\"",
        )
    })
}

pub fn etag(version: u64) -> (header::HeaderName, HeaderValue) {
    let v = HeaderValue::from_str(&format!("\"{version}\""))
        .unwrap_or(HeaderValue::from_static("\"0\""));
    (header::ETAG, v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_match_forms() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::IF_MATCH, HeaderValue::from_str(v).unwrap());
            if_match(&m)
        };
        assert_eq!(h("\"7\"").unwrap(), Some(7));
        assert_eq!(h("W/\"8\"").unwrap(), Some(8));
        assert_eq!(h("9").unwrap(), Some(9));
        assert_eq!(h("*").unwrap(), None);
        assert!(h("\"abc\"").is_err());
        assert_eq!(if_match(&HeaderMap::new()).unwrap(), None);
    }
}
