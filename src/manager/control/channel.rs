//! The manager end of the control WebSocket: authenticate the agent's Hello (enrolment
//! token → host key, or host key), register the host and its inventory, then pump
//! messages both ways until either side goes. `manager::api` only upgrades the request
//! and hands the socket over.
//!
//! A host has at most one current connection: a newer one replaces the older (the hub
//! closes the old outbox and its socket ends). Only the end of the *current* connection
//! marks the host disconnected; the liveness loop does the same for hosts silent longer
//! than `disconnect_after`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket};
use tokio_util::sync::CancellationToken;

use super::ControlPlane;
use crate::manager::store::{Actor, StoreError};
use crate::proto::control::{AgentHello, AgentMessage, ManagerMessage, CONTROL_PROTOCOL};

/// The first message must arrive within this.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// `hosts.last_seen_at` is written at most this often per host (the hub has the exact
/// time in memory; the column is for people and for after a restart).
pub const LAST_SEEN_EVERY: Duration = Duration::from_secs(10);
/// Largest message accepted from an agent (an inventory of thousands of VMs fits).
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// The host a connection authenticated as.
#[derive(Debug, Clone)]
pub struct HostRef {
    pub id: String,
    pub name: String,
    pub site_id: String,
}

/// Why the first message did not let the agent in.
#[derive(Debug, thiserror::Error)]
enum Refused {
    /// Answered with `Rejected{code, reason}`.
    #[error("{code}: {reason}")]
    Rejected { code: String, reason: String },
    /// Not worth an answer (no hello, socket gone): just close.
    #[error("{0}")]
    Closed(String),
}

impl Refused {
    fn rejected(code: &str, reason: impl Into<String>) -> Self {
        Refused::Rejected {
            code: code.to_string(),
            reason: reason.into(),
        }
    }
}

impl From<StoreError> for Refused {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { code, message } => Refused::rejected(code, message),
            StoreError::Invalid(v) => Refused::rejected(v.code, v.to_string()),
            StoreError::NotFound { .. } => {
                Refused::rejected("agent.bad_credential", "unknown host")
            }
            other => {
                tracing::error!(error = %other, "control channel: database error during hello");
                Refused::rejected(
                    "agent.internal",
                    "the manager cannot admit agents right now",
                )
            }
        }
    }
}

fn text(msg: &ManagerMessage) -> Option<Message> {
    match serde_json::to_string(msg) {
        Ok(s) => Some(Message::Text(s.into())),
        Err(e) => {
            tracing::error!(error = %e, "cannot serialise a control message");
            None
        }
    }
}

async fn close(socket: &mut WebSocket, code: u16, reason: &str) {
    // Close reasons are limited to 123 bytes by the protocol.
    let reason: String = reason.chars().take(100).collect();
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

/// Reads the first message: it must be a Hello.
async fn read_hello(socket: &mut WebSocket) -> Result<AgentHello, Refused> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, async {
        loop {
            match socket.recv().await {
                Some(Ok(Message::Text(t))) => return Ok(t),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Binary(_))) => {
                    return Err(Refused::rejected(
                        "agent.bad_message",
                        "control messages are JSON text",
                    ))
                }
                Some(Ok(Message::Close(_))) | None => {
                    return Err(Refused::Closed("closed before its hello".into()))
                }
                Some(Err(e)) => return Err(Refused::Closed(format!("socket error: {e}"))),
            }
        }
    })
    .await
    .map_err(|_| Refused::rejected("agent.hello_timeout", "no hello within 10 s"))??;
    match serde_json::from_str::<AgentMessage>(first.as_str()) {
        Ok(AgentMessage::Hello(h)) if h.protocol == CONTROL_PROTOCOL => Ok(h),
        Ok(AgentMessage::Hello(h)) => Err(Refused::rejected(
            "agent.protocol",
            format!(
                "agent speaks control protocol {}, this manager {CONTROL_PROTOCOL}",
                h.protocol
            ),
        )),
        Ok(other) => Err(Refused::rejected(
            "agent.bad_message",
            format!("the first message must be a hello, not {}", other.kind()),
        )),
        Err(e) => Err(Refused::rejected(
            "agent.bad_message",
            format!("not a control message: {e}"),
        )),
    }
}

/// Admits the agent: credential, host row, inventory.
async fn admit(
    cp: &ControlPlane,
    hello: &AgentHello,
) -> Result<(HostRef, Option<String>), Refused> {
    let a = cp.store.admit_agent(hello).await?;
    cp.store.host_connected(&a.host_id, hello).await?;
    let actor = Actor(format!("agent:{}", a.host_name));
    cp.store
        .apply_host_inventory(&actor, &a.host_id, &hello.inventory)
        .await?;
    Ok((
        HostRef {
            id: a.host_id,
            name: a.host_name,
            site_id: a.site_id,
        },
        a.host_key,
    ))
}

