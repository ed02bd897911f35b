//! `GET /api/v1/stream`: the live stream over WebSocket (frames in `proto::live`, the
//! engine in `manager::live`).

use super::error::ApiError;
use super::extract::{ApiQuery, Caller};
use super::AppState;
use crate::manager::live::{self, Published, Start};
use crate::model::access::Role;
use crate::proto::api::Problem;
use crate::proto::live::{Frame, LiveQuery, CLOSE_TOO_SLOW};
use axum::extract::ws::{
    rejection::WebSocketUpgradeRejection, CloseFrame, Message, Utf8Bytes, WebSocket,
    WebSocketUpgrade,
};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

/// A ping when nothing else was sent for this long keeps proxies from closing the
/// connection and finds dead peers.
const PING_EVERY: Duration = Duration::from_secs(15);
/// Clients send nothing but control frames; anything large is a mistake.
const MAX_CLIENT_MESSAGE: usize = 64 << 10;

#[utoipa::path(get, path = "/api/v1/stream", tag = "records", params(LiveQuery),
    responses(
        (status = 101, description = "Switching protocols: a snapshot (or the frames after `since`), then deltas; see `proto::live`"),
        (status = 400, body = Problem, description = "Not a WebSocket upgrade request"),
        (status = 401, body = Problem),
    ),
    security(("bearer" = [])))]
pub async fn stream(
    State(s): State<AppState>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<LiveQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let caller = match (headers.get(header::AUTHORIZATION), &q.access_token) {
        (None, Some(secret)) => Caller::authenticate(&s, secret).await?,
        _ => Caller::from_headers(&s, &headers).await?,
    };
    caller.require(Role::Viewer)?;
    let ws = ws.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "stream.websocket_required",
            format!("the live stream is a WebSocket: {e}"),
        )
    })?;
    let since = q.since;
    Ok(ws
        .max_message_size(MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| serve(s, socket, since))
        .into_response())
}

/// Why a client's connection ends.
enum End {
    ClientGone,
    TooSlow,
    ShuttingDown,
    Failed(String),
}

async fn serve(s: AppState, socket: WebSocket, since: Option<u64>) {
    let live = std::sync::Arc::clone(&s.control.live);
    let _client = live.client();
    let timeout = live.settings().send_timeout;
    let cancel = s.control.cancel_token();
    let (mut sink, mut incoming) = socket.split();
    let (start, mut rx) = live.subscribe(since);

    let end = 'conn: {
        let first: Vec<Published> = match start {
            Start::Snapshot { seq, reason } => {
                let snap = match live::snapshot(&s.store, seq, reason).await {
                    Ok(mut snap) => {
                        snap.samples = live.latest_samples();
                        snap
                    }
                    Err(e) => break 'conn End::Failed(format!("snapshot: {e}")),
                };
                match serde_json::to_string(&Frame::Snapshot(snap)) {
                    Ok(text) => vec![Published {
                        seq,
                        text: text.into(),
                    }],
                    Err(e) => break 'conn End::Failed(format!("snapshot: {e}")),
                }
            }
            Start::Replay(frames) => frames,
        };
        for f in first {
            if !send(&mut sink, Message::Text(f.text), timeout).await {
                break 'conn End::TooSlow;
            }
        }
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.reset();
        loop {
            tokio::select! {
                r = rx.recv() => match r {
                    Ok(f) => {
                        if !send(&mut sink, Message::Text(f.text), timeout).await {
                            break End::TooSlow;
                        }
                        ping.reset();
                    }
                    Err(RecvError::Lagged(_)) => break End::TooSlow,
                    Err(RecvError::Closed) => break End::ShuttingDown,
                },
                m = incoming.next() => match m {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break End::ClientGone,
                    // Pongs and anything else a client says are ignored.
                    Some(Ok(_)) => {}
                },
                _ = ping.tick() => {
                    if !send(&mut sink, Message::Ping(Default::default()), timeout).await {
                        break End::TooSlow;
                    }
                }
                _ = cancel.cancelled() => break End::ShuttingDown,
            }
        }
    };
    let (code, reason) = match end {
        End::ClientGone => return,
        End::TooSlow => {
            live.count_dropped();
            tracing::info!("live stream: client dropped for not keeping up");
            (
                CLOSE_TOO_SLOW,
                "too slow: reconnect with since=<last seq>".to_string(),
            )
        }
        End::ShuttingDown => (1001, "manager shutting down".to_string()),
        End::Failed(e) => {
            tracing::warn!(error = %e, "live stream: client connection failed");
            (1011, "internal error".to_string())
        }
    };
    // Best effort: a client too slow for frames may be too slow for this too.
    let close = Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(reason),
    }));
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(close)).await;
}

/// Sends one message within `timeout`; false if the client did not take it.
async fn send(
    sink: &mut futures::stream::SplitSink<WebSocket, Message>,
    msg: Message,
    timeout: Duration,
) -> bool {
    matches!(
        tokio::time::timeout(timeout, sink.send(msg)).await,
        Ok(Ok(()))
    )
}
