//! A fake agent for tests: a WebSocket client that speaks `proto::control` to a real
//! manager, with no data path behind it. Tests drive it message by message:
//!
//! ```ignore
//! let token = app.enrolment_token().await;            // helpers: POST /enrolment-tokens
//! let mut a = FakeAgent::connect(&app.ws_url(), FakeAgent::enrol("esx-1", "prod", &token))
//!     .await
//!     .expect("welcome");
//! let key = a.host_key.clone().unwrap();              // issued once, on enrolment
//! let d = a.desired().await;                          // first Desired after Welcome
//! a.applied(d.version).await;
//! a.heartbeat().await;
//! let hold = a.recv_until(|m| match m { ManagerMessage::Hold(h) => Some(h), _ => None }).await;
//! ```
//!
//! `connect` returns `Err(Rejection)` when the manager answers `Rejected`.
//!
//! Commands: `let c = a.command().await;` then `a.answer(&c.id, Ok(output))`, or for a
//! `ReadConsole` `a.answer_console(&c, log)` (the tail as the agent cuts it). Rounds:
//! `a.held(&hold, Some(QuiesceMethod::GuestAgent))` says how the round's VMs were
//! quiesced (only when the hold asked for it).

#![allow(dead_code)]

use std::time::Duration;

use bulwark::proto::agent::{AgentEndpoints, AgentStatus};
use bulwark::proto::control::{
    AgentEvent, AgentHello, AgentMessage, Boot, Command, CommandBody, CommandResult, ConsoleTail,
    Credential, DesiredState, Heartbeat, Inventory, InventoryDisk, InventoryVm, JournalReport,
    ManagerMessage, Nic, PowerState, QuiesceMethod, RoundHeld, RoundHold, CONTROL_PATH,
    CONTROL_PROTOCOL,
};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long `recv*` waits before failing the test.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The manager refused the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: String,
    pub reason: String,
}

/// One connected fake agent.
pub struct FakeAgent {
    ws: Ws,
    pub host_name: String,
    pub host_id: String,
    /// Present only when this connection enrolled.
    pub host_key: Option<String>,
    pub heartbeat_ms: u64,
    /// The last desired-state version seen (sent back in heartbeats).
    pub desired_version: Option<u64>,
}

/// `ws://addr/api/v1/agents/connect` for a manager at `addr` (`TestApp::addr`).
pub fn ws_url(addr: std::net::SocketAddr) -> String {
    format!("ws://{addr}{CONTROL_PATH}")
}

/// A VM for an inventory: `disks` are (disk_id, name, size) with export = name.
pub fn vm(name: &str, disks: &[(u64, &str, u64)]) -> InventoryVm {
    InventoryVm {
        name: name.to_string(),
        power_state: PowerState::On,
        cpus: 2,
        memory_mib: 2048,
        disks: disks
            .iter()
            .map(|(id, n, size)| InventoryDisk {
                disk_id: *id,
                name: n.to_string(),
                size_bytes: *size,
                export: n.to_string(),
            })
            .collect(),
        prepared_for_failover: false,
        boot: None,
        nics: Vec::new(),
    }
}

/// A kernel boot as a QEMU host reports it.
pub fn kernel_boot() -> Boot {
    Boot::Kernel {
        kernel: "/srv/guest/vmlinuz".into(),
        initrd: Some("/srv/guest/initrd.img".into()),
        cmdline: "console=ttyS0 quiet".into(),
    }
}

/// A NIC as an agent reports it.
pub fn nic(network: Option<&str>, mac: Option<&str>) -> Nic {
    Nic {
        network: network.map(str::to_string),
        mac: mac.map(str::to_string),
    }
}

/// A VM of a real hypervisor: [`vm`] with how it boots and its NICs.
pub fn vm_with(
    name: &str,
    disks: &[(u64, &str, u64)],
    boot: Option<Boot>,
    nics: Vec<Nic>,
) -> InventoryVm {
    InventoryVm {
        boot,
        nics,
        ..vm(name, disks)
    }
}

/// The end of `log` as an agent cuts it for `max_bytes`: whole when it fits, else the
/// last `max_bytes` starting after the first line break in them.
pub fn console_tail(vm: &str, log: &str, max_bytes: u64) -> ConsoleTail {
    let total = log.len() as u64;
    if total <= max_bytes {
        return ConsoleTail {
            vm: vm.to_string(),
            text: log.to_string(),
            total_bytes: total,
            truncated: false,
        };
    }
    let tail = &log.as_bytes()[(total - max_bytes) as usize..];
    let tail = match tail.iter().position(|b| *b == b'\n') {
        Some(i) => &tail[i + 1..],
        None => tail,
    };
    ConsoleTail {
        vm: vm.to_string(),
        text: String::from_utf8_lossy(tail).into_owned(),
        total_bytes: total,
        truncated: true,
    }
}

