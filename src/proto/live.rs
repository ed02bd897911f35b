//! The live stream's frames (`GET /api/v1/stream`, WebSocket, JSON text messages).
//!
//! A connection starts with one [`Snapshot`] (or, when reconnecting with `?since=N` and
//! the manager still holds every frame after N, with those frames replayed), then one
//! [`Delta`] per change as it happens. Each frame carries a sequence number one above
//! the previous one; a client remembers the last it applied and reconnects with
//! `?since=<seq>` to miss nothing.
//!
//! Deltas carry whole records, never differences: applying a record twice, or one the
//! snapshot already reflects, changes nothing. That is what lets a snapshot be read from
//! the database while deltas keep flowing, with no lock between them.

use super::api::{Alert, Event, Host, Site, Task, Vpg};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Path of the live stream.
pub const LIVE_PATH: &str = "/api/v1/stream";

/// One WebSocket text message of the stream.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Frame {
    Snapshot(Snapshot),
    Delta(Delta),
}

impl Frame {
    pub fn seq(&self) -> u64 {
        match self {
            Frame::Snapshot(s) => s.seq,
            Frame::Delta(d) => d.seq,
        }
    }
}

/// Why the stream began with a snapshot instead of replaying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotReason {
    /// No `since` given.
    Connect,
    /// The frames after `since` are no longer held (or `since` is from an earlier run of
    /// the manager): the client must replace its state with this one.
    SinceTooOld,
}

/// The state a client starts from. Deltas that follow have `seq` above this one.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    /// The last frame this snapshot reflects.
    pub seq: u64,
    pub at: DateTime<Utc>,
    pub reason: SnapshotReason,
    /// Every VPG, in the shape of `GET /api/v1/vpgs` items.
    pub vpgs: Vec<Vpg>,
    /// Open alerts.
    pub alerts: Vec<Alert>,
    /// Tasks not finished, and the most recent finished ones.
    pub tasks: Vec<Task>,
    pub sites: Vec<Site>,
    pub hosts: Vec<Host>,
    /// The most recent events, oldest first.
    pub events: Vec<Event>,
    /// Each VPG's latest SLA and throughput figures (what `samples` in deltas carry),
    /// so a client has throughput before the next delta.
    #[serde(default)]
    pub samples: Vec<VpgSample>,
}

/// What changed. Empty lists are omitted on the wire.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct Delta {
    pub seq: u64,
    /// When the manager published the frame.
    pub at: DateTime<Utc>,
    /// VPGs created or changed (status, settings, members, …), whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vpgs: Vec<Vpg>,
    /// Ids of VPGs that no longer exist.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vpgs_removed: Vec<String>,
    /// The SLA figures of VPGs whose figures moved, about once a second: what an RPO
    /// sparkline plots. Status changes come as whole VPGs in `vpgs`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<VpgSample>,
    /// Alerts raised, updated, acknowledged or cleared (`cleared_at` set), whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<Alert>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<Task>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<Site>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites_removed: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<Host>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts_removed: Vec<String>,
    /// New events, in id order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<Event>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.vpgs.is_empty()
            && self.vpgs_removed.is_empty()
            && self.samples.is_empty()
            && self.alerts.is_empty()
            && self.tasks.is_empty()
            && self.sites.is_empty()
            && self.sites_removed.is_empty()
            && self.hosts.is_empty()
            && self.hosts_removed.is_empty()
            && self.events.is_empty()
    }
}

/// A VPG's SLA figures at `at` (the fields of the same names on [`Vpg`]), and what its
/// VMs write: the sum over its disks of `GET /api/v1/vpgs/{id}/disks`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VpgSample {
    pub id: String,
    pub at: DateTime<Utc>,
    pub rpo_actual_secs: Option<f64>,
    pub history_actual_secs: Option<u64>,
    pub journal_bytes: u64,
    /// Data bytes per second the VPG's VMs write (over the last few seconds).
    #[serde(default)]
    pub throughput_bytes_per_sec: f64,
    /// Write commands per second.
    #[serde(default)]
    pub iops: f64,
}

/// Query of `GET /api/v1/stream`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LiveQuery {
    /// The `seq` of the last frame applied: the stream resumes after it, or starts with
    /// a snapshot if those frames are gone.
    pub since: Option<u64>,
    /// The API token, for clients that cannot set `Authorization` on a WebSocket (web
    /// browsers), as in RFC 6750 §2.3.
    pub access_token: Option<String>,
}

/// WebSocket close code when the manager drops a client that does not keep up.
pub const CLOSE_TOO_SLOW: u16 = 4008;
