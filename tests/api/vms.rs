//! Real VMs through their hosts: how agents report a VM's boot and NICs, creating a VM
//! (checked, then made by the host's agent), reading a VM's console over the control
//! channel, and the severity of the hypervisor's VM events. On SQLite and PostgreSQL.

use crate::both;
use crate::fake_agent::{kernel_boot, nic, vm, vm_with, FakeAgent};
use crate::helpers::*;
use bulwark::model::access::Role;
use bulwark::proto::control::{Boot, CommandBody, Nic, PowerState};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;

/// The VM named `name`, as the API shows it (waits until it is there).
async fn vm_named(app: &TestApp, name: &str) -> Value {
    app.eventually(&format!("VM {name} listed"), || async {
        let (_, v) = app.get(&format!("/api/v1/vms?name={name}")).await;
        v["items"].get(0).cloned()
    })
    .await
}

/// Everything the agent sent before this is applied once the event it sends now is
/// listed: the manager handles one connection's messages in order.
async fn settled(app: &TestApp, a: &mut FakeAgent, marker: &str) {
    a.vm_event("marker", marker, json!({})).await;
    app.eventually("marker event recorded", || async {
        let (_, v) = app.get("/api/v1/events?kind=agent.marker&limit=1000").await;
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["details"]["vm"] == marker)
            .then_some(())
    })
    .await;
}

/// A GET as the holder of `token`.
async fn get_as(app: &TestApp, path: &str, token: &str) -> (StatusCode, Value) {
    split(
        app.req(Method::GET, path, Some(token))
            .send()
            .await
            .unwrap(),
    )
    .await
}

fn kernel_json() -> Value {
    json!({"kind": "kernel", "kernel": "/srv/guest/vmlinuz",
           "initrd": "/srv/guest/initrd.img", "cmdline": "console=ttyS0 quiet"})
}

