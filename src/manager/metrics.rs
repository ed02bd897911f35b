//! Prometheus metrics of the manager, exposed at `/metrics`.
//!
//! Three sources: HTTP requests (observed by the middleware), the control plane (the
//! evaluator sets per-VPG values after each VPG's pass, rounds observe their hold) and
//! the scrape itself (per-disk values from the agents' latest heartbeats, counts from
//! the database). Label sets of VPGs and disks that no longer exist are removed, so
//! cardinality follows what exists now.

use crate::manager::control::HostLive;
use crate::manager::store::MetricCounts;
use crate::model::alerts::Severity;
use crate::model::status::VpgStatus;
use crate::proto::api::Connectivity;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VpgLabels {
    vpg: String,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VpgStatusLabels {
    vpg: String,
    name: String,
    status: String,
    sub_status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DiskLabels {
    host: String,
    disk: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SeverityLabels {
    severity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectivityLabels {
    connectivity: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// What the evaluator derived for one VPG in its last pass.
pub struct VpgSample<'a> {
    pub id: &'a str,
    pub name: &'a str,
    /// `None` while no checkpoint is recoverable (the gauge is then absent).
    pub rpo: Option<Duration>,
    pub history: Duration,
    pub journal_bytes: i64,
    pub status: &'a str,
    pub sub_status: &'a str,
    pub recoverable_checkpoints: u64,
}

/// The label sets last written for one VPG, to remove them when they change.
struct VpgSeries {
    labels: VpgLabels,
    status: VpgStatusLabels,
}

/// Per-VPG and per-disk families.
struct Live {
    vpg_rpo: Family<VpgLabels, FloatGauge>,
    vpg_history: Family<VpgLabels, FloatGauge>,
    vpg_journal_bytes: Family<VpgLabels, Gauge>,
    vpg_status: Family<VpgStatusLabels, Gauge>,
    vpg_recoverable: Family<VpgLabels, Gauge>,
    /// VPG id → its current label sets.
    vpg_series: Mutex<HashMap<String, VpgSeries>>,
    disk_lag: Family<DiskLabels, FloatGauge>,
    disk_queued: Family<DiskLabels, Gauge>,
    disk_write_bytes: Family<DiskLabels, FloatGauge>,
    disk_writes: Family<DiskLabels, FloatGauge>,
    disk_sync: Family<DiskLabels, FloatGauge>,
    hold: Histogram,
    rounds: Family<ResultLabels, Counter>,
    alerts_open: Family<SeverityLabels, Gauge>,
    hosts: Family<ConnectivityLabels, Gauge>,
    stream_clients: Gauge,
    stream_dropped: Counter,
    stream_history_bytes: Gauge,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    http_requests: Family<HttpLabels, Counter>,
    http_duration: Family<RouteLabels, Histogram>,
    vpgs: Family<StatusLabels, Gauge>,
    live: Live,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("bulwark");
        let http_requests = Family::<HttpLabels, Counter>::default();
        let http_duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        let vpgs = Family::<StatusLabels, Gauge>::default();
        registry.register(
            "http_requests",
            "HTTP requests served, by route template and status",
            http_requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to serve HTTP requests, by route template",
            http_duration.clone(),
        );
        registry.register("vpgs", "VPGs by status", vpgs.clone());
        let live = Live {
            vpg_rpo: Family::default(),
            vpg_history: Family::default(),
            vpg_journal_bytes: Family::default(),
            vpg_status: Family::default(),
            vpg_recoverable: Family::default(),
            vpg_series: Mutex::new(HashMap::new()),
            disk_lag: Family::default(),
            disk_queued: Family::default(),
            disk_write_bytes: Family::default(),
            disk_writes: Family::default(),
            disk_sync: Family::default(),
            // 50 µs … 51.2 ms: the hold bound is 50 ms by default.
            hold: Histogram::new(exponential_buckets(0.00005, 2.0, 11)),
            rounds: Family::default(),
            alerts_open: Family::default(),
            hosts: Family::default(),
            stream_clients: Gauge::default(),
            stream_dropped: Counter::default(),
            stream_history_bytes: Gauge::default(),
        };
        registry.register(
            "vpg_rpo_seconds",
            "Time since the VPG's newest recoverable checkpoint",
            live.vpg_rpo.clone(),
        );
        registry.register(
            "vpg_history_seconds",
            "Span between the VPG's oldest and newest recoverable checkpoints",
            live.vpg_history.clone(),
        );
        registry.register(
            "vpg_journal_bytes",
            "Journal bytes of the VPG's disks on the recovery site",
            live.vpg_journal_bytes.clone(),
        );
        registry.register(
            "vpg_status",
            "1 for the VPG's current status and sub-status",
            live.vpg_status.clone(),
        );
        registry.register(
            "vpg_checkpoints_recoverable",
            "Recoverable checkpoints of the VPG",
            live.vpg_recoverable.clone(),
        );
        registry.register(
            "disk_lag_seconds",
            "Age of the protected disk's oldest unacknowledged record",
            live.disk_lag.clone(),
        );
        registry.register(
            "disk_queued_bytes",
            "Bytes queued for the recovery site, not yet acknowledged durable",
            live.disk_queued.clone(),
        );
        registry.register(
            "disk_write_bytes_per_second",
            "Data the guest writes to the protected disk (last few seconds)",
            live.disk_write_bytes.clone(),
        );
        registry.register(
            "disk_writes_per_second",
            "Write commands per second to the protected disk (last few seconds)",
            live.disk_writes.clone(),
        );
        registry.register(
            "disk_sync_progress_ratio",
            "Progress of the disk's running sync (0..1; absent when none runs)",
            live.disk_sync.clone(),
        );
        registry.register(
            "checkpoint_hold_seconds",
            "Longest write-completion hold of each completed checkpoint round",
            live.hold.clone(),
        );
        registry.register(
            "checkpoint_rounds",
            "Checkpoint rounds, by result",
            live.rounds.clone(),
        );
        registry.register(
            "alerts_open",
            "Open alerts, by severity",
            live.alerts_open.clone(),
        );
        registry.register("hosts", "Hosts, by connectivity", live.hosts.clone());
        registry.register(
            "stream_clients",
            "Clients connected to the live stream",
            live.stream_clients.clone(),
        );
        registry.register(
            "stream_clients_dropped",
            "Live stream clients dropped for not keeping up",
            live.stream_dropped.clone(),
        );
        registry.register(
            "stream_history_bytes",
            "Bytes of frames kept for live stream clients that reconnect",
            live.stream_history_bytes.clone(),
        );
        registry.register(
            "build",
            "Version of this manager",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        Self {
            registry: Mutex::new(registry),
            http_requests,
            http_duration,
            vpgs,
            live,
        }
    }

    /// Registers a counter that another module owns and increments (e.g. the RPO
    /// history samples dropped); call once per counter.
    pub fn register_counter(&self, name: &str, help: &str, counter: Counter) {
        self.registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .register(name, help, counter);
    }

    /// A checkpoint round ended: `Some(hold)` when it completed, `None` when aborted.
    pub fn observe_round(&self, hold: Option<Duration>) {
        let result = match hold {
            Some(h) => {
                self.live.hold.observe(h.as_secs_f64());
                "completed"
            }
            None => "aborted",
        };
        self.live
            .rounds
            .get_or_create(&ResultLabels {
                result: result.to_string(),
            })
            .inc();
    }

    /// Sets the VPG's values from the evaluator's pass, replacing label sets that
    /// changed (status, or a renamed VPG) so only the current ones are exposed.
    pub fn set_vpg(&self, v: &VpgSample<'_>) {
        let l = &self.live;
        let labels = VpgLabels {
            vpg: v.id.to_string(),
            name: v.name.to_string(),
        };
        let status = VpgStatusLabels {
            vpg: v.id.to_string(),
            name: v.name.to_string(),
            status: v.status.to_string(),
            sub_status: v.sub_status.to_string(),
        };
        let mut series = l.vpg_series.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = series.get(v.id) {
            if old.labels != labels {
                self.remove_vpg_labels(&old.labels);
            }
            if old.status != status {
                l.vpg_status.remove(&old.status);
            }
        }
        match v.rpo {
            Some(rpo) => {
                l.vpg_rpo.get_or_create(&labels).set(rpo.as_secs_f64());
            }
            None => {
                l.vpg_rpo.remove(&labels);
            }
        }
        l.vpg_history
            .get_or_create(&labels)
            .set(v.history.as_secs_f64());
        l.vpg_journal_bytes
            .get_or_create(&labels)
            .set(v.journal_bytes);
        l.vpg_recoverable
            .get_or_create(&labels)
            .set(i64::try_from(v.recoverable_checkpoints).unwrap_or(i64::MAX));
        l.vpg_status.get_or_create(&status).set(1);
        series.insert(v.id.to_string(), VpgSeries { labels, status });
    }

    /// Removes the label sets of VPGs not in `keep` (deleted since).
    pub fn retain_vpgs(&self, keep: &HashSet<&str>) {
        let mut series = self
            .live
            .vpg_series
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        series.retain(|id, s| {
            if keep.contains(id.as_str()) {
                return true;
            }
            self.remove_vpg_labels(&s.labels);
            self.live.vpg_status.remove(&s.status);
            false
        });
    }

    fn remove_vpg_labels(&self, labels: &VpgLabels) {
        let l = &self.live;
        l.vpg_rpo.remove(labels);
        l.vpg_history.remove(labels);
        l.vpg_journal_bytes.remove(labels);
        l.vpg_recoverable.remove(labels);
    }

    /// Rewrites the per-disk families from the agents' latest heartbeats: cleared and
    /// refilled, so disks no longer reported disappear.
    fn set_disks(&self, live: &[HostLive]) {
        let l = &self.live;
        l.disk_lag.clear();
        l.disk_queued.clear();
        l.disk_write_bytes.clear();
        l.disk_writes.clear();
        l.disk_sync.clear();
        for h in live {
            let Some(hb) = &h.heartbeat else { continue };
            for p in &hb.status.protected {
                let labels = DiskLabels {
                    host: h.host_name.clone(),
                    disk: p.name.clone(),
                };
                l.disk_lag
                    .get_or_create(&labels)
                    .set(Duration::from_millis(p.oldest_unacked_ms).as_secs_f64());
                l.disk_queued
                    .get_or_create(&labels)
                    .set(i64::try_from(p.queued_bytes).unwrap_or(i64::MAX));
                l.disk_write_bytes
                    .get_or_create(&labels)
                    .set(p.writes.bytes_per_sec());
                l.disk_writes
                    .get_or_create(&labels)
                    .set(p.writes.writes_per_sec());
                if let Some(r) = &p.sync.running {
                    // bytes_total 0 (an empty pass) counts as no progress, not NaN.
                    let ratio = if r.bytes_total == 0 {
                        0.0
                    } else {
                        (r.bytes_done as f64 / r.bytes_total as f64).clamp(0.0, 1.0)
                    };
                    l.disk_sync.get_or_create(&labels).set(ratio);
                }
            }
        }
    }

    /// Sets gauges to the counts, every known value present (zero when none); only known
    /// values, so the label sets stay bounded.
    fn set_counts<L: Clone + std::hash::Hash + Eq>(
        family: &Family<L, Gauge>,
        known: &[&str],
        counts: &[(String, i64)],
        label: impl Fn(String) -> L,
    ) {
        for k in known {
            let n = counts.iter().find(|(c, _)| c == k).map_or(0, |(_, n)| *n);
            family.get_or_create(&label((*k).to_string())).set(n);
        }
    }

    pub fn observe_http(&self, method: &str, route: &str, status: u16, took: Duration) {
        self.http_requests
            .get_or_create(&HttpLabels {
                method: method.to_string(),
                route: route.to_string(),
                status,
            })
            .inc();
        self.http_duration
            .get_or_create(&RouteLabels {
                method: method.to_string(),
                route: route.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// The text exposition, with the count gauges set from `counts` (every known
    /// value present, zero when nothing has it) and the per-disk ones from `live`.
    pub fn render(
        &self,
        counts: &MetricCounts,
        live: &[HostLive],
        stream: &crate::manager::live::LiveStats,
    ) -> String {
        // Held while the families are rewritten, so concurrent scrapes do not see one
        // another's half-cleared disk families.
        let registry = match self.registry.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        let statuses: Vec<&str> = VpgStatus::ALL.iter().map(|s| s.as_str()).collect();
        Self::set_counts(&self.vpgs, &statuses, &counts.vpg_status, |status| {
            StatusLabels { status }
        });
        let severities = [Severity::Warning.as_str(), Severity::Error.as_str()];
        Self::set_counts(
            &self.live.alerts_open,
            &severities,
            &counts.alerts_open,
            |severity| SeverityLabels { severity },
        );
        let connectivity: Vec<&str> = Connectivity::ALL.iter().map(|c| c.as_str()).collect();
        Self::set_counts(
            &self.live.hosts,
            &connectivity,
            &counts.hosts,
            |connectivity| ConnectivityLabels { connectivity },
        );
        self.set_disks(live);
        self.live
            .stream_clients
            .set(i64::try_from(stream.clients).unwrap_or(i64::MAX));
        self.live.stream_dropped.inc_by(
            stream
                .dropped
                .saturating_sub(self.live.stream_dropped.get()),
        );
        self.live
            .stream_history_bytes
            .set(i64::try_from(stream.history_bytes).unwrap_or(i64::MAX));
        let mut out = String::new();
        if encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}
