//! The desired state of every host, from configuration rows: which of its disks
//! replicate (with their VPG, recovery host, pause, priority and resync policy), which
//! recovery hosts it streams to (with each link's share of the site bandwidth limit), and
//! which protected hosts may stream to it; and, for a recovery host, what it needs to
//! bring each VPG up on its own when the manager is gone (break-glass recovery).
//!
//! Pure: the caller reads the rows, assigns versions and sends. Every host in the input
//! gets an entry, an empty one when it has nothing to do, so a host whose protection was
//! removed is told so (reconcile, never replay).

use std::collections::{BTreeMap, BTreeSet};

use crate::model::settings::{Priority, ResyncPolicy};
use crate::model::status::Lifecycle;
use crate::proto::control::{
    Boot, DesiredState, DiskProtection, PeerTarget, RecoverDisk, RecoverVm, RecoveryVpg,
    RecoveryVpgVm,
};

/// A VPG as far as the desired state cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VpgRow {
    pub id: String,
    pub name: String,
    pub lifecycle: Lifecycle,
    pub paused: bool,
    pub priority: Priority,
    pub resync: ResyncPolicy,
    pub fencing_generation: u64,
    /// A recovery operation has stopped its protection (commit in progress).
    pub protection_stopped: bool,
    pub journal_history_secs: u64,
    pub journal_hard_limit_bytes: u64,
    pub journal_warning_bytes: u64,
}

/// A disk of a member VM; `disk_id` is the agent's id, None until an agent reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRow {
    pub disk_id: Option<u64>,
    pub name: String,
}

/// A VPG member: the VM, its (protected) host and its recovery host, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRow {
    pub vpg_id: String,
    pub vm: String,
    pub protected_host: String,
    /// None: "needs configuration", nothing replicates.
    pub recovery_host: Option<String>,
    pub disks: Vec<DiskRow>,
    /// How the VM comes up at its recovery host in a live recovery.
    pub recovery: MemberRecovery,
}

/// A member's live-recovery settings, resolved (member over VPG defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberRecovery {
    pub cpus: u32,
    pub memory_mib: u64,
    pub network: Option<String>,
    pub ip_address: Option<String>,
    pub boot_group: u32,
    pub boot_delay_secs: u64,
    /// How the protected VM boots: the recovered VM boots the same way.
    pub boot: Option<Boot>,
}

/// A host, its replication listener, its site and that site's bandwidth limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRow {
    pub name: String,
    pub data_address: Option<String>,
    pub site_id: String,
    /// The site's `bandwidth_limit` (bytes/s), None = unlimited.
    pub site_bandwidth_limit: Option<u64>,
}

/// The least a link is given when a site limit is split (and the least a site limit may
/// be): below this a stream cannot keep up even with checkpoint markers and syncs' headers.
pub const MIN_BANDWIDTH_LIMIT: u64 = 64 * 1024;

/// A link's share of a site limit shared by `links` links: floor(limit / links), at least
/// [`MIN_BANDWIDTH_LIMIT`].
pub fn link_share(limit: u64, links: usize) -> u64 {
    let n = u64::try_from(links.max(1)).unwrap_or(u64::MAX);
    (limit / n).max(MIN_BANDWIDTH_LIMIT)
}

/// Why something configured does not show in any desired state (for logs).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Gap {
    /// The member has no recovery host yet.
    NoRecoveryHost { vpg_id: String, vm: String },
    /// No agent reported this disk (no disk id), so it cannot be named to an agent.
    DiskNotReported { vm: String, disk: String },
    /// The recovery host has no replication listener: not listed as a peer.
    NoDataAddress { recovery_host: String },
    /// The member's VPG is not among the VPG rows (deleted meanwhile).
    UnknownVpg { vpg_id: String },
}

/// Desired states (version 0: the caller numbers them) by host name, and the gaps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Computed {
    pub hosts: BTreeMap<String, DesiredState>,
    pub gaps: Vec<Gap>,
}

/// Whether a VPG in this lifecycle replicates. Deleting and waiting-to-be-removed VPGs
/// have left their hosts' desired state (that is how hosts learn to stop); a recovered
/// VPG has nothing left to protect.
pub fn replicates(l: Lifecycle) -> bool {
    matches!(l, Lifecycle::Creating | Lifecycle::Protecting)
}

