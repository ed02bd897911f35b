//! The agent end of the control channel against a FAKE manager written here (a
//! tokio-tungstenite server on 127.0.0.1:0 that plays the manager's part of
//! `proto::control`): enrolment and the stored host key, desired state, checkpoint
//! rounds with and without quiesce, idempotent commands, heartbeats at the Welcome's
//! interval, reconnects with back-off, a silent manager, a rejected credential; and the
//! agent's admin endpoint for VMs and the control state. The agent runs in-process
//! (`AgentConfig::loopback`) with the simulated hypervisor.
// The handshake callback signature is tungstenite's (its error is a whole HTTP response).
#![allow(clippy::unwrap_used, clippy::result_large_err)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulwark::agent::control::{ControlClient, ControlSettings};
use bulwark::agent::host::{admin, Agent, AgentConfig};
use bulwark::agent::hypervisor::{self, HostVms, HypervisorDriver as _, VmCatalog};
use bulwark::proto::agent::ControlStatus;
use bulwark::proto::control::{
    AgentMessage, CheckpointKind, Command, CommandBody, Credential, DesiredState, Inventory,
    InventoryVm, ManagerMessage, NewDisk, PowerState, RoundHold, CONTROL_PATH,
};
use futures::{SinkExt as _, StreamExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------
// The fake manager
// ---------------------------------------------------------------------------------------

enum Out {
    Msg(ManagerMessage),
    /// Close frame, then drop the socket.
    Close,
    /// Stop reading and writing, keep the socket open: a hung manager (no pongs).
    Freeze,
}

/// One accepted agent connection.
struct FakeConn {
    rx: mpsc::UnboundedReceiver<(Instant, AgentMessage)>,
    tx: mpsc::UnboundedSender<Out>,
    path: String,
}

impl FakeConn {
    fn send(&self, m: ManagerMessage) {
        self.tx.send(Out::Msg(m)).unwrap();
    }

    fn close(&self) {
        let _ = self.tx.send(Out::Close);
    }

    fn freeze(&self) {
        let _ = self.tx.send(Out::Freeze);
    }

    /// The next message of the agent that `pick` accepts (others are skipped).
    async fn recv_where<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&AgentMessage) -> Option<T>,
    ) -> (Instant, T) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (at, m) = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("no {what} from the agent within {WAIT:?}"))
                .unwrap_or_else(|| panic!("connection ended before {what}"));
            if let Some(t) = pick(&m) {
                return (at, t);
            }
        }
    }
}

async fn conn_task(
    mut ws: WebSocketStream<TcpStream>,
    inbox: mpsc::UnboundedSender<(Instant, AgentMessage)>,
    mut outbox: mpsc::UnboundedReceiver<Out>,
) {
    loop {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    let msg: AgentMessage = serde_json::from_str(t.as_str()).unwrap();
                    let _ = inbox.send((Instant::now(), msg));
                }
                // Pings are answered by tungstenite as part of reading.
                Some(Ok(_)) => {}
                _ => return,
            },
            o = outbox.recv() => match o {
                Some(Out::Msg(m)) => {
                    if ws.send(Message::text(serde_json::to_string(&m).unwrap())).await.is_err() {
                        return;
                    }
                }
                Some(Out::Close) | None => {
                    let _ = ws.close(None).await;
                    return;
                }
                Some(Out::Freeze) => {
                    // Hold the socket without reading: no pong ever comes back.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    drop(ws);
                    return;
                }
            },
        }
    }
}

struct FakeManager {
    url: String,
    conns: mpsc::UnboundedReceiver<FakeConn>,
    accepted_at: Arc<Mutex<Vec<Instant>>>,
}

