//! Rules that span entities: which VMs may form a VPG and where they may recover.
//! The caller looks the facts up (in one query each) and this module decides.

use super::settings::MemberSettings;
use super::ValidationError;
use std::collections::HashMap;

/// Where a VM lives and which VPG (if any) already protects it.
#[derive(Debug, Clone)]
pub struct VmPlacement {
    pub site_id: String,
    pub vpg_id: Option<String>,
}

/// What a VPG's membership resolves to once the rules pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// The site of every member VM, or the declared one for an empty VPG.
    pub protected_site_id: Option<String>,
}

/// Checks a whole proposed membership of VPG `vpg_id` (None while creating it).
///
/// Rules: every VM exists and is listed once; a VM belongs to at most one VPG; all
/// VMs come from one protected site (matching `declared_protected_site` if given);
/// the recovery site differs from it; each recovery host exists and lies in the
/// recovery site.
pub fn check_membership(
    vpg_id: Option<&str>,
    declared_protected_site: Option<&str>,
    recovery_site_id: &str,
    members: &[MemberSettings],
    vms: &HashMap<String, VmPlacement>,
    host_sites: &HashMap<String, String>,
) -> Result<Membership, ValidationError> {
    let mut protected = declared_protected_site.map(str::to_string);
    for (i, m) in members.iter().enumerate() {
        let at = format!("members[{i}]");
        m.validate().map_err(|e| e.under(&at))?;
        if members[..i].iter().any(|o| o.vm_id == m.vm_id) {
            return Err(ValidationError::new(
                "vpg.duplicate_member",
                format!("{at}.vm_id"),
                format!("VM {} is listed twice", m.vm_id),
            ));
        }
        let Some(vm) = vms.get(&m.vm_id) else {
            return Err(ValidationError::new(
                "vpg.unknown_vm",
                format!("{at}.vm_id"),
                format!("no VM with id {}", m.vm_id),
            ));
        };
        if let Some(other) = &vm.vpg_id {
            if Some(other.as_str()) != vpg_id {
                return Err(ValidationError::new(
                    "vpg.vm_already_protected",
                    format!("{at}.vm_id"),
                    format!("VM {} already belongs to VPG {other}", m.vm_id),
                ));
            }
        }
        match &protected {
            None => protected = Some(vm.site_id.clone()),
            Some(site) if *site != vm.site_id => {
                let code = if declared_protected_site.is_some() {
                    "vpg.vm_not_in_protected_site"
                } else {
                    "vpg.vms_span_sites"
                };
                return Err(ValidationError::new(
                    code,
                    format!("{at}.vm_id"),
                    "all VMs of a VPG must run in its one protected site",
                ));
            }
            Some(_) => {}
        }
        if let Some(host) = &m.recovery_host_id {
            match host_sites.get(host) {
                None => {
                    return Err(ValidationError::new(
                        "vpg.unknown_recovery_host",
                        format!("{at}.recovery_host_id"),
                        format!("no host with id {host}"),
                    ))
                }
                Some(site) if site != recovery_site_id => {
                    return Err(ValidationError::new(
                        "vpg.recovery_host_not_in_recovery_site",
                        format!("{at}.recovery_host_id"),
                        "the recovery host must lie in the VPG's recovery site",
                    ))
                }
                Some(_) => {}
            }
        }
    }
    if protected.as_deref() == Some(recovery_site_id) {
        return Err(ValidationError::new(
            "vpg.recovery_site_is_protected_site",
            "recovery_site_id",
            "the recovery site must differ from the protected site",
        ));
    }
    Ok(Membership {
        protected_site_id: protected,
    })
}

