//! What the agent control channel needs from the database: enrolment tokens (shown once,
//! stored as BLAKE3 hashes like API tokens), admitting an agent (enrolment token → host
//! key, or host key), host connectivity, the rows the desired state is computed from,
//! and events reported by agents.
//!
//! Refusals of an agent are `StoreError::Conflict` with an `agent.*` code: the channel
//! sends that code in its `Rejected` message.

use super::entity::{disk, enrolment_token, host, member, site, vm, vpg};
use super::inventory::{check_inventory, check_text};
use super::tokens::hash_secret;
use super::vpgs::lifecycle_of;
use super::{finish_page, new_id, now, page_limit, u64_of, Actor, NewEvent, Store, StoreError};
use crate::model::desired::{DiskRow, HostRow, MemberRecovery, MemberRow, VpgRow};
use crate::model::names::Name;
use crate::model::operations::{recovery_ip, recovery_network};
use crate::model::settings::{MemberSettings, VpgSettings};
use crate::model::ValidationError;
use crate::proto::api::{
    Connectivity, EnrolmentToken, EnrolmentTokenCreate, EnrolmentTokenCreated, Page, PageQuery,
};
use crate::proto::control::{AgentEvent, AgentHello, Credential};
use chrono::Duration;
use rand::RngCore;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, IntoActiveModel, QueryFilter, QueryOrder,
    QuerySelect, Set, TransactionTrait,
};
use std::collections::HashMap;

/// A replica disk (journal + replica image) at a recovery host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaTarget {
    pub vpg_id: String,
    pub vm: String,
    pub disk: String,
    pub protected_host: String,
    pub recovery_host: String,
    pub disk_id: u64,
}

/// Every enrolment secret starts with this (API tokens use `bwk_`), so leaked ones are
/// easy to scan for and the two kinds are never confused.
pub const ENROLMENT_PREFIX: &str = "bwe_";
pub const DEFAULT_ENROLMENT_SECS: u64 = 86_400;
const MIN_ENROLMENT_SECS: u64 = 60;
const MAX_ENROLMENT_SECS: u64 = 30 * 86_400;
const MAX_ENROLMENT_USES: u32 = 10_000;
/// Longest credential looked at; anything longer is not ours.
const MAX_SECRET_LEN: usize = 128;

/// An agent the manager let in.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub host_id: String,
    pub host_name: String,
    pub site_id: String,
    /// The new host key, when this connection enrolled (shown once).
    pub host_key: Option<String>,
}

/// The rows the desired state of every host is computed from.
#[derive(Debug, Clone, Default)]
pub struct DesiredRows {
    pub vpgs: Vec<VpgRow>,
    pub members: Vec<MemberRow>,
    pub hosts: Vec<HostRow>,
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn to_enrolment(m: enrolment_token::Model) -> EnrolmentToken {
    EnrolmentToken {
        id: m.id,
        description: m.description,
        created_at: m.created_at,
        expires_at: m.expires_at,
        max_uses: m.max_uses.and_then(|u| u32::try_from(u).ok()),
        uses: u32::try_from(m.uses).unwrap_or(0),
        revoked_at: m.revoked_at,
        created_by: m.created_by,
    }
}

fn refuse(code: &'static str, message: impl Into<String>) -> StoreError {
    StoreError::conflict(code, message)
}

fn bad_credential() -> StoreError {
    refuse(
        "agent.bad_credential",
        "the credential is not valid for this host",
    )
}

/// Constant-time comparison of a secret with a stored BLAKE3 hex digest.
fn hash_matches(stored_hex: &str, secret: &str) -> bool {
    match blake3::Hash::from_hex(stored_hex) {
        Ok(stored) => stored == blake3::hash(secret.as_bytes()),
        Err(_) => false,
    }
}

impl Store {
    // ---- enrolment tokens --------------------------------------------------------------

