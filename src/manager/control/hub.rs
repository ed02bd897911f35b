//! The agents connected right now: one entry per host with the channel to its socket
//! writer and what it last reported. In memory only: after a manager restart every
//! agent reconnects and reports again within a heartbeat, and the database holds the
//! desired state, so nothing here needs to survive.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::proto::control::{Command, CommandResult, Heartbeat, ManagerMessage};

/// Messages queued towards one agent before it counts as too slow and is dropped.
pub const OUTBOX: usize = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HubError {
    #[error("host {0} is not connected")]
    NotConnected(String),
    #[error("host {0} does not read its control channel fast enough")]
    Slow(String),
    #[error("host {0} did not answer command {1} in time")]
    Timeout(String, String),
}

/// One connected agent.
struct Conn {
    conn_id: u64,
    host_id: String,
    tx: mpsc::Sender<ManagerMessage>,
    connected_at: Instant,
    last_seen: Instant,
    heartbeat: Option<Arc<Heartbeat>>,
    applied: Option<u64>,
    sent: Option<u64>,
}

/// What the manager knows live about one host.
#[derive(Debug, Clone)]
pub struct HostLive {
    pub host_name: String,
    pub host_id: String,
    pub connected_for: Duration,
    pub last_seen_ago: Duration,
    pub heartbeat: Option<Arc<Heartbeat>>,
    /// Desired-state versions sent and acknowledged as applied.
    pub sent: Option<u64>,
    pub applied: Option<u64>,
}

#[derive(Default)]
struct Inner {
    next_conn: u64,
    conns: HashMap<String, Conn>,
    /// Command id → who waits for its result.
    waiting: HashMap<String, oneshot::Sender<CommandResult>>,
}

/// See the module documentation.
#[derive(Clone, Default)]
pub struct Hub {
    inner: Arc<Mutex<Inner>>,
}

impl Hub {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A host's new connection. An older connection of the same host is replaced (its
    /// writer sees its channel close and ends the socket). Returns the connection id
    /// (for [`Hub::unregister`]) and the receiving end the socket writer drains.
    pub fn register(
        &self,
        host_name: &str,
        host_id: &str,
    ) -> (u64, mpsc::Receiver<ManagerMessage>) {
        let (tx, rx) = mpsc::channel(OUTBOX);
        let mut g = self.lock();
        g.next_conn += 1;
        let conn_id = g.next_conn;
        let now = Instant::now();
        g.conns.insert(
            host_name.to_string(),
            Conn {
                conn_id,
                host_id: host_id.to_string(),
                tx,
                connected_at: now,
                last_seen: now,
                heartbeat: None,
                applied: None,
                sent: None,
            },
        );
        (conn_id, rx)
    }

    /// Forgets the connection if it is still the host's current one. Returns whether it
    /// was (a replaced connection ending is not a disconnection).
    pub fn unregister(&self, host_name: &str, conn_id: u64) -> bool {
        let mut g = self.lock();
        match g.conns.get(host_name) {
            Some(c) if c.conn_id == conn_id => {
                g.conns.remove(host_name);
                true
            }
            _ => false,
        }
    }

    /// Queues a message for the host. Never waits: a host whose outbox is full is too
    /// slow and is disconnected (it reconciles when it comes back).
    pub fn send(&self, host_name: &str, msg: ManagerMessage) -> Result<(), HubError> {
        let mut g = self.lock();
        let Some(c) = g.conns.get(host_name) else {
            return Err(HubError::NotConnected(host_name.to_string()));
        };
        let desired = match &msg {
            ManagerMessage::Desired(d) => Some(d.version),
            _ => None,
        };
        if let Err(e) = c.tx.try_send(msg) {
            return Err(Self::failed(&mut g, host_name, e));
        }
        if let (Some(v), Some(c)) = (desired, g.conns.get_mut(host_name)) {
            c.sent = Some(v);
        }
        Ok(())
    }

    fn failed(
        g: &mut Inner,
        host_name: &str,
        e: mpsc::error::TrySendError<ManagerMessage>,
    ) -> HubError {
        match e {
            mpsc::error::TrySendError::Full(_) => {
                tracing::warn!(
                    host = host_name,
                    "control channel outbox full: dropping the connection"
                );
                g.conns.remove(host_name);
                HubError::Slow(host_name.to_string())
            }
            mpsc::error::TrySendError::Closed(_) => {
                g.conns.remove(host_name);
                HubError::NotConnected(host_name.to_string())
            }
        }
    }

    /// Sends a command and waits for its result (bounded by `timeout`).
    pub async fn command(
        &self,
        host_name: &str,
        cmd: Command,
        timeout: Duration,
    ) -> Result<CommandResult, HubError> {
        let id = cmd.id.clone();
        let (tx, rx) = oneshot::channel();
        self.lock().waiting.insert(id.clone(), tx);
        if let Err(e) = self.send(host_name, ManagerMessage::Command(cmd)) {
            self.lock().waiting.remove(&id);
            return Err(e);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => Ok(r),
            _ => {
                self.lock().waiting.remove(&id);
                Err(HubError::Timeout(host_name.to_string(), id))
            }
        }
    }