/// Serves one agent connection to its end.
pub async fn serve(cp: Arc<ControlPlane>, mut socket: WebSocket) {
    let hello = match read_hello(&mut socket).await {
        Ok(h) => h,
        Err(r) => return refuse(&mut socket, r).await,
    };
    let (host, host_key) = match admit(&cp, &hello).await {
        Ok(x) => x,
        Err(r) => {
            tracing::info!(host = %hello.host_name, credential = %hello.credential, refusal = %r, "agent refused");
            return refuse(&mut socket, r).await;
        }
    };
    let enrolled_now = host_key.is_some();
    let (conn_id, mut outbox) = cp.hub.register(&host.name, &host.id);
    tracing::info!(host = %host.name, agent_version = %hello.agent_version, enrolled = host_key.is_some(), "agent connected");
    let welcome = ManagerMessage::Welcome {
        host_id: host.id.clone(),
        host_key,
        heartbeat_ms: u64::try_from(cp.settings.heartbeat.as_millis()).unwrap_or(u64::MAX),
    };
    let sent = match text(&welcome) {
        Some(m) => socket.send(m).await.is_ok(),
        None => false,
    };
    let reason = if sent {
        cp.bump_generation();
        cp.changed.notify_waiters();
        cp.reconciler.push_to(&cp, &host.name).await;
        pump(&cp, &host, &mut socket, &mut outbox, enrolled_now).await
    } else {
        "socket failed before the welcome".to_string()
    };
    if cp.hub.unregister(&host.name, conn_id) {
        mark_disconnected(&cp, &host.name, &host.id, &reason).await;
    }
    tracing::info!(host = %host.name, reason = %reason, "agent connection ended");
}

async fn refuse(socket: &mut WebSocket, r: Refused) {
    match r {
        Refused::Rejected { code, reason } => {
            if let Some(m) = text(&ManagerMessage::Rejected {
                code: code.clone(),
                reason,
            }) {
                let _ = socket.send(m).await;
            }
            close(socket, close_code::POLICY, &code).await;
        }
        Refused::Closed(why) => {
            tracing::debug!(why = %why, "control connection closed before admission")
        }
    }
}

/// Messages both ways until the socket closes, the hub drops this connection (replaced,
/// silent, too slow) or the control plane stops. Returns why it ended.
async fn pump(
    cp: &Arc<ControlPlane>,
    host: &HostRef,
    socket: &mut WebSocket,
    outbox: &mut tokio::sync::mpsc::Receiver<ManagerMessage>,
    mut key_unconfirmed: bool,
) -> String {
    let cancel: CancellationToken = cp.cancel_token();
    let mut last_seen_written = Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                close(socket, close_code::AWAY, "manager shutting down").await;
                return "manager shutting down".into();
            }
            out = outbox.recv() => match out {
                Some(m) => {
                    let Some(frame) = text(&m) else { continue };
                    if let Err(e) = socket.send(frame).await {
                        return format!("send failed: {e}");
                    }
                }
                None => {
                    close(socket, close_code::NORMAL, "replaced by a newer connection, or silent too long").await;
                    return "dropped by the manager (replaced or silent)".into();
                }
            },
            inbound = socket.recv() => {
                let t = match inbound {
                    Some(Ok(Message::Text(t))) => t,
                    // Pings are answered by the WebSocket layer itself; any frame proves
                    // the agent alive.
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                        cp.hub.touch(&host.name);
                        continue;
                    }
                    Some(Ok(Message::Binary(_))) => {
                        tracing::warn!(host = %host.name, "binary frame on the control channel");
                        close(socket, close_code::UNSUPPORTED, "control messages are JSON text").await;
                        return "binary frame".into();
                    }
                    Some(Ok(Message::Close(_))) | None => return "closed by the agent".into(),
                    Some(Err(e)) => return format!("socket error: {e}"),
                };
                let msg = match serde_json::from_str::<AgentMessage>(t.as_str()) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(host = %host.name, error = %e, "bad control message; closing");
                        close(socket, close_code::INVALID, &format!("bad control message: {e}")).await;
                        return format!("bad control message: {e}");
                    }
                };
                if last_seen_written.elapsed() >= LAST_SEEN_EVERY {
                    last_seen_written = Instant::now();
                    // Off the message path: a busy database must not delay the
                    // replies a checkpoint round is waiting for.
                    let (store, id, name) = (cp.store.clone(), host.id.clone(), host.name.clone());
                    tokio::spawn(async move {
                        if let Err(e) = store.touch_host(&id).await {
                            tracing::warn!(host = %name, error = %e, "last_seen_at not written");
                        }
                    });
                }
                if key_unconfirmed {
                    // An agent that just enrolled speaks only after storing its key.
                    key_unconfirmed = false;
                    let (store, id, name) = (cp.store.clone(), host.id.clone(), host.name.clone());
                    tokio::spawn(async move {
                        if let Err(e) = store.confirm_host_key(&id).await {
                            tracing::warn!(host = %name, error = %e, "host key use not recorded (its next connection records it)");
                        }
                    });
                }
                cp.on_message(host, msg).await;
            }
        }
    }
}

async fn mark_disconnected(cp: &ControlPlane, name: &str, id: &str, reason: &str) {
    match cp.store.host_disconnected(id, reason).await {
        Ok(_) => {
            cp.bump_generation();
            cp.changed.notify_waiters()
        }
        Err(e) => tracing::warn!(host = name, error = %e, "cannot mark host disconnected"),
    }
}

/// Drops hosts silent longer than `disconnect_after` (every second) and marks them
/// disconnected. Runs next to the reconciler.
pub async fn liveness(cp: Arc<ControlPlane>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let ids: HashMap<String, String> = cp
            .hub
            .all_live()
            .into_iter()
            .map(|l| (l.host_name, l.host_id))
            .collect();
        for name in cp.hub.expire(cp.settings.disconnect_after) {
            tracing::warn!(host = %name, after = ?cp.settings.disconnect_after, "agent silent: dropping its connection");
            // It may have reconnected in between: then it is not disconnected.
            if cp.hub.is_connected(&name) {
                continue;
            }
            if let Some(id) = ids.get(&name) {
                mark_disconnected(&cp, &name, id, "no heartbeat").await;
            }
        }
    }
}
