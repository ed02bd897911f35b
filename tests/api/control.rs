//! The manager end of the agent control channel, with fake agents: enrolment and host
//! keys, refusals with their codes, inventory, desired state pushed on configuration
//! changes, replacement of a connection, disconnection (socket gone or host silent),
//! agent events.

use crate::both;
use crate::fake_agent::{vm, FakeAgent, Rejection};
use crate::helpers::*;
use bulwark::proto::control::{ManagerMessage, CONTROL_PROTOCOL};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;

const GIB: u64 = 1 << 30;

async fn rejected(app: &TestApp, hello: bulwark::proto::control::AgentHello) -> Rejection {
    match FakeAgent::connect(&app.ws_url(), hello).await {
        Ok(a) => panic!("{} was let in", a.host_name),
        Err(r) => r,
    }
}

async fn events(app: &TestApp, query: &str) -> Vec<Value> {
    let (s, v) = app.get(&format!("/api/v1/events?limit=1000&{query}")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["items"].as_array().unwrap().clone()
}

async fn host(app: &TestApp, name: &str) -> Value {
    let id = app.host_id(name).await;
    app.get(&format!("/api/v1/hosts/{id}")).await.1
}

async fn vms_of(app: &TestApp, host_name: &str) -> Vec<Value> {
    let id = app.host_id(host_name).await;
    let (_, v) = app.get(&format!("/api/v1/vms?host={id}")).await;
    let mut vms = v["items"].as_array().unwrap().clone();
    vms.sort_by_key(|v| v["name"].as_str().unwrap().to_string());
    vms
}

both!(
    enrolment_issues_a_host_key_once,
    |app: TestApp| async move {
        let token = app.enrolment_token().await;
        let mut hello = FakeAgent::enrol("esx-prod-1", "prod", &token);
        hello.data_address = Some("10.0.0.1:9701".into());
        let a = FakeAgent::connect(&app.ws_url(), hello)
            .await
            .expect("welcome");
        let key = a.host_key.clone().expect("a host key on enrolment");
        assert_eq!(key.len(), 64, "32 random bytes in hex");
        assert_eq!(a.heartbeat_ms, 1000);

        // The site and the host exist, connected, with what the hello said.
        let (_, sites) = app.get("/api/v1/sites?name=prod").await;
        assert_eq!(sites["items"].as_array().unwrap().len(), 1, "{sites}");
        let h = host(&app, "esx-prod-1").await;
        assert_eq!(h["id"], a.host_id.as_str());
        assert_eq!(h["site_id"], sites["items"][0]["id"]);
        assert_eq!(h["connectivity"], "connected", "{h}");
        assert_eq!(h["agent_version"], "fake-0.1");
        assert_eq!(h["data_address"], "10.0.0.1:9701");
        assert_eq!(h["nbd_address"], "127.0.0.1:10809");
        assert!(h["last_seen_at"].is_string());
        let enrolled = events(&app, "kind=host.enrolled").await;
        assert_eq!(enrolled.len(), 1);
        assert_eq!(enrolled[0]["actor"], "agent:esx-prod-1");
        assert_eq!(events(&app, "kind=site.created").await.len(), 1);
        // The key is stored as a hash only.
        assert!(!h.to_string().contains(&key));
        a.close().await;

        // The key lets the host back in, without a new key.
        let b = FakeAgent::connect(
            &app.ws_url(),
            FakeAgent::with_key("esx-prod-1", "prod", &key),
        )
        .await
        .expect("welcome with the key");
        assert_eq!(b.host_key, None);
        assert_eq!(b.host_id, h["id"].as_str().unwrap());
        b.close().await;

        // Refusals.
        let r = rejected(
            &app,
            FakeAgent::with_key("esx-prod-1", "prod", "0".repeat(64).as_str()),
        )
        .await;
        assert_eq!(r.code, "agent.bad_credential", "{r:?}");
        let r = rejected(&app, FakeAgent::with_key("esx-unknown", "prod", &key)).await;
        assert_eq!(r.code, "agent.bad_credential", "another host's key: {r:?}");
        let r = rejected(&app, FakeAgent::enrol("esx-prod-2", "prod", &token)).await;
        assert_eq!(
            r.code, "agent.token_used_up",
            "a one-use token reused: {r:?}"
        );
        let r = rejected(&app, FakeAgent::enrol("esx-prod-2", "prod", "bwe_nonsense")).await;
        assert_eq!(r.code, "agent.bad_credential", "{r:?}");
        let fresh = app.enrolment_token().await;
        let r = rejected(&app, FakeAgent::enrol("esx-prod-1", "prod", &fresh)).await;
        assert_eq!(r.code, "agent.already_enrolled", "{r:?}");
        let mut old = FakeAgent::enrol("esx-prod-3", "prod", &fresh);
        old.protocol = CONTROL_PROTOCOL + 1;
        assert_eq!(rejected(&app, old).await.code, "agent.protocol");
        let mut bad = FakeAgent::enrol("esx-prod-3", "prod", &fresh);
        bad.inventory.vms = vec![
            vm("x", &[(5, "x-root", GIB)]),
            vm("y", &[(5, "y-root", GIB)]),
        ];
        let r = rejected(&app, bad).await;
        assert_eq!(
            r.code, "inventory.duplicate_disk_id",
            "checked before the token is spent"
        );
        // A refused enrolment used nothing up: the fresh token still enrols another host.
        FakeAgent::connect(
            &app.ws_url(),
            FakeAgent::enrol("esx-prod-3", "prod", &fresh),
        )
        .await
        .expect("fresh token still valid");
    }
);

both!(
    an_enrolment_whose_key_was_never_used_can_be_repeated_with_its_token,
    |app: TestApp| async move {
        // The agent enrols and vanishes before storing its key (it never speaks after
        // the Welcome): the same one-use token enrols it again, with a new key.
        let token = app.enrolment_token().await;
        let lost = FakeAgent::connect(&app.ws_url(), FakeAgent::enrol("esx-lost", "prod", &token))
            .await
            .expect("welcome");
        let k1 = lost.host_key.clone().unwrap();
        lost.drop_hard();
        let again = FakeAgent::connect(&app.ws_url(), FakeAgent::enrol("esx-lost", "prod", &token))
            .await
            .expect("the same token enrols the host again");
        let k2 = again.host_key.clone().unwrap();
        assert_ne!(k1, k2, "a new key");
        assert_eq!(again.host_id, lost_id(&app).await);
        let enrolled = events(&app, "kind=host.enrolled").await;
        assert_eq!(enrolled.len(), 2, "{enrolled:?}");
        assert!(
            enrolled.iter().any(|e| e["details"]["again"] == true),
            "{enrolled:?}"
        );
        // Spoke after the Welcome: the key is the host's credential from now on.
        let mut again = again;
        again.heartbeat().await;
        again.close().await;
        let r = rejected(&app, FakeAgent::with_key("esx-lost", "prod", &k1)).await;
        assert_eq!(
            r.code, "agent.bad_credential",
            "the first key is gone: {r:?}"
        );
        let b = FakeAgent::connect(&app.ws_url(), FakeAgent::with_key("esx-lost", "prod", &k2))
            .await
            .expect("the second key admits");
        b.close().await;
        let r = rejected(&app, FakeAgent::enrol("esx-lost", "prod", &token)).await;
        assert_eq!(r.code, "agent.token_used_up", "{r:?}");
        // A token with uses left cannot take over a host whose key is in use either.
        let (_, many) = app
            .post(
                "/api/v1/enrolment-tokens",
                json!({"expires_in_secs": 3600, "max_uses": 5}),
            )
            .await;
        let many = many["secret"].as_str().unwrap().to_string();
        let r = rejected(&app, FakeAgent::enrol("esx-lost", "prod", &many)).await;
        assert_eq!(r.code, "agent.already_enrolled", "{r:?}");
        // Nor one whose key was never used, when it is another token.
        let other = FakeAgent::connect(&app.ws_url(), FakeAgent::enrol("esx-new", "prod", &many))
            .await
            .expect("welcome");
        other.drop_hard();
        let fresh = app.enrolment_token().await;
        let r = rejected(&app, FakeAgent::enrol("esx-new", "prod", &fresh)).await;
        assert_eq!(r.code, "agent.already_enrolled", "{r:?}");
    }
);

async fn lost_id(app: &TestApp) -> String {
    app.host_id("esx-lost").await
}

both!(
    revoked_and_expired_tokens_are_refused,
    |app: TestApp| async move {
        // Validation and access first.
        let bad = app
            .post("/api/v1/enrolment-tokens", json!({"expires_in_secs": 5}))
            .await;
        assert_problem(
            &bad,
            StatusCode::UNPROCESSABLE_ENTITY,
            "enrolment_token.expiry_out_of_range",
        );
        let bad = app
            .post("/api/v1/enrolment-tokens", json!({"max_uses": 0}))
            .await;
        assert_problem(
            &bad,
            StatusCode::UNPROCESSABLE_ENTITY,
            "enrolment_token.max_uses_out_of_range",
        );
        let operator = app.token(bulwark::model::access::Role::Operator).await;
        let res = app
            .req(Method::POST, "/api/v1/enrolment-tokens", Some(&operator))
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN);

        let (s, created) = app
            .post("/api/v1/enrolment-tokens", json!({"description": "rack 4"}))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{created}");
        let secret = created["secret"].as_str().unwrap().to_string();
        assert!(secret.starts_with("bwe_"));
        let id = created["token"]["id"].as_str().unwrap().to_string();
        assert_eq!(
            created["token"]["max_uses"],
            Value::Null,
            "unlimited by default"
        );
        let (_, list) = app.get("/api/v1/enrolment-tokens").await;
        assert_eq!(list["items"][0]["description"], "rack 4");
        assert!(
            !list.to_string().contains(&secret),
            "secrets are shown once"
        );

        // Unlimited: two hosts enrol with it; the uses are counted.
        for h in ["a1", "a2"] {
            FakeAgent::connect(&app.ws_url(), FakeAgent::enrol(h, "prod", &secret))
                .await
                .expect("welcome")
                .close()
                .await;
        }
        let (_, list) = app.get("/api/v1/enrolment-tokens").await;
        assert_eq!(list["items"][0]["uses"], 2);

        let (s, revoked) = app.delete(&format!("/api/v1/enrolment-tokens/{id}")).await;
        assert_eq!(s, StatusCode::OK, "{revoked}");
        assert!(revoked["revoked_at"].is_string());
        let r = rejected(&app, FakeAgent::enrol("a3", "prod", &secret)).await;
        assert_eq!(r.code, "agent.token_revoked", "{r:?}");
        assert_problem(
            &app.delete("/api/v1/enrolment-tokens/nope").await,
            StatusCode::NOT_FOUND,
            "enrolment_token.not_found",
        );

        // Expiry: age a token in the database (the API's shortest expiry is a minute).
        let secret = app.enrolment_token().await;
        {
            use sea_orm::ConnectionTrait;
            let db = app.store.connection();
            // The same literal parses as a timestamp on both databases.
            let sql = "UPDATE enrolment_tokens SET expires_at = '2001-01-01 00:00:00+00:00' \
                   WHERE uses = 0 AND revoked_at IS NULL";
            db.execute_unprepared(sql).await.unwrap();
        }
        let r = rejected(&app, FakeAgent::enrol("a4", "prod", &secret)).await;
        assert_eq!(r.code, "agent.token_expired", "{r:?}");
        let (_, hosts) = app.get("/api/v1/hosts").await;
        assert_eq!(
            hosts["items"].as_array().unwrap().len(),
            2,
            "refusals create nothing"
        );
    }
);

