//! VPG settings and per-member recovery settings: defaults the market expects, the
//! validation rules with their stable codes, and patching (a PATCH body is a
//! [`VpgSettingsPatch`] applied onto the current settings, then validated whole).

use super::ValidationError;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use utoipa::ToSchema;

pub const MIN_RPO_SECS: u32 = 10;
pub const MAX_RPO_SECS: u32 = 24 * 3600;
pub const MIN_HISTORY_SECS: u32 = 3600;
pub const MAX_HISTORY_SECS: u32 = 30 * 24 * 3600;
pub const MIN_JOURNAL_BYTES: u64 = 64 << 20;
pub const MIN_CHECKPOINT_INTERVAL_MS: u32 = 1000;
pub const MAX_CHECKPOINT_INTERVAL_MS: u32 = 3600 * 1000;
pub const MAX_TEST_REMINDER_DAYS: u32 = 3650;
pub const MAX_BOOT_GROUP: u32 = 100;
pub const MAX_BOOT_DELAY_SECS: u32 = 3600;
pub const MAX_NETWORK_MAPPINGS: usize = 1000;

/// Replication priority between VPGs that share links and sync bandwidth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    High,
    Medium,
    Low,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Medium, Priority::Low];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Medium => "medium",
            Priority::Low => "low",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }

    pub fn description(self) -> &'static str {
        match self {
            Priority::High => "served first when links or sync bandwidth are short",
            Priority::Medium => "the default share of links and sync bandwidth",
            Priority::Low => "served last when links or sync bandwidth are short",
        }
    }
}

/// A time of day, minutes after midnight, written "HH:MM" in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, example = "22:00")]
pub struct TimeOfDay(u16);

impl TimeOfDay {
    pub fn from_minutes(m: u16) -> Option<Self> {
        (m < 24 * 60).then_some(Self(m))
    }

    pub fn minutes(self) -> u16 {
        self.0
    }

    pub fn parse(s: &str) -> Option<Self> {
        let (h, m) = s.split_once(':')?;
        if h.len() != 2 || m.len() != 2 {
            return None;
        }
        let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
        (h < 24 && m < 60).then_some(Self(h * 60 + m))
    }
}

impl TryFrom<String> for TimeOfDay {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s).ok_or_else(|| format!("`{s}` is not a time of day HH:MM"))
    }
}

impl From<TimeOfDay> for String {
    fn from(t: TimeOfDay) -> String {
        format!("{:02}:{:02}", t.0 / 60, t.0 % 60)
    }
}

/// When a sync that protection needs may start (Hyper-V's resynchronisation choice).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResyncPolicy {
    /// Start as soon as the need is found.
    Automatic,
    /// Wait ("Resynchronization required") until an operator resumes it.
    Manual,
    /// Start only inside a daily off-peak window; `end` before `start` spans midnight.
    Window { start: TimeOfDay, end: TimeOfDay },
}

impl ResyncPolicy {
    /// Whether a sync may start at `minute` (minutes after midnight, in the manager's
    /// configured zone). Manual never starts by itself.
    pub fn allows_start_at(self, minute: u16) -> bool {
        match self {
            ResyncPolicy::Automatic => true,
            ResyncPolicy::Manual => false,
            ResyncPolicy::Window { start, end } => {
                let (s, e) = (start.minutes(), end.minutes());
                if s <= e {
                    (s..e).contains(&minute)
                } else {
                    minute >= s || minute < e
                }
            }
        }
    }
}

/// VPG-wide rule: addresses in `from` are recovered into `to`, keeping the host part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkMapping {
    #[schema(example = "10.1.0.0/16")]
    pub from: String,
    #[schema(example = "10.201.0.0/16")]
    pub to: String,
}