    pub async fn create_enrolment_token(
        &self,
        actor: &Actor,
        input: EnrolmentTokenCreate,
    ) -> Result<EnrolmentTokenCreated, StoreError> {
        let description = input.description.unwrap_or_default().trim().to_string();
        check_text("description", &Some(description.clone()))?;
        let secs = input.expires_in_secs.unwrap_or(DEFAULT_ENROLMENT_SECS);
        if !(MIN_ENROLMENT_SECS..=MAX_ENROLMENT_SECS).contains(&secs) {
            return Err(ValidationError::new(
                "enrolment_token.expiry_out_of_range",
                "expires_in_secs",
                format!("expiry must be {MIN_ENROLMENT_SECS} to {MAX_ENROLMENT_SECS} seconds"),
            )
            .into());
        }
        if input
            .max_uses
            .is_some_and(|u| u == 0 || u > MAX_ENROLMENT_USES)
        {
            return Err(ValidationError::new(
                "enrolment_token.max_uses_out_of_range",
                "max_uses",
                format!("max_uses must be 1 to {MAX_ENROLMENT_USES}"),
            )
            .into());
        }
        let secret = format!("{ENROLMENT_PREFIX}{}", random_hex());
        let t = now();
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let m = enrolment_token::ActiveModel {
            id: Set(new_id()),
            description: Set(description),
            secret_hash: Set(hash_secret(&secret)),
            created_at: Set(t),
            // Bounded above, so the cast and the addition cannot overflow.
            expires_at: Set(t + Duration::seconds(secs as i64)),
            max_uses: Set(input.max_uses.map(|u| u as i32)),
            uses: Set(0),
            revoked_at: Set(None),
            created_by: Set(actor.0.clone()),
        }
        .insert(&txn)
        .await?;
        NewEvent::info(
            "enrolment_token.created",
            "enrolment_token",
            &m.id,
            format!("enrolment token created, valid until {}", m.expires_at),
        )
        .write(&txn, actor)
        .await?;
        self.commit(txn).await?;
        Ok(EnrolmentTokenCreated {
            token: to_enrolment(m),
            secret,
        })
    }

    pub async fn list_enrolment_tokens(
        &self,
        p: &PageQuery,
    ) -> Result<Page<EnrolmentToken>, StoreError> {
        let limit = page_limit(p.limit)?;
        let mut sel = enrolment_token::Entity::find().order_by_asc(enrolment_token::Column::Id);
        if let Some(c) = &p.cursor {
            sel = sel.filter(enrolment_token::Column::Id.gt(c.as_str()));
        }
        let rows = sel.limit(limit + 1).all(&self.db).await?;
        Ok(finish_page(rows, limit, |m| m.id.clone(), to_enrolment))
    }

    /// Revokes an enrolment token; revoking twice is harmless. Hosts already enrolled
    /// keep their keys.
    pub async fn revoke_enrolment_token(
        &self,
        actor: &Actor,
        id: &str,
    ) -> Result<EnrolmentToken, StoreError> {
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let cur = enrolment_token::Entity::find_by_id(id)
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::not_found("enrolment_token", id))?;
        if cur.revoked_at.is_some() {
            return Ok(to_enrolment(cur));
        }
        let mut am = cur.into_active_model();
        am.revoked_at = Set(Some(now()));
        let m = am.update(&txn).await?;
        NewEvent::info(
            "enrolment_token.revoked",
            "enrolment_token",
            id,
            "enrolment token revoked".to_string(),
        )
        .write(&txn, actor)
        .await?;
        self.commit(txn).await?;
        Ok(to_enrolment(m))
    }

    // ---- admitting agents --------------------------------------------------------------

