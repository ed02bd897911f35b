//! Create, read, update and delete round trips, filters, status derivation and the
//! audit trail.

use crate::both;
use crate::helpers::*;
use reqwest::{Method, StatusCode};
use serde_json::json;

both!(inventory_round_trip, |app: TestApp| async move {
    let site = app
        .create(
            "/api/v1/sites",
            json!({"name": "prod", "description": "main DC"}),
        )
        .await;
    let (s, v) = app.get(&format!("/api/v1/sites/{site}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (
            v["name"].as_str(),
            v["description"].as_str(),
            v["location"].as_str()
        ),
        (Some("prod"), Some("main DC"), None)
    );

    let (s, v) = app
        .patch(
            &format!("/api/v1/sites/{site}"),
            json!({"location": "Frankfurt", "name": "  prod-fra "}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["name"].as_str(), v["location"].as_str()),
        (Some("prod-fra"), Some("Frankfurt"))
    );
    let (_, v) = app
        .patch(&format!("/api/v1/sites/{site}"), json!({"location": null}))
        .await;
    assert!(v["location"].is_null(), "null clears an optional field");

    let host = app
        .create(
            "/api/v1/hosts",
            json!({"name": "esx1", "site_id": site, "nbd_address": "10.0.0.5:10809"}),
        )
        .await;
    let (_, v) = app.get(&format!("/api/v1/hosts/{host}")).await;
    assert_eq!(v["connectivity"], "unknown");
    assert_eq!(v["nbd_address"], "10.0.0.5:10809");

    let vm = app
        .create(
            "/api/v1/vms",
            json!({"name": "db1", "host_id": host, "cpus": 4, "memory_mib": 8192, "power_state": "on",
                   "nics": [{"name": "eth0", "addresses": ["10.1.2.3/24"]}],
                   "disks": [{"name": "root", "size_bytes": 10737418240u64}, {"name": "data", "size_bytes": 1048576}]}),
        )
        .await;
    let (_, v) = app.get(&format!("/api/v1/vms/{vm}")).await;
    assert_eq!(v["site_id"], site.as_str());
    assert_eq!(v["power_state"], "on");
    assert_eq!(v["replication_state"], "not_enabled");
    let disks = v["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2);
    assert_eq!(
        disks
            .iter()
            .map(|d| d["name"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["data", "root"]
    );
    assert_eq!(disks[1]["size_bytes"], 10737418240u64);

    let disk = app
        .create(
            &format!("/api/v1/vms/{vm}/disks"),
            json!({"name": "logs", "size_bytes": 4096}),
        )
        .await;
    let (_, v) = app.get(&format!("/api/v1/vms/{vm}/disks")).await;
    assert_eq!(v.as_array().unwrap().len(), 3);
    let (s, _) = app.delete(&format!("/api/v1/vms/{vm}/disks/{disk}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, v) = app
        .patch(
            &format!("/api/v1/vms/{vm}"),
            json!({"power_state": "off", "cpus": 2}),
        )
        .await;
    assert_eq!(
        (
            v["power_state"].as_str(),
            v["cpus"].as_u64(),
            v["disks"].as_array().unwrap().len()
        ),
        (Some("off"), Some(2), 2)
    );

    // Deleting in the wrong order is refused and changes nothing.
    assert_problem(
        &app.delete(&format!("/api/v1/sites/{site}")).await,
        StatusCode::CONFLICT,
        "site.in_use",
    );
    assert_problem(
        &app.delete(&format!("/api/v1/hosts/{host}")).await,
        StatusCode::CONFLICT,
        "host.in_use",
    );
    assert_eq!(
        app.delete(&format!("/api/v1/vms/{vm}")).await.0,
        StatusCode::NO_CONTENT
    );
    assert_problem(
        &app.get(&format!("/api/v1/vms/{vm}")).await,
        StatusCode::NOT_FOUND,
        "vm.not_found",
    );
    assert_eq!(
        app.delete(&format!("/api/v1/hosts/{host}")).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.delete(&format!("/api/v1/sites/{site}")).await.0,
        StatusCode::NO_CONTENT
    );
    assert_problem(
        &app.get(&format!("/api/v1/sites/{site}")).await,
        StatusCode::NOT_FOUND,
        "site.not_found",
    );

    // Every mutation left an event naming who did it.
    let (_, ev) = app.get("/api/v1/events?limit=1000").await;
    let kinds: Vec<&str> = ev["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for k in [
        "site.created",
        "site.updated",
        "host.created",
        "vm.created",
        "disk.created",
        "disk.deleted",
        "vm.updated",
        "vm.deleted",
        "host.deleted",
        "site.deleted",
    ] {
        assert!(kinds.contains(&k), "missing event {k} in {kinds:?}");
    }
    assert!(ev["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] != "token.created")
        .all(|e| e["actor"] == "token:bootstrap-admin"));
    let (_, only) = app.get("/api/v1/events?kind=site.").await;
    assert!(only["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["kind"].as_str().unwrap().starts_with("site.")));
    assert_eq!(only["items"].as_array().unwrap().len(), 4);
});

both!(vpg_round_trip, |app: TestApp| async move {
    let w = app.world(3).await;
    let vpg = app
        .create(
            "/api/v1/vpgs",
            json!({
                "name": "web-tier",
                "recovery_site_id": w.recovery_site,
                "settings": {"rpo_target_secs": 120, "priority": "high",
                             "resync_policy": {"mode": "window", "start": "22:00", "end": "05:30"},
                             "network_mappings": [{"from": "10.1.0.0/16", "to": "10.201.0.0/16"}]},
                "members": [
                    {"vm_id": w.vms[0], "recovery_host_id": w.recovery_host, "boot_group": 1, "boot_delay_secs": 30,
                     "nics": [{"nic": "eth0", "reip": {"address": "10.201.9.9", "prefix": 24, "gateway": "10.201.9.1", "dns": ["10.201.0.53"]}}]},
                    {"vm_id": w.vms[1], "recovery_host_id": w.recovery_host},
                ],
            }),
        )
        .await;
    let res = app
        .req(
            Method::GET,
            &format!("/api/v1/vpgs/{vpg}"),
            Some(&app.admin),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["etag"], "\"1\"");
    let (_, v) = split(res).await;
    assert_eq!(
        v["protected_site_id"],
        w.protected_site.as_str(),
        "protected site comes from the VMs"
    );
    assert_eq!(
        (v["status"].as_str(), v["sub_status"].as_str()),
        (Some("initializing"), Some("creating_vpg"))
    );
    assert_eq!(v["settings"]["rpo_target_secs"], 120);
    assert_eq!(
        v["settings"]["journal_history_secs"], 86400,
        "defaults fill what was not given"
    );
    assert_eq!(
        v["settings"]["resync_policy"],
        json!({"mode": "window", "start": "22:00", "end": "05:30"})
    );
    assert_eq!(v["vm_count"], 2);
    let members = v["members"].as_array().unwrap();
    assert_eq!(members[0]["boot_group"], 0, "members come in boot order");
    assert_eq!(members[1]["nics"][0]["reip"]["gateway"], "10.201.9.1");
    assert_eq!(members[1]["vm_name"], "vm0");
    assert!(members
        .iter()
        .all(|m| m["replication_state"] == "pending_initial_replication"));
    let (_, vm) = app.get(&format!("/api/v1/vms/{}", w.vms[0])).await;
    assert_eq!(vm["vpg_id"], vpg.as_str());

    // PATCH changes only what it names and bumps the version.
    let (s, v) = app
        .patch(
            &format!("/api/v1/vpgs/{vpg}"),
            json!({"settings": {"journal_history_secs": 7200}, "description": "front end"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (
            v["version"].as_u64(),
            v["settings"]["journal_history_secs"].as_u64(),
            v["settings"]["rpo_target_secs"].as_u64()
        ),
        (Some(2), Some(7200), Some(120))
    );
    assert_eq!(v["description"], "front end");

    // Members: add, update, remove.
    let (s, v) = app
        .post(
            &format!("/api/v1/vpgs/{vpg}/members"),
            json!({"vm_id": w.vms[2], "recovery_host_id": w.recovery_host}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["vm_count"], 3);
    let (s, v) = app
        .call(
            Method::PUT,
            &format!("/api/v1/vpgs/{vpg}/members/{}", w.vms[2]),
            Some(json!({"vm_id": "ignored", "recovery_host_id": w.recovery_host, "boot_group": 5})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let m = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["vm_id"] == w.vms[2].as_str())
        .unwrap()
        .clone();
    assert_eq!(m["boot_group"], 5);
    let (s, v) = app
        .delete(&format!(
            "/api/v1/vpgs/{vpg}/members/{}?keep_recovery_disks=false",
            w.vms[2]
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["vm_count"], 2);
    assert_eq!(v["version"], 5);
    let (_, vm) = app.get(&format!("/api/v1/vms/{}", w.vms[2])).await;
    assert!(vm["vpg_id"].is_null());
    assert_problem(
        &app.delete(&format!("/api/v1/vpgs/{vpg}/members/{}", w.vms[2]))
            .await,
        StatusCode::NOT_FOUND,
        "member.not_found",
    );

    // PUT replaces the whole definition.
    let (s, v) = app
        .call(
            Method::PUT,
            &format!("/api/v1/vpgs/{vpg}"),
            Some(json!({
                "name": "web", "recovery_site_id": w.recovery_site, "settings": {},
                "members": [{"vm_id": w.vms[1]}],
            })),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (
            v["name"].as_str(),
            v["vm_count"].as_u64(),
            v["settings"]["rpo_target_secs"].as_u64()
        ),
        (Some("web"), Some(1), Some(300))
    );
    assert_eq!(
        (v["status"].as_str(), v["sub_status"].as_str()),
        (Some("not_meeting_sla"), Some("needs_configuration")),
        "a member without recovery host"
    );

    // Status follows configuration.
    let (_, v) = app
        .patch(&format!("/api/v1/vpgs/{vpg}"), json!({"members": []}))
        .await;
    assert_eq!(
        (v["status"].as_str(), v["sub_status"].as_str()),
        (Some("not_meeting_sla"), Some("vpg_has_no_vms"))
    );
    assert_eq!(
        v["protected_site_id"],
        w.protected_site.as_str(),
        "an emptied VPG keeps its protected site"
    );
    let (_, list) = app.get("/api/v1/vpgs?status=not_meeting_sla").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    let (_, list) = app.get("/api/v1/vpgs?status=meeting_sla").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 0);
    let (_, list) = app
        .get(&format!("/api/v1/vpgs?site={}", w.recovery_site))
        .await;
    assert_eq!(list["items"][0]["id"], vpg.as_str());
    assert!(
        list["items"][0].get("members").is_none(),
        "lists omit members"
    );

    let (_, cps) = app.get(&format!("/api/v1/vpgs/{vpg}/checkpoints")).await;
    assert_eq!(cps["items"].as_array().unwrap().len(), 0);
    assert_problem(
        &app.get("/api/v1/vpgs/nope/checkpoints").await,
        StatusCode::NOT_FOUND,
        "vpg.not_found",
    );

    // Deletion is an operation: accepted, then the VPG goes once no host protects it
    // (these hosts never had an agent, so at once).
    let (s, v) = app.delete(&format!("/api/v1/vpgs/{vpg}")).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["status"], "deleting");
    app.eventually("VPG removed", || async {
        (app.get(&format!("/api/v1/vpgs/{vpg}")).await.0 == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
    assert_problem(
        &app.get(&format!("/api/v1/vpgs/{vpg}")).await,
        StatusCode::NOT_FOUND,
        "vpg.not_found",
    );
    let (_, ev) = app.get(&format!("/api/v1/events?vpg={vpg}")).await;
    let kinds: Vec<&str> = ev["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "vpg.deleted",
            "vpg.deleting",
            "vpg.updated",
            "vpg.updated",
            "vpg.member_removed_with_disks",
            "vpg.member_updated",
            "vpg.member_added",
            "vpg.updated",
            "vpg.created"
        ]
    );
});

both!(filters_and_lookups, |app: TestApp| async move {
    let w = app.world(3).await;
    app.create("/api/v1/vpgs", json!({"name": "g", "recovery_site_id": w.recovery_site, "members": [{"vm_id": w.vms[0], "recovery_host_id": w.recovery_host}]})).await;
    let (_, v) = app.get("/api/v1/vms?protected=false").await;
    let ids: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [w.vms[1].as_str(), w.vms[2].as_str()]);
    let (_, v) = app.get("/api/v1/vms?protected=true").await;
    assert_eq!(
        v["items"][0]["replication_state"],
        "pending_initial_replication"
    );
    let (_, v) = app
        .get(&format!("/api/v1/vms?site={}", w.recovery_site))
        .await;
    assert_eq!(v["items"].as_array().unwrap().len(), 0);
    let (_, v) = app
        .get(&format!("/api/v1/hosts?site={}", w.recovery_site))
        .await;
    assert_eq!(v["items"][0]["id"], w.recovery_host.as_str());
    let (_, v) = app.get("/api/v1/hosts?connectivity=unknown").await;
    assert_eq!(v["items"].as_array().unwrap().len(), 2);
    let (_, v) = app.get("/api/v1/sites?name=dr").await;
    assert_eq!(v["items"][0]["id"], w.recovery_site.as_str());
    assert_problem(
        &app.get("/api/v1/vpgs?status=fine").await,
        StatusCode::BAD_REQUEST,
        "request.invalid_query",
    );

    let (s, l) = app.get("/api/v1/lookups").await;
    assert_eq!(s, StatusCode::OK);
    let find = |list: &str, id: &str| {
        l[list]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == id)
            .cloned()
    };
    assert_eq!(
        find("vpg_statuses", "meeting_sla").unwrap()["label"],
        "Meeting SLA"
    );
    assert_eq!(
        find("vpg_sub_statuses", "site_disconnection_no_checkpoints").unwrap()["label"],
        "Site disconnection. No checkpoints"
    );
    assert_eq!(
        find("vm_replication_states", "prepared_for_planned_failover").unwrap()["label"],
        "Prepared for planned failover"
    );
    assert_eq!(l["vpg_statuses"].as_array().unwrap().len(), 9);
    assert!(l["vpg_sub_statuses"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| !x["description"].as_str().unwrap().is_empty()));
    assert!(
        find("sync_kinds", "bitmap").is_some()
            && find("priorities", "high").is_some()
            && find("roles", "operator").is_some()
    );

    // Health, readiness and metrics need no token.
    let (s, h) = split(app.req(Method::GET, "/healthz", None).send().await.unwrap()).await;
    assert_eq!((s, h["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (s, _) = split(app.req(Method::GET, "/readyz", None).send().await.unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    let m = app
        .req(Method::GET, "/metrics", None)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("bulwark_vpgs{status=\"initializing\"} 1"), "{m}");
    assert!(m.contains("bulwark_vpgs{status=\"meeting_sla\"} 0"));
    assert!(
        m.contains(
            "bulwark_http_requests_total{method=\"GET\",route=\"/api/v1/vms\",status=\"200\"} 3"
        ),
        "{m}"
    );
});