impl FakeAgent {
    /// A Hello that enrols with `token` (no inventory; set `hello.inventory` to add one).
    pub fn enrol(host: &str, site: &str, token: &str) -> AgentHello {
        Self::hello(
            host,
            site,
            Credential::Enrolment {
                token: token.to_string(),
            },
        )
    }

    /// A Hello with the host key from an earlier enrolment.
    pub fn with_key(host: &str, site: &str, key: &str) -> AgentHello {
        Self::hello(
            host,
            site,
            Credential::HostKey {
                key: key.to_string(),
            },
        )
    }

    /// A Hello with plausible endpoints: NBD on 127.0.0.1:10809, data listener on
    /// 127.0.0.1:9701, storage under /srv/bulwark/<host>.
    pub fn hello(host: &str, site: &str, credential: Credential) -> AgentHello {
        AgentHello {
            protocol: CONTROL_PROTOCOL,
            host_name: host.to_string(),
            site: site.to_string(),
            agent_version: "fake-0.1".to_string(),
            credential,
            nbd_address: "127.0.0.1:10809".to_string(),
            data_address: Some("127.0.0.1:9701".to_string()),
            storage_path: Some(format!("/srv/bulwark/{host}")),
            inventory: Inventory::default(),
            desired_version: None,
        }
    }

