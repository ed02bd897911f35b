//! The manager end of the control WebSocket (axum): authenticate the agent's Hello
//! (enrolment token → host key, or host key), register the host and its inventory, then
//! pump messages both ways until either side goes.

/// The host a connection authenticated as.
#[derive(Debug, Clone)]
pub struct HostRef {
    pub id: String,
    pub name: String,
    pub site_id: String,
}
