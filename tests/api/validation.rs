//! Every rule rejected with its problem code, and a rejected request changes nothing.

use crate::both;
use crate::helpers::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

both!(settings_and_membership_rules, |app: TestApp| async move {
    let w = app.world(3).await;
    // A second protected site with a VM, and a host in the protected site for the
    // wrong-recovery-host rule.
    let other_site = app.create("/api/v1/sites", json!({"name": "branch"})).await;
    let other_host = app
        .create(
            "/api/v1/hosts",
            json!({"name": "esx-branch", "site_id": other_site}),
        )
        .await;
    let other_vm = app
        .create(
            "/api/v1/vms",
            json!({"name": "branch-vm", "host_id": other_host}),
        )
        .await;
    let taken = app
        .create("/api/v1/vpgs", json!({"name": "taken", "recovery_site_id": w.recovery_site, "members": [{"vm_id": w.vms[2]}]}))
        .await;

    let base = |extra: Value| {
        let mut b = json!({"name": "g", "recovery_site_id": w.recovery_site});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let settings = |s: Value| base(json!({"settings": s}));
    let member = |m: Value| base(json!({"members": [m]}));
    let cases: Vec<(Value, StatusCode, &str)> = vec![
        (
            settings(json!({"rpo_target_secs": 5})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vpg.rpo_target_out_of_range",
        ),
        (
            settings(json!({"rpo_target_secs": 100000})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vpg.rpo_target_out_of_range",
        ),
        (
            settings(json!({"journal_history_secs": 60})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vpg.journal_history_out_of_range",
        ),
        (
            settings(json!({"journal_history_secs": 2592001})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vpg.journal_history_out_of_range",
        ),
        (
            settings(json!({"journal_hard_limit_bytes": 1000000, "journal_warning_bytes": 1000})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vpg.journal_hard_limit_too_small",
        ),
        (
            settings(
                json!({"journal_hard_limit_bytes": 10000000000u64, "journal_warning_bytes": 10000000000u64}),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vpg.journal_warning_not_below_hard_limit",
        ),
        (
            settings(json!({"checkpoint_interval_ms": 10})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vpg.checkpoint_interval_out_of_range",
        ),
        (
            settings(json!({"rpo_target_secs": 10, "checkpoint_interval_ms": 20000})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vpg.checkpoint_interval_not_below_rpo",
        ),
        (
            settings(json!({"test_reminder_days": 5000})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vpg.test_reminder_out_of_range",
        ),
        (
            settings(
                json!({"resync_policy": {"mode": "window", "start": "01:00", "end": "01:00"}}),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vpg.resync_window_empty",
        ),
        (
            settings(json!({"network_mappings": [{"from": "10.0.0.0/8", "to": "not-a-net"}]})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vpg.network_mapping_invalid",
        ),
        (
            settings(
                json!({"network_mappings": [{"from": "10.0.0.0/8", "to": "11.0.0.0/8"}, {"from": "10.5.0.0/16", "to": "12.5.0.0/16"}]}),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vpg.network_mapping_overlap",
        ),
        (
            settings(json!({"rpo_target_secs": "300"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "request.invalid_body",
        ),
        (
            settings(json!({"rpo_target_secs": -1})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "request.invalid_body",
        ),
        (
            settings(json!({"priority": "urgent"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "request.invalid_body",
        ),
        (
            settings(
                json!({"resync_policy": {"mode": "window", "start": "24:00", "end": "01:00"}}),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "request.invalid_body",
        ),
        (
            settings(json!({"rpo": 300})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "request.invalid_body",
        ),
        (
            base(json!({"name": "  "})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation.name_empty",
        ),
        (
            base(json!({"name": "taken"})),
            StatusCode::CONFLICT,
            "vpg.name_taken",
        ),
        (
            base(json!({"recovery_site_id": "no-such-site"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vpg.unknown_recovery_site",
        ),
        (
            base(json!({"protected_site_id": "no-such-site"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vpg.unknown_protected_site",
        ),
        (
            base(json!({"recovery_site_id": w.protected_site, "members": [{"vm_id": w.vms[0]}]})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vpg.recovery_site_is_protected_site",
        ),
        (
            member(json!({"vm_id": "no-such-vm"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vpg.unknown_vm",
        ),
        (
            member(json!({"vm_id": w.vms[2]})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vpg.vm_already_protected",
        ),
        (
            base(json!({"members": [{"vm_id": w.vms[0]}, {"vm_id": other_vm}]})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vpg.vms_span_sites",
        ),
        (
            base(json!({"protected_site_id": other_site, "members": [{"vm_id": w.vms[0]}]})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vpg.vm_not_in_protected_site",
        ),
        (
            base(json!({"members": [{"vm_id": w.vms[0]}, {"vm_id": w.vms[0]}]})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vpg.duplicate_member",
        ),
        (
            member(json!({"vm_id": w.vms[0], "recovery_host_id": "no-such-host"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vpg.unknown_recovery_host",
        ),
        (
            member(json!({"vm_id": w.vms[0], "recovery_host_id": w.protected_host})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vpg.recovery_host_not_in_recovery_site",
        ),
        (
            member(json!({"vm_id": w.vms[0], "boot_group": 101})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vpg.boot_group_out_of_range",
        ),
        (
            member(
                json!({"vm_id": w.vms[0], "nics": [{"nic": "eth0", "reip": {"address": "10.0.0.1", "prefix": 24, "gateway": "10.9.9.1"}}]}),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vpg.reip_gateway_outside_subnet",
        ),
        (
            member(
                json!({"vm_id": w.vms[0], "nics": [{"nic": "eth0", "reip": {"address": "10.0.0.999", "prefix": 24}}]}),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vpg.reip_invalid",
        ),
        (
            member(json!({"vm_id": w.vms[0], "frobnicate": true})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "request.invalid_body",
        ),
    ];
    let events_before = app.event_count().await;
    for (body, status, code) in cases {
        let got = app.post("/api/v1/vpgs", body.clone()).await;
        assert_problem(&got, status, code);
    }
    // The field is named for form validation in the console.
    let got = app
        .post("/api/v1/vpgs", settings(json!({"rpo_target_secs": 5})))
        .await;
    assert_eq!(got.1["field"], "settings.rpo_target_secs");
    let got = app
        .post(
            "/api/v1/vpgs",
            base(json!({"members": [{"vm_id": w.vms[0]}, {"vm_id": other_vm}]})),
        )
        .await;
    assert_eq!(got.1["field"], "members[1].vm_id");

    // Updates follow the same rules, and a rejected update leaves the VPG as it was.
    let (_, before) = app.get(&format!("/api/v1/vpgs/{taken}")).await;
    assert_problem(
        &app.patch(
            &format!("/api/v1/vpgs/{taken}"),
            json!({"settings": {"journal_warning_bytes": 200000000000u64}}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "vpg.journal_warning_not_below_hard_limit",
    );
    assert_problem(
        &app.patch(
            &format!("/api/v1/vpgs/{taken}"),
            json!({"recovery_site_id": w.protected_site}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "vpg.recovery_site_is_protected_site",
    );
    assert_problem(
        &app.post(
            &format!("/api/v1/vpgs/{taken}/members"),
            json!({"vm_id": other_vm}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "vpg.vms_span_sites",
    );
    assert_problem(
        &app.post(
            &format!("/api/v1/vpgs/{taken}/members"),
            json!({"vm_id": w.vms[2]}),
        )
        .await,
        StatusCode::CONFLICT,
        "vpg.duplicate_member",
    );
    let (_, after) = app.get(&format!("/api/v1/vpgs/{taken}")).await;
    assert_eq!(before, after);
    assert_eq!(
        app.event_count().await,
        events_before,
        "rejected requests write no events"
    );
    let (_, list) = app.get("/api/v1/vpgs").await;
    assert_eq!(
        list["items"].as_array().unwrap().len(),
        1,
        "nothing was created"
    );
});

both!(inventory_rules, |app: TestApp| async move {
    let w = app.world(1).await;
    let cases: Vec<(&str, Value, StatusCode, &str)> = vec![
        (
            "/api/v1/sites",
            json!({"name": ""}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation.name_empty",
        ),
        (
            "/api/v1/sites",
            json!({"name": "x".repeat(200)}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation.name_too_long",
        ),
        (
            "/api/v1/sites",
            json!({"name": "prod"}),
            StatusCode::CONFLICT,
            "site.name_taken",
        ),
        (
            "/api/v1/sites",
            json!({"name": 7}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "request.invalid_body",
        ),
        (
            "/api/v1/hosts",
            json!({"name": "h", "site_id": "nope"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "host.unknown_site",
        ),
        (
            "/api/v1/hosts",
            json!({"name": "esx-dr-1", "site_id": w.recovery_site}),
            StatusCode::CONFLICT,
            "host.name_taken",
        ),
        (
            "/api/v1/vms",
            json!({"name": "v", "host_id": "nope"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vm.unknown_host",
        ),
        (
            "/api/v1/vms",
            json!({"name": "vm0", "host_id": w.protected_host}),
            StatusCode::CONFLICT,
            "vm.name_taken",
        ),
        (
            "/api/v1/vms",
            json!({"name": "v", "host_id": w.protected_host, "cpus": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vm.cpus_out_of_range",
        ),
        (
            "/api/v1/vms",
            json!({"name": "v", "host_id": w.protected_host, "disks": [{"name": "d", "size_bytes": 1000}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "disk.size_invalid",
        ),
        (
            "/api/v1/vms",
            json!({"name": "v", "host_id": w.protected_host, "disks": [{"name": "d", "size_bytes": 512}, {"name": "d", "size_bytes": 512}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vm.duplicate_disk",
        ),
        (
            "/api/v1/vms",
            json!({"name": "v", "host_id": w.protected_host, "nics": [{"name": "eth0", "addresses": ["10.0.0.1"]}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vm.nic_address_invalid",
        ),
        (
            "/api/v1/vms",
            json!({"name": "v", "host_id": w.protected_host, "power_state": "paused"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "request.invalid_body",
        ),
        (
            "/api/v1/vms",
            json!({"name": "v", "host_id": w.protected_host, "memory_mib": 18446744073709551615u64}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "request.number_out_of_range",
        ),
    ];
    let events_before = app.event_count().await;
    for (path, body, status, code) in cases {
        assert_problem(&app.post(path, body).await, status, code);
    }
    assert_problem(
        &app.patch(
            &format!("/api/v1/vms/{}", w.vms[0]),
            json!({"host_id": w.recovery_host}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "vm.host_in_other_site",
    );
    assert_problem(
        &app.get("/api/v1/hosts/nope").await,
        StatusCode::NOT_FOUND,
        "host.not_found",
    );
    assert_problem(
        &app.patch("/api/v1/sites/nope", json!({"name": "x"})).await,
        StatusCode::NOT_FOUND,
        "site.not_found",
    );

    // Malformed requests.
    let raw = |body: &'static str, ct: &'static str| {
        app.req(Method::POST, "/api/v1/sites", Some(&app.admin))
            .header("content-type", ct)
            .body(body)
            .send()
    };
    assert_problem(
        &split(raw("{\"name\":", "application/json").await.unwrap()).await,
        StatusCode::BAD_REQUEST,
        "request.invalid_json",
    );
    assert_problem(
        &split(raw("{\"name\":\"x\"}", "text/plain").await.unwrap()).await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "request.unsupported_media_type",
    );
    // Just over the limit, on a connection of its own: the server answers before reading
    // the whole body and then closes that connection.
    let huge = format!(
        "{{\"name\":\"x\",\"description\":\"{}\"}}",
        "a".repeat(bulwark::manager::api::MAX_BODY_BYTES + 1024)
    );
    let res = reqwest::Client::new()
        .post(app.url("/api/v1/sites"))
        .bearer_auth(&app.admin)
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_problem(
        &split(res).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "request.body_too_large",
    );
    assert_problem(
        &app.get("/api/v1/sites?limit=0").await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "request.invalid_limit",
    );
    assert_problem(
        &app.get("/api/v1/sites?limit=abc").await,
        StatusCode::BAD_REQUEST,
        "request.invalid_query",
    );
    assert_problem(
        &app.get("/api/v1/events?cursor=xyz").await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "request.invalid_cursor",
    );
    assert_problem(
        &app.get("/api/v1/nothing-here").await,
        StatusCode::NOT_FOUND,
        "route.not_found",
    );
    assert_problem(
        &app.call(Method::PUT, "/api/v1/sites", Some(json!({})))
            .await,
        StatusCode::METHOD_NOT_ALLOWED,
        "route.method_not_allowed",
    );

    assert_eq!(app.event_count().await, events_before);
    let (_, sites) = app.get("/api/v1/sites").await;
    assert_eq!(sites["items"].as_array().unwrap().len(), 2);
    let (_, vms) = app.get("/api/v1/vms").await;
    assert_eq!(vms["items"].as_array().unwrap().len(), 1);
});
