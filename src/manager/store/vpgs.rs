//! VPGs and their members: the definition (settings, membership) with its cross-entity
//! rules, optimistic concurrency through `version`, and the stored status.

use super::entity::{alert, host, member, vm, vpg};
use super::inventory::vm_state;
use super::{
    finish_page, new_id, now, on_unique, page_limit, u64_of, Actor, NewEvent, Store, StoreError,
};
use crate::model::membership::{check_membership, member_needs_configuration, VmPlacement};
use crate::model::names::Name;
use crate::model::settings::{MemberSettings, VpgSettings};
use crate::model::status::{derive_status, Lifecycle, VpgFacts, VpgStatus, VpgSubStatus};
use crate::model::ValidationError;
use crate::proto::api::{Member, Page, PageQuery, Vpg, VpgCreate, VpgPatch, VpgQuery, VpgReplace};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseTransaction, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, Set, TransactionTrait,
};
use std::collections::HashMap;
use std::time::Duration;

pub const MAX_MEMBERS: usize = 1000;

/// What a delete request did.
#[derive(Debug)]
pub enum VpgDeletion {
    /// The Delete operation started (or was already running): the VPG as it is now.
    Started(Box<Vpg>),
    /// Forced: the VPG is gone.
    Removed,
}

/// A VPG's definition as a whole, whatever request it came from.
struct Definition {
    name: Name,
    description: String,
    declared_protected_site: Option<String>,
    recovery_site_id: String,
    settings: VpgSettings,
    members: Vec<MemberSettings>,
}

pub(crate) fn lifecycle_of(s: &str) -> Lifecycle {
    match s {
        "protecting" => Lifecycle::Protecting,
        "deleting" => Lifecycle::Deleting,
        "waiting_removal" => Lifecycle::WaitingRemoval,
        "recovered" => Lifecycle::Recovered,
        _ => Lifecycle::Creating,
    }
}

/// The facts configuration alone gives; the SLA evaluator adds the live ones.
pub(crate) fn config_facts(
    lifecycle: Lifecycle,
    paused: bool,
    settings: &VpgSettings,
    members: &[MemberSettings],
) -> VpgFacts {
    VpgFacts {
        lifecycle,
        members: members.len(),
        members_needing_configuration: members
            .iter()
            .filter(|m| member_needs_configuration(m))
            .count(),
        paused,
        has_recoverable_checkpoint: false,
        rpo_actual: None,
        rpo_target: Duration::from_secs(u64::from(settings.rpo_target_secs)),
        history_actual: Duration::ZERO,
        history_target: Duration::from_secs(u64::from(settings.journal_history_secs)),
        protected_for: Duration::ZERO,
        ..VpgFacts::healthy(members.len())
    }
}

pub(crate) fn member_settings(m: &member::Model) -> MemberSettings {
    let mut s: MemberSettings = serde_json::from_value(m.settings.clone())
        .unwrap_or_else(|_| MemberSettings::for_vm(m.vm_id.clone()));
    s.vm_id = m.vm_id.clone();
    s.recovery_host_id = m.recovery_host_id.clone();
    s
}