    /// Checks the credential of a Hello. A host key must be the one issued to the host
    /// of that name. An enrolment token that is live and not used up creates the site
    /// and the host if missing, issues the host key (its hash stored) and counts the use,
    /// all in one transaction with its events.
    pub async fn admit_agent(&self, hello: &AgentHello) -> Result<Admitted, StoreError> {
        let host_name = Name::parse(&hello.host_name).map_err(|e| e.under("host_name"))?;
        // Everything the connection will store is checked first: an enrolment that
        // spent its token and issued a key must not then be refused for its inventory
        // (the agent would never learn the key).
        check_endpoints(hello)?;
        check_inventory(&hello.inventory)?;
        match &hello.credential {
            Credential::HostKey { key } => {
                if key.is_empty() || key.len() > MAX_SECRET_LEN {
                    return Err(bad_credential());
                }
                let h = host::Entity::find()
                    .filter(host::Column::Name.eq(host_name.to_string()))
                    .one(&self.db)
                    .await?
                    .ok_or_else(bad_credential)?;
                match &h.host_key_hash {
                    Some(stored) if hash_matches(stored, key) => {
                        if h.key_used_at.is_none() {
                            self.confirm_host_key(&h.id).await?;
                        }
                        Ok(Admitted {
                            host_id: h.id,
                            host_name: h.name,
                            site_id: h.site_id,
                            host_key: None,
                        })
                    }
                    _ => Err(bad_credential()),
                }
            }
            Credential::Enrolment { token } => self.enrol(hello, &host_name, token).await,
        }
    }

    async fn enrol(
        &self,
        hello: &AgentHello,
        host_name: &Name,
        token: &str,
    ) -> Result<Admitted, StoreError> {
        let site_name = Name::parse(&hello.site).map_err(|e| e.under("site"))?;
        if !token.starts_with(ENROLMENT_PREFIX) || token.len() > MAX_SECRET_LEN {
            return Err(bad_credential());
        }
        let actor = Actor(format!("agent:{host_name}"));
        let t = now();
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let tok = enrolment_token::Entity::find()
            .filter(enrolment_token::Column::SecretHash.eq(hash_secret(token)))
            .one(&txn)
            .await?
            .ok_or_else(bad_credential)?;
        if tok.revoked_at.is_some() {
            return Err(refuse(
                "agent.token_revoked",
                "the enrolment token was revoked",
            ));
        }
        if tok.expires_at <= t {
            return Err(refuse(
                "agent.token_expired",
                "the enrolment token has expired",
            ));
        }
        let site = match site::Entity::find()
            .filter(site::Column::Name.eq(site_name.to_string()))
            .one(&txn)
            .await?
        {
            Some(s) => s,
            None => {
                let s = site::ActiveModel {
                    id: Set(new_id()),
                    name: Set(site_name.to_string()),
                    description: Set(String::new()),
                    location: Set(None),
                    bandwidth_limit: Set(None),
                    created_at: Set(t),
                    updated_at: Set(t),
                }
                .insert(&txn)
                .await
                .map_err(super::on_unique(
                    "agent.retry",
                    format!("site {site_name} was created meanwhile; connect again"),
                ))?;
                NewEvent::info(
                    "site.created",
                    "site",
                    &s.id,
                    format!("site {site_name} created by the enrolment of host {host_name}"),
                )
                .write(&txn, &actor)
                .await?;
                s
            }
        };
        let key = random_hex();
        let existing = host::Entity::find()
            .filter(host::Column::Name.eq(host_name.to_string()))
            .one(&txn)
            .await?;
        // Enrolling again with the same token while the key issued by it was never used:
        // the agent did not get its Welcome (the connection, or a write after the key was
        // stored, failed). It gets a new key; the token's use was counted the first time.
        let again = existing.as_ref().is_some_and(|h| {
            h.host_key_hash.is_some()
                && h.key_used_at.is_none()
                && h.enrolled_by.as_deref() == Some(tok.id.as_str())
                && h.site_id == site.id
        });
        if !again {
            count_use(&txn, &tok.id).await?;
        }
        let h = match existing {
            Some(h) if h.host_key_hash.is_some() && !again => {
                return Err(refuse(
                    "agent.already_enrolled",
                    format!(
                        "host {host_name} is already enrolled; connect with its host key \
                         (or delete the host to enrol it again)"
                    ),
                ))
            }
            Some(h) if h.site_id != site.id => {
                return Err(refuse(
                    "agent.site_mismatch",
                    format!("host {host_name} belongs to another site than {site_name}"),
                ))
            }
            Some(h) => {
                let mut am = h.into_active_model();
                am.host_key_hash = Set(Some(hash_secret(&key)));
                am.enrolled_at = Set(Some(t));
                am.enrolled_by = Set(Some(tok.id.clone()));
                am.key_used_at = Set(None);
                am.updated_at = Set(t);
                am.update(&txn).await?
            }
            None => {
                let h = host::ActiveModel {
                    id: Set(new_id()),
                    site_id: Set(site.id.clone()),
                    name: Set(host_name.to_string()),
                    address: Set(None),
                    data_address: Set(None),
                    nbd_address: Set(None),
                    storage_path: Set(None),
                    connectivity: Set(Connectivity::Unknown.as_str().to_string()),
                    agent_version: Set(None),
                    last_seen_at: Set(None),
                    created_at: Set(t),
                    updated_at: Set(t),
                    host_key_hash: Set(Some(hash_secret(&key))),
                    enrolled_at: Set(Some(t)),
                    enrolled_by: Set(Some(tok.id.clone())),
                    key_used_at: Set(None),
                }
                .insert(&txn)
                .await
                .map_err(super::on_unique(
                    "agent.already_enrolled",
                    format!("host {host_name} was enrolled meanwhile"),
                ))?;
                NewEvent::info(
                    "host.created",
                    "host",
                    &h.id,
                    format!("host {host_name} created by enrolment"),
                )
                .write(&txn, &actor)
                .await?;
                h
            }
        };
        NewEvent::info(
            "host.enrolled",
            "host",
            &h.id,
            if again {
                format!(
                    "host {host_name} enrolled again at site {site_name}: its first key was \
                     never used"
                )
            } else {
                format!("host {host_name} enrolled at site {site_name}")
            },
        )
        .details(serde_json::json!({ "enrolment_token_id": tok.id, "again": again }))
        .write(&txn, &actor)
        .await?;
        self.commit(txn).await?;
        Ok(Admitted {
            host_id: h.id,
            host_name: h.name,
            site_id: h.site_id,
            host_key: Some(key),
        })
    }