both!(
    inventory_is_upserted_and_members_are_kept,
    |app: TestApp| async move {
        let mut a = app
            .agent(
                "esx-prod-1",
                "prod",
                vec![
                    vm("web", &[(1, "web-root", 8 * GIB), (2, "web-data", GIB)]),
                    vm("db", &[(3, "db-root", 4 * GIB)]),
                ],
            )
            .await;
        let vms = vms_of(&app, "esx-prod-1").await;
        assert_eq!(vms.len(), 2);
        assert_eq!(vms[1]["name"], "web");
        assert_eq!(vms[1]["power_state"], "on");
        assert_eq!(vms[1]["cpus"], 2);
        let disks: Vec<(String, u64, u64)> = vms[1]["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["name"].as_str().unwrap().to_string(),
                    d["device_id"].as_u64().unwrap(),
                    d["size_bytes"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            disks,
            [
                ("web-data".to_string(), 2, GIB),
                ("web-root".to_string(), 1, 8 * GIB)
            ]
        );
        assert_eq!(vms[1]["disks"][0]["path"], "web-data", "path is the export");
        assert_eq!(events(&app, "kind=vm.discovered").await.len(), 2);

        // Make web a member (with a recovery host), then report neither VM any more, and a
        // new one; db goes, web stays as missing with no disk ids.
        let dr = app.agent("esx-dr-1", "dr", vec![]).await;
        let (_, dr_site) = app.get("/api/v1/sites?name=dr").await;
        app.create(
        "/api/v1/vpgs",
        json!({"name": "g", "recovery_site_id": dr_site["items"][0]["id"],
               "members": [{"vm_id": vms[1]["id"], "recovery_host_id": app.host_id("esx-dr-1").await}]}),
    )
    .await;
        a.inventory(vec![vm("new", &[(9, "new-root", GIB)])]).await;
        let vms = app
            .eventually("inventory applied", || async {
                let vms = vms_of(&app, "esx-prod-1").await;
                (vms.iter().any(|v| v["name"] == "new")).then_some(vms)
            })
            .await;
        let names: Vec<&str> = vms.iter().map(|v| v["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["new", "web"], "db deleted, web kept");
        assert_eq!(vms[1]["power_state"], "missing");
        assert!(vms[1]["disks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["device_id"].is_null()));
        assert_eq!(events(&app, "kind=vm.removed").await.len(), 1);
        let missing = events(&app, "kind=vm.missing").await;
        assert_eq!(missing.len(), 1);
        assert_eq!(missing[0]["severity"], "warning");

        // It comes back: on again, with its disk ids.
        a.inventory(vec![vm(
            "web",
            &[(1, "web-root", 8 * GIB), (2, "web-data", GIB)],
        )])
        .await;
        let vms = app
            .eventually("web back", || async {
                let vms = vms_of(&app, "esx-prod-1").await;
                (vms.len() == 1 && vms[0]["power_state"] == "on").then_some(vms)
            })
            .await;
        assert_eq!(vms[0]["disks"][1]["device_id"], 1);
        assert_eq!(events(&app, "kind=vm.returned").await.len(), 1);

        // A bad inventory (one disk id twice) changes nothing.
        a.inventory(vec![
            vm("x", &[(5, "x-root", GIB)]),
            vm("y", &[(5, "y-root", GIB)]),
        ])
        .await;
        a.heartbeat().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(vms_of(&app, "esx-prod-1").await.len(), 1);
        drop(dr);
    }
);

/// A protected host with VM `web` (disks 1, 2), a recovery host with a data listener;
/// returns both agents and the VM id.
async fn two_hosts(app: &TestApp) -> (FakeAgent, FakeAgent, String) {
    let prod = app
        .agent(
            "esx-prod-1",
            "prod",
            vec![vm("web", &[(1, "web-root", GIB), (2, "web-data", GIB)])],
        )
        .await;
    let token = app.enrolment_token().await;
    let mut hello = FakeAgent::enrol("esx-dr-1", "dr", &token);
    hello.data_address = Some("10.9.0.1:9701".into());
    let mut dr = FakeAgent::connect(&app.ws_url(), hello).await.unwrap();
    dr.desired().await;
    let web = vms_of(app, "esx-prod-1").await[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    (prod, dr, web)
}

both!(vpg_changes_reach_both_hosts, |app: TestApp| async move {
    let (mut prod, mut dr, web) = two_hosts(&app).await;
    let (_, dr_site) = app.get("/api/v1/sites?name=dr").await;
    let dr_host = app.host_id("esx-dr-1").await;
    let vpg = app
        .create(
            "/api/v1/vpgs",
            json!({"name": "web-tier", "recovery_site_id": dr_site["items"][0]["id"],
                   "settings": {"priority": "high"},
                   "members": [{"vm_id": web, "recovery_host_id": dr_host}]}),
        )
        .await;
    // Pushed at once on the change (not at the 5 s resend tick).
    let d = tokio::time::timeout(
        Duration::from_millis(1500),
        prod.desired_where(|d| !d.protect.is_empty()),
    )
    .await
    .expect("desired state pushed on the configuration change");
    assert_eq!(d.protect.len(), 2, "{d:?}");
    let ids: Vec<u64> = d.protect.iter().map(|p| p.disk_id).collect();
    assert_eq!(ids, [1, 2]);
    for p in &d.protect {
        assert_eq!(p.vm, "web");
        assert_eq!(p.vpg_id, vpg);
        assert_eq!(p.recovery_host, "esx-dr-1");
        assert!(!p.paused);
        assert_eq!(p.priority, bulwark::model::settings::Priority::High);
    }
    assert_eq!(d.peers.len(), 1);
    assert_eq!(d.peers[0].host_name, "esx-dr-1");
    assert_eq!(d.peers[0].address, "10.9.0.1:9701");
    assert!(d.accept.is_empty());
    let r = dr.desired_where(|d| !d.accept.is_empty()).await;
    assert_eq!(r.accept, ["esx-prod-1"]);
    assert!(r.protect.is_empty());
    prod.applied(d.version).await;

    // A later change gets a higher version; the member leaves → empty protection.
    let (s, v) = app
        .call(
            Method::DELETE,
            &format!("/api/v1/vpgs/{vpg}/members/{web}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let d2 = prod.desired_where(|d| d.protect.is_empty()).await;
    assert!(d2.version > d.version);
    assert!(d2.peers.is_empty());
    let r2 = dr.desired_where(|d| d.accept.is_empty()).await;
    assert!(r2.version > r.version);

    // Not applied: resent (every 5 s) with the same version.
    let again = prod.desired().await;
    assert_eq!(again.version, d2.version);
});

both!(
    a_new_connection_replaces_the_old,
    |app: TestApp| async move {
        let token = app.enrolment_token().await;
        let mut first = FakeAgent::connect(&app.ws_url(), FakeAgent::enrol("h1", "prod", &token))
            .await
            .unwrap();
        let key = first.host_key.clone().unwrap();
        first.desired().await;
        let mut second = FakeAgent::connect(&app.ws_url(), FakeAgent::with_key("h1", "prod", &key))
            .await
            .unwrap();
        second.desired().await;
        assert!(
            first.closed_within(Duration::from_secs(5)).await,
            "the replaced connection is closed"
        );
        // Its end is not a disconnection: the host stays connected and hears changes.
        second.heartbeat().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(host(&app, "h1").await["connectivity"], "connected");
        assert!(events(&app, "kind=host.disconnected").await.is_empty());
        second.send_text("{not json").await;
        assert!(
            second.closed_within(Duration::from_secs(5)).await,
            "bad JSON closes the connection"
        );
        app.eventually("disconnected after bad JSON", || async {
            (host(&app, "h1").await["connectivity"] == "disconnected").then_some(())
        })
        .await;
    }
);

both!(
    a_dropped_connection_disconnects_the_host,
    |app: TestApp| async move {
        let a = app.agent("h1", "prod", vec![]).await;
        assert_eq!(host(&app, "h1").await["connectivity"], "connected");
        a.drop_hard();
        app.eventually("host disconnected", || async {
            (host(&app, "h1").await["connectivity"] == "disconnected").then_some(())
        })
        .await;
        let ev = events(&app, "kind=host.disconnected").await;
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0]["subject_id"], app.host_id("h1").await.as_str());
    }
);

mod silent_host {
    use super::*;

    async fn run(backend: Backend) {
        let app = spawn_app_with(
            backend,
            ControlSettings {
                heartbeat: Duration::from_millis(200),
                disconnect_after: Duration::from_millis(800),
                ..Default::default()
            },
        )
        .await;
        let mut quiet = app.agent("quiet", "prod", vec![]).await;
        let mut chatty = app.agent("chatty", "prod", vec![]).await;
        assert_eq!(chatty.heartbeat_ms, 200);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while tokio::time::Instant::now() < deadline {
            chatty.heartbeat().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(host(&app, "quiet").await["connectivity"], "disconnected");
        assert_eq!(host(&app, "chatty").await["connectivity"], "connected");
        assert!(quiet.closed_within(Duration::from_secs(2)).await);
        let ev = events(&app, "kind=host.disconnected").await;
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert!(ev[0]["message"].as_str().unwrap().contains("no heartbeat"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        run(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        run(Backend::Postgres).await;
    }
}

both!(
    agent_events_are_recorded_with_their_vpg,
    |app: TestApp| async move {
        let (mut prod, _dr, web) = two_hosts(&app).await;
        let (_, dr_site) = app.get("/api/v1/sites?name=dr").await;
        let vpg = app
            .create(
                "/api/v1/vpgs",
                json!({"name": "web-tier", "recovery_site_id": dr_site["items"][0]["id"],
                   "members": [{"vm_id": web, "recovery_host_id": app.host_id("esx-dr-1").await}]}),
            )
            .await;
        prod.event(
            "sync_started",
            Some(2),
            "initial sync of web-data",
            json!({"kind": "initial"}),
        )
        .await;
        prod.event(
            "sync_ended",
            Some(2),
            "initial sync of web-data: completed",
            json!({"blocks_sent": 128, "duration_ms": 900, "result": "completed"}),
        )
        .await;
        prod.event(
            "stream_connected",
            None,
            "connected to esx-dr-1",
            Value::Null,
        )
        .await;
        let ev = app
            .eventually("three agent events", || async {
                let ev = events(&app, "kind=agent.").await;
                (ev.len() == 3).then_some(ev)
            })
            .await;
        // Newest first.
        assert_eq!(ev[2]["kind"], "agent.sync_started");
        assert_eq!(ev[2]["vpg_id"], vpg.as_str());
        assert_eq!(ev[2]["details"]["blocks_sent"], 0);
        assert_eq!(ev[2]["details"]["duration_ms"], 0);
        assert_eq!(ev[2]["details"]["vm"], "web");
        assert_eq!(ev[1]["kind"], "agent.sync_ended");
        assert_eq!(ev[1]["details"]["blocks_sent"], 128);
        assert_eq!(ev[1]["details"]["duration_ms"], 900);
        assert_eq!(ev[1]["actor"], "agent:esx-prod-1");
        assert_eq!(ev[0]["kind"], "agent.stream_connected");
        assert!(ev[0]["vpg_id"].is_null());
        assert_eq!(
            events(&app, &format!("vpg={vpg}&kind=agent.")).await.len(),
            2
        );
    }
);

#[tokio::test]
async fn the_socket_needs_an_upgrade_and_a_hello() {
    let app = spawn_app(Backend::Sqlite).await;
    let res = app
        .req(Method::GET, "/api/v1/agents/connect", None)
        .send()
        .await
        .unwrap();
    let got = split(res).await;
    assert_problem(&got, StatusCode::BAD_REQUEST, "agent.websocket_required");
    // A first message that is not a hello.
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (mut ws, _) = tokio_tungstenite::connect_async(app.ws_url())
        .await
        .unwrap();
    ws.send(Message::text(
        r#"{"type":"applied","version":1,"error":null}"#,
    ))
    .await
    .unwrap();
    let Some(Ok(Message::Text(t))) = ws.next().await else {
        panic!("no answer")
    };
    match serde_json::from_str::<ManagerMessage>(t.as_str()).unwrap() {
        ManagerMessage::Rejected { code, .. } => assert_eq!(code, "agent.bad_message"),
        other => panic!("{other:?}"),
    }
}