/// A parsed CIDR block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Self> {
        let (a, p) = s.split_once('/')?;
        let addr: IpAddr = a.parse().ok()?;
        let prefix: u8 = p.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Self { addr, prefix })
    }

    fn bits(addr: IpAddr) -> (u128, u8) {
        match addr {
            IpAddr::V4(a) => (u32::from(a) as u128, 32),
            IpAddr::V6(a) => (u128::from(a), 128),
        }
    }

    fn mask(&self) -> u128 {
        let (_, width) = Self::bits(self.addr);
        let host_bits = u32::from(width - self.prefix);
        let all = if width == 32 {
            u32::MAX as u128
        } else {
            u128::MAX
        };
        if host_bits >= 128 {
            0
        } else {
            all & !((1u128 << host_bits) - 1)
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        if self.addr.is_ipv4() != ip.is_ipv4() {
            return false;
        }
        let m = self.mask();
        Self::bits(ip).0 & m == Self::bits(self.addr).0 & m
    }
}

/// The recovered address of `ip` under the first mapping whose `from` contains it.
/// Mappings are validated first, so unparsable entries are skipped here.
pub fn map_address(ip: IpAddr, mappings: &[NetworkMapping]) -> Option<IpAddr> {
    mappings.iter().find_map(|m| {
        let (from, to) = (Cidr::parse(&m.from)?, Cidr::parse(&m.to)?);
        if !from.contains(ip) || from.prefix != to.prefix {
            return None;
        }
        let mask = from.mask();
        let (bits, width) = Cidr::bits(ip);
        let mapped = (Cidr::bits(to.addr).0 & mask) | (bits & !mask);
        Some(match width {
            32 => IpAddr::V4((mapped as u32).into()),
            _ => IpAddr::V6(mapped.into()),
        })
    })
}

/// Settings of a VPG. Every field has the market's default, so `{}` is valid input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct VpgSettings {
    /// Alert when the newest recoverable checkpoint is older than this.
    #[schema(minimum = 10, maximum = 86400, example = 300)]
    pub rpo_target_secs: u32,
    /// How far back recovery must be possible (1 h … 30 days).
    #[schema(minimum = 3600, maximum = 2592000, example = 86400)]
    pub journal_history_secs: u32,
    /// The journal never grows past this; promotion is forced early instead.
    pub journal_hard_limit_bytes: u64,
    /// An alert is raised when the journal passes this (must be below the hard limit).
    pub journal_warning_bytes: u64,
    /// How often a crash-consistent checkpoint is taken across the VPG.
    #[schema(minimum = 1000, example = 5000)]
    pub checkpoint_interval_ms: u32,
    /// Compress replication traffic.
    pub compression: bool,
    pub priority: Priority,
    /// Remind (alert) when no failover test ran for this long; 0 turns it off.
    pub test_reminder_days: u32,
    pub resync_policy: ResyncPolicy,
    /// Network recovered VMs join on failover and move, unless a member overrides it.
    pub failover_network: Option<String>,
    /// Network recovered VMs join in a failover test, unless a member overrides it.
    pub test_network: Option<String>,
    /// Re-IP rules applied to every NIC that has no explicit re-IP of its own.
    pub network_mappings: Vec<NetworkMapping>,
}

pub const DEFAULT_JOURNAL_HARD_LIMIT_BYTES: u64 = 150_000_000_000;

impl Default for VpgSettings {
    fn default() -> Self {
        Self {
            rpo_target_secs: 300,
            journal_history_secs: 24 * 3600,
            journal_hard_limit_bytes: DEFAULT_JOURNAL_HARD_LIMIT_BYTES,
            journal_warning_bytes: DEFAULT_JOURNAL_HARD_LIMIT_BYTES / 4 * 3,
            checkpoint_interval_ms: 5000,
            compression: true,
            priority: Priority::Medium,
            test_reminder_days: 180,
            resync_policy: ResyncPolicy::Automatic,
            failover_network: None,
            test_network: None,
            network_mappings: Vec::new(),
        }
    }
}

fn field_err(code: &'static str, field: &str, msg: String) -> ValidationError {
    ValidationError::new(code, format!("settings.{field}"), msg)
}

fn check_network_name(field: &str, v: &Option<String>) -> Result<(), ValidationError> {
    match v {
        Some(n) if n.trim().is_empty() || n.len() > 128 || n.chars().any(char::is_control) => {
            Err(ValidationError::new(
                "vpg.network_name_invalid",
                field,
                "a network name must be 1 to 128 printable characters",
            ))
        }
        _ => Ok(()),
    }
}