    /// The agent of `host_id` has its host key: it connected with it, or spoke after the
    /// Welcome that carried it (the agent stores the key before anything else). From now
    /// on the key is the host's only credential; its enrolment token cannot enrol it again.
    pub async fn confirm_host_key(&self, host_id: &str) -> Result<(), StoreError> {
        let _w = self.write_guard().await;
        host::Entity::update_many()
            .col_expr(host::Column::KeyUsedAt, Expr::value(now()))
            .filter(host::Column::Id.eq(host_id))
            .filter(host::Column::KeyUsedAt.is_null())
            .exec(&self.db)
            .await?;
        Ok(())
    }

    // ---- connectivity ------------------------------------------------------------------

    /// The agent of `host_id` connected: its endpoints and version as its Hello says.
    pub async fn host_connected(
        &self,
        host_id: &str,
        hello: &AgentHello,
    ) -> Result<(), StoreError> {
        check_endpoints(hello)?;
        let nbd = Some(hello.nbd_address.clone());
        let actor = Actor(format!("agent:{}", hello.host_name));
        let t = now();
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let h = host::Entity::find_by_id(host_id)
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::not_found("host", host_id))?;
        let name = h.name.clone();
        let mut am = h.into_active_model();
        am.connectivity = Set(Connectivity::Connected.as_str().to_string());
        am.agent_version = Set(Some(hello.agent_version.clone()));
        am.last_seen_at = Set(Some(t));
        am.nbd_address = Set(nbd);
        am.data_address = Set(hello.data_address.clone());
        am.storage_path = Set(hello.storage_path.clone());
        am.updated_at = Set(t);
        am.update(&txn).await?;
        NewEvent::info(
            "host.connected",
            "host",
            host_id,
            format!("agent of host {name} connected"),
        )
        .details(serde_json::json!({ "agent_version": hello.agent_version }))
        .write(&txn, &actor)
        .await?;
        self.commit(txn).await?;
        Ok(())
    }

    /// The host's agent is gone (socket closed or silent too long). Returns whether the
    /// host was connected (only then is an event written).
    pub async fn host_disconnected(&self, host_id: &str, reason: &str) -> Result<bool, StoreError> {
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let done = disconnect(&txn, host_id, reason).await?;
        self.commit(txn).await?;
        Ok(done)
    }

    /// At manager start: no agent is connected to this process yet, whatever the
    /// database says; hosts not in `connected_now` are marked disconnected (they
    /// reconnect within a heartbeat). Returns how many were marked.
    pub async fn disconnect_all_hosts_except(
        &self,
        connected_now: &[String],
        reason: &str,
    ) -> Result<usize, StoreError> {
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let ids: Vec<String> = host::Entity::find()
            .filter(host::Column::Connectivity.eq(Connectivity::Connected.as_str()))
            .filter(host::Column::Name.is_not_in(connected_now.iter().cloned()))
            .select_only()
            .column(host::Column::Id)
            .into_tuple()
            .all(&txn)
            .await?;
        let mut n = 0;
        for id in ids {
            if disconnect(&txn, &id, reason).await? {
                n += 1;
            }
        }
        self.commit(txn).await?;
        Ok(n)
    }

    /// Refreshes `last_seen_at` (the caller limits how often: it is not a change worth
    /// an event, like an API token's last use).
    pub async fn touch_host(&self, host_id: &str) -> Result<(), StoreError> {
        let _w = self.write_guard().await;
        host::Entity::update_many()
            .col_expr(host::Column::LastSeenAt, Expr::value(now()))
            .filter(host::Column::Id.eq(host_id))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    // ---- desired state -----------------------------------------------------------------

    /// Every VPG, member (with its VM's disks and both hosts by name) and host.
    pub async fn desired_rows(&self) -> Result<DesiredRows, StoreError> {
        let hosts = host::Entity::find().all(&self.db).await?;
        let site_limits: HashMap<String, Option<u64>> = site::Entity::find()
            .all(&self.db)
            .await?
            .into_iter()
            .map(|s| (s.id, s.bandwidth_limit.map(u64_of)))
            .collect();
        let host_names: HashMap<String, String> = hosts
            .iter()
            .map(|h| (h.id.clone(), h.name.clone()))
            .collect();
        let mut vpg_settings: HashMap<String, VpgSettings> = HashMap::new();
        let vpgs = vpg::Entity::find()
            .all(&self.db)
            .await?
            .into_iter()
            .map(|v| {
                // A settings document that no longer parses falls back to the defaults
                // rather than stopping every host's reconciliation.
                let s: VpgSettings = serde_json::from_value(v.settings).unwrap_or_default();
                let row = VpgRow {
                    name: v.name,
                    journal_history_secs: u64::from(s.journal_history_secs),
                    journal_hard_limit_bytes: s.journal_hard_limit_bytes,
                    journal_warning_bytes: s.journal_warning_bytes,
                    lifecycle: lifecycle_of(&v.lifecycle),
                    paused: v.paused,
                    priority: s.priority,
                    resync: s.resync_policy,
                    fencing_generation: v.fencing_generation.max(0) as u64,
                    protection_stopped: v
                        .operation_phase
                        .as_deref()
                        .and_then(crate::model::status::OperationPhase::parse)
                        .is_some_and(|p| p.stops_protection()),
                    id: v.id,
                };
                vpg_settings.insert(row.id.clone(), s);
                row
            })
            .collect();
        let members = member::Entity::find().all(&self.db).await?;
        let vm_ids: Vec<String> = members.iter().map(|m| m.vm_id.clone()).collect();
        let vms: HashMap<String, vm::Model> = vm::Entity::find()
            .filter(vm::Column::Id.is_in(vm_ids.clone()))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|v| (v.id.clone(), v))
            .collect();
        let mut disks: HashMap<String, Vec<DiskRow>> = HashMap::new();
        for d in disk::Entity::find()
            .filter(disk::Column::VmId.is_in(vm_ids))
            .order_by_asc(disk::Column::Name)
            .all(&self.db)
            .await?
        {
            disks.entry(d.vm_id).or_default().push(DiskRow {
                disk_id: d.device_id.map(u64_of),
                name: d.name,
            });
        }
        let members = members
            .into_iter()
            .filter_map(|m| {
                let v = vms.get(&m.vm_id)?;
                let ms: MemberSettings = serde_json::from_value(m.settings).unwrap_or_default();
                let vs = vpg_settings.get(&m.vpg_id).cloned().unwrap_or_default();
                Some(MemberRow {
                    recovery: MemberRecovery {
                        cpus: u32::try_from(v.cpus).unwrap_or(1),
                        memory_mib: u64_of(v.memory_mib),
                        network: recovery_network(&ms, &vs, false),
                        ip_address: recovery_ip(&ms, false),
                        boot_group: ms.boot_group,
                        boot_delay_secs: u64::from(ms.boot_delay_secs),
                        boot: super::inventory::boot_of(v.boot.as_deref()),
                    },
                    vpg_id: m.vpg_id,
                    vm: v.name.clone(),
                    protected_host: host_names.get(&v.host_id)?.clone(),
                    recovery_host: m
                        .recovery_host_id
                        .as_ref()
                        .and_then(|r| host_names.get(r).cloned()),
                    disks: disks.remove(&m.vm_id).unwrap_or_default(),
                })
            })
            .collect();
        Ok(DesiredRows {
            vpgs,
            members,
            hosts: hosts
                .into_iter()
                .map(|h| HostRow {
                    site_bandwidth_limit: site_limits.get(&h.site_id).copied().flatten(),
                    name: h.name,
                    data_address: h.data_address,
                    site_id: h.site_id,
                })
                .collect(),
        })
    }

    /// The replicas a VPG's members (or one member VM) have at their recovery hosts:
    /// what "delete the recovery disks" must remove. Disks the agents never reported
    /// (no device id) and members without a recovery host have none.
    pub async fn replica_targets(
        &self,
        vpg_id: &str,
        vm_id: Option<&str>,
    ) -> Result<Vec<ReplicaTarget>, StoreError> {
        let mut q = member::Entity::find().filter(member::Column::VpgId.eq(vpg_id));
        if let Some(v) = vm_id {
            q = q.filter(member::Column::VmId.eq(v));
        }
        let mut out = Vec::new();
        for m in q.all(&self.db).await? {
            let Some(rec_id) = &m.recovery_host_id else {
                continue;
            };
            let Some(v) = vm::Entity::find_by_id(&m.vm_id).one(&self.db).await? else {
                continue;
            };
            let (Some(prot), Some(rec)) = (
                host::Entity::find_by_id(&v.host_id).one(&self.db).await?,
                host::Entity::find_by_id(rec_id).one(&self.db).await?,
            ) else {
                continue;
            };
            for d in disk::Entity::find()
                .filter(disk::Column::VmId.eq(&v.id))
                .all(&self.db)
                .await?
            {
                if let Some(id) = d.device_id {
                    out.push(ReplicaTarget {
                        vpg_id: vpg_id.to_string(),
                        vm: v.name.clone(),
                        disk: d.name,
                        protected_host: prot.name.clone(),
                        recovery_host: rec.name.clone(),
                        disk_id: u64_of(id),
                    });
                }
            }
        }
        Ok(out)
    }

    // ---- agent events ------------------------------------------------------------------

    /// Writes an event an agent reported: kind `agent.<kind>`, subject the host, the VPG
    /// when the disk belongs to a member VM.
    pub async fn record_agent_event(
        &self,
        host_id: &str,
        host_name: &str,
        ev: &AgentEvent,
    ) -> Result<(), StoreError> {
        let kind = format!("agent.{}", agent_event_kind(&ev.kind));
        let mut vpg_id = None;
        let mut vm_name = ev.vm.clone();
        if let Some(disk_id) = ev.disk_id.and_then(|d| i64::try_from(d).ok()) {
            let vm_ids: Vec<String> = vm::Entity::find()
                .filter(vm::Column::HostId.eq(host_id))
                .select_only()
                .column(vm::Column::Id)
                .into_tuple()
                .all(&self.db)
                .await?;
            if let Some(d) = disk::Entity::find()
                .filter(disk::Column::VmId.is_in(vm_ids))
                .filter(disk::Column::DeviceId.eq(disk_id))
                .one(&self.db)
                .await?
            {
                if vm_name.is_none() {
                    vm_name = vm::Entity::find_by_id(&d.vm_id)
                        .one(&self.db)
                        .await?
                        .map(|v| v.name);
                }
                vpg_id = member::Entity::find()
                    .filter(member::Column::VmId.eq(d.vm_id.as_str()))
                    .one(&self.db)
                    .await?
                    .map(|m| m.vpg_id);
            }
        }
        let details = agent_event_details(ev, vm_name.as_deref());
        let message: String = ev.message.chars().take(1024).collect();
        let actor = Actor(format!("agent:{host_name}"));
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        NewEvent {
            kind: &kind,
            severity: agent_event_severity(&ev.kind, &ev.details),
            vpg_id: vpg_id.as_deref(),
            subject_type: "host",
            subject_id: Some(host_id),
            message: format!("{host_name}: {message}"),
            details: Some(details),
        }
        .write(&txn, &actor)
        .await?;
        self.commit(txn).await?;
        Ok(())
    }
}

