//! TLS and allow-list behaviour of the replication stream.
#![allow(clippy::unwrap_used)]

mod stream_util;

use std::time::{Duration, Instant};

use bulwark::agent::stream::{ClientTransport, Sender, ServerTransport, StreamEvent};
use bulwark::agent::tls;
use stream_util::*;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

/// Collects events for `d` (bounded) or until one matches `stop`.
async fn events_for(
    rx: &mut UnboundedReceiver<StreamEvent>,
    d: Duration,
    stop: impl Fn(&StreamEvent) -> bool,
) -> Vec<StreamEvent> {
    let deadline = Instant::now() + d;
    let mut v = Vec::new();
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(50), rx.recv()).await {
            Ok(Some(e)) => {
                let s = stop(&e);
                v.push(e);
                if s {
                    break;
                }
            }
            Ok(None) => break,
            Err(_) => {}
        }
    }
    v
}

async fn try_connect(
    server: ServerTransport,
    allow: &[(&str, &std::path::Path)],
    host: &str,
    client: ClientTransport,
) -> (Vec<StreamEvent>, RunningReceiver) {
    let rx = RunningReceiver::start("127.0.0.1:0".parse().unwrap(), server, allow).await;
    let mut cfg = sender_config(rx.addr, client);
    cfg.host_name = host.into();
    let cancel = CancellationToken::new();
    let (_sender, mut events) = Sender::start(cfg, specs(&[1]), cancel.clone()).unwrap();
    let ev = events_for(&mut events, Duration::from_millis(1500), |e| {
        matches!(e, StreamEvent::Connected | StreamEvent::Refused { .. })
    })
    .await;
    cancel.cancel();
    (ev, rx)
}

fn connected(ev: &[StreamEvent]) -> bool {
    ev.contains(&StreamEvent::Connected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_certificate_on_allow_list_connects() {
    init_tracing();
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let (ev, rx) = try_connect(certs.server(), &[(PRO, dir.path())], PRO, certs.client(PRO)).await;
    assert!(connected(&ev), "{ev:?}");
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_another_ca_is_refused() {
    init_tracing();
    let certs = Certs::new();
    let other = tempfile::tempdir().unwrap();
    tls::lab_certs(other.path(), &[PRO.into()]).unwrap();
    // The intruder trusts the real CA for the server, but its own cert is from another.
    let files = tls::TlsFiles {
        ca: certs.files(PRO).ca,
        ..tls::TlsFiles::in_dir(other.path(), PRO)
    };
    let client = ClientTransport::Tls {
        config: tls::client_config(&files).unwrap(),
        server_name: REC.into(),
    };
    let dir = tempfile::tempdir().unwrap();
    let (ev, rx) = try_connect(certs.server(), &[(PRO, dir.path())], PRO, client).await;
    assert!(!connected(&ev), "{ev:?}");
    assert!(
        ev.iter()
            .any(|e| matches!(e, StreamEvent::Disconnected { .. })),
        "{ev:?}"
    );
    assert!(rx.handle.lag().is_empty());
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_not_on_allow_list_is_refused_at_hello() {
    init_tracing();
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let (ev, rx) = try_connect(
        certs.server(),
        &[("pro-2", dir.path())],
        PRO,
        certs.client(PRO),
    )
    .await;
    assert!(!connected(&ev), "{ev:?}");
    let reason = ev.iter().find_map(|e| match e {
        StreamEvent::Refused { reason } => Some(reason.clone()),
        _ => None,
    });
    assert!(
        reason
            .as_deref()
            .is_some_and(|r| r.contains("\"pro-1\" is not on this recovery agent's allow-list")),
        "{ev:?}"
    );
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_claiming_another_host_than_the_certificate_is_refused() {
    init_tracing();
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    // pro-1's certificate, but the Hello says pro-2 (which is allowed).
    let (ev, rx) = try_connect(
        certs.server(),
        &[("pro-2", dir.path())],
        "pro-2",
        certs.client(PRO),
    )
    .await;
    assert!(!connected(&ev), "{ev:?}");
    assert!(
        ev.iter().any(|e| matches!(e, StreamEvent::Refused { reason } if reason.contains("certificate does not name host"))),
        "{ev:?}"
    );
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_only_when_both_sides_say_so() {
    init_tracing();
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let allow = [(PRO, dir.path())];

    let (ev, rx) = try_connect(
        ServerTransport::Insecure,
        &allow,
        PRO,
        ClientTransport::Insecure,
    )
    .await;
    assert!(connected(&ev), "both insecure: {ev:?}");
    rx.stop().await;

    let (ev, rx) = try_connect(certs.server(), &allow, PRO, ClientTransport::Insecure).await;
    assert!(!connected(&ev), "TLS server, plain client: {ev:?}");
    rx.stop().await;

    let (ev, rx) = try_connect(ServerTransport::Insecure, &allow, PRO, certs.client(PRO)).await;
    assert!(!connected(&ev), "plain server, TLS client: {ev:?}");
    rx.stop().await;
}