/// See the module documentation.
pub fn desired_states(vpgs: &[VpgRow], members: &[MemberRow], hosts: &[HostRow]) -> Computed {
    let vpgs: BTreeMap<&str, &VpgRow> = vpgs.iter().map(|v| (v.id.as_str(), v)).collect();
    let addresses: BTreeMap<&str, Option<&str>> = hosts
        .iter()
        .map(|h| (h.name.as_str(), h.data_address.as_deref()))
        .collect();
    let mut out = Computed::default();
    for h in hosts {
        out.hosts.insert(h.name.clone(), DesiredState::default());
    }
    let mut peers: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut accept: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut gaps = BTreeSet::new();
    let mut break_glass: BTreeMap<(String, String), RecoveryVpg> = BTreeMap::new();
    for m in members {
        let Some(vpg) = vpgs.get(m.vpg_id.as_str()) else {
            gaps.insert(Gap::UnknownVpg {
                vpg_id: m.vpg_id.clone(),
            });
            continue;
        };
        // Fencing reaches every host of the VPG, replicating or not: a recovered VPG's
        // old primary must still learn that its generation is over.
        for host in std::iter::once(&m.protected_host).chain(m.recovery_host.as_ref()) {
            out.hosts
                .entry(host.clone())
                .or_default()
                .fencing
                .insert(vpg.id.clone(), vpg.fencing_generation);
        }
        if !replicates(vpg.lifecycle) || vpg.protection_stopped {
            continue;
        }
        let Some(recovery) = &m.recovery_host else {
            gaps.insert(Gap::NoRecoveryHost {
                vpg_id: m.vpg_id.clone(),
                vm: m.vm.clone(),
            });
            continue;
        };
        let mut any = false;
        let mut recover_disks = Vec::new();
        for d in &m.disks {
            let Some(disk_id) = d.disk_id else {
                gaps.insert(Gap::DiskNotReported {
                    vm: m.vm.clone(),
                    disk: d.name.clone(),
                });
                continue;
            };
            any = true;
            recover_disks.push(RecoverDisk {
                host: m.protected_host.clone(),
                disk_id,
                name: d.name.clone(),
            });
            out.hosts
                .entry(m.protected_host.clone())
                .or_default()
                .protect
                .push(DiskProtection {
                    disk_id,
                    disk_name: d.name.clone(),
                    vm: m.vm.clone(),
                    vpg_id: vpg.id.clone(),
                    recovery_host: recovery.clone(),
                    paused: vpg.paused,
                    priority: vpg.priority,
                    resync: vpg.resync,
                    fencing_generation: vpg.fencing_generation,
                });
        }
        if !any {
            continue;
        }
        let r = &m.recovery;
        break_glass
            .entry((recovery.clone(), vpg.id.clone()))
            .or_insert_with(|| RecoveryVpg {
                vpg_id: vpg.id.clone(),
                name: vpg.name.clone(),
                fencing_generation: vpg.fencing_generation,
                journal_history_secs: vpg.journal_history_secs,
                // Shares are set below, once every disk of the VPG is counted.
                journal_hard_limit_bytes_per_disk: 0,
                journal_warning_bytes_per_disk: 0,
                vms: Vec::new(),
            })
            .vms
            .push(RecoveryVpgVm {
                vm: RecoverVm {
                    name: m.vm.clone(),
                    source_vm: m.vm.clone(),
                    cpus: r.cpus,
                    memory_mib: r.memory_mib,
                    network: r.network.clone(),
                    ip_address: r.ip_address.clone(),
                    boot: r.boot.clone(),
                    disks: recover_disks,
                },
                boot_group: r.boot_group,
                boot_delay_secs: r.boot_delay_secs,
            });
        peers
            .entry(m.protected_host.clone())
            .or_default()
            .insert(recovery.clone());
        accept
            .entry(recovery.clone())
            .or_default()
            .insert(m.protected_host.clone());
    }
    // The links in use (the recovery host has a listener), and how many of them leave
    // each site: a site's limit is shared equally by the links from its hosts to hosts of
    // other sites. A link inside one site does not cross the WAN and is not limited.
    let site_of: BTreeMap<&str, &HostRow> = hosts.iter().map(|h| (h.name.as_str(), h)).collect();
    let leaves = |from: &str, to: &str| match (site_of.get(from), site_of.get(to)) {
        (Some(a), Some(b)) => a.site_id != b.site_id,
        // A host missing from the rows: count the link as leaving (the safe side).
        _ => true,
    };
    let mut links_per_site: BTreeMap<&str, usize> = BTreeMap::new();
    for (host, targets) in &peers {
        let Some(h) = site_of.get(host.as_str()) else {
            continue;
        };
        for t in targets {
            if addresses.get(t.as_str()).copied().flatten().is_some() && leaves(host, t) {
                *links_per_site.entry(h.site_id.as_str()).or_default() += 1;
            }
        }
    }
    for (host, targets) in &peers {
        let share = |t: &str| {
            let h = site_of.get(host.as_str())?;
            let limit = h.site_bandwidth_limit?;
            if !leaves(host, t) {
                return None;
            }
            let n = links_per_site.get(h.site_id.as_str()).copied().unwrap_or(1);
            Some(link_share(limit, n))
        };
        let d = out.hosts.entry(host.clone()).or_default();
        for t in targets {
            match addresses.get(t.as_str()).copied().flatten() {
                Some(a) => d.peers.push(PeerTarget {
                    host_name: t.clone(),
                    address: a.to_string(),
                    bandwidth_limit: share(t),
                }),
                None => {
                    gaps.insert(Gap::NoDataAddress {
                        recovery_host: t.clone(),
                    });
                }
            }
        }
    }
    for (host, from) in accept {
        out.hosts.entry(host).or_default().accept = from.into_iter().collect();
    }
    // A VPG's journal limits are shared equally by its journals, wherever they are.
    let mut disks_of: BTreeMap<String, u64> = BTreeMap::new();
    for r in break_glass.values() {
        let n: usize = r.vms.iter().map(|v| v.vm.disks.len()).sum();
        *disks_of.entry(r.vpg_id.clone()).or_default() += n as u64;
    }
    for ((host, _), mut r) in break_glass {
        if let Some(v) = vpgs.get(r.vpg_id.as_str()) {
            let n = disks_of.get(&r.vpg_id).copied().unwrap_or(1).max(1);
            r.journal_hard_limit_bytes_per_disk = v.journal_hard_limit_bytes / n;
            r.journal_warning_bytes_per_disk = v.journal_warning_bytes / n;
        }
        r.vms
            .sort_by(|a, b| (a.boot_group, &a.vm.name).cmp(&(b.boot_group, &b.vm.name)));
        out.hosts.entry(host).or_default().recovery.push(r);
    }
    for d in out.hosts.values_mut() {
        d.protect
            .sort_by(|a, b| (&a.vpg_id, &a.vm, a.disk_id).cmp(&(&b.vpg_id, &b.vm, b.disk_id)));
    }
    out.gaps = gaps.into_iter().collect();
    out
}