/// Counts one use of an enrolment token. A conditional update, so two hosts racing for
/// the last use of a token cannot both win (on either database).
async fn count_use(txn: &sea_orm::DatabaseTransaction, token_id: &str) -> Result<(), StoreError> {
    let counted = enrolment_token::Entity::update_many()
        .col_expr(
            enrolment_token::Column::Uses,
            Expr::col(enrolment_token::Column::Uses).add(1),
        )
        .filter(enrolment_token::Column::Id.eq(token_id))
        .filter(
            enrolment_token::Column::MaxUses
                .is_null()
                .or(Expr::col(enrolment_token::Column::Uses)
                    .lt(Expr::col(enrolment_token::Column::MaxUses))),
        )
        .exec(txn)
        .await?;
    if counted.rows_affected != 1 {
        return Err(refuse(
            "agent.token_used_up",
            "the enrolment token has been used as often as it may",
        ));
    }
    Ok(())
}

fn check_endpoints(hello: &AgentHello) -> Result<(), ValidationError> {
    for (f, v) in [
        ("nbd_address", &Some(hello.nbd_address.clone())),
        ("data_address", &hello.data_address),
        ("storage_path", &hello.storage_path),
        ("agent_version", &Some(hello.agent_version.clone())),
    ] {
        check_text(f, v)?;
    }
    Ok(())
}

