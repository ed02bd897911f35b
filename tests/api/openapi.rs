//! The OpenAPI document parses and lists exactly the routes the server serves.

use crate::helpers::*;
use reqwest::{Method, StatusCode};
use std::collections::BTreeSet;

/// Every route the manager serves. A new route must be added here *and* reach the
/// document; the test fails on either side's omission.
const SERVED: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/api/v1/openapi.json"),
    ("GET", "/api/v1/lookups"),
    ("GET", "/api/v1/session"),
    ("GET", "/api/v1/sites"),
    ("POST", "/api/v1/sites"),
    ("GET", "/api/v1/sites/{id}"),
    ("PATCH", "/api/v1/sites/{id}"),
    ("DELETE", "/api/v1/sites/{id}"),
    ("GET", "/api/v1/hosts"),
    ("POST", "/api/v1/hosts"),
    ("GET", "/api/v1/hosts/{id}"),
    ("PATCH", "/api/v1/hosts/{id}"),
    ("DELETE", "/api/v1/hosts/{id}"),
    ("GET", "/api/v1/vms"),
    ("POST", "/api/v1/vms"),
    ("GET", "/api/v1/vms/{id}"),
    ("PATCH", "/api/v1/vms/{id}"),
    ("DELETE", "/api/v1/vms/{id}"),
    ("GET", "/api/v1/vms/{id}/console"),
    ("GET", "/api/v1/vms/{id}/disks"),
    ("POST", "/api/v1/vms/{id}/disks"),
    ("DELETE", "/api/v1/vms/{id}/disks/{disk_id}"),
    ("GET", "/api/v1/vpgs"),
    ("POST", "/api/v1/vpgs"),
    ("GET", "/api/v1/vpgs/{id}"),
    ("PATCH", "/api/v1/vpgs/{id}"),
    ("PUT", "/api/v1/vpgs/{id}"),
    ("DELETE", "/api/v1/vpgs/{id}"),
    ("GET", "/api/v1/vpgs/{id}/members"),
    ("POST", "/api/v1/vpgs/{id}/members"),
    ("GET", "/api/v1/vpgs/{id}/disks"),
    ("PUT", "/api/v1/vpgs/{id}/members/{vm_id}"),
    ("DELETE", "/api/v1/vpgs/{id}/members/{vm_id}"),
    ("GET", "/api/v1/vpgs/{id}/checkpoints"),
    ("GET", "/api/v1/vpgs/{id}/rpo-history"),
    ("POST", "/api/v1/vpgs/{id}/failover-test"),
    ("POST", "/api/v1/vpgs/{id}/failover-test/stop"),
    ("POST", "/api/v1/vpgs/{id}/failover"),
    ("POST", "/api/v1/vpgs/{id}/move"),
    ("POST", "/api/v1/vpgs/{id}/commit"),
    ("POST", "/api/v1/vpgs/{id}/rollback"),
    ("POST", "/api/v1/vpgs/{id}/pause"),
    ("POST", "/api/v1/vpgs/{id}/resume"),
    ("POST", "/api/v1/vpgs/{id}/force-sync"),
    ("GET", "/api/v1/reports"),
    ("GET", "/api/v1/reports/{id}"),
    ("POST", "/api/v1/vpgs/{id}/checkpoints"),
    ("GET", "/api/v1/tasks"),
    ("GET", "/api/v1/tasks/{id}"),
    ("GET", "/api/v1/events"),
    ("GET", "/api/v1/alerts"),
    ("GET", "/api/v1/alerts/{id}"),
    ("POST", "/api/v1/alerts/{id}/acknowledge"),
    ("GET", "/api/v1/tokens"),
    ("POST", "/api/v1/tokens"),
    ("DELETE", "/api/v1/tokens/{id}"),
    ("GET", "/api/v1/enrolment-tokens"),
    ("POST", "/api/v1/enrolment-tokens"),
    ("DELETE", "/api/v1/enrolment-tokens/{id}"),
    ("GET", "/api/v1/agents/connect"),
    ("GET", "/api/v1/webhooks"),
    ("POST", "/api/v1/webhooks"),
    ("GET", "/api/v1/webhooks/{id}"),
    ("PATCH", "/api/v1/webhooks/{id}"),
    ("DELETE", "/api/v1/webhooks/{id}"),
    ("POST", "/api/v1/webhooks/{id}/rotate-secret"),
    ("GET", "/api/v1/webhooks/{id}/deliveries"),
    ("GET", "/api/v1/stream"),
];

#[tokio::test]
async fn document_lists_every_served_route() {
    let app = spawn_app(Backend::Sqlite).await;
    let res = app
        .req(Method::GET, "/api/v1/openapi.json", None)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let doc: serde_json::Value = res.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    assert!(doc["components"]["schemas"]["Problem"].is_object());
    assert!(doc["components"]["schemas"]["VpgSettings"].is_object());

    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    let expected: BTreeSet<(String, String)> = SERVED
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, expected);

    // Every documented route is really served: none answers with the router's own
    // not-found or method-not-allowed problem.
    for (method, path) in &documented {
        let concrete = path
            .replace("{id}", "x")
            .replace("{vm_id}", "y")
            .replace("{disk_id}", "z");
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let res = app
            .req(m, &concrete, Some(&app.admin))
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        let status = res.status();
        let body = res.text().await.unwrap();
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert!(
            !body.contains("route.not_found"),
            "{method} {path} is documented but not served"
        );
    }
}