impl FakeManager {
    async fn start() -> FakeManager {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, conns) = mpsc::unbounded_channel();
        let accepted_at = Arc::new(Mutex::new(Vec::new()));
        let times = accepted_at.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                times.lock().unwrap().push(Instant::now());
                let path = Arc::new(Mutex::new(String::new()));
                let p = path.clone();
                let cb = move |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
                               resp| {
                    *p.lock().unwrap() = req.uri().path().to_string();
                    Ok(resp)
                };
                let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, cb).await else {
                    continue;
                };
                let (in_tx, in_rx) = mpsc::unbounded_channel();
                let (out_tx, out_rx) = mpsc::unbounded_channel();
                tokio::spawn(conn_task(ws, in_tx, out_rx));
                let path = path.lock().unwrap().clone();
                if tx
                    .send(FakeConn {
                        rx: in_rx,
                        tx: out_tx,
                        path,
                    })
                    .is_err()
                {
                    return;
                }
            }
        });
        FakeManager {
            url: format!("ws://{addr}"),
            conns,
            accepted_at,
        }
    }

    async fn accept(&mut self) -> FakeConn {
        tokio::time::timeout(WAIT, self.conns.recv())
            .await
            .expect("the agent did not connect")
            .unwrap()
    }

    fn accepted(&self) -> Vec<Instant> {
        self.accepted_at.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------------------------------
// The agent under test
// ---------------------------------------------------------------------------------------

const SECTION: &str = r#"
[[disks]]
name = "d1"
id = 5
size = "1 MiB"
group = "vpg1"
[[vms]]
name = "web"
cpus = 2
memory_mib = 2048
disks = [{ name = "web-0", id = 7, size = "1 MiB" }]
"#;

struct Host {
    agent: Arc<Agent>,
    hv: Arc<VmCatalog>,
    vms: Arc<HostVms>,
    cfg: AgentConfig,
}

async fn start_host(dir: &Path) -> Host {
    let cfg = AgentConfig::loopback(dir, "prot1", SECTION, None).unwrap();
    let (agent, hv) = hypervisor::start_agent(cfg.clone()).await.unwrap();
    let vms = Arc::new(HostVms::new(hv.clone(), agent.clone()));
    Host {
        agent,
        hv,
        vms,
        cfg,
    }
}

fn settings(h: &Host, url: &str, token: Option<&str>) -> ControlSettings {
    let mut s = ControlSettings::new(url, token.map(String::from), &h.cfg.data_dir).unwrap();
    s.rejected_backoff = Duration::from_millis(1500);
    s.connect_timeout = Duration::from_secs(5);
    s
}

fn hello_of(m: &AgentMessage) -> Option<bulwark::proto::control::AgentHello> {
    match m {
        AgentMessage::Hello(h) => Some(h.clone()),
        _ => None,
    }
}

fn welcome(host_id: &str, host_key: Option<&str>, heartbeat_ms: u64) -> ManagerMessage {
    ManagerMessage::Welcome {
        host_id: host_id.into(),
        host_key: host_key.map(String::from),
        heartbeat_ms,
    }
}

fn hold(round: u64, quiesce: &[&str]) -> ManagerMessage {
    ManagerMessage::Hold(RoundHold {
        round,
        vpg_id: "vpg1".into(),
        kind: if quiesce.is_empty() {
            CheckpointKind::Scheduled
        } else {
            CheckpointKind::AppConsistent
        },
        tag: None,
        bound_ms: 10_000,
        quiesce: quiesce.iter().map(|s| s.to_string()).collect(),
        barrier: true,
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolment_rounds_commands_heartbeats_and_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let h = start_host(dir.path()).await;
    let mut fm = FakeManager::start().await;
    let client = ControlClient::new(
        settings(&h, &fm.url, Some("enrol-1")),
        h.agent.clone(),
        h.vms.clone(),
    )
    .unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(client.clone().run(stop.clone()));

    // Enrolment: the token goes out, the key comes back and is stored 0600.
    let mut c1 = fm.accept().await;
    assert_eq!(c1.path, CONTROL_PATH);
    let (_, hello) = c1.recv_where("hello", hello_of).await;
    assert_eq!(
        hello.credential,
        Credential::Enrolment {
            token: "enrol-1".into()
        }
    );
    assert_eq!(hello.host_name, "prot1");
    assert_eq!(hello.nbd_address, h.agent.endpoints().nbd);
    let mut names: Vec<_> = hello.inventory.vms.iter().map(|v| v.name.clone()).collect();
    names.sort();
    assert_eq!(names, ["d1", "web"]);
    c1.send(welcome("h-1", Some("key-abc"), 200));
    c1.recv_where("first heartbeat", |m| {
        matches!(m, AgentMessage::Heartbeat(_)).then_some(())
    })
    .await;
    let key_path = h.cfg.data_dir.join("state/host.key");
    assert_eq!(
        std::fs::read_to_string(&key_path).unwrap().trim(),
        "key-abc"
    );
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "host key mode {mode:o}");
    let st = client.status();
    assert!(st.connected && st.enrolled, "{st:?}");
    assert_eq!(st.host_id.as_deref(), Some("h-1"));

    // Rounds: Hold → Held at once, Release → Released on time. Many rounds, so the
    // turnaround is a median rather than one lucky or unlucky sample.
    let mut turnaround = Vec::new();
    for round in 100..120u64 {
        let sent = Instant::now();
        c1.send(hold(round, &[]));
        let (at, held) = c1
            .recv_where("held", |m| match m {
                AgentMessage::Held(x) if x.round == round => Some(x.clone()),
                _ => None,
            })
            .await;
        turnaround.push(at.saturating_duration_since(sent));
        assert_eq!(held.error, None, "{held:?}");
        assert_eq!(held.vpg_id, "vpg1");
        assert!(held.disks.iter().any(|d| d.name == "d1"), "{held:?}");
        c1.send(ManagerMessage::Release { round });
        let (_, rel) = c1
            .recv_where("released", |m| match m {
                AgentMessage::Released(x) if x.round == round => Some(x.clone()),
                _ => None,
            })
            .await;
        assert!(rel.on_time, "{rel:?}");
    }
    let med = median(turnaround.clone());
    eprintln!(
        "hold → held turnaround through the fake manager: median {med:?}, max {:?}",
        turnaround.iter().max().unwrap()
    );
    // Well under a millisecond on an idle machine; the bound leaves room for a
    // loaded CI box while still catching a Held queued behind a heartbeat interval.
    assert!(med < Duration::from_millis(20), "median {med:?}");

    // App-consistent: quiesce first, thaw after the release.
    c1.send(hold(200, &["web"]));
    let (_, held) = c1
        .recv_where("held (quiesced)", |m| match m {
            AgentMessage::Held(x) if x.round == 200 => Some(x.clone()),
            _ => None,
        })
        .await;
    assert_eq!(held.error, None);
    assert_eq!(h.hv.quiesce_count(), 1);
    assert_eq!(h.hv.thaw_count(), 0, "thawed before the release");
    c1.send(ManagerMessage::Release { round: 200 });
    c1.recv_where("released (quiesced)", |m| match m {
        AgentMessage::Released(x) if x.round == 200 => Some(()),
        _ => None,
    })
    .await;
    eventually("thaw", || h.hv.thaw_count() == 1).await;

    // A quiesce that fails: Held carries the error and nothing is held.
    h.hv.fail_quiesce(Some("guest agent not responding".into()));
    c1.send(hold(201, &["web"]));
    let (_, held) = c1
        .recv_where("held (quiesce failed)", |m| match m {
            AgentMessage::Held(x) if x.round == 201 => Some(x.clone()),
            _ => None,
        })
        .await;
    let err = held.error.unwrap_or_default();
    assert!(err.contains("guest agent not responding"), "{err}");
    assert!(held.disks.is_empty());
    h.hv.fail_quiesce(None);
    // Nothing was left held: the next round holds at once.
    c1.send(hold(202, &[]));
    let (_, held) = c1
        .recv_where("held", |m| match m {
            AgentMessage::Held(x) if x.round == 202 => Some(x.clone()),
            _ => None,
        })
        .await;
    assert_eq!(held.error, None);
    c1.send(ManagerMessage::Abort { round: 202 });
    c1.recv_where("released (aborted)", |m| match m {
        AgentMessage::Released(x) if x.round == 202 => Some(()),
        _ => None,
    })
    .await;

    // Desired state → Applied with its version.
    c1.send(ManagerMessage::Desired(DesiredState {
        version: 3,
        ..DesiredState::default()
    }));
    let (_, (version, error)) = c1
        .recv_where("applied", |m| match m {
            AgentMessage::Applied { version, error } => Some((*version, error.clone())),
            _ => None,
        })
        .await;
    assert_eq!(version, 3);
    assert_eq!(error, None);

    // A command runs once; the same id again is answered from memory.
    let power_off = ManagerMessage::Command(Command {
        id: "cmd-1".into(),
        body: CommandBody::PowerOff { vm: "web".into() },
    });
    c1.send(power_off.clone());
    // The inventory comes before the result (same queue); the hypervisor's event goes
    // on the ordinary queue, so it may come before or after them.
    let mut inventory = None;
    let mut event = false;
    let (_, r1) = c1
        .recv_where("command result", |m| match m {
            AgentMessage::Inventory(i) => {
                inventory = Some(i.clone());
                None
            }
            AgentMessage::Event(e) if e.kind == "vm_power" => {
                event = true;
                None
            }
            AgentMessage::CommandResult(r) if r.id == "cmd-1" => Some(r.clone()),
            _ => None,
        })
        .await;
    let inv = inventory.expect("an inventory before the result");
    let web = inv.vms.iter().find(|v| v.name == "web").unwrap();
    assert_eq!(web.power_state, PowerState::Off);
    assert!(r1.ok, "{r1:?}");
    assert_eq!(r1.output["changed"], true);
    if !event {
        c1.recv_where("vm_power event", |m| match m {
            AgentMessage::Event(e) if e.kind == "vm_power" => Some(()),
            _ => None,
        })
        .await;
    }
    c1.send(power_off);
    let (_, r2) = c1
        .recv_where("repeated command result", |m| match m {
            AgentMessage::CommandResult(r) if r.id == "cmd-1" => Some(r.clone()),
            _ => None,
        })
        .await;
    // Run again it would say `changed: false`.
    assert_eq!(r2, r1);
    assert_eq!(client.commands_run(), 1);

    // CreateVm: ids above every id in use; the new disk is exported.
    c1.send(ManagerMessage::Command(Command {
        id: "cmd-2".into(),
        body: CommandBody::CreateVm {
            name: "db".into(),
            cpus: 1,
            memory_mib: 512,
            disks: vec![NewDisk {
                name: "db-0".into(),
                size_bytes: 1 << 20,
            }],
            boot: None,
            nics: vec![],
        },
    }));
    let (_, r) = c1
        .recv_where("create result", |m| match m {
            AgentMessage::CommandResult(r) if r.id == "cmd-2" => Some(r.clone()),
            _ => None,
        })
        .await;
    assert!(r.ok, "{r:?}");
    let vm: InventoryVm = serde_json::from_value(r.output).unwrap();
    assert_eq!(vm.disks[0].disk_id, 8);
    assert!(h
        .agent
        .status()
        .protected
        .iter()
        .any(|d| d.name == "db-0" && d.disk_id == 8));
    // A failing command answers with its error.
    c1.send(ManagerMessage::Command(Command {
        id: "cmd-3".into(),
        body: CommandBody::Sync {
            disk_id: 999,
            action: bulwark::proto::agent::SyncAction::Force,
        },
    }));
    let (_, r) = c1
        .recv_where("sync result", |m| match m {
            AgentMessage::CommandResult(r) if r.id == "cmd-3" => Some(r.clone()),
            _ => None,
        })
        .await;
    assert!(!r.ok);
    assert!(r.error.unwrap().contains("999"));

    // The manager goes away: the agent comes back with its host key.
    c1.close();
    let mut c2 = fm.accept().await;
    let (_, hello) = c2.recv_where("hello", hello_of).await;
    assert_eq!(
        hello.credential,
        Credential::HostKey {
            key: "key-abc".into()
        }
    );
    assert_eq!(hello.desired_version, h.agent.desired_version());
    assert!(hello.inventory.vms.iter().any(|v| v.name == "db"));

    // Heartbeats at the interval this Welcome gives, and the connection stays up on
    // pongs alone for many heartbeats.
    c2.send(welcome("h-1", None, 100));
    let mut at = Vec::new();
    for _ in 0..8 {
        let (t, hb) = c2
            .recv_where("heartbeat", |m| match m {
                AgentMessage::Heartbeat(hb) => Some(hb.clone()),
                _ => None,
            })
            .await;
        assert!(hb.status.protected.iter().any(|d| d.name == "d1"));
        at.push(t);
    }
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    let med = median(gaps.clone());
    eprintln!("heartbeat gaps at 100 ms: {gaps:?}");
    assert!(
        med >= Duration::from_millis(80) && med <= Duration::from_millis(180),
        "median heartbeat gap {med:?}"
    );
    assert_eq!(fm.accepted().len(), 2, "the connection was replaced");
    let st = client.status();
    assert!(st.connected, "{st:?}");
    assert_eq!(st.connects, 2);
    assert_eq!(st.heartbeat_ms, Some(100));

    stop.cancel();
    tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
    assert_eq!(client.status().state, "stopped");
    h.agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_with_back_off_and_leaves_a_silent_manager() {
    let dir = tempfile::tempdir().unwrap();
    let h = start_host(dir.path()).await;
    let mut fm = FakeManager::start().await;
    let mut s = settings(&h, &fm.url, Some("enrol-1"));
    s.stable_after = Duration::from_millis(300);
    let client = ControlClient::new(s, h.agent.clone(), h.vms.clone()).unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(client.clone().run(stop.clone()));

    // The manager hangs up after every Hello: the waits grow.
    for _ in 0..4 {
        let mut c = fm.accept().await;
        c.recv_where("hello", hello_of).await;
        c.close();
    }
    let mut c = fm.accept().await;
    let t = fm.accepted();
    let gaps: Vec<Duration> = t.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!("reconnect gaps: {gaps:?}");
    // Waits are in [d/2, d] for d = 200, 400, 800, 1600 ms.
    assert!(gaps[0] >= Duration::from_millis(90), "{gaps:?}");
    assert!(gaps[3] >= Duration::from_millis(750), "{gaps:?}");
    assert!(gaps[3] > gaps[0], "{gaps:?}");
    let st = client.status();
    assert!(!st.connected);
    assert!(st.last_error.is_some(), "{st:?}");

    // A manager that stops answering (no message, no pong) is left after 4 heartbeats.
    c.recv_where("hello", hello_of).await;
    c.send(welcome("h-9", Some("key-9"), 100));
    c.recv_where("heartbeat", |m| {
        matches!(m, AgentMessage::Heartbeat(_)).then_some(())
    })
    .await;
    // Up for longer than `stable_after`, so the back-off starts small again.
    tokio::time::sleep(Duration::from_millis(400)).await;
    c.freeze();
    let frozen = Instant::now();
    let mut c = fm.accept().await;
    let after = frozen.elapsed();
    eprintln!("reconnected {after:?} after the manager froze");
    assert!(after >= Duration::from_millis(350), "{after:?}");
    assert!(after < Duration::from_secs(3), "{after:?}");
    let st = client.status();
    assert!(
        st.last_error
            .as_deref()
            .is_some_and(|e| e.contains("no message or pong")),
        "{st:?}"
    );
    let (_, hello) = c.recv_where("hello", hello_of).await;
    assert_eq!(
        hello.credential,
        Credential::HostKey {
            key: "key-9".into()
        }
    );

    stop.cancel();
    tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
    h.agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_host_waits_long_and_a_host_without_credential_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = start_host(dir.path()).await;
    let mut fm = FakeManager::start().await;

    let e = ControlClient::new(settings(&h, &fm.url, None), h.agent.clone(), h.vms.clone())
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("not enrolled: pass --enrolment-token"),
        "{e}"
    );

    let client = ControlClient::new(
        settings(&h, &fm.url, Some("stale")),
        h.agent.clone(),
        h.vms.clone(),
    )
    .unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(client.clone().run(stop.clone()));
    let mut c = fm.accept().await;
    c.recv_where("hello", hello_of).await;
    c.send(ManagerMessage::Rejected {
        code: "enrolment.invalid".into(),
        reason: "unknown or used enrolment token".into(),
    });
    c.close();
    eventually("rejected state", || client.status().state == "rejected").await;
    let st: ControlStatus = client.status();
    assert!(
        st.last_error
            .as_deref()
            .unwrap()
            .contains("unknown or used"),
        "{st:?}"
    );
    assert!(!st.enrolled);
    let _c = fm.accept().await;
    let t = fm.accepted();
    let gap = t[1] - t[0];
    assert!(gap >= Duration::from_millis(1400), "retried after {gap:?}");
    assert!(!h.cfg.data_dir.join("state/host.key").exists());
    stop.cancel();
    tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
    h.agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoint_serves_vms_and_the_control_state() {
    let dir = tempfile::tempdir().unwrap();
    let h = start_host(dir.path()).await;
    let listener = admin::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let server = tokio::spawn(admin::serve(
        listener,
        admin::AdminState {
            agent: h.agent.clone(),
            vms: Some(h.vms.clone()),
            control: None,
        },
        stop.clone(),
    ));
    let http = reqwest::Client::new();

    let inv: Inventory = http
        .get(format!("{base}/v1/vms"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(inv.vms.len(), 2);

    let r = http
        .post(format!("{base}/v1/vms"))
        .json(&serde_json::json!({
            "name": "app", "cpus": 2, "memory_mib": 1024,
            "disks": [{ "name": "app-0", "size_bytes": 1048576 }]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let vm: InventoryVm = r.json().await.unwrap();
    assert_eq!(vm.disks[0].disk_id, 8);
    assert_eq!(vm.power_state, PowerState::On);

    let r = http
        .post(format!("{base}/v1/vms"))
        .json(&serde_json::json!({ "name": "app", "cpus": 1, "memory_mib": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let p: serde_json::Value = r.json().await.unwrap();
    assert_eq!(p["code"], "vm.name_taken");
    let r = http
        .post(format!("{base}/v1/vms"))
        .json(&serde_json::json!({ "name": "a/b", "cpus": 1, "memory_mib": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);

    let r = http
        .post(format!("{base}/v1/vms/app/power"))
        .json(&serde_json::json!({ "state": "off" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let vm: InventoryVm = r.json().await.unwrap();
    assert_eq!(vm.power_state, PowerState::Off);
    // A powered-off VM's disks are not served.
    let exports = exports_of(&h).await;
    assert!(!exports.contains(&"app-0".to_string()), "{exports:?}");
    assert!(exports.contains(&"web-0".to_string()), "{exports:?}");
    let r = http
        .post(format!("{base}/v1/vms/nobody/power"))
        .json(&serde_json::json!({ "state": "on" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = http
        .post(format!("{base}/v1/vms/app/power"))
        .json(&serde_json::json!({ "state": "sideways" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let st: ControlStatus = http
        .get(format!("{base}/v1/control"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(!st.configured && !st.connected, "{st:?}");
    assert_eq!(st.state, "not_configured");

    stop.cancel();
    server.await.unwrap();
    h.agent.shutdown().await.unwrap();

    // Power state and run-time VMs survive a restart of the agent.
    let h = start_host(dir.path()).await;
    let app =
        h.hv.inventory()
            .vms
            .into_iter()
            .find(|v| v.name == "app")
            .expect("the run-time VM is back after a restart");
    assert_eq!(app.power_state, PowerState::Off);
    assert!(h
        .agent
        .status()
        .protected
        .iter()
        .any(|d| d.name == "app-0" && d.disk_id == 8));
    let exports = exports_of(&h).await;
    assert!(!exports.contains(&"app-0".to_string()), "{exports:?}");
    let change = h.vms.set_power("app", PowerState::On).await.unwrap();
    assert!(change.changed);
    assert!(exports_of(&h).await.contains(&"app-0".to_string()));
    h.agent.shutdown().await.unwrap();
}

async fn exports_of(h: &Host) -> Vec<String> {
    bulwark::agent::nbd::client::NbdClient::list(h.agent.endpoints().nbd.as_str())
        .await
        .unwrap()
}

/// `bulwark agent` as a process: the manager from `--manager`, the token from the
/// environment; without any credential it refuses to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulwark_agent_dials_the_manager_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("a1");
    let mut fm = FakeManager::start().await;
    let cmd = |token: Option<&str>| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_bulwark"));
        c.arg("--config")
            .arg(dir.path().join("none.toml"))
            .args(["agent", "--site", "s1", "--host-name", "a1"])
            .args([
                "--nbd-listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .arg("--insecure")
            .arg("--data-dir")
            .arg(&data)
            .args(["--manager", &fm.url])
            .env_remove("BULWARK_ENROLMENT_TOKEN")
            .env_remove("BULWARK_MANAGER_URL")
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        if let Some(t) = token {
            c.env("BULWARK_ENROLMENT_TOKEN", t);
        }
        c
    };
    let out = cmd(None).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("not enrolled: pass --enrolment-token"),
        "{err}"
    );

    let mut child = cmd(Some("tok-env")).spawn().unwrap();
    let mut c = fm.accept().await;
    let (_, hello) = c.recv_where("hello", hello_of).await;
    assert_eq!(
        hello.credential,
        Credential::Enrolment {
            token: "tok-env".into()
        }
    );
    assert_eq!(hello.host_name, "a1");
    c.send(welcome("h-a1", Some("key-a1"), 200));
    c.recv_where("heartbeat", |m| {
        matches!(m, AgentMessage::Heartbeat(_)).then_some(())
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(data.join("state/host.key"))
            .unwrap()
            .trim(),
        "key-a1"
    );
    let ep: bulwark::proto::agent::AgentEndpoints =
        serde_json::from_slice(&std::fs::read(data.join("run/endpoints.json")).unwrap()).unwrap();
    let st: ControlStatus = reqwest::get(format!("http://{}/v1/control", ep.admin.unwrap()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(st.configured && st.connected, "{st:?}");
    assert_eq!(st.host_id.as_deref(), Some("h-a1"));

    // SIGTERM: the agent leaves the manager (close frame or end of stream) and exits 0.
    let pid = child.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::timeout_at(deadline, c.rx.recv())
        .await
        .expect("the connection did not end")
        .is_some()
    {}
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}