async fn disconnect(
    txn: &impl sea_orm::ConnectionTrait,
    host_id: &str,
    reason: &str,
) -> Result<bool, StoreError> {
    let Some(h) = host::Entity::find_by_id(host_id).one(txn).await? else {
        return Ok(false);
    };
    if h.connectivity != Connectivity::Connected.as_str() {
        return Ok(false);
    }
    let name = h.name.clone();
    let mut am = h.into_active_model();
    am.connectivity = Set(Connectivity::Disconnected.as_str().to_string());
    am.updated_at = Set(now());
    am.update(txn).await?;
    NewEvent {
        severity: "warning",
        ..NewEvent::info(
            "host.disconnected",
            "host",
            host_id,
            format!("agent of host {name} disconnected: {reason}"),
        )
    }
    .details(serde_json::json!({ "reason": reason }))
    .write(txn, &Actor::system())
    .await?;
    Ok(true)
}

/// The agent's kind, kept to lower-case letters, digits and `_` (at most 64), so an
/// event kind stays a stable, filterable word whatever an agent sends.
fn agent_event_kind(kind: &str) -> String {
    let k: String = kind
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(64)
        .collect::<String>()
        .to_ascii_lowercase();
    if k.is_empty() {
        "event".to_string()
    } else {
        k
    }
}