impl VpgSettings {
    /// Checks every rule; the first broken one is returned.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if !(MIN_RPO_SECS..=MAX_RPO_SECS).contains(&self.rpo_target_secs) {
            return Err(field_err(
                "vpg.rpo_target_out_of_range",
                "rpo_target_secs",
                format!("RPO target must be between {MIN_RPO_SECS} s and {MAX_RPO_SECS} s"),
            ));
        }
        if !(MIN_HISTORY_SECS..=MAX_HISTORY_SECS).contains(&self.journal_history_secs) {
            return Err(field_err(
                "vpg.journal_history_out_of_range",
                "journal_history_secs",
                "journal history must be between 1 hour and 30 days".into(),
            ));
        }
        if self.journal_hard_limit_bytes < MIN_JOURNAL_BYTES {
            return Err(field_err(
                "vpg.journal_hard_limit_too_small",
                "journal_hard_limit_bytes",
                format!(
                    "journal hard limit must be at least {} ({MIN_JOURNAL_BYTES} bytes)",
                    super::units::Bytes(MIN_JOURNAL_BYTES)
                ),
            ));
        }
        if self.journal_warning_bytes == 0
            || self.journal_warning_bytes >= self.journal_hard_limit_bytes
        {
            return Err(field_err(
                "vpg.journal_warning_not_below_hard_limit",
                "journal_warning_bytes",
                "journal warning threshold must be above zero and below the hard limit".into(),
            ));
        }
        if !(MIN_CHECKPOINT_INTERVAL_MS..=MAX_CHECKPOINT_INTERVAL_MS)
            .contains(&self.checkpoint_interval_ms)
        {
            return Err(field_err(
                "vpg.checkpoint_interval_out_of_range",
                "checkpoint_interval_ms",
                "checkpoint interval must be between 1 s and 1 hour".into(),
            ));
        }
        if u64::from(self.checkpoint_interval_ms) >= u64::from(self.rpo_target_secs) * 1000 {
            return Err(field_err(
                "vpg.checkpoint_interval_not_below_rpo",
                "checkpoint_interval_ms",
                "checkpoint interval must be shorter than the RPO target".into(),
            ));
        }
        if self.test_reminder_days > MAX_TEST_REMINDER_DAYS {
            return Err(field_err(
                "vpg.test_reminder_out_of_range",
                "test_reminder_days",
                format!("test reminder must be 0 (off) to {MAX_TEST_REMINDER_DAYS} days"),
            ));
        }
        if let ResyncPolicy::Window { start, end } = self.resync_policy {
            if start == end {
                return Err(field_err(
                    "vpg.resync_window_empty",
                    "resync_policy",
                    "resync window start and end must differ".into(),
                ));
            }
        }
        check_network_name("settings.failover_network", &self.failover_network)?;
        check_network_name("settings.test_network", &self.test_network)?;
        if self.network_mappings.len() > MAX_NETWORK_MAPPINGS {
            return Err(field_err(
                "vpg.too_many_network_mappings",
                "network_mappings",
                format!("at most {MAX_NETWORK_MAPPINGS} network mappings"),
            ));
        }
        let mut seen = Vec::with_capacity(self.network_mappings.len());
        for (i, m) in self.network_mappings.iter().enumerate() {
            let field = format!("network_mappings[{i}]");
            let (Some(from), Some(to)) = (Cidr::parse(&m.from), Cidr::parse(&m.to)) else {
                return Err(field_err(
                    "vpg.network_mapping_invalid",
                    &field,
                    "from and to must be CIDR blocks such as 10.1.0.0/16".into(),
                ));
            };
            if from.addr.is_ipv4() != to.addr.is_ipv4() || from.prefix != to.prefix {
                return Err(field_err(
                    "vpg.network_mapping_invalid",
                    &field,
                    "from and to must be of the same family and prefix length".into(),
                ));
            }
            if seen
                .iter()
                .any(|s: &Cidr| s.contains(from.addr) || from.contains(s.addr))
            {
                return Err(field_err(
                    "vpg.network_mapping_overlap",
                    &field,
                    "source blocks of network mappings must not overlap".into(),
                ));
            }
            seen.push(from);
        }
        Ok(())
    }

    pub fn apply(&mut self, p: VpgSettingsPatch) {
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = p.$f { self.$f = v; } )* };
        }
        set!(
            rpo_target_secs,
            journal_history_secs,
            journal_hard_limit_bytes,
            journal_warning_bytes,
            checkpoint_interval_ms,
            compression,
            priority,
            test_reminder_days,
            resync_policy,
            failover_network,
            test_network,
            network_mappings
        );
    }
}