/// The RPO a read at `now` shows: now minus the newest recoverable checkpoint's time.
pub(crate) fn rpo_secs(
    newest_recoverable_at: Option<chrono::DateTime<chrono::Utc>>,
    rpo_actual_ms: Option<i64>,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<f64> {
    match newest_recoverable_at {
        Some(t) => Some(((now - t).num_milliseconds().max(0)) as f64 / 1000.0),
        None => rpo_actual_ms.map(|ms| ms as f64 / 1000.0),
    }
}

pub(crate) fn to_vpg(m: vpg::Model, vm_count: u32, members: Option<Vec<Member>>) -> Vpg {
    Vpg {
        status: VpgStatus::parse(&m.status).unwrap_or(VpgStatus::Initializing),
        sub_status: VpgSubStatus::parse(&m.sub_status).unwrap_or(VpgSubStatus::None),
        settings: serde_json::from_value(m.settings).unwrap_or_default(),
        // Exact at every read: now minus the newest recoverable checkpoint's time.
        rpo_actual_secs: rpo_secs(m.newest_recoverable_at, m.rpo_actual_ms, chrono::Utc::now()),
        history_actual_secs: m.history_actual_secs.map(u64_of),
        journal_bytes: u64_of(m.journal_bytes),
        version: u64_of(m.version),
        vm_count,
        members,
        id: m.id,
        name: m.name,
        description: m.description,
        protected_site_id: m.protected_site_id,
        recovery_site_id: m.recovery_site_id,
        paused: m.paused,
        last_test_at: m.last_test_at,
        fencing_generation: u64_of(m.fencing_generation),
        operation_id: m.operation_id,
        operation_phase: m.operation_phase,
        created_at: m.created_at,
        updated_at: m.updated_at,
    }
}

fn check_description(d: &str) -> Result<(), ValidationError> {
    if d.len() > 4096 {
        return Err(ValidationError::new(
            "validation.text_invalid",
            "description",
            "description must be at most 4096 bytes",
        ));
    }
    Ok(())
}

impl Store {
    async fn members_of(
        &self,
        db: &impl ConnectionTrait,
        vpg: &vpg::Model,
    ) -> Result<Vec<Member>, StoreError> {
        let rows = member::Entity::find()
            .filter(member::Column::VpgId.eq(vpg.id.as_str()))
            .order_by_asc(member::Column::BootGroup)
            .order_by_asc(member::Column::Id)
            .all(db)
            .await?;
        let names: HashMap<String, String> = vm::Entity::find()
            .filter(vm::Column::Id.is_in(rows.iter().map(|r| r.vm_id.clone())))
            .select_only()
            .column(vm::Column::Id)
            .column(vm::Column::Name)
            .into_tuple()
            .all(db)
            .await?
            .into_iter()
            .collect();
        let state = vm_state(Some(&(vpg.lifecycle.clone(), vpg.paused)));
        Ok(rows
            .iter()
            .map(|r| Member {
                settings: member_settings(r),
                vm_name: names.get(&r.vm_id).cloned().unwrap_or_default(),
                replication_state: state,
            })
            .collect())
    }

    pub async fn list_vpgs(&self, q: &VpgQuery, p: &PageQuery) -> Result<Page<Vpg>, StoreError> {
        let limit = page_limit(p.limit)?;
        let mut sel = vpg::Entity::find().order_by_asc(vpg::Column::Id);
        if let Some(c) = &p.cursor {
            sel = sel.filter(vpg::Column::Id.gt(c.as_str()));
        }
        if let Some(s) = q.status {
            sel = sel.filter(vpg::Column::Status.eq(s.as_str()));
        }
        if let Some(site) = &q.site {
            sel = sel.filter(
                vpg::Column::ProtectedSiteId
                    .eq(site.as_str())
                    .or(vpg::Column::RecoverySiteId.eq(site.as_str())),
            );
        }
        if let Some(n) = &q.name {
            sel = sel.filter(vpg::Column::Name.eq(n.as_str()));
        }
        let rows = sel.limit(limit + 1).all(&self.db).await?;
        let counts = self.member_counts(&rows).await?;
        Ok(finish_page(
            rows,
            limit,
            |m| m.id.clone(),
            |m| list_item(m, &counts),
        ))
    }

    /// VPGs in the shape of list items (no members), for the ids that exist, in id
    /// order: what the live stream sends when they change.
    pub async fn vpgs_by_ids(&self, ids: &[String]) -> Result<Vec<Vpg>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        // Bounded IN lists: SQLite caps bound parameters.
        for chunk in ids.chunks(500) {
            let rows = vpg::Entity::find()
                .filter(vpg::Column::Id.is_in(chunk.iter().cloned()))
                .order_by_asc(vpg::Column::Id)
                .all(&self.db)
                .await?;
            let counts = self.member_counts(&rows).await?;
            out.extend(rows.into_iter().map(|m| list_item(m, &counts)));
        }
        Ok(out)
    }

    /// Every VPG as a list item, in id order.
    pub async fn all_vpgs(&self) -> Result<Vec<Vpg>, StoreError> {
        let rows = vpg::Entity::find()
            .order_by_asc(vpg::Column::Id)
            .all(&self.db)
            .await?;
        let counts = self.member_counts(&rows).await?;
        Ok(rows.into_iter().map(|m| list_item(m, &counts)).collect())
    }

    async fn member_counts(&self, rows: &[vpg::Model]) -> Result<HashMap<String, i64>, StoreError> {
        if rows.is_empty() {
            return Ok(HashMap::new());
        }
        let mut q = member::Entity::find()
            .select_only()
            .column(member::Column::VpgId)
            .column_as(member::Column::Id.count(), "n")
            .group_by(member::Column::VpgId);
        // A bounded IN list when it is a page; a whole-table count otherwise.
        if rows.len() <= 500 {
            q = q.filter(member::Column::VpgId.is_in(rows.iter().map(|r| r.id.clone())));
        }
        Ok(q.into_tuple().all(&self.db).await?.into_iter().collect())
    }

    pub async fn get_vpg(&self, id: &str) -> Result<Vpg, StoreError> {
        let m = vpg::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .ok_or_else(|| StoreError::not_found("vpg", id))?;
        let members = self.members_of(&self.db, &m).await?;
        Ok(to_vpg(m, members.len() as u32, Some(members)))
    }

    /// Validates a whole definition against the database and returns the protected
    /// site it resolves to.
    async fn check_definition(
        &self,
        txn: &DatabaseTransaction,
        vpg_id: Option<&str>,
        d: &Definition,
    ) -> Result<Option<String>, StoreError> {
        d.settings.validate()?;
        check_description(&d.description)?;
        if d.members.len() > MAX_MEMBERS {
            return Err(ValidationError::new(
                "vpg.too_many_members",
                "members",
                format!("a VPG has at most {MAX_MEMBERS} VMs"),
            )
            .into());
        }
        let mut site_ids = vec![d.recovery_site_id.clone()];
        site_ids.extend(d.declared_protected_site.clone());
        let known_sites: Vec<String> = super::entity::site::Entity::find()
            .filter(super::entity::site::Column::Id.is_in(site_ids))
            .select_only()
            .column(super::entity::site::Column::Id)
            .into_tuple()
            .all(txn)
            .await?;
        if !known_sites.contains(&d.recovery_site_id) {
            return Err(ValidationError::new(
                "vpg.unknown_recovery_site",
                "recovery_site_id",
                format!("no site with id {}", d.recovery_site_id),
            )
            .into());
        }
        if let Some(p) = &d.declared_protected_site {
            if !known_sites.contains(p) {
                return Err(ValidationError::new(
                    "vpg.unknown_protected_site",
                    "protected_site_id",
                    format!("no site with id {p}"),
                )
                .into());
            }
        }
        let vm_ids: Vec<String> = d.members.iter().map(|m| m.vm_id.clone()).collect();
        let vms: Vec<(String, String)> = vm::Entity::find()
            .filter(vm::Column::Id.is_in(vm_ids.clone()))
            .select_only()
            .column(vm::Column::Id)
            .column(vm::Column::HostId)
            .into_tuple()
            .all(txn)
            .await?;
        let owners: HashMap<String, String> = member::Entity::find()
            .filter(member::Column::VmId.is_in(vm_ids))
            .select_only()
            .column(member::Column::VmId)
            .column(member::Column::VpgId)
            .into_tuple()
            .all(txn)
            .await?
            .into_iter()
            .collect();
        let mut host_ids: Vec<String> = vms.iter().map(|(_, h)| h.clone()).collect();
        host_ids.extend(d.members.iter().filter_map(|m| m.recovery_host_id.clone()));
        let host_sites: HashMap<String, String> = host::Entity::find()
            .filter(host::Column::Id.is_in(host_ids))
            .select_only()
            .column(host::Column::Id)
            .column(host::Column::SiteId)
            .into_tuple()
            .all(txn)
            .await?
            .into_iter()
            .collect();
        let placements: HashMap<String, VmPlacement> = vms
            .into_iter()
            .map(|(vm_id, host_id)| {
                let p = VmPlacement {
                    site_id: host_sites.get(&host_id).cloned().unwrap_or_default(),
                    vpg_id: owners.get(&vm_id).cloned(),
                };
                (vm_id, p)
            })
            .collect();
        let membership = check_membership(
            vpg_id,
            d.declared_protected_site.as_deref(),
            &d.recovery_site_id,
            &d.members,
            &placements,
            &host_sites,
        )?;
        Ok(membership.protected_site_id)
    }

    async fn write_members(
        &self,
        txn: &DatabaseTransaction,
        vpg_id: &str,
        members: &[MemberSettings],
    ) -> Result<(), StoreError> {
        member::Entity::delete_many()
            .filter(member::Column::VpgId.eq(vpg_id))
            .exec(txn)
            .await?;
        let t = now();
        for m in members {
            member::ActiveModel {
                id: Set(new_id()),
                vpg_id: Set(vpg_id.to_string()),
                vm_id: Set(m.vm_id.clone()),
                recovery_host_id: Set(m.recovery_host_id.clone()),
                boot_group: Set(m.boot_group as i32),
                settings: Set(serde_json::to_value(m).unwrap_or_default()),
                created_at: Set(t),
                updated_at: Set(t),
            }
            .insert(txn)
            .await
            .map_err(on_unique(
                "vpg.vm_already_protected",
                format!("VM {} already belongs to a VPG", m.vm_id),
            ))?;
        }
        Ok(())
    }

    pub async fn create_vpg(&self, actor: &Actor, input: VpgCreate) -> Result<Vpg, StoreError> {
        let d = Definition {
            name: Name::parse(&input.name)?,
            description: input.description,
            declared_protected_site: input.protected_site_id,
            recovery_site_id: input.recovery_site_id,
            settings: input.settings,
            members: input.members,
        };
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let protected = self.check_definition(&txn, None, &d).await?;
        let (status, sub) = derive_status(&config_facts(
            Lifecycle::Creating,
            false,
            &d.settings,
            &d.members,
        ));
        let id = new_id();
        let t = now();
        vpg::ActiveModel {
            id: Set(id.clone()),
            name: Set(d.name.to_string()),
            description: Set(d.description.clone()),
            protected_site_id: Set(protected),
            recovery_site_id: Set(d.recovery_site_id.clone()),
            settings: Set(serde_json::to_value(&d.settings).unwrap_or_default()),
            lifecycle: Set("creating".into()),
            paused: Set(false),
            status: Set(status.as_str().into()),
            sub_status: Set(sub.as_str().into()),
            rpo_actual_ms: Set(None),
            history_actual_secs: Set(None),
            journal_bytes: Set(0),
            protected_since: Set(None),
            history_since: Set(None),
            newest_recoverable_at: Set(None),
            last_test_at: Set(None),
            fencing_generation: Set(1),
            operation_id: Set(None),
            operation_phase: Set(None),
            version: Set(1),
            created_at: Set(t),
            updated_at: Set(t),
        }
        .insert(&txn)
        .await
        .map_err(on_unique(
            "vpg.name_taken",
            format!("a VPG named `{}` exists", d.name),
        ))?;
        self.write_members(&txn, &id, &d.members).await?;
        NewEvent::info(
            "vpg.created",
            "vpg",
            &id,
            format!("VPG {} created with {} VM(s)", d.name, d.members.len()),
        )
        .vpg(&id)
        .details(serde_json::json!({ "settings": d.settings, "members": d.members }))
        .write(&txn, actor)
        .await?;
        self.commit(txn).await?;
        self.get_vpg(&id).await
    }

    /// Applies `change` to the current definition and stores it if the result is valid
    /// and the version still matches. Without an expected version a lost race is
    /// retried on the newer definition (last writer wins, nothing is half-applied).
    async fn change_definition(
        &self,
        actor: &Actor,
        id: &str,
        expected_version: Option<u64>,
        kind: &str,
        change: impl Fn(&mut Definition) -> Result<(), StoreError>,
    ) -> Result<Vpg, StoreError> {
        let mut attempts = 0;
        loop {
            match self
                .try_change_definition(actor, id, expected_version, kind, &change)
                .await
            {
                Err(StoreError::VersionMismatch { .. })
                    if expected_version.is_none() && attempts < 10 =>
                {
                    attempts += 1;
                }
                other => return other,
            }
        }
    }

    async fn try_change_definition(
        &self,
        actor: &Actor,
        id: &str,
        expected_version: Option<u64>,
        kind: &str,
        change: &impl Fn(&mut Definition) -> Result<(), StoreError>,
    ) -> Result<Vpg, StoreError> {
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let cur = vpg::Entity::find_by_id(id)
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::not_found("vpg", id))?;
        let version = u64_of(cur.version);
        if let Some(expected) = expected_version {
            if expected != version {
                return Err(StoreError::VersionMismatch {
                    expected,
                    current: version,
                });
            }
        }
        refuse_during_operation(&cur, "be changed")?;
        if matches!(
            lifecycle_of(&cur.lifecycle),
            Lifecycle::Deleting | Lifecycle::WaitingRemoval
        ) {
            return Err(StoreError::conflict(
                "vpg.deleting",
                "the VPG is being deleted",
            ));
        }
        let members: Vec<MemberSettings> = member::Entity::find()
            .filter(member::Column::VpgId.eq(id))
            .order_by_asc(member::Column::Id)
            .all(&txn)
            .await?
            .iter()
            .map(member_settings)
            .collect();
        let mut d = Definition {
            name: Name::parse(&cur.name)?,
            description: cur.description.clone(),
            declared_protected_site: None,
            recovery_site_id: cur.recovery_site_id.clone(),
            settings: serde_json::from_value(cur.settings.clone()).unwrap_or_default(),
            members,
        };
        let before = (d.settings.clone(), d.members.clone());
        change(&mut d)?;
        let protected = self.check_definition(&txn, Some(id), &d).await?;
        // An empty VPG keeps the site it protected.
        let protected = protected.or(cur.protected_site_id.clone());
        let lifecycle = lifecycle_of(&cur.lifecycle);
        let derived = derive_status(&config_facts(
            lifecycle,
            cur.paused,
            &d.settings,
            &d.members,
        ));
        // A protecting VPG's status needs live facts this transaction does not have: the
        // evaluator rederives it at once (poked by the change) and records the change.
        // Only a configuration gap, which no live fact can outweigh, is written here.
        let config_gap = matches!(
            derived.1,
            VpgSubStatus::VpgHasNoVms | VpgSubStatus::NeedsConfiguration
        );
        let (status, sub) = match (lifecycle, config_gap) {
            (Lifecycle::Protecting, false) => (
                VpgStatus::parse(&cur.status).unwrap_or(derived.0),
                VpgSubStatus::parse(&cur.sub_status).unwrap_or(derived.1),
            ),
            _ => derived,
        };
        let res = vpg::Entity::update_many()
            .col_expr(vpg::Column::Name, Expr::value(d.name.to_string()))
            .col_expr(vpg::Column::Description, Expr::value(d.description.clone()))
            .col_expr(vpg::Column::ProtectedSiteId, Expr::value(protected))
            .col_expr(
                vpg::Column::RecoverySiteId,
                Expr::value(d.recovery_site_id.clone()),
            )
            .col_expr(
                vpg::Column::Settings,
                Expr::value(serde_json::to_value(&d.settings).unwrap_or_default()),
            )
            .col_expr(vpg::Column::Status, Expr::value(status.as_str()))
            .col_expr(vpg::Column::SubStatus, Expr::value(sub.as_str()))
            .col_expr(vpg::Column::Version, Expr::col(vpg::Column::Version).add(1))
            .col_expr(vpg::Column::UpdatedAt, Expr::value(now()))
            .filter(vpg::Column::Id.eq(id))
            .filter(vpg::Column::Version.eq(cur.version))
            .exec(&txn)
            .await
            .map_err(on_unique(
                "vpg.name_taken",
                format!("a VPG named `{}` exists", d.name),
            ))?;
        if res.rows_affected == 0 {
            return Err(StoreError::VersionMismatch {
                expected: expected_version.unwrap_or(version),
                current: version + 1,
            });
        }
        if before.1 != d.members {
            self.write_members(&txn, id, &d.members).await?;
        }
        // A VM that joins has no earlier checkpoints: the history the VPG can have
        // starts again at its first checkpoint covering every member.
        if d.members
            .iter()
            .any(|m| !before.1.iter().any(|b| b.vm_id == m.vm_id))
        {
            vpg::Entity::update_many()
                .col_expr(
                    vpg::Column::HistorySince,
                    Expr::value(Option::<chrono::DateTime<chrono::Utc>>::None),
                )
                .filter(vpg::Column::Id.eq(id))
                .exec(&txn)
                .await?;
        }
        let mut details = serde_json::Map::new();
        if before.0 != d.settings {
            details.insert(
                "settings".into(),
                serde_json::to_value(&d.settings).unwrap_or_default(),
            );
        }
        if before.1 != d.members {
            details.insert(
                "members".into(),
                serde_json::to_value(&d.members).unwrap_or_default(),
            );
        }
        NewEvent::info(kind, "vpg", id, format!("VPG {} updated", d.name))
            .vpg(id)
            .details(serde_json::Value::Object(details))
            .write(&txn, actor)
            .await?;
        self.commit(txn).await?;
        self.get_vpg(id).await
    }

    pub async fn update_vpg(
        &self,
        actor: &Actor,
        id: &str,
        expected_version: Option<u64>,
        p: VpgPatch,
    ) -> Result<Vpg, StoreError> {
        self.change_definition(actor, id, expected_version, "vpg.updated", |d| {
            if let Some(n) = &p.name {
                d.name = Name::parse(n)?;
            }
            if let Some(desc) = &p.description {
                d.description = desc.clone();
            }
            if let Some(r) = &p.recovery_site_id {
                d.recovery_site_id = r.clone();
            }
            if let Some(s) = &p.settings {
                d.settings.apply(s.clone());
            }
            if let Some(m) = &p.members {
                d.members = m.clone();
            }
            Ok(())
        })
        .await
    }

    pub async fn replace_vpg(
        &self,
        actor: &Actor,
        id: &str,
        expected_version: Option<u64>,
        r: VpgReplace,
    ) -> Result<Vpg, StoreError> {
        self.change_definition(actor, id, expected_version, "vpg.updated", |d| {
            d.name = Name::parse(&r.name)?;
            d.description = r.description.clone();
            d.recovery_site_id = r.recovery_site_id.clone();
            d.declared_protected_site = r.protected_site_id.clone();
            d.settings = r.settings.clone();
            d.members = r.members.clone();
            Ok(())
        })
        .await
    }

    pub async fn add_member(
        &self,
        actor: &Actor,
        vpg_id: &str,
        expected_version: Option<u64>,
        m: MemberSettings,
    ) -> Result<Vpg, StoreError> {
        self.change_definition(actor, vpg_id, expected_version, "vpg.member_added", |d| {
            if d.members.iter().any(|o| o.vm_id == m.vm_id) {
                return Err(StoreError::conflict(
                    "vpg.duplicate_member",
                    format!("VM {} is already a member", m.vm_id),
                ));
            }
            d.members.push(m.clone());
            Ok(())
        })
        .await
    }

    pub async fn update_member(
        &self,
        actor: &Actor,
        vpg_id: &str,
        vm_id: &str,
        expected_version: Option<u64>,
        mut m: MemberSettings,
    ) -> Result<Vpg, StoreError> {
        m.vm_id = vm_id.to_string();
        self.change_definition(actor, vpg_id, expected_version, "vpg.member_updated", |d| {
            let slot = d
                .members
                .iter_mut()
                .find(|o| o.vm_id == vm_id)
                .ok_or_else(|| StoreError::not_found("member", vm_id))?;
            *slot = m.clone();
            Ok(())
        })
        .await
    }

    pub async fn remove_member(
        &self,
        actor: &Actor,
        vpg_id: &str,
        vm_id: &str,
        expected_version: Option<u64>,
        keep_recovery_disks: bool,
    ) -> Result<Vpg, StoreError> {
        let kind = if keep_recovery_disks {
            "vpg.member_removed"
        } else {
            "vpg.member_removed_with_disks"
        };
        self.change_definition(actor, vpg_id, expected_version, kind, |d| {
            let before = d.members.len();
            d.members.retain(|o| o.vm_id != vm_id);
            if d.members.len() == before {
                return Err(StoreError::not_found("member", vm_id));
            }
            Ok(())
        })
        .await
    }

    /// Deletes a VPG. Without `force` this starts the Delete operation: the lifecycle
    /// becomes "deleting" (the desired state of every host drops the VPG), and the
    /// evaluator removes the row once no host protects any of its disks any more.
    /// Asking again while it is being deleted changes nothing. With `force` the row goes
    /// at once, whatever the hosts still run (they drop it when they next reconcile).
    pub async fn delete_vpg(
        &self,
        actor: &Actor,
        id: &str,
        expected_version: Option<u64>,
        force: bool,
    ) -> Result<VpgDeletion, StoreError> {
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let cur = vpg::Entity::find_by_id(id)
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::not_found("vpg", id))?;
        if let Some(expected) = expected_version {
            if expected != u64_of(cur.version) {
                return Err(StoreError::VersionMismatch {
                    expected,
                    current: u64_of(cur.version),
                });
            }
        }
        // Even by force: the operation's task would go on acting on a VPG that is gone.
        refuse_during_operation(&cur, "be deleted")?;
        if force {
            super::checkpoints::remove_rows(&txn, id).await?;
            let mut ev = NewEvent::info(
                "vpg.force_removed",
                "vpg",
                id,
                format!("VPG {} removed by force", cur.name),
            )
            .vpg(id);
            ev.severity = "warning";
            ev.write(&txn, actor).await?;
            self.commit(txn).await?;
            return Ok(VpgDeletion::Removed);
        }
        let lifecycle = lifecycle_of(&cur.lifecycle);
        if matches!(lifecycle, Lifecycle::Deleting | Lifecycle::WaitingRemoval) {
            drop(txn);
            return Ok(VpgDeletion::Started(Box::new(self.get_vpg(id).await?)));
        }
        let (status, sub) = derive_status(&VpgFacts {
            lifecycle: Lifecycle::Deleting,
            ..VpgFacts::healthy(0)
        });
        vpg::Entity::update_many()
            .col_expr(vpg::Column::Lifecycle, Expr::value("deleting"))
            .col_expr(vpg::Column::Status, Expr::value(status.as_str()))
            .col_expr(vpg::Column::SubStatus, Expr::value(sub.as_str()))
            .col_expr(vpg::Column::Version, Expr::col(vpg::Column::Version).add(1))
            .col_expr(vpg::Column::UpdatedAt, Expr::value(now()))
            .filter(vpg::Column::Id.eq(id))
            .exec(&txn)
            .await?;
        NewEvent::info(
            "vpg.deleting",
            "vpg",
            id,
            format!("VPG {}: deletion started", cur.name),
        )
        .vpg(id)
        .details(serde_json::json!({
            "from": {"status": cur.status, "sub_status": cur.sub_status},
            "to": {"status": status.as_str(), "sub_status": sub.as_str()},
        }))
        .write(&txn, actor)
        .await?;
        self.commit(txn).await?;
        Ok(VpgDeletion::Started(Box::new(self.get_vpg(id).await?)))
    }

    /// How many VPGs are in each status (for metrics and the dashboard).
    pub async fn vpg_status_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(vpg::Entity::find()
            .select_only()
            .column(vpg::Column::Status)
            .column_as(vpg::Column::Id.count(), "n")
            .group_by(vpg::Column::Status)
            .into_tuple()
            .all(&self.db)
            .await?)
    }

    /// The counts `/metrics` shows: VPGs by status, open alerts by severity, hosts by
    /// connectivity (three grouped counts, cheap at scrape time).
    pub async fn metric_counts(&self) -> Result<MetricCounts, StoreError> {
        let alerts_open = alert::Entity::find()
            .filter(alert::Column::ClearedAt.is_null())
            .select_only()
            .column(alert::Column::Severity)
            .column_as(alert::Column::Id.count(), "n")
            .group_by(alert::Column::Severity)
            .into_tuple()
            .all(&self.db)
            .await?;
        let hosts = host::Entity::find()
            .select_only()
            .column(host::Column::Connectivity)
            .column_as(host::Column::Id.count(), "n")
            .group_by(host::Column::Connectivity)
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(MetricCounts {
            vpg_status: self.vpg_status_counts().await?,
            alerts_open,
            hosts,
        })
    }
}

/// A VPG row as a list item (member count, no members).
fn list_item(m: vpg::Model, counts: &HashMap<String, i64>) -> Vpg {
    let n = counts.get(&m.id).copied().unwrap_or(0);
    to_vpg(m, u32::try_from(n).unwrap_or(0), None)
}

/// Grouped counts for `/metrics`: (value, count) pairs.
#[derive(Debug, Clone, Default)]
pub struct MetricCounts {
    pub vpg_status: Vec<(String, i64)>,
    pub alerts_open: Vec<(String, i64)>,
    pub hosts: Vec<(String, i64)>,
}

/// A VPG with a recovery operation running may not change, go, pause or start another:
/// its members, hosts and settings are what the operation acts on (409
/// `vpg.operation_running`). `doing` completes "cannot …".
pub(super) fn refuse_during_operation(v: &vpg::Model, doing: &str) -> Result<(), StoreError> {
    match &v.operation_id {
        Some(op) => Err(StoreError::conflict(
            "vpg.operation_running",
            format!(
                "VPG `{}` cannot {doing} while operation {op} runs: commit, roll it back \
                 or stop the test first",
                v.name
            ),
        )),
        None => Ok(()),
    }
}