/// A member lacks what protection needs (the VPG then "Needs configuration").
pub fn member_needs_configuration(m: &MemberSettings) -> bool {
    m.recovery_host_id.is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(vm: &str, host: Option<&str>) -> MemberSettings {
        MemberSettings {
            recovery_host_id: host.map(Into::into),
            ..MemberSettings::for_vm(vm)
        }
    }

    fn world() -> (HashMap<String, VmPlacement>, HashMap<String, String>) {
        let vm = |site: &str, vpg: Option<&str>| VmPlacement {
            site_id: site.into(),
            vpg_id: vpg.map(Into::into),
        };
        let vms = HashMap::from([
            ("a1".to_string(), vm("A", None)),
            ("a2".to_string(), vm("A", None)),
            ("a3".to_string(), vm("A", Some("other"))),
            ("b1".to_string(), vm("B", None)),
        ]);
        let hosts = HashMap::from([
            ("ha".to_string(), "A".to_string()),
            ("hb".to_string(), "B".to_string()),
        ]);
        (vms, hosts)
    }

    #[test]
    fn table() {
        let (vms, hosts) = world();
        type Case<'a> = (
            Option<&'a str>,
            Option<&'a str>,
            &'a str,
            Vec<MemberSettings>,
            Result<Option<&'a str>, &'a str>,
        );
        let cases: Vec<Case> = vec![
            (
                None,
                None,
                "B",
                vec![member("a1", Some("hb")), member("a2", None)],
                Ok(Some("A")),
            ),
            (None, Some("A"), "B", vec![], Ok(Some("A"))),
            (None, None, "B", vec![], Ok(None)),
            (
                None,
                None,
                "B",
                vec![member("zz", None)],
                Err("vpg.unknown_vm"),
            ),
            (
                None,
                None,
                "B",
                vec![member("a1", None), member("a1", None)],
                Err("vpg.duplicate_member"),
            ),
            (
                None,
                None,
                "B",
                vec![member("a3", None)],
                Err("vpg.vm_already_protected"),
            ),
            (
                Some("other"),
                None,
                "B",
                vec![member("a3", None)],
                Ok(Some("A")),
            ),
            (
                None,
                None,
                "B",
                vec![member("a1", None), member("b1", None)],
                Err("vpg.vms_span_sites"),
            ),
            (
                None,
                Some("B"),
                "C",
                vec![member("a1", None)],
                Err("vpg.vm_not_in_protected_site"),
            ),
            (
                None,
                None,
                "A",
                vec![member("a1", None)],
                Err("vpg.recovery_site_is_protected_site"),
            ),
            (
                None,
                Some("B"),
                "B",
                vec![],
                Err("vpg.recovery_site_is_protected_site"),
            ),
            (
                None,
                None,
                "B",
                vec![member("a1", Some("nope"))],
                Err("vpg.unknown_recovery_host"),
            ),
            (
                None,
                None,
                "B",
                vec![member("a1", Some("ha"))],
                Err("vpg.recovery_host_not_in_recovery_site"),
            ),
            (
                None,
                None,
                "B",
                vec![MemberSettings {
                    boot_group: 1000,
                    ..member("a1", None)
                }],
                Err("vpg.boot_group_out_of_range"),
            ),
        ];
        for (i, (vpg, declared, recovery, members, want)) in cases.into_iter().enumerate() {
            let got = check_membership(vpg, declared, recovery, &members, &vms, &hosts);
            match want {
                Ok(site) => assert_eq!(got.unwrap().protected_site_id.as_deref(), site, "case {i}"),
                Err(code) => assert_eq!(got.unwrap_err().code, code, "case {i}"),
            }
        }
    }

    #[test]
    fn member_errors_carry_their_path() {
        let (vms, hosts) = world();
        let e = check_membership(
            None,
            None,
            "B",
            &[member("a1", None), member("b1", None)],
            &vms,
            &hosts,
        )
        .unwrap_err();
        assert_eq!(e.field, "members[1].vm_id");
        let bad = MemberSettings {
            boot_delay_secs: 99999,
            ..member("a1", None)
        };
        let e = check_membership(None, None, "B", &[bad], &vms, &hosts).unwrap_err();
        assert_eq!(e.field, "members[0].boot_delay_secs");
    }
}