both!(
    agents_report_how_their_vms_boot_and_their_nics,
    |app: TestApp| async move {
        let qemu = |mac0: &str, boot: Boot| {
            vm_with(
                "qemu-vm",
                &[(1, "qemu-vm-root", 1 << 30)],
                Some(boot),
                vec![nic(Some("lan"), Some(mac0)), nic(None, None)],
            )
        };
        let sim = vm("sim-vm", &[(2, "sim-vm-root", 1 << 30)]);
        let mut a = app
            .agent(
                "esx-a",
                "prod",
                vec![qemu("52:54:00:00:00:01", kernel_boot()), sim.clone()],
            )
            .await;
        let v = vm_named(&app, "qemu-vm").await;
        assert_eq!(v["boot"], kernel_json(), "{v}");
        assert_eq!(
            v["nics"],
            json!([
                {"name": "net0", "network": "lan", "mac": "52:54:00:00:00:01", "addresses": []},
                {"name": "net1", "network": null, "mac": null, "addresses": []},
            ]),
            "NICs an agent reports are named by their position"
        );
        let s = vm_named(&app, "sim-vm").await;
        assert_eq!(s["boot"], Value::Null);
        assert_eq!(s["nics"], json!([]));

        // The operator names the NICs and gives their addresses.
        let id = v["id"].as_str().unwrap().to_string();
        let (st, p) = app
            .patch(
                &format!("/api/v1/vms/{id}"),
                json!({"nics": [
                    {"name": "eth0", "network": "lan", "mac": "52:54:00:00:00:01", "addresses": ["10.1.0.5/24"]},
                    {"name": "eth1"},
                ]}),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{p}");
        let updated_at = p["updated_at"].clone();

        // The same inventory again is no change.
        a.inventory(vec![qemu("52:54:00:00:00:01", kernel_boot()), sim.clone()])
            .await;
        settled(&app, &mut a, "same").await;
        let (_, same) = app.get(&format!("/api/v1/vms/{id}")).await;
        assert_eq!(same["updated_at"], updated_at, "{same}");
        assert_eq!(same["nics"][0]["name"], "eth0");

        // A new MAC and another boot are: what the agent reports replaces network, MAC
        // and boot; the names and addresses stay the operator's.
        a.inventory(vec![qemu("52:54:00:00:00:02", Boot::Firmware), sim.clone()])
            .await;
        settled(&app, &mut a, "changed").await;
        let (_, now) = app.get(&format!("/api/v1/vms/{id}")).await;
        assert_eq!(now["boot"], json!({"kind": "firmware"}));
        assert_eq!(
            now["nics"],
            json!([
                {"name": "eth0", "network": "lan", "mac": "52:54:00:00:00:02", "addresses": ["10.1.0.5/24"]},
                {"name": "eth1", "network": null, "mac": null, "addresses": []},
            ])
        );
        assert_ne!(now["updated_at"], updated_at);

        // An inventory with a bad MAC or boot path is refused whole: nothing changes,
        // not even the VM it would add.
        for bad in [
            vm_with("new-vm", &[], None, vec![nic(None, Some("52:54:00:00:00"))]),
            vm_with(
                "new-vm",
                &[],
                Some(Boot::Kernel {
                    kernel: "vmlinuz".into(),
                    initrd: None,
                    cmdline: String::new(),
                }),
                vec![],
            ),
            vm_with("new-vm", &[], None, vec![nic(None, None); 9]),
        ] {
            a.inventory(vec![qemu("52:54:00:00:00:03", kernel_boot()), bad])
                .await;
        }
        settled(&app, &mut a, "refused").await;
        let (_, list) = app.get("/api/v1/vms?name=new-vm").await;
        assert_eq!(list["items"], json!([]));
        let (_, kept) = app.get(&format!("/api/v1/vms/{id}")).await;
        assert_eq!(kept["nics"][0]["mac"], "52:54:00:00:00:02");
        assert_eq!(kept["boot"], json!({"kind": "firmware"}));
    }
);

both!(
    creating_a_vm_checks_boot_and_nics,
    |app: TestApp| async move {
        let w = app.world(0).await;
        let vm = |extra: Value| {
            let mut b = json!({"name": "v", "host_id": w.protected_host});
            for (k, v) in extra.as_object().unwrap() {
                b[k] = v.clone();
            }
            b
        };
        let eth = |mac: &str| json!([{"name": "eth0", "mac": mac}]);
        let cases: Vec<(Value, StatusCode, &str, &str)> = vec![
            (
                vm(json!({"boot": {"kind": "kernel", "kernel": "vmlinuz"}})),
                StatusCode::UNPROCESSABLE_ENTITY,
                "vm.boot_path_invalid",
                "boot.kernel",
            ),
            (
                vm(json!({"boot": {"kind": "kernel", "kernel": ""}})),
                StatusCode::UNPROCESSABLE_ENTITY,
                "vm.boot_path_invalid",
                "boot.kernel",
            ),
            (
                vm(json!({"boot": {"kind": "kernel", "kernel": "/k", "initrd": "initrd.img"}})),
                StatusCode::UNPROCESSABLE_ENTITY,
                "vm.boot_path_invalid",
                "boot.initrd",
            ),
            (
                vm(json!({"boot": {"kind": "kernel", "kernel": "/k", "cmdline": "a\nb"}})),
                StatusCode::UNPROCESSABLE_ENTITY,
                "vm.boot_cmdline_invalid",
                "boot.cmdline",
            ),
            (
                vm(json!({"nics": eth("52:54:00:12:34")})),
                StatusCode::UNPROCESSABLE_ENTITY,
                "vm.nic_mac_invalid",
                "nics[0].mac",
            ),
            (
                vm(json!({"nics": eth("52-54-00-12-34-56")})),
                StatusCode::UNPROCESSABLE_ENTITY,
                "vm.nic_mac_invalid",
                "nics[0].mac",
            ),
            (
                vm(json!({"nics": eth("52:54:00:12:34:5g")})),
                StatusCode::UNPROCESSABLE_ENTITY,
                "vm.nic_mac_invalid",
                "nics[0].mac",
            ),
            (
                vm(json!({"nics": eth("52:54:00:12:34:567")})),
                StatusCode::UNPROCESSABLE_ENTITY,
                "vm.nic_mac_invalid",
                "nics[0].mac",
            ),
            (
                vm(
                    json!({"nics": (0..9).map(|i| json!({"name": format!("eth{i}")})).collect::<Vec<_>>()}),
                ),
                StatusCode::UNPROCESSABLE_ENTITY,
                "vm.too_many_nics",
                "nics",
            ),
            (
                vm(json!({"boot": {"kind": "pxe"}})),
                StatusCode::UNPROCESSABLE_ENTITY,
                "request.invalid_body",
                "",
            ),
        ];
        let events_before = app.event_count().await;
        for (body, status, code, field) in cases {
            let got = app.post("/api/v1/vms", body.clone()).await;
            assert_problem(&got, status, code);
            if !field.is_empty() {
                assert_eq!(got.1["field"], field, "{body}: {}", got.1);
            }
            assert!(
                got.1["detail"].as_str().unwrap().len() > 20,
                "a clear message: {}",
                got.1
            );
        }
        let (_, vms) = app.get("/api/v1/vms").await;
        assert_eq!(vms["items"], json!([]), "nothing was created");
        assert_eq!(app.event_count().await, events_before, "nor audited");

        // A host no agent registered for records the VM as given: boot and eight NICs.
        let nics: Vec<Value> = (0..8)
            .map(|i| json!({"name": format!("eth{i}"), "mac": format!("52:54:00:AB:cd:0{i}")}))
            .collect();
        let (s, v) = app
            .post(
                "/api/v1/vms",
                vm(json!({"boot": kernel_json(), "nics": nics})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let (_, got) = app
            .get(&format!("/api/v1/vms/{}", v["id"].as_str().unwrap()))
            .await;
        assert_eq!(got["boot"], kernel_json());
        assert_eq!(got["nics"].as_array().unwrap().len(), 8);
        assert_eq!(got["nics"][7]["mac"], "52:54:00:AB:cd:07");
        // The same rules for a change of NICs.
        let id = v["id"].as_str().unwrap();
        assert_problem(
            &app.patch(
                &format!("/api/v1/vms/{id}"),
                json!({"nics": [{"name": "eth0", "mac": "nope"}]}),
            )
            .await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "vm.nic_mac_invalid",
        );
    }
);

both!(
    creating_a_vm_on_an_agent_host_goes_through_the_agent,
    |app: TestApp| async move {
        let mut a = app.agent("esx-a", "prod", vec![]).await;
        let host = app.host_id("esx-a").await;
        let body = json!({
            "host_id": host, "name": "web", "cpus": 2, "memory_mib": 512,
            "disks": [{"name": "root", "size_bytes": 1u64 << 30}],
            "boot": kernel_json(),
            "nics": [{"name": "eth0", "network": "lan", "mac": "52:54:00:aa:bb:cc",
                      "addresses": ["10.0.0.5/24"]}],
        });
        let post = {
            let (http, url, admin, body) = (
                app.http.clone(),
                app.url("/api/v1/vms"),
                app.admin.clone(),
                body.clone(),
            );
            tokio::spawn(async move {
                split(
                    http.post(url)
                        .bearer_auth(admin)
                        .json(&body)
                        .send()
                        .await
                        .unwrap(),
                )
                .await
            })
        };
        let c = a.command().await;
        assert!(c.id.starts_with("create-vm:"), "{}", c.id);
        let CommandBody::CreateVm {
            name,
            cpus,
            memory_mib,
            disks,
            boot,
            nics,
        } = c.body
        else {
            panic!("expected CreateVm, got {:?}", c.body);
        };
        assert_eq!((name.as_str(), cpus, memory_mib), ("web", 2, 512));
        assert_eq!(disks.len(), 1);
        assert_eq!(
            (disks[0].name.as_str(), disks[0].size_bytes),
            ("root", 1 << 30)
        );
        assert_eq!(boot, Some(kernel_boot()));
        assert_eq!(
            nics,
            vec![Nic {
                network: Some("lan".into()),
                mac: Some("52:54:00:aa:bb:cc".into()),
            }]
        );
        // As the real agent: the inventory with the new VM first, then the answer.
        let made = vm_with(
            "web",
            &[(7, "root", 1 << 30)],
            boot,
            vec![nic(Some("lan"), Some("52:54:00:aa:bb:cc"))],
        );
        assert_eq!(made.power_state, PowerState::On);
        a.inventory(vec![made.clone()]).await;
        a.answer(&c.id, Ok(serde_json::to_value(&made).unwrap()))
            .await;
        let (s, v) = post.await.unwrap();
        assert_eq!(s, StatusCode::CREATED, "{v}");
        assert_eq!(v["host_id"], host);
        assert_eq!(v["power_state"], "on", "as the agent reports it");
        assert_eq!(v["boot"], kernel_json());
        assert_eq!(
            v["nics"],
            json!([{"name": "eth0", "network": "lan", "mac": "52:54:00:aa:bb:cc",
                    "addresses": ["10.0.0.5/24"]}]),
            "the operator's NIC names and addresses on the NICs the agent made"
        );
        assert_eq!(v["disks"][0]["device_id"], 7);
        let (_, ev) = app.get("/api/v1/events?kind=vm.created").await;
        let e = &ev["items"][0];
        assert_eq!(e["subject_id"], v["id"]);
        assert!(e["actor"].as_str().unwrap().starts_with("token:"), "{e}");
        assert_eq!(e["details"]["by_agent"], true);

        // The agent refuses: nothing is recorded, and its reason is in the problem.
        let post = {
            let (http, url, admin) = (app.http.clone(), app.url("/api/v1/vms"), app.admin.clone());
            tokio::spawn(async move {
                split(
                    http.post(url)
                        .bearer_auth(admin)
                        .json(&json!({"host_id": host, "name": "db"}))
                        .send()
                        .await
                        .unwrap(),
                )
                .await
            })
        };
        let c = a.command().await;
        assert!(matches!(c.body, CommandBody::CreateVm { ref name, .. } if name == "db"));
        a.answer(
            &c.id,
            Err("hypervisor settings: no QEMU binary on this host".into()),
        )
        .await;
        let got = post.await.unwrap();
        assert_problem(&got, StatusCode::CONFLICT, "vm.create_refused");
        assert!(
            got.1["detail"].as_str().unwrap().contains("no QEMU binary"),
            "{}",
            got.1
        );
        let (_, list) = app.get("/api/v1/vms?name=db").await;
        assert_eq!(list["items"], json!([]));

        // A name the host has is refused before anything is asked of the agent.
        let host = app.host_id("esx-a").await;
        assert_problem(
            &app.post("/api/v1/vms", json!({"host_id": host, "name": "web"}))
                .await,
            StatusCode::CONFLICT,
            "vm.name_taken",
        );
        assert!(a.command_within(Duration::from_millis(300)).await.is_none());

        // With its agent away, the host cannot create anything.
        a.close().await;
        app.eventually("esx-a disconnected", || async {
            let (_, h) = app.get(&format!("/api/v1/hosts/{host}")).await;
            (h["connectivity"] == "disconnected").then_some(())
        })
        .await;
        assert_problem(
            &app.post("/api/v1/vms", json!({"host_id": host, "name": "later"}))
                .await,
            StatusCode::SERVICE_UNAVAILABLE,
            "host.unreachable",
        );
    }
);

both!(
    the_console_is_read_from_the_vms_host,
    |app: TestApp| async move {
        let mut a = app
            .agent(
                "esx-a",
                "prod",
                vec![vm_with(
                    "qemu-vm",
                    &[(1, "root", 1 << 30)],
                    Some(kernel_boot()),
                    vec![],
                )],
            )
            .await;
        let id = vm_named(&app, "qemu-vm").await["id"]
            .as_str()
            .unwrap()
            .to_string();
        let operator = app.token(Role::Operator).await;
        let log = "[    0.000000] Linux version 6.1\nbulwark guest ready\nlogin: ";
        let console = |q: &str| {
            let (http, url, token) = (
                app.http.clone(),
                app.url(&format!("/api/v1/vms/{id}/console{q}")),
                operator.clone(),
            );
            tokio::spawn(async move {
                split(http.get(url).bearer_auth(token).send().await.unwrap()).await
            })
        };

        // The end of the log, cut at a line boundary.
        let call = console("?max_bytes=30");
        let c1 = a.command().await;
        assert!(
            matches!(&c1.body, CommandBody::ReadConsole { vm, max_bytes: 30 } if vm == "qemu-vm"),
            "{c1:?}"
        );
        a.answer_console(&c1, log).await;
        let (s, v) = call.await.unwrap();
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(
            v,
            json!({"vm_id": id, "vm": "qemu-vm", "text": "bulwark guest ready\nlogin: ",
                   "total_bytes": log.len(), "truncated": true})
        );

        // By default as much as the manager allows: here all of it.
        let call = console("");
        let c2 = a.command().await;
        assert!(
            matches!(
                &c2.body,
                CommandBody::ReadConsole {
                    max_bytes: 65536,
                    ..
                }
            ),
            "{c2:?}"
        );
        assert!(c1.id.starts_with("console:") && c2.id.starts_with("console:"));
        assert_ne!(c1.id, c2.id, "every read is a new command");
        a.answer_console(&c2, log).await;
        let (s, v) = call.await.unwrap();
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(
            (v["text"].as_str(), v["truncated"].as_bool()),
            (Some(log), Some(false))
        );

        // The host cannot read it: a conflict with the agent's words.
        let call = console("?max_bytes=100");
        let c = a.command().await;
        a.answer(
            &c.id,
            Err("this hypervisor driver cannot read a console".into()),
        )
        .await;
        let got = call.await.unwrap();
        assert_problem(&got, StatusCode::CONFLICT, "vm.console_unavailable");
        assert!(
            got.1["detail"]
                .as_str()
                .unwrap()
                .contains("cannot read a console"),
            "{}",
            got.1
        );

        // Bad bounds and bad callers never reach the host.
        let path = format!("/api/v1/vms/{id}/console");
        for (q, code) in [
            ("?max_bytes=65537", "request.invalid_max_bytes"),
            ("?max_bytes=0", "request.invalid_max_bytes"),
            ("?max_bytes=lots", "request.invalid_query"),
        ] {
            assert_problem(
                &get_as(&app, &format!("{path}{q}"), &operator).await,
                StatusCode::BAD_REQUEST,
                code,
            );
        }
        let viewer = app.token(Role::Viewer).await;
        assert_problem(
            &get_as(&app, &path, &viewer).await,
            StatusCode::FORBIDDEN,
            "auth.forbidden",
        );
        let res = app.req(Method::GET, &path, None).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert_problem(
            &get_as(&app, "/api/v1/vms/no-such-vm/console", &operator).await,
            StatusCode::NOT_FOUND,
            "vm.not_found",
        );
        assert!(a.command_within(Duration::from_millis(300)).await.is_none());

        // The host's agent is away (or there never was one): 503.
        a.close().await;
        let got = app
            .eventually("esx-a away", || async {
                let got = get_as(&app, &path, &operator).await;
                (got.0 == StatusCode::SERVICE_UNAVAILABLE).then_some(got)
            })
            .await;
        assert_problem(&got, StatusCode::SERVICE_UNAVAILABLE, "host.unreachable");
        let site = app.create("/api/v1/sites", json!({"name": "lab"})).await;
        let host = app
            .create(
                "/api/v1/hosts",
                json!({"name": "esx-manual", "site_id": site}),
            )
            .await;
        let manual = app
            .create("/api/v1/vms", json!({"name": "manual", "host_id": host}))
            .await;
        assert_problem(
            &get_as(&app, &format!("/api/v1/vms/{manual}/console"), &operator).await,
            StatusCode::SERVICE_UNAVAILABLE,
            "host.unreachable",
        );
    }
);

both!(vm_events_have_their_severity, |app: TestApp| async move {
    let mut a = app
        .agent(
            "esx-a",
            "prod",
            vec![vm("qemu-vm", &[(1, "root", 1 << 30)])],
        )
        .await;
    let events = [
        ("vm_block_io_error", json!({"count": 1}), "error"),
        ("vm_shutdown", json!({}), "info"),
        ("vm_stopped", json!({}), "info"),
        ("vm_resumed", json!({}), "info"),
        (
            "vm_power",
            json!({"state": "off", "cause": "failed"}),
            "warning",
        ),
        (
            "vm_power",
            json!({"state": "off", "cause": "guest"}),
            "info",
        ),
    ];
    for (kind, details, _) in &events {
        a.vm_event(kind, "qemu-vm", details.clone()).await;
    }
    let got = app
        .eventually("VM events recorded", || async {
            let (_, v) = app.get("/api/v1/events?kind=agent.&limit=1000").await;
            let items: Vec<Value> = v["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["kind"].as_str().unwrap().starts_with("agent.vm_"))
                .cloned()
                .collect();
            (items.len() >= events.len()).then_some(items)
        })
        .await;
    // Newest first.
    let seen: Vec<(String, String, String)> = got
        .iter()
        .rev()
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_string(),
                e["severity"].as_str().unwrap().to_string(),
                e["details"]["vm"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String, String)> = events
        .iter()
        .map(|(k, _, s)| (format!("agent.{k}"), s.to_string(), "qemu-vm".to_string()))
        .collect();
    assert_eq!(seen, want);
    let (_, errors) = app.get("/api/v1/events?severity=error").await;
    assert_eq!(errors["items"][0]["kind"], "agent.vm_block_io_error");
});