/// Whether two desired states ask for the same thing (versions aside).
pub fn same_content(a: &DesiredState, b: &DesiredState) -> bool {
    a.protect == b.protect
        && a.peers == b.peers
        && a.accept == b.accept
        && a.fencing == b.fencing
        && a.recovery == b.recovery
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vpg(id: &str, lifecycle: Lifecycle, paused: bool) -> VpgRow {
        VpgRow {
            id: id.into(),
            name: format!("VPG {id}"),
            lifecycle,
            paused,
            priority: Priority::High,
            resync: ResyncPolicy::Automatic,
            fencing_generation: 1,
            protection_stopped: false,
            journal_history_secs: 3600,
            journal_hard_limit_bytes: 2 << 30,
            journal_warning_bytes: 1 << 30,
        }
    }

    fn member(
        vpg: &str,
        vm: &str,
        host: &str,
        rec: Option<&str>,
        disks: &[(Option<u64>, &str)],
    ) -> MemberRow {
        MemberRow {
            vpg_id: vpg.into(),
            vm: vm.into(),
            protected_host: host.into(),
            recovery_host: rec.map(str::to_string),
            disks: disks
                .iter()
                .map(|(id, n)| DiskRow {
                    disk_id: *id,
                    name: n.to_string(),
                })
                .collect(),
            recovery: MemberRecovery {
                cpus: 2,
                memory_mib: 1024,
                boot_group: u32::from(vm.starts_with("db")),
                ..Default::default()
            },
        }
    }

    fn host(name: &str, data: Option<&str>) -> HostRow {
        HostRow {
            name: name.into(),
            data_address: data.map(str::to_string),
            site_id: if name.starts_with('p') { "ps" } else { "rs" }.into(),
            site_bandwidth_limit: None,
        }
    }

    fn hosts() -> Vec<HostRow> {
        vec![
            host("p1", Some("10.0.0.1:9701")),
            host("p2", None),
            host("r1", Some("10.9.0.1:9701")),
            host("r2", None),
        ]
    }

    /// (protected disks as (host, vm, disk_id, recovery, paused), peers as
    /// (host, target), accept as (host, from)), everything else empty.
    type Expect = (
        &'static [(&'static str, &'static str, u64, &'static str, bool)],
        &'static [(&'static str, &'static str)],
        &'static [(&'static str, &'static str)],
    );

    fn check(name: &str, vpgs: Vec<VpgRow>, members: Vec<MemberRow>, want: Expect, gaps: &[Gap]) {
        let got = desired_states(&vpgs, &members, &hosts());
        let mut protect = Vec::new();
        let mut peers = Vec::new();
        let mut accept = Vec::new();
        for (h, d) in &got.hosts {
            assert_eq!(d.version, 0, "{name}");
            for p in &d.protect {
                protect.push((
                    h.clone(),
                    p.vm.clone(),
                    p.disk_id,
                    p.recovery_host.clone(),
                    p.paused,
                ));
            }
            for p in &d.peers {
                peers.push((h.clone(), p.host_name.clone()));
            }
            for a in &d.accept {
                accept.push((h.clone(), a.clone()));
            }
        }
        let own = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        };
        let want_protect: Vec<_> = want
            .0
            .iter()
            .map(|(h, vm, id, r, p)| (h.to_string(), vm.to_string(), *id, r.to_string(), *p))
            .collect();
        assert_eq!(protect, want_protect, "{name}: protect");
        assert_eq!(peers, own(want.1), "{name}: peers");
        assert_eq!(accept, own(want.2), "{name}: accept");
        assert_eq!(got.gaps, gaps, "{name}: gaps");
        assert_eq!(got.hosts.len(), 4, "{name}: every host has an entry");
    }

    #[test]
    fn recovery_hosts_keep_what_break_glass_recovery_needs() {
        use Lifecycle::*;
        let mut vpgs = vec![vpg("v", Protecting, false), vpg("gone", Recovered, false)];
        vpgs[0].fencing_generation = 4;
        let mut web = member("v", "web", "p1", Some("r1"), &[(Some(1), "root")]);
        web.recovery.network = Some("dr-net".into());
        web.recovery.ip_address = Some("10.9.0.20/24".into());
        let kernel = Boot::Kernel {
            kernel: "/srv/guest/vmlinuz".into(),
            initrd: Some("/srv/guest/initrd".into()),
            cmdline: "console=ttyS0".into(),
        };
        web.recovery.boot = Some(kernel.clone());
        let members = vec![
            // Boot group 1 ("db…"), listed first: the order comes from the boot groups.
            member(
                "v",
                "db",
                "p2",
                Some("r1"),
                &[(Some(9), "data"), (None, "new")],
            ),
            web,
            member("v", "lonely", "p1", None, &[(Some(3), "root")]),
            member("gone", "old", "p1", Some("r1"), &[(Some(5), "root")]),
        ];
        let got = desired_states(&vpgs, &members, &hosts());
        let r1 = &got.hosts["r1"].recovery;
        assert_eq!(r1.len(), 1, "only the replicating VPG: {r1:?}");
        let v = &r1[0];
        assert_eq!((v.vpg_id.as_str(), v.name.as_str()), ("v", "VPG v"));
        assert_eq!(v.fencing_generation, 4);
        assert_eq!(v.journal_history_secs, 3600);
        // Two journals share the VPG's limits (an unreported disk has none).
        assert_eq!(v.journal_hard_limit_bytes_per_disk, 1 << 30);
        assert_eq!(v.journal_warning_bytes_per_disk, 1 << 29);
        let names: Vec<(&str, u32)> = v
            .vms
            .iter()
            .map(|m| (m.vm.name.as_str(), m.boot_group))
            .collect();
        assert_eq!(names, vec![("web", 0), ("db", 1)]);
        assert_eq!(v.vms[0].vm.network.as_deref(), Some("dr-net"));
        assert_eq!(v.vms[0].vm.ip_address.as_deref(), Some("10.9.0.20/24"));
        assert_eq!(
            v.vms[0].vm.boot.as_ref(),
            Some(&kernel),
            "the recovered VM boots as the protected one"
        );
        assert_eq!(v.vms[1].vm.boot, None, "a simulated VM has no boot");
        assert_eq!(
            v.vms[1].vm.disks,
            vec![RecoverDisk {
                host: "p2".into(),
                disk_id: 9,
                name: "data".into()
            }],
            "an unreported disk has no journal to recover from"
        );
        assert!(got.hosts["p1"].recovery.is_empty());
        let mut other = got.hosts["r1"].clone();
        other.recovery[0].vms[0].boot_delay_secs = 30;
        assert!(!same_content(&got.hosts["r1"], &other));
        let mut other = got.hosts["r1"].clone();
        other.recovery[0].vms[0].vm.boot = Some(Boot::Firmware);
        assert!(
            !same_content(&got.hosts["r1"], &other),
            "a change of boot is a new desired state"
        );
    }

    #[test]
    fn table() {
        use Lifecycle::*;
        let two_disks = [(Some(1), "root"), (Some(2), "data")];
        check(
            "protecting member: both disks, peer with address, accept on recovery",
            vec![vpg("v", Protecting, false)],
            vec![member("v", "web", "p1", Some("r1"), &two_disks)],
            (
                &[("p1", "web", 1, "r1", false), ("p1", "web", 2, "r1", false)],
                &[("p1", "r1")],
                &[("r1", "p1")],
            ),
            &[],
        );
        check(
            "creating replicates too; pause is carried",
            vec![vpg("v", Creating, true)],
            vec![member("v", "web", "p1", Some("r1"), &[(Some(7), "root")])],
            (
                &[("p1", "web", 7, "r1", true)],
                &[("p1", "r1")],
                &[("r1", "p1")],
            ),
            &[],
        );
        for l in [Deleting, WaitingRemoval, Recovered] {
            check(
                &format!("{l:?}: nothing anywhere"),
                vec![vpg("v", l, false)],
                vec![member("v", "web", "p1", Some("r1"), &two_disks)],
                (&[], &[], &[]),
                &[],
            );
        }
        check(
            "no recovery host: skipped (needs configuration)",
            vec![vpg("v", Protecting, false)],
            vec![member("v", "web", "p1", None, &two_disks)],
            (&[], &[], &[]),
            &[Gap::NoRecoveryHost {
                vpg_id: "v".into(),
                vm: "web".into(),
            }],
        );
        check(
            "disk without id skipped, the other replicates",
            vec![vpg("v", Protecting, false)],
            vec![member(
                "v",
                "web",
                "p1",
                Some("r1"),
                &[(None, "root"), (Some(2), "data")],
            )],
            (
                &[("p1", "web", 2, "r1", false)],
                &[("p1", "r1")],
                &[("r1", "p1")],
            ),
            &[Gap::DiskNotReported {
                vm: "web".into(),
                disk: "root".into(),
            }],
        );
        check(
            "no reported disk at all: no peer, no accept",
            vec![vpg("v", Protecting, false)],
            vec![member("v", "web", "p1", Some("r1"), &[(None, "root")])],
            (&[], &[], &[]),
            &[Gap::DiskNotReported {
                vm: "web".into(),
                disk: "root".into(),
            }],
        );
        check(
            "recovery host without data address: protected, accepted, no peer",
            vec![vpg("v", Protecting, false)],
            vec![member("v", "web", "p1", Some("r2"), &[(Some(1), "root")])],
            (&[("p1", "web", 1, "r2", false)], &[], &[("r2", "p1")]),
            &[Gap::NoDataAddress {
                recovery_host: "r2".into(),
            }],
        );
        check(
            "two protected hosts into one recovery host, two VPGs; peers deduplicated",
            vec![vpg("a", Protecting, false), vpg("b", Protecting, true)],
            vec![
                member("a", "web", "p1", Some("r1"), &[(Some(1), "root")]),
                member("a", "db", "p1", Some("r1"), &[(Some(3), "root")]),
                member("b", "app", "p2", Some("r1"), &[(Some(1), "root")]),
            ],
            (
                &[
                    ("p1", "db", 3, "r1", false),
                    ("p1", "web", 1, "r1", false),
                    ("p2", "app", 1, "r1", true),
                ],
                &[("p1", "r1"), ("p2", "r1")],
                &[("r1", "p1"), ("r1", "p2")],
            ),
            &[],
        );
        check(
            "member of an unknown VPG is ignored",
            vec![],
            vec![member("gone", "web", "p1", Some("r1"), &two_disks)],
            (&[], &[], &[]),
            &[Gap::UnknownVpg {
                vpg_id: "gone".into(),
            }],
        );
    }

    /// Peers' limits as (protected host, recovery host, limit), for hosts p1, p2 at site
    /// "ps" (limit `ps`), r1, r2 at "rs" (limit `rs`), and r3 at "ps" (same site as p*).
    fn limits(
        ps: Option<u64>,
        rs: Option<u64>,
        members: &[MemberRow],
    ) -> Vec<(String, String, Option<u64>)> {
        let hosts: Vec<HostRow> = [
            ("p1", "ps"),
            ("p2", "ps"),
            ("r1", "rs"),
            ("r2", "rs"),
            ("r3", "ps"),
        ]
        .iter()
        .map(|(n, site)| HostRow {
            name: n.to_string(),
            data_address: Some(format!("{n}:9701")),
            site_id: site.to_string(),
            site_bandwidth_limit: if *site == "ps" { ps } else { rs },
        })
        .collect();
        let vpgs = [vpg("v", Lifecycle::Protecting, false)];
        let got = desired_states(&vpgs, members, &hosts);
        let mut out = Vec::new();
        for (h, d) in &got.hosts {
            for p in &d.peers {
                out.push((h.clone(), p.host_name.clone(), p.bandwidth_limit));
            }
        }
        out
    }

    #[test]
    fn site_bandwidth_limit_is_split_among_the_links_leaving_the_site() {
        const K: u64 = 1024;
        let m = |vm: &str, h: &str, r: &str, id: u64| {
            member("v", vm, h, Some(r), &[(Some(id), "root")])
        };
        let own = |v: &[(&str, &str, Option<u64>)]| {
            v.iter()
                .map(|(a, b, l)| (a.to_string(), b.to_string(), *l))
                .collect::<Vec<_>>()
        };
        type Case = (
            &'static str,
            Option<u64>,
            Vec<MemberRow>,
            Vec<(&'static str, &'static str, Option<u64>)>,
        );
        let cases: Vec<Case> = vec![
            (
                "no limit: unlimited",
                None,
                vec![m("a", "p1", "r1", 1)],
                vec![("p1", "r1", None)],
            ),
            (
                "one link gets it all",
                Some(1000 * K),
                vec![m("a", "p1", "r1", 1)],
                vec![("p1", "r1", Some(1000 * K))],
            ),
            (
                "one link, two VMs on it: still one link",
                Some(1000 * K),
                vec![m("a", "p1", "r1", 1), m("b", "p1", "r1", 2)],
                vec![("p1", "r1", Some(1000 * K))],
            ),
            (
                "two hosts x one peer: halves",
                Some(1000 * K),
                vec![m("a", "p1", "r1", 1), m("b", "p2", "r1", 2)],
                vec![("p1", "r1", Some(500 * K)), ("p2", "r1", Some(500 * K))],
            ),
            (
                "one host x two peers: halves",
                Some(1000 * K),
                vec![m("a", "p1", "r1", 1), m("b", "p1", "r2", 2)],
                vec![("p1", "r1", Some(500 * K)), ("p1", "r2", Some(500 * K))],
            ),
            (
                "three links: floor of the third",
                Some(1000),
                vec![
                    m("a", "p1", "r1", 1),
                    m("b", "p1", "r2", 2),
                    m("c", "p2", "r1", 3),
                ],
                vec![
                    ("p1", "r1", Some(MIN_BANDWIDTH_LIMIT)),
                    ("p1", "r2", Some(MIN_BANDWIDTH_LIMIT)),
                    ("p2", "r1", Some(MIN_BANDWIDTH_LIMIT)),
                ],
            ),
            (
                "floor(L/N) exactly",
                Some(1_000_001),
                vec![
                    m("a", "p1", "r1", 1),
                    m("b", "p1", "r2", 2),
                    m("c", "p2", "r1", 3),
                ],
                vec![
                    ("p1", "r1", Some(333_333)),
                    ("p1", "r2", Some(333_333)),
                    ("p2", "r1", Some(333_333)),
                ],
            ),
            (
                "share never below 64 KiB/s",
                Some(100 * K),
                vec![m("a", "p1", "r1", 1), m("b", "p2", "r1", 2)],
                vec![("p1", "r1", Some(64 * K)), ("p2", "r1", Some(64 * K))],
            ),
            (
                "a link inside the site is neither limited nor counted",
                Some(1000 * K),
                vec![m("a", "p1", "r1", 1), m("b", "p1", "r3", 2)],
                vec![("p1", "r1", Some(1000 * K)), ("p1", "r3", None)],
            ),
        ];
        for (name, limit, members, want) in cases {
            assert_eq!(limits(limit, None, &members), own(&want), "{name}");
        }
        // The recovery site's limit does not bear on links into it.
        assert_eq!(
            limits(None, Some(100 * K), &[m("a", "p1", "r1", 1)]),
            own(&[("p1", "r1", None)]),
            "recovery site limit"
        );
        // A limit change changes the desired state's content (so it is sent again).
        let ms = [m("a", "p1", "r1", 1), m("b", "p2", "r1", 2)];
        let hosts = |l: Option<u64>| -> Vec<HostRow> {
            ["p1", "p2", "r1"]
                .iter()
                .map(|n| HostRow {
                    name: n.to_string(),
                    data_address: Some(format!("{n}:9701")),
                    site_id: if n.starts_with('p') { "ps" } else { "rs" }.into(),
                    site_bandwidth_limit: if n.starts_with('p') { l } else { None },
                })
                .collect()
        };
        let vpgs = [vpg("v", Lifecycle::Protecting, false)];
        let a = desired_states(&vpgs, &ms, &hosts(Some(1000 * K)));
        let b = desired_states(&vpgs, &ms, &hosts(Some(2000 * K)));
        let c = desired_states(&vpgs, &ms, &hosts(None));
        assert_eq!(a.hosts["p1"].peers[0].bandwidth_limit, Some(500 * K));
        assert_eq!(b.hosts["p1"].peers[0].bandwidth_limit, Some(1000 * K));
        assert_eq!(c.hosts["p1"].peers[0].bandwidth_limit, None);
        assert!(!same_content(&a.hosts["p1"], &b.hosts["p1"]));
        assert!(!same_content(&b.hosts["p1"], &c.hosts["p1"]));
        assert!(
            same_content(&a.hosts["r1"], &b.hosts["r1"]),
            "recovery side unchanged"
        );
    }

    #[test]
    fn settings_are_carried_and_content_compares_without_version() {
        let mut v = vpg("v", Lifecycle::Protecting, false);
        v.priority = Priority::Low;
        v.resync = ResyncPolicy::Manual;
        let got = desired_states(
            &[v],
            &[member("v", "web", "p1", Some("r1"), &[(Some(1), "root")])],
            &hosts(),
        );
        let p1 = &got.hosts["p1"];
        assert_eq!(p1.protect[0].priority, Priority::Low);
        assert_eq!(p1.protect[0].resync, ResyncPolicy::Manual);
        assert_eq!(p1.protect[0].disk_name, "root");
        assert_eq!(p1.protect[0].vpg_id, "v");
        assert_eq!(p1.peers[0].address, "10.9.0.1:9701");
        let mut bumped = p1.clone();
        bumped.version = 9;
        assert!(same_content(p1, &bumped));
        assert!(!same_content(p1, &got.hosts["p2"]));
    }
}