fn agent_event_severity(kind: &str, details: &serde_json::Value) -> &'static str {
    match kind {
        // A VM that went off without being asked to (QEMU ended, failed, had nothing to
        // boot) is down against the operator's will; a guest powering itself off is not.
        "vm_power" => match details.get("cause").and_then(serde_json::Value::as_str) {
            Some("exited" | "failed" | "no_boot") => "warning",
            _ => "info",
        },
        // A guest's disk failed under it (QEMU stopped the VM on the error): its
        // application is down now.
        "vm_block_io_error" => "error",
        // The guest shut down, stopped or resumed: what a VM does, not a fault.
        "vm_shutdown" | "vm_stopped" | "vm_resumed" => "info",
        "disk_bitmap_only" | "replica_behind" | "stream_disconnected" | "storage_error" => {
            "warning"
        }
        k if k.ends_with("_failed") || k.ends_with("_error") => "warning",
        _ => "info",
    }
}

/// The agent's details, plus where and when. Sync start and end always carry
/// `blocks_sent` and `duration_ms` (nothing sent and no time spent at the start); an
/// end event without them records null rather than an invented number.
fn agent_event_details(ev: &AgentEvent, vm: Option<&str>) -> serde_json::Value {
    let mut d = match &ev.details {
        serde_json::Value::Object(m) => m.clone(),
        serde_json::Value::Null => serde_json::Map::new(),
        other => {
            let mut m = serde_json::Map::new();
            m.insert("agent".into(), other.clone());
            m
        }
    };
    d.insert("at_ms".into(), ev.at_ms.into());
    if let Some(id) = ev.disk_id {
        d.insert("disk_id".into(), id.into());
    }
    if let Some(vm) = vm {
        d.insert("vm".into(), vm.into());
    }
    let start = ev.kind == "sync_started";
    if start || ev.kind == "sync_ended" {
        for k in ["blocks_sent", "duration_ms"] {
            d.entry(k).or_insert(if start {
                0.into()
            } else {
                serde_json::Value::Null
            });
        }
    }
    serde_json::Value::Object(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_event_kinds_are_tamed_and_syncs_carry_their_numbers() {
        assert_eq!(agent_event_kind("sync_started"), "sync_started");
        assert_eq!(agent_event_kind("Weird kind!\n"), "weirdkind");
        assert_eq!(agent_event_kind(""), "event");
        let ev = AgentEvent {
            kind: "sync_started".into(),
            disk_id: Some(3),
            vm: None,
            message: "m".into(),
            details: serde_json::json!({"kind": "initial"}),
            at_ms: 5,
        };
        let d = agent_event_details(&ev, Some("web"));
        assert_eq!(d["blocks_sent"], 0);
        assert_eq!(d["duration_ms"], 0);
        assert_eq!(d["vm"], "web");
        assert_eq!(d["disk_id"], 3);
        let end = AgentEvent {
            kind: "sync_ended".into(),
            details: serde_json::json!({"blocks_sent": 12, "duration_ms": 40}),
            ..ev
        };
        let d = agent_event_details(&end, None);
        assert_eq!(d["blocks_sent"], 12);
        assert_eq!(d["duration_ms"], 40);
        let none = serde_json::Value::Null;
        assert_eq!(agent_event_severity("replica_behind", &none), "warning");
        assert_eq!(agent_event_severity("sync_started", &none), "info");
        assert_eq!(agent_event_severity("vm_block_io_error", &none), "error");
        assert_eq!(agent_event_severity("journal_error", &none), "warning");
        for k in ["vm_shutdown", "vm_stopped", "vm_resumed", "vm_power"] {
            assert_eq!(agent_event_severity(k, &none), "info", "{k}");
        }
        let power = |cause: &str| serde_json::json!({"state": "off", "cause": cause});
        for (cause, want) in [
            ("request", "info"),
            ("guest", "info"),
            ("exited", "warning"),
            ("failed", "warning"),
            ("no_boot", "warning"),
        ] {
            assert_eq!(
                agent_event_severity("vm_power", &power(cause)),
                want,
                "{cause}"
            );
        }
    }

    #[test]
    fn host_keys_compare_by_hash() {
        let h = hash_secret("k");
        assert!(hash_matches(&h, "k"));
        assert!(!hash_matches(&h, "K"));
        assert!(!hash_matches("not hex", "k"));
    }
}