    /// Opens the socket, sends `hello`, waits for Welcome (Ok) or Rejected (Err).
    /// Panics on anything else (a broken manager is a test failure).
    pub async fn connect(url: &str, hello: AgentHello) -> Result<FakeAgent, Rejection> {
        let (mut ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        let host_name = hello.host_name.clone();
        let desired_version = hello.desired_version;
        send_on(&mut ws, &AgentMessage::Hello(hello)).await;
        match tokio::time::timeout(RECV_TIMEOUT, recv_on(&mut ws))
            .await
            .unwrap_or_else(|_| panic!("no answer to the hello"))
        {
            Some(ManagerMessage::Welcome {
                host_id,
                host_key,
                heartbeat_ms,
            }) => Ok(FakeAgent {
                ws,
                host_name,
                host_id,
                host_key,
                heartbeat_ms,
                desired_version,
            }),
            Some(ManagerMessage::Rejected { code, reason }) => Err(Rejection { code, reason }),
            other => panic!("expected welcome or rejected, got {other:?}"),
        }
    }

    /// Sends a raw text frame (to test what the manager does with bad input).
    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text.to_string()))
            .await
            .expect("send text");
    }

    pub async fn send(&mut self, msg: AgentMessage) {
        send_on(&mut self.ws, &msg).await;
    }

    /// The next manager message within [`RECV_TIMEOUT`]; None when the socket closed.
    /// Panics on timeout.
    pub async fn recv(&mut self) -> Option<ManagerMessage> {
        self.recv_within(RECV_TIMEOUT)
            .await
            .unwrap_or_else(|| panic!("{}: nothing from the manager in time", self.host_name))
    }

    /// The next manager message within `d`: `None` on timeout, `Some(None)` when closed.
    pub async fn recv_within(&mut self, d: Duration) -> Option<Option<ManagerMessage>> {
        tokio::time::timeout(d, recv_on(&mut self.ws)).await.ok()
    }

    /// Skips messages until `f` picks one (within [`RECV_TIMEOUT`] overall).
    pub async fn recv_until<T>(&mut self, mut f: impl FnMut(ManagerMessage) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_within(left).await {
                Some(Some(m)) => {
                    if let Some(t) = f(m) {
                        return t;
                    }
                }
                Some(None) => panic!("{}: socket closed while waiting", self.host_name),
                None => panic!("{}: the awaited message did not come", self.host_name),
            }
        }
    }

    /// The next desired state (skipping other messages); remembers its version.
    pub async fn desired(&mut self) -> DesiredState {
        let d = self
            .recv_until(|m| match m {
                ManagerMessage::Desired(d) => Some(d),
                _ => None,
            })
            .await;
        self.desired_version = Some(d.version);
        d
    }

    /// The next desired state for which `f` holds (earlier ones are skipped).
    pub async fn desired_where(
        &mut self,
        mut f: impl FnMut(&DesiredState) -> bool,
    ) -> DesiredState {
        let d = self
            .recv_until(|m| match m {
                ManagerMessage::Desired(d) if f(&d) => Some(d),
                _ => None,
            })
            .await;
        self.desired_version = Some(d.version);
        d
    }

    /// Reports `version` as applied.
    pub async fn applied(&mut self, version: u64) {
        self.send(AgentMessage::Applied {
            version,
            error: None,
        })
        .await;
    }

    /// A heartbeat with an empty status and no journals.
    pub async fn heartbeat(&mut self) {
        self.heartbeat_with(Vec::new()).await;
    }

    /// A heartbeat reporting these journals (recovery side).
    pub async fn heartbeat_with(&mut self, journals: Vec<JournalReport>) {
        let hb = Heartbeat {
            status: self.status(),
            journals,
            desired_version: self.desired_version,
            recoveries: Vec::new(),
        };
        self.send(AgentMessage::Heartbeat(hb)).await;
    }

    /// Reports a new inventory.
    pub async fn inventory(&mut self, vms: Vec<InventoryVm>) {
        self.send(AgentMessage::Inventory(Inventory { vms })).await;
    }

    /// The next command (skipping other messages).
    pub async fn command(&mut self) -> Command {
        self.recv_until(|m| match m {
            ManagerMessage::Command(c) => Some(c),
            _ => None,
        })
        .await
    }

    /// Whether a command arrives within `d` (other messages are skipped).
    pub async fn command_within(&mut self, d: Duration) -> Option<Command> {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_within(left).await {
                Some(Some(ManagerMessage::Command(c))) => return Some(c),
                Some(Some(_)) => continue,
                Some(None) | None => return None,
            }
        }
    }

    /// Answers command `id`: its output, or the agent's error.
    pub async fn answer(&mut self, id: &str, result: Result<serde_json::Value, String>) {
        let (ok, error, output) = match result {
            Ok(v) => (true, None, v),
            Err(e) => (false, Some(e), serde_json::Value::Null),
        };
        self.send(AgentMessage::CommandResult(CommandResult {
            id: id.to_string(),
            ok,
            error,
            output,
        }))
        .await;
    }

    /// Answers a `ReadConsole` with the end of `log` (panics on another command).
    pub async fn answer_console(&mut self, c: &Command, log: &str) {
        let CommandBody::ReadConsole { vm, max_bytes } = &c.body else {
            panic!("expected ReadConsole, got {:?}", c.body);
        };
        let tail = console_tail(vm, log, *max_bytes);
        self.answer(&c.id, Ok(serde_json::to_value(tail).unwrap()))
            .await;
    }

    /// Answers a round's Hold: markers placed, and how the round's VMs were quiesced
    /// (`method`, reported only when the hold asked to quiesce).
    pub async fn held(&mut self, hold: &RoundHold, method: Option<QuiesceMethod>) {
        self.send(AgentMessage::Held(RoundHeld {
            round: hold.round,
            vpg_id: hold.vpg_id.clone(),
            timestamp_ms: chrono::Utc::now().timestamp_millis(),
            disks: vec![],
            error: None,
            quiesce: if hold.quiesce.is_empty() {
                None
            } else {
                method
            },
        }))
        .await;
    }

    /// Reports an event about a VM.
    pub async fn vm_event(&mut self, kind: &str, vm: &str, details: serde_json::Value) {
        self.send(AgentMessage::Event(AgentEvent {
            kind: kind.to_string(),
            disk_id: None,
            vm: Some(vm.to_string()),
            message: format!("{kind} of {vm}"),
            details,
            at_ms: chrono::Utc::now().timestamp_millis(),
        }))
        .await;
    }

    /// Reports an event.
    pub async fn event(
        &mut self,
        kind: &str,
        disk_id: Option<u64>,
        message: &str,
        details: serde_json::Value,
    ) {
        self.send(AgentMessage::Event(AgentEvent {
            kind: kind.to_string(),
            disk_id,
            vm: None,
            message: message.to_string(),
            details,
            at_ms: chrono::Utc::now().timestamp_millis(),
        }))
        .await;
    }

    /// An empty status naming this host.
    pub fn status(&self) -> AgentStatus {
        AgentStatus {
            endpoints: AgentEndpoints {
                host_name: self.host_name.clone(),
                site: String::new(),
                pid: std::process::id(),
                nbd: "127.0.0.1:10809".into(),
                data: Some("127.0.0.1:9701".into()),
                admin: None,
                nbd_socket: None,
            },
            protected: Vec::new(),
            peers: Vec::new(),
            received: Vec::new(),
            checkpoints: 0,
            max_hold_us: 0,
        }
    }

    /// Waits until the manager closes the socket (messages before are skipped); false if
    /// it stays open for `d`.
    pub async fn closed_within(&mut self, d: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_within(left).await {
                Some(Some(_)) => continue,
                Some(None) => return true,
                None => return false,
            }
        }
    }

    /// Closes the socket cleanly.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }

    /// Drops the TCP connection without a close frame (a crashed agent).
    pub fn drop_hard(self) {
        drop(self);
    }
}

async fn send_on(ws: &mut Ws, msg: &AgentMessage) {
    let text = serde_json::to_string(msg).expect("serialise");
    ws.send(Message::text(text)).await.expect("send");
}

/// Next typed manager message; None on close or error. Pings are answered by
/// tungstenite itself; binary frames are a manager bug. Callers bound the wait.
async fn recv_on(ws: &mut Ws) -> Option<ManagerMessage> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                return Some(
                    serde_json::from_str(t.as_str())
                        .unwrap_or_else(|e| panic!("manager sent bad JSON {t}: {e}")),
                )
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(Message::Binary(_))) => panic!("manager sent a binary frame"),
            Some(Ok(_)) => continue,
        }
    }
}