    /// A command's result arrived.
    pub fn command_done(&self, result: CommandResult) {
        if let Some(tx) = self.lock().waiting.remove(&result.id) {
            let _ = tx.send(result);
        }
    }

    /// Any message from the host proves it alive.
    pub fn touch(&self, host_name: &str) {
        if let Some(c) = self.lock().conns.get_mut(host_name) {
            c.last_seen = Instant::now();
        }
    }

    pub fn record_heartbeat(&self, host_name: &str, hb: Heartbeat) {
        if let Some(c) = self.lock().conns.get_mut(host_name) {
            c.last_seen = Instant::now();
            c.heartbeat = Some(Arc::new(hb));
        }
    }

    pub fn record_applied(&self, host_name: &str, version: u64) {
        if let Some(c) = self.lock().conns.get_mut(host_name) {
            c.applied = Some(version);
        }
    }

    pub fn is_connected(&self, host_name: &str) -> bool {
        self.lock().conns.contains_key(host_name)
    }

    pub fn connected_hosts(&self) -> Vec<String> {
        self.lock().conns.keys().cloned().collect()
    }

    pub fn live(&self, host_name: &str) -> Option<HostLive> {
        let g = self.lock();
        g.conns.get(host_name).map(|c| Self::live_of(host_name, c))
    }

    pub fn all_live(&self) -> Vec<HostLive> {
        let g = self.lock();
        g.conns.iter().map(|(h, c)| Self::live_of(h, c)).collect()
    }

    fn live_of(host_name: &str, c: &Conn) -> HostLive {
        HostLive {
            host_name: host_name.to_string(),
            host_id: c.host_id.clone(),
            connected_for: c.connected_at.elapsed(),
            last_seen_ago: c.last_seen.elapsed(),
            heartbeat: c.heartbeat.clone(),
            sent: c.sent,
            applied: c.applied,
        }
    }

    /// Drops connections silent for longer than `after` (their sockets end when the
    /// writer sees the channel close). Returns the hosts dropped.
    pub fn expire(&self, after: Duration) -> Vec<String> {
        let mut g = self.lock();
        let stale: Vec<String> = g
            .conns
            .iter()
            .filter(|(_, c)| c.last_seen.elapsed() > after)
            .map(|(h, _)| h.clone())
            .collect();
        for h in &stale {
            g.conns.remove(h);
        }
        stale
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::control::DesiredState;

    #[tokio::test]
    async fn a_new_connection_replaces_the_old_and_only_the_current_one_unregisters() {
        let hub = Hub::new();
        let (c1, mut rx1) = hub.register("h", "id");
        let (c2, mut rx2) = hub.register("h", "id");
        assert!(
            rx1.recv().await.is_none(),
            "old writer sees its channel close"
        );
        assert!(
            !hub.unregister("h", c1),
            "a replaced connection is not the host's"
        );
        hub.send(
            "h",
            ManagerMessage::Desired(DesiredState {
                version: 3,
                ..Default::default()
            }),
        )
        .unwrap();
        assert!(matches!(rx2.recv().await, Some(ManagerMessage::Desired(_))));
        assert_eq!(hub.live("h").unwrap().sent, Some(3));
        assert!(hub.unregister("h", c2));
        assert_eq!(
            hub.send("h", ManagerMessage::Abort { round: 1 }),
            Err(HubError::NotConnected("h".into()))
        );
    }

    #[tokio::test]
    async fn a_host_that_does_not_read_is_dropped_not_buffered() {
        let hub = Hub::new();
        let (_c, _rx) = hub.register("h", "id");
        for i in 0..OUTBOX as u64 {
            hub.send("h", ManagerMessage::Abort { round: i }).unwrap();
        }
        assert_eq!(
            hub.send("h", ManagerMessage::Abort { round: 0 }),
            Err(HubError::Slow("h".into()))
        );
        assert!(!hub.is_connected("h"));
    }

    #[tokio::test]
    async fn commands_wait_for_their_result_and_time_out() {
        let hub = Hub::new();
        let (_c, mut rx) = hub.register("h", "id");
        let h2 = hub.clone();
        let answer = tokio::spawn(async move {
            if let Some(ManagerMessage::Command(c)) = rx.recv().await {
                h2.command_done(CommandResult {
                    id: c.id,
                    ok: true,
                    error: None,
                    output: serde_json::Value::Null,
                });
            }
            rx
        });
        let cmd = |id: &str| Command {
            id: id.into(),
            body: crate::proto::control::CommandBody::PowerOn { vm: "v".into() },
        };
        let r = hub
            .command("h", cmd("c1"), Duration::from_secs(5))
            .await
            .unwrap();
        assert!(r.ok);
        let _rx = answer.await.unwrap();
        let e = hub
            .command("h", cmd("c2"), Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(e, HubError::Timeout("h".into(), "c2".into()));
    }
}
