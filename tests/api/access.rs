//! Bearer tokens and roles: viewer reads, operator runs operations, admin configures.

use crate::both;
use crate::helpers::*;
use bulwark::model::access::Role;
use reqwest::{Method, StatusCode};
use serde_json::json;

both!(tokens_and_roles, |app: TestApp| async move {
    let w = app.world(1).await;
    let viewer = app.token(Role::Viewer).await;
    let operator = app.token(Role::Operator).await;

    let as_ = |m: Method, path: &str, token: Option<&str>| app.req(m, path, token).send();
    assert_problem(
        &split(as_(Method::GET, "/api/v1/sites", None).await.unwrap()).await,
        StatusCode::UNAUTHORIZED,
        "auth.missing_token",
    );
    let res = as_(Method::GET, "/api/v1/sites", Some("bwk_0000"))
        .await
        .unwrap();
    assert_eq!(
        res.headers()["www-authenticate"],
        "Bearer realm=\"bulwark\""
    );
    assert_problem(
        &split(res).await,
        StatusCode::UNAUTHORIZED,
        "auth.invalid_token",
    );
    let res = app
        .http
        .get(app.url("/api/v1/sites"))
        .header("authorization", format!("Basic {}", app.admin))
        .send()
        .await
        .unwrap();
    assert_problem(
        &split(res).await,
        StatusCode::UNAUTHORIZED,
        "auth.invalid_token",
    );

    // Viewers and operators read everything.
    for t in [&viewer, &operator] {
        for path in [
            "/api/v1/sites",
            "/api/v1/vms",
            "/api/v1/vpgs",
            "/api/v1/events",
            "/api/v1/alerts",
            "/api/v1/tasks",
            "/api/v1/lookups",
        ] {
            let (s, v) = split(as_(Method::GET, path, Some(t)).await.unwrap()).await;
            assert_eq!(s, StatusCode::OK, "{path}: {v}");
        }
    }
    // Only admins configure.
    let writes = [
        (
            Method::POST,
            "/api/v1/sites".to_string(),
            json!({"name": "x"}),
        ),
        (
            Method::PATCH,
            format!("/api/v1/sites/{}", w.protected_site),
            json!({"name": "x"}),
        ),
        (
            Method::DELETE,
            format!("/api/v1/vms/{}", w.vms[0]),
            json!(null),
        ),
        (
            Method::POST,
            "/api/v1/vpgs".to_string(),
            json!({"name": "g", "recovery_site_id": w.recovery_site}),
        ),
        (
            Method::POST,
            "/api/v1/tokens".to_string(),
            json!({"name": "t", "role": "admin"}),
        ),
    ];
    let events_before = app.event_count().await;
    for t in [&viewer, &operator] {
        for (m, path, body) in &writes {
            let res = app
                .req(m.clone(), path, Some(t))
                .json(body)
                .send()
                .await
                .unwrap();
            assert_problem(&split(res).await, StatusCode::FORBIDDEN, "auth.forbidden");
        }
        let res = app
            .req(Method::GET, "/api/v1/tokens", Some(t))
            .send()
            .await
            .unwrap();
        assert_problem(&split(res).await, StatusCode::FORBIDDEN, "auth.forbidden");
    }
    assert_eq!(
        app.event_count().await,
        events_before,
        "refused writes changed nothing"
    );

    let (_, s) = split(
        as_(Method::GET, "/api/v1/session", Some(&viewer))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s["role"], "viewer");

    // Admins mint tokens; the secret shows once and is stored only hashed.
    let (st, created) = app
        .post(
            "/api/v1/tokens",
            json!({"name": "automation", "role": "operator", "expires_in_days": 30}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{created}");
    let secret = created["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("bwk_") && secret.len() > 40);
    assert!(secret.starts_with(created["token"]["prefix"].as_str().unwrap()));
    assert!(created["token"]["expires_at"].is_string());
    let (_, list) = app.get("/api/v1/tokens").await;
    assert!(
        !list.to_string().contains(&secret),
        "listing never shows secrets"
    );
    let (_, s) = split(
        as_(Method::GET, "/api/v1/session", Some(&secret))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s["role"].as_str(), s["name"].as_str()),
        (Some("operator"), Some("automation"))
    );
    assert_problem(
        &app.post("/api/v1/tokens", json!({"name": "t", "role": "root"}))
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "request.invalid_body",
    );
    assert_problem(
        &app.post(
            "/api/v1/tokens",
            json!({"name": "t", "role": "viewer", "expires_in_days": 0}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "token.expiry_out_of_range",
    );

    // Revoked tokens stop working at once.
    let id = created["token"]["id"].as_str().unwrap();
    let (st, _) = app.delete(&format!("/api/v1/tokens/{id}")).await;
    assert_eq!(st, StatusCode::OK);
    assert_problem(
        &split(
            as_(Method::GET, "/api/v1/session", Some(&secret))
                .await
                .unwrap(),
        )
        .await,
        StatusCode::UNAUTHORIZED,
        "auth.invalid_token",
    );
    let (_, ev) = app.get("/api/v1/events?kind=token.").await;
    let kinds: Vec<&str> = ev["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(&kinds[..2], ["token.revoked", "token.created"]);
});
