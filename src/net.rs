//! Socket options for the long-lived TCP connections of both roles: the replication
//! stream, sync sessions, the agent's control channel and the manager's accepted
//! connections.
//!
//! A cable cut without resets (a silent partition) leaves a TCP connection looking open
//! for as long as nothing is sent, and a writer blocked on a full send buffer for the
//! kernel's retransmission timeout (~15 min). Every connection here also has a liveness
//! check of its own in its protocol (pings and a peer timeout); these options are the
//! floor under it: keepalive probes find an idle dead peer, and `TCP_USER_TIMEOUT` ends
//! a connection whose sent data stays unacknowledged, so a blocked write returns an error
//! instead of waiting.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

/// Idle time before the first keepalive probe, the interval between probes, and how
/// many unanswered probes end the connection: a dead idle peer is found in ~11 s.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_PROBES: u32 = 3;

/// Sets keepalive probes and, on Linux, `TCP_USER_TIMEOUT = user_timeout` (data sent and
/// not acknowledged for that long ends the connection). Best effort: a socket that
/// refuses an option keeps working without it, and the refusal is logged once per call.
pub fn tune_long_lived<S: std::os::fd::AsFd>(socket: &S, user_timeout: Duration) {
    let sock = SockRef::from(socket);
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    if let Err(e) = sock.set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "TCP keepalive not set");
    }
    #[cfg(target_os = "linux")]
    if let Err(e) = sock.set_tcp_user_timeout(Some(user_timeout)) {
        tracing::debug!(error = %e, "TCP_USER_TIMEOUT not set");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = user_timeout;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn options_are_set_on_a_connected_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let client = client.unwrap();
        let (server, _) = accepted.unwrap();
        tune_long_lived(&client, Duration::from_secs(7));
        tune_long_lived(&server, Duration::from_secs(7));
        for s in [&client, &server] {
            let r = SockRef::from(s);
            assert!(r.keepalive().unwrap());
            assert_eq!(r.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
            assert_eq!(r.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
            assert_eq!(r.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
            #[cfg(target_os = "linux")]
            assert_eq!(r.tcp_user_timeout().unwrap(), Some(Duration::from_secs(7)));
        }
    }
}