/// A partial update of [`VpgSettings`]: absent fields keep their value; for the two
/// optional network names, `null` clears the value.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct VpgSettingsPatch {
    pub rpo_target_secs: Option<u32>,
    pub journal_history_secs: Option<u32>,
    pub journal_hard_limit_bytes: Option<u64>,
    pub journal_warning_bytes: Option<u64>,
    pub checkpoint_interval_ms: Option<u32>,
    pub compression: Option<bool>,
    pub priority: Option<Priority>,
    pub test_reminder_days: Option<u32>,
    pub resync_policy: Option<ResyncPolicy>,
    #[serde(deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub failover_network: Option<Option<String>>,
    #[serde(deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub test_network: Option<Option<String>>,
    pub network_mappings: Option<Vec<NetworkMapping>>,
}

/// `absent` → None, `null` → Some(None), value → Some(Some(v)).
fn double_option<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// An explicit address for one NIC of a recovered VM (overrides network mappings).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReIp {
    #[schema(example = "10.201.4.20")]
    pub address: String,
    #[schema(example = 24)]
    pub prefix: u8,
    pub gateway: Option<String>,
    #[serde(default)]
    pub dns: Vec<String>,
}

/// Recovery settings of one NIC of a member VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NicSettings {
    /// The NIC's name in the VM's inventory (e.g. `eth0`).
    pub nic: String,
    #[serde(default)]
    pub failover_network: Option<String>,
    #[serde(default)]
    pub test_network: Option<String>,
    #[serde(default)]
    pub reip: Option<ReIp>,
}

/// Per-VM recovery settings inside a VPG.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberSettings {
    pub vm_id: String,
    /// Host at the recovery site that receives and recovers this VM. Without it the
    /// VPG "Needs configuration".
    #[serde(default)]
    pub recovery_host_id: Option<String>,
    /// Where the recovery host keeps this VM's journal and replica disks; the host's
    /// default storage when absent.
    #[serde(default)]
    pub recovery_storage_path: Option<String>,
    /// VMs start group by group, lowest first.
    #[serde(default)]
    pub boot_group: u32,
    /// Wait this long after this VM's group started before starting the next group.
    #[serde(default)]
    pub boot_delay_secs: u32,
    #[serde(default)]
    pub failover_network: Option<String>,
    #[serde(default)]
    pub test_network: Option<String>,
    #[serde(default)]
    pub nics: Vec<NicSettings>,
}

fn check_ip(field: &str, s: &str) -> Result<IpAddr, ValidationError> {
    s.parse().map_err(|_| {
        ValidationError::new(
            "vpg.reip_invalid",
            field,
            format!("`{s}` is not an IP address"),
        )
    })
}

impl ReIp {
    pub fn validate(&self) -> Result<(), ValidationError> {
        let addr = check_ip("address", &self.address)?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if self.prefix == 0 || self.prefix > max {
            return Err(ValidationError::new(
                "vpg.reip_invalid",
                "prefix",
                format!("prefix must be 1 to {max}"),
            ));
        }
        if let Some(gw) = &self.gateway {
            let gw = check_ip("gateway", gw)?;
            let net = Cidr {
                addr,
                prefix: self.prefix,
            };
            if !net.contains(gw) {
                return Err(ValidationError::new(
                    "vpg.reip_gateway_outside_subnet",
                    "gateway",
                    "gateway must lie in the address's subnet",
                ));
            }
        }
        for (i, d) in self.dns.iter().enumerate() {
            check_ip(&format!("dns[{i}]"), d)?;
        }
        Ok(())
    }
}

