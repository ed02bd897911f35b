//! The site bandwidth limit: on the site resource, validated, and pushed at once to the
//! protected hosts' desired states as each link's share (PATCH null lifts it).

use crate::both;
use crate::fake_agent::{vm, FakeAgent};
use crate::helpers::*;
use bulwark::proto::control::DesiredState;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

const GIB: u64 = 1 << 30;

fn peer_limit(d: &DesiredState) -> Option<Option<u64>> {
    d.peers.first().map(|p| p.bandwidth_limit)
}

/// The next desired state whose (single) peer carries `want`, pushed on the change
/// itself (well before the 5 s resend).
async fn limit_reaches(a: &mut FakeAgent, want: Option<u64>) -> DesiredState {
    tokio::time::timeout(
        Duration::from_millis(1500),
        a.desired_where(|d| peer_limit(d) == Some(want)),
    )
    .await
    .unwrap_or_else(|_| panic!("{}: no desired state with peer limit {want:?}", a.host_name))
}

both!(
    site_limit_is_split_among_the_links_and_follows_changes,
    |app: TestApp| async move {
        // Two protected hosts at `prod`, one recovery host at `dr`: two links leave prod.
        let mut p1 = app
            .agent(
                "esx-prod-1",
                "prod",
                vec![vm("web", &[(1, "web-root", GIB)])],
            )
            .await;
        let mut p2 = app
            .agent("esx-prod-2", "prod", vec![vm("db", &[(1, "db-root", GIB)])])
            .await;
        let token = app.enrolment_token().await;
        let mut hello = FakeAgent::enrol("esx-dr-1", "dr", &token);
        hello.data_address = Some("10.9.0.1:9701".into());
        let mut dr = FakeAgent::connect(&app.ws_url(), hello).await.unwrap();
        dr.desired().await;
        let (_, sites) = app.get("/api/v1/sites?name=prod").await;
        let prod = sites["items"][0]["id"].as_str().unwrap().to_string();
        assert_eq!(sites["items"][0]["bandwidth_limit"], Value::Null);
        let (_, dr_site) = app.get("/api/v1/sites?name=dr").await;
        let dr_host = app.host_id("esx-dr-1").await;
        let (_, vms) = app.get("/api/v1/vms?limit=1000").await;
        let members: Vec<Value> = vms["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| json!({"vm_id": v["id"], "recovery_host_id": dr_host}))
            .collect();
        assert_eq!(members.len(), 2);
        app.create(
            "/api/v1/vpgs",
            json!({"name": "tier", "recovery_site_id": dr_site["items"][0]["id"],
                   "members": members}),
        )
        .await;
        let d = p1.desired_where(|d| !d.peers.is_empty()).await;
        assert_eq!(d.peers[0].bandwidth_limit, None, "no limit: unlimited");
        p2.desired_where(|d| !d.peers.is_empty()).await;

        // 1 MB/s for the site: each of the two links gets half.
        let (s, v) = app
            .patch(
                &format!("/api/v1/sites/{prod}"),
                json!({"bandwidth_limit": 1_000_000}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["bandwidth_limit"], 1_000_000);
        let d1 = limit_reaches(&mut p1, Some(500_000)).await;
        assert!(d1.version > d.version);
        assert_eq!(d1.protect.len(), 1, "protection itself unchanged: {d1:?}");
        limit_reaches(&mut p2, Some(500_000)).await;

        // A PATCH without the field keeps it.
        let (s, v) = app
            .patch(
                &format!("/api/v1/sites/{prod}"),
                json!({"description": "main data centre"}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["bandwidth_limit"], 1_000_000);
        let (_, v) = app.get(&format!("/api/v1/sites/{prod}")).await;
        assert_eq!(v["bandwidth_limit"], 1_000_000);

        // null lifts it.
        let (s, v) = app
            .patch(
                &format!("/api/v1/sites/{prod}"),
                json!({"bandwidth_limit": null}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["bandwidth_limit"], Value::Null);
        limit_reaches(&mut p1, None).await;
        limit_reaches(&mut p2, None).await;
        let (_, v) = app.get(&format!("/api/v1/sites/{prod}")).await;
        assert_eq!(v["bandwidth_limit"], Value::Null);
        drop(dr);
    }
);

both!(site_limit_is_validated, |app: TestApp| async move {
    // At creation: at least 64 KiB/s when set.
    let got = app
        .post(
            "/api/v1/sites",
            json!({"name": "slow", "bandwidth_limit": 65_535}),
        )
        .await;
    assert_problem(
        &got,
        StatusCode::UNPROCESSABLE_ENTITY,
        "site.bandwidth_limit_too_small",
    );
    assert_eq!(got.1["field"], "bandwidth_limit");
    let (s, v) = app
        .post(
            "/api/v1/sites",
            json!({"name": "edge", "bandwidth_limit": 65_536}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["bandwidth_limit"], 65_536);
    let id = v["id"].as_str().unwrap().to_string();

    // On update; a refused PATCH changes nothing.
    let path = format!("/api/v1/sites/{id}");
    for (body, code) in [
        (
            json!({"bandwidth_limit": 0}),
            "site.bandwidth_limit_too_small",
        ),
        (
            json!({"bandwidth_limit": 1000, "description": "x"}),
            "site.bandwidth_limit_too_small",
        ),
        (json!({"bandwidth_limit": -1}), "request.invalid_body"),
        (json!({"bandwidth_limit": "1M"}), "request.invalid_body"),
        (
            json!({"bandwidth_limit": u64::MAX}),
            "request.number_out_of_range",
        ),
    ] {
        let got = app.patch(&path, body.clone()).await;
        assert_problem(&got, StatusCode::UNPROCESSABLE_ENTITY, code);
    }
    let (_, v) = app.get(&path).await;
    assert_eq!(v["bandwidth_limit"], 65_536);
    assert_eq!(v["description"], "");
});