impl MemberSettings {
    /// A member with nothing but its VM set (every other setting at its default).
    pub fn for_vm(vm_id: impl Into<String>) -> Self {
        Self {
            vm_id: vm_id.into(),
            recovery_host_id: None,
            recovery_storage_path: None,
            boot_group: 0,
            boot_delay_secs: 0,
            failover_network: None,
            test_network: None,
            nics: vec![],
        }
    }

    /// Rules local to one member; cross-entity rules live in [`super::membership`].
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.boot_group > MAX_BOOT_GROUP {
            return Err(ValidationError::new(
                "vpg.boot_group_out_of_range",
                "boot_group",
                format!("boot group must be 0 to {MAX_BOOT_GROUP}"),
            ));
        }
        if self.boot_delay_secs > MAX_BOOT_DELAY_SECS {
            return Err(ValidationError::new(
                "vpg.boot_delay_out_of_range",
                "boot_delay_secs",
                format!("boot delay must be 0 to {MAX_BOOT_DELAY_SECS} s"),
            ));
        }
        if let Some(p) = &self.recovery_storage_path {
            if p.trim().is_empty() || p.contains('\0') {
                return Err(ValidationError::new(
                    "vpg.recovery_storage_path_invalid",
                    "recovery_storage_path",
                    "recovery storage path must be a non-empty path",
                ));
            }
        }
        check_network_name("failover_network", &self.failover_network)?;
        check_network_name("test_network", &self.test_network)?;
        for (i, nic) in self.nics.iter().enumerate() {
            let at = format!("nics[{i}]");
            if self.nics[..i].iter().any(|n| n.nic == nic.nic) {
                return Err(ValidationError::new(
                    "vpg.duplicate_nic",
                    at,
                    format!("NIC `{}` is listed twice", nic.nic),
                ));
            }
            check_network_name("failover_network", &nic.failover_network)
                .and_then(|_| check_network_name("test_network", &nic.test_network))
                .and_then(|_| {
                    nic.reip
                        .as_ref()
                        .map_or(Ok(()), |r| r.validate().map_err(|e| e.under("reip")))
                })
                .map_err(|e| e.under(&at))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_market_defaults_and_valid() {
        let s = VpgSettings::default();
        assert_eq!(s.rpo_target_secs, 300);
        assert_eq!(s.journal_history_secs, 86400);
        assert_eq!(s.journal_hard_limit_bytes, 150_000_000_000);
        assert_eq!(s.journal_warning_bytes, 112_500_000_000);
        assert_eq!(s.test_reminder_days, 180);
        assert_eq!(s.priority, Priority::Medium);
        assert!(s.compression);
        s.validate().unwrap();
        let parsed: VpgSettings = serde_json::from_str("{}").unwrap();
        assert_eq!(parsed, s);
    }

    #[test]
    fn each_rule_has_its_code() {
        type Mutate = Box<dyn Fn(&mut VpgSettings)>;
        let cases: Vec<(&str, Mutate)> = vec![
            (
                "vpg.rpo_target_out_of_range",
                Box::new(|s| s.rpo_target_secs = 9),
            ),
            (
                "vpg.rpo_target_out_of_range",
                Box::new(|s| s.rpo_target_secs = 86401),
            ),
            (
                "vpg.journal_history_out_of_range",
                Box::new(|s| s.journal_history_secs = 3599),
            ),
            (
                "vpg.journal_history_out_of_range",
                Box::new(|s| s.journal_history_secs = 30 * 86400 + 1),
            ),
            (
                "vpg.journal_hard_limit_too_small",
                Box::new(|s| s.journal_hard_limit_bytes = 1000),
            ),
            (
                "vpg.journal_warning_not_below_hard_limit",
                Box::new(|s| s.journal_warning_bytes = s.journal_hard_limit_bytes),
            ),
            (
                "vpg.journal_warning_not_below_hard_limit",
                Box::new(|s| s.journal_warning_bytes = 0),
            ),
            (
                "vpg.checkpoint_interval_out_of_range",
                Box::new(|s| s.checkpoint_interval_ms = 999),
            ),
            (
                "vpg.checkpoint_interval_not_below_rpo",
                Box::new(|s| {
                    s.rpo_target_secs = 10;
                    s.checkpoint_interval_ms = 10_000
                }),
            ),
            (
                "vpg.test_reminder_out_of_range",
                Box::new(|s| s.test_reminder_days = 4000),
            ),
            (
                "vpg.resync_window_empty",
                Box::new(|s| {
                    s.resync_policy = ResyncPolicy::Window {
                        start: TimeOfDay(60),
                        end: TimeOfDay(60),
                    }
                }),
            ),
            (
                "vpg.network_name_invalid",
                Box::new(|s| s.test_network = Some(" ".into())),
            ),
            (
                "vpg.network_mapping_invalid",
                Box::new(|s| {
                    s.network_mappings = vec![NetworkMapping {
                        from: "10.0.0.0/33".into(),
                        to: "10.1.0.0/16".into(),
                    }]
                }),
            ),
            (
                "vpg.network_mapping_invalid",
                Box::new(|s| {
                    s.network_mappings = vec![NetworkMapping {
                        from: "10.0.0.0/16".into(),
                        to: "10.1.0.0/24".into(),
                    }]
                }),
            ),
            (
                "vpg.network_mapping_invalid",
                Box::new(|s| {
                    s.network_mappings = vec![NetworkMapping {
                        from: "10.0.0.0/16".into(),
                        to: "fd00::/16".into(),
                    }]
                }),
            ),
            (
                "vpg.network_mapping_overlap",
                Box::new(|s| {
                    s.network_mappings = vec![
                        NetworkMapping {
                            from: "10.0.0.0/16".into(),
                            to: "10.1.0.0/16".into(),
                        },
                        NetworkMapping {
                            from: "10.0.5.0/24".into(),
                            to: "10.2.5.0/24".into(),
                        },
                    ]
                }),
            ),
        ];
        for (code, mutate) in cases {
            let mut s = VpgSettings::default();
            mutate(&mut s);
            assert_eq!(s.validate().unwrap_err().code, code, "{s:?}");
        }
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_rejected() {
        assert!(serde_json::from_str::<VpgSettings>(r#"{"rpo":5}"#).is_err());
        assert!(serde_json::from_str::<VpgSettings>(r#"{"rpo_target_secs":"5"}"#).is_err());
        assert!(serde_json::from_str::<VpgSettings>(r#"{"priority":"urgent"}"#).is_err());
        assert!(serde_json::from_str::<VpgSettings>(
            r#"{"resync_policy":{"mode":"window","start":"25:00","end":"06:00"}}"#
        )
        .is_err());
    }

    #[test]
    fn patch_changes_only_what_it_names_and_null_clears() {
        let mut s = VpgSettings {
            test_network: Some("lab".into()),
            ..Default::default()
        };
        let p: VpgSettingsPatch =
            serde_json::from_str(r#"{"rpo_target_secs":60,"test_network":null}"#).unwrap();
        s.apply(p);
        assert_eq!(s.rpo_target_secs, 60);
        assert_eq!(s.test_network, None);
        assert_eq!(s.journal_history_secs, 86400);
        let p: VpgSettingsPatch = serde_json::from_str(r#"{"compression":false}"#).unwrap();
        s.apply(p);
        assert!(!s.compression);
        assert_eq!(s.rpo_target_secs, 60);
    }

    #[test]
    fn resync_window_spans_midnight() {
        let w = ResyncPolicy::Window {
            start: TimeOfDay::parse("22:00").unwrap(),
            end: TimeOfDay::parse("06:00").unwrap(),
        };
        assert!(w.allows_start_at(22 * 60));
        assert!(w.allows_start_at(23 * 60 + 59));
        assert!(w.allows_start_at(0));
        assert!(w.allows_start_at(5 * 60 + 59));
        assert!(!w.allows_start_at(6 * 60));
        assert!(!w.allows_start_at(12 * 60));
        let day = ResyncPolicy::Window {
            start: TimeOfDay::parse("01:00").unwrap(),
            end: TimeOfDay::parse("03:30").unwrap(),
        };
        assert!(day.allows_start_at(60) && day.allows_start_at(209));
        assert!(!day.allows_start_at(210) && !day.allows_start_at(59));
        assert!(ResyncPolicy::Automatic.allows_start_at(700));
        assert!(!ResyncPolicy::Manual.allows_start_at(700));
        assert_eq!(String::from(TimeOfDay::parse("07:05").unwrap()), "07:05");
        assert!(TimeOfDay::parse("7:05").is_none());
    }

    #[test]
    fn network_mappings_keep_the_host_part() {
        let maps = vec![
            NetworkMapping {
                from: "10.1.0.0/16".into(),
                to: "10.201.0.0/16".into(),
            },
            NetworkMapping {
                from: "fd00:1::/64".into(),
                to: "fd00:9::/64".into(),
            },
        ];
        let m = |s: &str| map_address(s.parse().unwrap(), &maps).map(|a| a.to_string());
        assert_eq!(m("10.1.4.20").as_deref(), Some("10.201.4.20"));
        assert_eq!(m("10.2.4.20"), None);
        assert_eq!(m("fd00:1::7").as_deref(), Some("fd00:9::7"));
        let zero = vec![NetworkMapping {
            from: "0.0.0.0/0".into(),
            to: "0.0.0.0/0".into(),
        }];
        assert_eq!(
            map_address("1.2.3.4".parse().unwrap(), &zero)
                .map(|a| a.to_string())
                .as_deref(),
            Some("1.2.3.4")
        );
    }

    #[test]
    fn member_rules() {
        let base = MemberSettings::for_vm("vm");
        base.validate().unwrap();
        let code = |m: MemberSettings| m.validate().unwrap_err().code;
        assert_eq!(
            code(MemberSettings {
                boot_group: 101,
                ..base.clone()
            }),
            "vpg.boot_group_out_of_range"
        );
        assert_eq!(
            code(MemberSettings {
                boot_delay_secs: 3601,
                ..base.clone()
            }),
            "vpg.boot_delay_out_of_range"
        );
        assert_eq!(
            code(MemberSettings {
                recovery_storage_path: Some(" ".into()),
                ..base.clone()
            }),
            "vpg.recovery_storage_path_invalid"
        );
        let nic = |reip: Option<ReIp>| NicSettings {
            nic: "eth0".into(),
            failover_network: None,
            test_network: None,
            reip,
        };
        let reip = |a: &str, p: u8, gw: Option<&str>| ReIp {
            address: a.into(),
            prefix: p,
            gateway: gw.map(Into::into),
            dns: vec!["10.0.0.53".into()],
        };
        assert_eq!(
            code(MemberSettings {
                nics: vec![nic(None), nic(None)],
                ..base.clone()
            }),
            "vpg.duplicate_nic"
        );
        let e = MemberSettings {
            nics: vec![nic(Some(reip("10.0.0.300", 24, None)))],
            ..base.clone()
        }
        .validate()
        .unwrap_err();
        assert_eq!(
            (e.code, e.field.as_str()),
            ("vpg.reip_invalid", "nics[0].reip.address")
        );
        assert_eq!(
            code(MemberSettings {
                nics: vec![nic(Some(reip("10.0.0.5", 33, None)))],
                ..base.clone()
            }),
            "vpg.reip_invalid"
        );
        assert_eq!(
            code(MemberSettings {
                nics: vec![nic(Some(reip("10.0.0.5", 24, Some("10.0.1.1"))))],
                ..base.clone()
            }),
            "vpg.reip_gateway_outside_subnet"
        );
        MemberSettings {
            nics: vec![nic(Some(reip("10.0.0.5", 24, Some("10.0.0.1"))))],
            ..base
        }
        .validate()
        .unwrap();
    }
}
