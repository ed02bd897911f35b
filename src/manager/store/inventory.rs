//! Sites, hosts, VMs and disks, and the inventory agents report (VMs with their disks,
//! NICs and how they boot).

use super::entity::{disk, host, member, site, vm, vpg};
use super::{
    finish_page, i64_of, new_id, now, on_unique, page_limit, u64_of, Actor, NewEvent, Store,
    StoreError,
};
use crate::model::desired::MIN_BANDWIDTH_LIMIT;
use crate::model::machine;
use crate::model::names::Name;
use crate::model::status::{derive_vm_state, VmFacts, VmReplicationState};
use crate::model::ValidationError;
use crate::proto::api::{
    Connectivity, Disk, DiskCreate, Host, HostCreate, HostPatch, HostQuery, Nic, Page, PageQuery,
    PowerState, Site, SiteCreate, SitePatch, SiteQuery, Vm, VmCreate, VmPatch, VmQuery,
};
use crate::proto::control::{self, Inventory, InventoryDisk};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, IntoActiveModel, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect, Set, TransactionTrait,
};
use std::collections::{HashMap, HashSet};

const MAX_DISKS_PER_VM: usize = 64;
pub use crate::model::machine::MAX_NICS_PER_VM;

fn to_site(m: site::Model) -> Site {
    Site {
        id: m.id,
        name: m.name,
        description: m.description,
        location: m.location,
        bandwidth_limit: m.bandwidth_limit.map(u64_of),
        created_at: m.created_at,
        updated_at: m.updated_at,
    }
}

/// A site bandwidth limit: at least [`MIN_BANDWIDTH_LIMIT`] bytes/s when set.
fn check_bandwidth(v: Option<u64>) -> Result<Option<i64>, StoreError> {
    match v {
        None => Ok(None),
        Some(b) if b < MIN_BANDWIDTH_LIMIT => Err(ValidationError::new(
            "site.bandwidth_limit_too_small",
            "bandwidth_limit",
            format!("must be at least {MIN_BANDWIDTH_LIMIT} bytes per second (64 KiB/s), or null for unlimited"),
        )
        .into()),
        Some(b) => Ok(Some(i64_of(b, "bandwidth_limit")?)),
    }
}

fn to_host(m: host::Model) -> Host {
    Host {
        id: m.id,
        site_id: m.site_id,
        name: m.name,
        address: m.address,
        data_address: m.data_address,
        nbd_address: m.nbd_address,
        storage_path: m.storage_path,
        connectivity: Connectivity::parse(&m.connectivity).unwrap_or(Connectivity::Unknown),
        agent_version: m.agent_version,
        last_seen_at: m.last_seen_at,
        created_at: m.created_at,
        updated_at: m.updated_at,
    }
}

fn to_disk(m: disk::Model) -> Disk {
    Disk {
        id: m.id,
        vm_id: m.vm_id,
        name: m.name,
        size_bytes: u64_of(m.size_bytes),
        path: m.path,
        device_id: m.device_id.map(u64_of),
        created_at: m.created_at,
    }
}

pub(super) fn check_text(field: &str, v: &Option<String>) -> Result<(), ValidationError> {
    match v {
        Some(s) if s.len() > 1024 || s.chars().any(char::is_control) => Err(ValidationError::new(
            "validation.text_invalid",
            field,
            "must be at most 1024 printable characters",
        )),
        _ => Ok(()),
    }
}

/// How a VM boots: for a kernel boot, absolute kernel (and initrd) paths and a bounded
/// command line.
pub(crate) fn check_boot(boot: &control::Boot) -> Result<(), ValidationError> {
    match boot {
        control::Boot::Kernel {
            kernel,
            initrd,
            cmdline,
        } => machine::check_kernel_boot(kernel, initrd.as_deref(), cmdline),
        control::Boot::Firmware => Ok(()),
    }
}

/// `vms.boot` as stored: JSON of the boot definition.
pub(super) fn boot_json(boot: Option<&control::Boot>) -> Option<String> {
    boot.and_then(|b| serde_json::to_string(b).ok())
}

/// `vms.boot` as read; a value that no longer parses counts as unknown.
pub(super) fn boot_of(stored: Option<&str>) -> Option<control::Boot> {
    stored.and_then(|s| serde_json::from_str(s).ok())
}

/// The NICs to store for what an agent reports: network and MAC as reported, in order;
/// the name and addresses (the operator's, which the agent does not know) kept from the
/// stored NIC at the same position, else named `net<i>` (the hypervisor's own name).
fn reported_nics(reported: &[control::Nic], stored: &[Nic]) -> Vec<Nic> {
    reported
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let kept = stored.get(i);
            Nic {
                name: kept.map_or_else(|| format!("net{i}"), |k| k.name.clone()),
                network: r.network.clone(),
                mac: r.mac.clone(),
                addresses: kept.map(|k| k.addresses.clone()).unwrap_or_default(),
            }
        })
        .collect()
}

fn nics_of(stored: &serde_json::Value) -> Vec<Nic> {
    serde_json::from_value(stored.clone()).unwrap_or_default()
}

fn check_nics(nics: &[Nic]) -> Result<(), ValidationError> {
    machine::check_nic_count(nics.len())?;
    for (i, n) in nics.iter().enumerate() {
        let at = format!("nics[{i}]");
        Name::parse(&n.name).map_err(|e| e.under(&at))?;
        machine::check_mac(&format!("{at}.mac"), &n.mac)?;
        if nics[..i].iter().any(|o| o.name == n.name) {
            return Err(ValidationError::new(
                "vm.duplicate_nic",
                at,
                format!("NIC `{}` is listed twice", n.name),
            ));
        }
        for (j, a) in n.addresses.iter().enumerate() {
            if crate::model::settings::Cidr::parse(a).is_none() {
                return Err(ValidationError::new(
                    "vm.nic_address_invalid",
                    format!("{at}.addresses[{j}]"),
                    format!("`{a}` is not an address in CIDR form such as 10.1.4.20/24"),
                ));
            }
        }
    }
    Ok(())
}

fn check_cpus(cpus: u32) -> Result<i32, ValidationError> {
    if cpus == 0 || cpus > 1024 {
        return Err(ValidationError::new(
            "vm.cpus_out_of_range",
            "cpus",
            "cpus must be 1 to 1024",
        ));
    }
    Ok(cpus as i32)
}

fn check_memory(memory_mib: u64) -> Result<i64, StoreError> {
    let memory = i64_of(memory_mib, "memory_mib")?;
    if memory == 0 {
        return Err(ValidationError::new(
            "vm.memory_out_of_range",
            "memory_mib",
            "memory must be positive",
        )
        .into());
    }
    Ok(memory)
}

fn check_disk(d: &DiskCreate) -> Result<(), ValidationError> {
    Name::parse(&d.name)?;
    if d.size_bytes == 0 || d.size_bytes % 512 != 0 || d.size_bytes > i64::MAX as u64 {
        return Err(ValidationError::new(
            "disk.size_invalid",
            "size_bytes",
            "disk size must be a positive multiple of 512 bytes",
        ));
    }
    check_text("path", &d.path)
}

impl Store {
    // ---- sites ---------------------------------------------------------------------

    pub async fn list_sites(&self, q: &SiteQuery, p: &PageQuery) -> Result<Page<Site>, StoreError> {
        let limit = page_limit(p.limit)?;
        let mut sel = site::Entity::find().order_by_asc(site::Column::Id);
        if let Some(c) = &p.cursor {
            sel = sel.filter(site::Column::Id.gt(c.as_str()));
        }
        if let Some(n) = &q.name {
            sel = sel.filter(site::Column::Name.eq(n.as_str()));
        }
        let rows = sel.limit(limit + 1).all(&self.db).await?;
        Ok(finish_page(rows, limit, |m| m.id.clone(), to_site))
    }

    pub async fn get_site(&self, id: &str) -> Result<Site, StoreError> {
        site::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .map(to_site)
            .ok_or_else(|| StoreError::not_found("site", id))
    }

    pub async fn create_site(&self, actor: &Actor, input: SiteCreate) -> Result<Site, StoreError> {
        let name = Name::parse(&input.name)?;
        check_text("description", &Some(input.description.clone()))?;
        check_text("location", &input.location)?;
        let bandwidth_limit = check_bandwidth(input.bandwidth_limit)?;
        let t = now();
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let m = site::ActiveModel {
            id: Set(new_id()),
            name: Set(name.to_string()),
            description: Set(input.description),
            location: Set(input.location),
            bandwidth_limit: Set(bandwidth_limit),
            created_at: Set(t),
            updated_at: Set(t),
        }
        .insert(&txn)
        .await
        .map_err(on_unique(
            "site.name_taken",
            format!("a site named `{name}` exists"),
        ))?;
        NewEvent::info(
            "site.created",
            "site",
            &m.id,
            format!("site {name} created"),
        )
        .write(&txn, actor)
        .await?;
        self.commit(txn).await?;
        Ok(to_site(m))
    }

    pub async fn update_site(
        &self,
        actor: &Actor,
        id: &str,
        p: SitePatch,
    ) -> Result<Site, StoreError> {
        let bandwidth_limit = p.bandwidth_limit.map(check_bandwidth).transpose()?;
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let cur = site::Entity::find_by_id(id)
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::not_found("site", id))?;
        let mut am = cur.into_active_model();
        if let Some(n) = p.name {
            am.name = Set(Name::parse(&n)?.to_string());
        }
        if let Some(d) = p.description {
            check_text("description", &Some(d.clone()))?;
            am.description = Set(d);
        }
        if let Some(l) = p.location {
            check_text("location", &l)?;
            am.location = Set(l);
        }
        if let Some(b) = bandwidth_limit {
            am.bandwidth_limit = Set(b);
        }
        am.updated_at = Set(now());
        let m = am.update(&txn).await.map_err(on_unique(
            "site.name_taken",
            "a site with that name exists".into(),
        ))?;
        NewEvent::info(
            "site.updated",
            "site",
            id,
            format!("site {} updated", m.name),
        )
        .write(&txn, actor)
        .await?;
        self.commit(txn).await?;
        Ok(to_site(m))
    }

    pub async fn delete_site(&self, actor: &Actor, id: &str) -> Result<(), StoreError> {
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let cur = site::Entity::find_by_id(id)
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::not_found("site", id))?;
        let hosts = host::Entity::find()
            .filter(host::Column::SiteId.eq(id))
            .count(&txn)
            .await?;
        if hosts > 0 {
            return Err(StoreError::conflict(
                "site.in_use",
                format!("site {} still has {hosts} host(s)", cur.name),
            ));
        }
        let vpgs = vpg::Entity::find()
            .filter(
                vpg::Column::ProtectedSiteId
                    .eq(id)
                    .or(vpg::Column::RecoverySiteId.eq(id)),
            )
            .count(&txn)
            .await?;
        if vpgs > 0 {
            return Err(StoreError::conflict(
                "site.in_use",
                format!("site {} is used by {vpgs} VPG(s)", cur.name),
            ));
        }
        site::Entity::delete_by_id(id).exec(&txn).await?;
        NewEvent::info(
            "site.deleted",
            "site",
            id,
            format!("site {} deleted", cur.name),
        )
        .write(&txn, actor)
        .await?;
        self.commit(txn).await?;
        Ok(())
    }

    // ---- hosts ---------------------------------------------------------------------

    pub async fn list_hosts(&self, q: &HostQuery, p: &PageQuery) -> Result<Page<Host>, StoreError> {
        let limit = page_limit(p.limit)?;
        let mut sel = host::Entity::find().order_by_asc(host::Column::Id);
        if let Some(c) = &p.cursor {
            sel = sel.filter(host::Column::Id.gt(c.as_str()));
        }
        if let Some(s) = &q.site {
            sel = sel.filter(host::Column::SiteId.eq(s.as_str()));
        }
        if let Some(c) = q.connectivity {
            sel = sel.filter(host::Column::Connectivity.eq(c.as_str()));
        }
        let rows = sel.limit(limit + 1).all(&self.db).await?;
        Ok(finish_page(rows, limit, |m| m.id.clone(), to_host))
    }

    pub async fn get_host(&self, id: &str) -> Result<Host, StoreError> {
        host::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .map(to_host)
            .ok_or_else(|| StoreError::not_found("host", id))
    }

    pub async fn create_host(&self, actor: &Actor, input: HostCreate) -> Result<Host, StoreError> {
        let name = Name::parse(&input.name)?;
        for (f, v) in [
            ("address", &input.address),
            ("data_address", &input.data_address),
            ("nbd_address", &input.nbd_address),
            ("storage_path", &input.storage_path),
        ] {
            check_text(f, v)?;
        }
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        if site::Entity::find_by_id(&input.site_id)
            .one(&txn)
            .await?
            .is_none()
        {
            return Err(ValidationError::new(
                "host.unknown_site",
                "site_id",
                format!("no site with id {}", input.site_id),
            )
            .into());
        }
        let t = now();
        let m = host::ActiveModel {
            id: Set(new_id()),
            site_id: Set(input.site_id),
            name: Set(name.to_string()),
            address: Set(input.address),
            data_address: Set(input.data_address),
            nbd_address: Set(input.nbd_address),
            storage_path: Set(input.storage_path),
            connectivity: Set(Connectivity::Unknown.as_str().to_string()),
            agent_version: Set(None),
            last_seen_at: Set(None),
            created_at: Set(t),
            updated_at: Set(t),
            host_key_hash: Set(None),
            enrolled_at: Set(None),
            enrolled_by: Set(None),
            key_used_at: Set(None),
        }
        .insert(&txn)
        .await
        .map_err(on_unique(
            "host.name_taken",
            format!("a host named `{name}` exists"),
        ))?;
        NewEvent::info(
            "host.created",
            "host",
            &m.id,
            format!("host {name} created"),
        )
        .write(&txn, actor)
        .await?;
        self.commit(txn).await?;
        Ok(to_host(m))
    }

    pub async fn update_host(
        &self,
        actor: &Actor,
        id: &str,
        p: HostPatch,
    ) -> Result<Host, StoreError> {
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let cur = host::Entity::find_by_id(id)
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::not_found("host", id))?;
        let mut am = cur.into_active_model();
        if let Some(n) = p.name {
            am.name = Set(Name::parse(&n)?.to_string());
        }
        macro_rules! opt {
            ($f:ident) => {
                if let Some(v) = p.$f {
                    check_text(stringify!($f), &v)?;
                    am.$f = Set(v);
                }
            };
        }
        opt!(address);
        opt!(data_address);
        opt!(nbd_address);
        opt!(storage_path);
        am.updated_at = Set(now());
        let m = am.update(&txn).await.map_err(on_unique(
            "host.name_taken",
            "a host with that name exists".into(),
        ))?;
        NewEvent::info(
            "host.updated",
            "host",
            id,
            format!("host {} updated", m.name),
        )
        .write(&txn, actor)
        .await?;
        self.commit(txn).await?;
        Ok(to_host(m))
    }

    pub async fn delete_host(&self, actor: &Actor, id: &str) -> Result<(), StoreError> {
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let cur = host::Entity::find_by_id(id)
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::not_found("host", id))?;
        let vms = vm::Entity::find()
            .filter(vm::Column::HostId.eq(id))
            .count(&txn)
            .await?;
        if vms > 0 {
            return Err(StoreError::conflict(
                "host.in_use",
                format!("host {} still runs {vms} VM(s)", cur.name),
            ));
        }
        let recovering = member::Entity::find()
            .filter(member::Column::RecoveryHostId.eq(id))
            .count(&txn)
            .await?;
        if recovering > 0 {
            return Err(StoreError::conflict(
                "host.in_use",
                format!(
                    "host {} is the recovery host of {recovering} protected VM(s)",
                    cur.name
                ),
            ));
        }
        host::Entity::delete_by_id(id).exec(&txn).await?;
        NewEvent::info(
            "host.deleted",
            "host",
            id,
            format!("host {} deleted", cur.name),
        )
        .write(&txn, actor)
        .await?;
        self.commit(txn).await?;
        Ok(())
    }

    // ---- VMs and disks -----------------------------------------------------------------

    /// Builds API VMs for `rows` with two extra queries (disks, memberships) in all,
    /// never one per VM.
    async fn to_vms(
        &self,
        db: &impl ConnectionTrait,
        rows: Vec<vm::Model>,
    ) -> Result<Vec<Vm>, StoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = rows.iter().map(|v| v.id.clone()).collect();
        let host_ids: Vec<String> = rows.iter().map(|v| v.host_id.clone()).collect();
        let mut disks: HashMap<String, Vec<Disk>> = HashMap::new();
        for d in disk::Entity::find()
            .filter(disk::Column::VmId.is_in(ids.clone()))
            .order_by_asc(disk::Column::Name)
            .all(db)
            .await?
        {
            disks.entry(d.vm_id.clone()).or_default().push(to_disk(d));
        }
        let members: HashMap<String, String> = member::Entity::find()
            .filter(member::Column::VmId.is_in(ids))
            .all(db)
            .await?
            .into_iter()
            .map(|m| (m.vm_id, m.vpg_id))
            .collect();
        let vpg_ids: Vec<String> = members.values().cloned().collect();
        let lifecycles: HashMap<String, (String, bool)> = if vpg_ids.is_empty() {
            HashMap::new()
        } else {
            vpg::Entity::find()
                .filter(vpg::Column::Id.is_in(vpg_ids))
                .all(db)
                .await?
                .into_iter()
                .map(|v| (v.id, (v.lifecycle, v.paused)))
                .collect()
        };
        let sites: HashMap<String, String> = host::Entity::find()
            .filter(host::Column::Id.is_in(host_ids))
            .all(db)
            .await?
            .into_iter()
            .map(|h| (h.id, h.site_id))
            .collect();
        Ok(rows
            .into_iter()
            .map(|m| {
                let vpg_id = members.get(&m.id).cloned();
                let state = vm_state(vpg_id.as_ref().and_then(|v| lifecycles.get(v)));
                Vm {
                    site_id: sites.get(&m.host_id).cloned().unwrap_or_default(),
                    disks: disks.remove(&m.id).unwrap_or_default(),
                    nics: serde_json::from_value(m.nics).unwrap_or_default(),
                    boot: boot_of(m.boot.as_deref()).map(Into::into),
                    power_state: PowerState::parse(&m.power_state).unwrap_or(PowerState::Off),
                    cpus: u32::try_from(m.cpus).unwrap_or(0),
                    memory_mib: u64_of(m.memory_mib),
                    replication_state: state,
                    vpg_id,
                    id: m.id,
                    host_id: m.host_id,
                    name: m.name,
                    created_at: m.created_at,
                    updated_at: m.updated_at,
                }
            })
            .collect())
    }

    pub async fn list_vms(&self, q: &VmQuery, p: &PageQuery) -> Result<Page<Vm>, StoreError> {
        let limit = page_limit(p.limit)?;
        let mut sel = vm::Entity::find().order_by_asc(vm::Column::Id);
        if let Some(c) = &p.cursor {
            sel = sel.filter(vm::Column::Id.gt(c.as_str()));
        }
        if let Some(h) = &q.host {
            sel = sel.filter(vm::Column::HostId.eq(h.as_str()));
        }
        if let Some(n) = &q.name {
            sel = sel.filter(vm::Column::Name.eq(n.as_str()));
        }
        if let Some(s) = &q.site {
            let hosts: Vec<String> = host::Entity::find()
                .filter(host::Column::SiteId.eq(s.as_str()))
                .select_only()
                .column(host::Column::Id)
                .into_tuple()
                .all(&self.db)
                .await?;
            sel = sel.filter(vm::Column::HostId.is_in(hosts));
        }
        if let Some(protected) = q.protected {
            use sea_orm::sea_query::Query;
            let sub = Query::select()
                .column(member::Column::VmId)
                .from(member::Entity)
                .to_owned();
            sel = if protected {
                sel.filter(vm::Column::Id.in_subquery(sub))
            } else {
                sel.filter(vm::Column::Id.not_in_subquery(sub))
            };
        }
        let rows = sel.limit(limit + 1).all(&self.db).await?;
        let more = rows.len() as u64 > limit;
        let mut vms = self.to_vms(&self.db, rows).await?;
        vms.truncate(limit as usize);
        let next_cursor = if more {
            vms.last().map(|v| v.id.clone())
        } else {
            None
        };
        Ok(Page {
            items: vms,
            next_cursor,
        })
    }

    /// The VMs among `ids` that exist, in id order, with their disks (one read).
    pub async fn vms_by_ids(&self, ids: &[String]) -> Result<Vec<Vm>, StoreError> {
        let rows = vm::Entity::find()
            .filter(vm::Column::Id.is_in(ids.iter().map(String::as_str)))
            .order_by_asc(vm::Column::Id)
            .all(&self.db)
            .await?;
        self.to_vms(&self.db, rows).await
    }

    pub async fn get_vm(&self, id: &str) -> Result<Vm, StoreError> {
        let m = vm::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .ok_or_else(|| StoreError::not_found("vm", id))?;
        let mut v = self.to_vms(&self.db, vec![m]).await?;
        v.pop().ok_or_else(|| StoreError::not_found("vm", id))
    }

    /// Records a VM (a host without an agent: nothing is created anywhere).
    pub async fn create_vm(&self, actor: &Actor, input: VmCreate) -> Result<Vm, StoreError> {
        let name = check_vm_create(&input)?;
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        if host::Entity::find_by_id(&input.host_id)
            .one(&txn)
            .await?
            .is_none()
        {
            return Err(unknown_host(&input.host_id).into());
        }
        let m = insert_vm(&txn, &name, input).await?;
        NewEvent::info("vm.created", "vm", &m.id, format!("VM {name} created"))
            .write(&txn, actor)
            .await?;
        let id = m.id.clone();
        let mut out = self.to_vms(&txn, vec![m]).await?;
        self.commit(txn).await?;
        out.pop().ok_or_else(|| StoreError::not_found("vm", &id))
    }

    /// Records a VM a host's agent has just created for `input` (its inventory, sent
    /// before the command's answer, usually holds it already): the operator's NIC names
    /// and addresses go onto the NICs the agent reports, by position, and the creation is
    /// audited as the operator's. A VM the inventory did not bring is recorded as asked.
    pub async fn record_created_vm(
        &self,
        actor: &Actor,
        input: VmCreate,
    ) -> Result<Vm, StoreError> {
        let name = check_vm_create(&input)?;
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let found = vm::Entity::find()
            .filter(vm::Column::HostId.eq(input.host_id.as_str()))
            .filter(vm::Column::Name.eq(name.as_str()))
            .one(&txn)
            .await?;
        let m = match found {
            Some(cur) => {
                let mut nics = nics_of(&cur.nics);
                for (n, asked) in nics.iter_mut().zip(&input.nics) {
                    n.name.clone_from(&asked.name);
                    n.addresses.clone_from(&asked.addresses);
                }
                let mut am = cur.into_active_model();
                am.nics = Set(serde_json::to_value(&nics).unwrap_or_default());
                am.updated_at = Set(now());
                am.update(&txn).await?
            }
            None => insert_vm(&txn, &name, input).await?,
        };
        NewEvent::info(
            "vm.created",
            "vm",
            &m.id,
            format!("VM {name} created by its host's agent"),
        )
        .details(serde_json::json!({ "host_id": m.host_id, "by_agent": true }))
        .write(&txn, actor)
        .await?;
        let id = m.id.clone();
        let mut out = self.to_vms(&txn, vec![m]).await?;
        self.commit(txn).await?;
        out.pop().ok_or_else(|| StoreError::not_found("vm", &id))
    }

    pub async fn update_vm(&self, actor: &Actor, id: &str, p: VmPatch) -> Result<Vm, StoreError> {
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let cur = vm::Entity::find_by_id(id)
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::not_found("vm", id))?;
        let old_host = cur.host_id.clone();
        let mut am = cur.into_active_model();
        if let Some(n) = p.name {
            am.name = Set(Name::parse(&n)?.to_string());
        }
        if let Some(h) = p.host_id {
            let sites: Vec<(String, String)> = host::Entity::find()
                .filter(host::Column::Id.is_in([h.clone(), old_host.clone()]))
                .select_only()
                .column(host::Column::Id)
                .column(host::Column::SiteId)
                .into_tuple()
                .all(&txn)
                .await?;
            let site_of = |id: &str| sites.iter().find(|(h, _)| h == id).map(|(_, s)| s.clone());
            match (site_of(&h), site_of(&old_host)) {
                (None, _) => {
                    return Err(ValidationError::new(
                        "vm.unknown_host",
                        "host_id",
                        format!("no host with id {h}"),
                    )
                    .into())
                }
                (Some(new), Some(old)) if new != old => {
                    return Err(ValidationError::new(
                        "vm.host_in_other_site",
                        "host_id",
                        "a VM can move only to a host of its own site",
                    )
                    .into())
                }
                _ => am.host_id = Set(h),
            }
        }
        if let Some(ps) = p.power_state {
            am.power_state = Set(ps.as_str().to_string());
        }
        if let Some(c) = p.cpus {
            am.cpus = Set(check_cpus(c)?);
        }
        if let Some(mem) = p.memory_mib {
            am.memory_mib = Set(check_memory(mem)?);
        }
        if let Some(nics) = p.nics {
            check_nics(&nics)?;
            am.nics = Set(serde_json::to_value(&nics).unwrap_or_default());
        }
        am.updated_at = Set(now());
        let m = am.update(&txn).await.map_err(on_unique(
            "vm.name_taken",
            "the host already has a VM with that name".into(),
        ))?;
        NewEvent::info("vm.updated", "vm", id, format!("VM {} updated", m.name))
            .write(&txn, actor)
            .await?;
        let mut out = self.to_vms(&txn, vec![m]).await?;
        self.commit(txn).await?;
        out.pop().ok_or_else(|| StoreError::not_found("vm", id))
    }

    pub async fn delete_vm(&self, actor: &Actor, id: &str) -> Result<(), StoreError> {
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let cur = vm::Entity::find_by_id(id)
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::not_found("vm", id))?;
        if let Some(m) = member::Entity::find()
            .filter(member::Column::VmId.eq(id))
            .one(&txn)
            .await?
        {
            return Err(StoreError::conflict(
                "vm.protected",
                format!(
                    "VM {} belongs to VPG {}; remove it from the VPG first",
                    cur.name, m.vpg_id
                ),
            ));
        }
        vm::Entity::delete_by_id(id).exec(&txn).await?;
        NewEvent::info("vm.deleted", "vm", id, format!("VM {} deleted", cur.name))
            .write(&txn, actor)
            .await?;
        self.commit(txn).await?;
        Ok(())
    }

    pub async fn list_disks(&self, vm_id: &str) -> Result<Vec<Disk>, StoreError> {
        if vm::Entity::find_by_id(vm_id).one(&self.db).await?.is_none() {
            return Err(StoreError::not_found("vm", vm_id));
        }
        Ok(disk::Entity::find()
            .filter(disk::Column::VmId.eq(vm_id))
            .order_by_asc(disk::Column::Name)
            .all(&self.db)
            .await?
            .into_iter()
            .map(to_disk)
            .collect())
    }

    pub async fn add_disk(
        &self,
        actor: &Actor,
        vm_id: &str,
        d: DiskCreate,
    ) -> Result<Disk, StoreError> {
        check_disk(&d)?;
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        if vm::Entity::find_by_id(vm_id).one(&txn).await?.is_none() {
            return Err(StoreError::not_found("vm", vm_id));
        }
        let count = disk::Entity::find()
            .filter(disk::Column::VmId.eq(vm_id))
            .count(&txn)
            .await?;
        if count as usize >= MAX_DISKS_PER_VM {
            return Err(ValidationError::new(
                "vm.too_many_disks",
                "disks",
                format!("a VM has at most {MAX_DISKS_PER_VM} disks"),
            )
            .into());
        }
        let m = insert_disk(&txn, vm_id, d, None).await?;
        NewEvent::info(
            "disk.created",
            "disk",
            &m.id,
            format!("disk {} added", m.name),
        )
        .details(serde_json::json!({ "vm_id": vm_id }))
        .write(&txn, actor)
        .await?;
        self.commit(txn).await?;
        Ok(to_disk(m))
    }

    pub async fn delete_disk(
        &self,
        actor: &Actor,
        vm_id: &str,
        disk_id: &str,
    ) -> Result<(), StoreError> {
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let d = disk::Entity::find_by_id(disk_id)
            .filter(disk::Column::VmId.eq(vm_id))
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::not_found("disk", disk_id))?;
        if member::Entity::find()
            .filter(member::Column::VmId.eq(vm_id))
            .one(&txn)
            .await?
            .is_some()
        {
            return Err(StoreError::conflict(
                "vm.protected",
                "the VM is protected; remove it from its VPG before removing a disk",
            ));
        }
        disk::Entity::delete_by_id(disk_id).exec(&txn).await?;
        NewEvent::info(
            "disk.deleted",
            "disk",
            disk_id,
            format!("disk {} removed", d.name),
        )
        .details(serde_json::json!({ "vm_id": vm_id }))
        .write(&txn, actor)
        .await?;
        self.commit(txn).await?;
        Ok(())
    }
}

async fn insert_disk(
    db: &impl ConnectionTrait,
    vm_id: &str,
    d: DiskCreate,
    device_id: Option<i64>,
) -> Result<disk::Model, StoreError> {
    let name = d.name.trim().to_string();
    disk::ActiveModel {
        id: Set(new_id()),
        vm_id: Set(vm_id.to_string()),
        name: Set(name.clone()),
        size_bytes: Set(i64_of(d.size_bytes, "size_bytes")?),
        path: Set(d.path),
        created_at: Set(now()),
        device_id: Set(device_id),
    }
    .insert(db)
    .await
    .map_err(on_unique(
        "disk.name_taken",
        format!("the VM already has a disk named `{name}`"),
    ))
}

/// Every rule of a new VM that needs no database (name, NICs, disks, CPUs, memory,
/// boot). Returns the VM's name, parsed.
pub fn check_vm_create(input: &VmCreate) -> Result<String, StoreError> {
    let name = Name::parse(&input.name)?;
    check_nics(&input.nics)?;
    if input.disks.len() > MAX_DISKS_PER_VM {
        return Err(ValidationError::new(
            "vm.too_many_disks",
            "disks",
            format!("a VM has at most {MAX_DISKS_PER_VM} disks"),
        )
        .into());
    }
    for (i, d) in input.disks.iter().enumerate() {
        check_disk(d).map_err(|e| e.under(&format!("disks[{i}]")))?;
        if input.disks[..i].iter().any(|o| o.name == d.name) {
            return Err(ValidationError::new(
                "vm.duplicate_disk",
                format!("disks[{i}].name"),
                format!("disk `{}` is listed twice", d.name),
            )
            .into());
        }
    }
    check_cpus(input.cpus)?;
    check_memory(input.memory_mib)?;
    if let Some(b) = &input.boot {
        check_boot(&b.clone().into())?;
    }
    Ok(name.to_string())
}

pub(crate) fn unknown_host(id: &str) -> ValidationError {
    ValidationError::new(
        "vm.unknown_host",
        "host_id",
        format!("no host with id {id}"),
    )
}

/// The VM's row and its disks (checked by [`check_vm_create`]).
async fn insert_vm(
    db: &impl ConnectionTrait,
    name: &str,
    input: VmCreate,
) -> Result<vm::Model, StoreError> {
    let t = now();
    let boot = input.boot.map(control::Boot::from);
    let m = vm::ActiveModel {
        id: Set(new_id()),
        host_id: Set(input.host_id),
        name: Set(name.to_string()),
        power_state: Set(input.power_state.as_str().to_string()),
        cpus: Set(check_cpus(input.cpus)?),
        memory_mib: Set(check_memory(input.memory_mib)?),
        nics: Set(serde_json::to_value(&input.nics).unwrap_or_default()),
        boot: Set(boot_json(boot.as_ref())),
        created_at: Set(t),
        updated_at: Set(t),
    }
    .insert(db)
    .await
    .map_err(on_unique(
        "vm.name_taken",
        format!("the host already has a VM named `{name}`"),
    ))?;
    for d in input.disks {
        insert_disk(db, &m.id, d, None).await?;
    }
    Ok(m)
}

/// The Hyper-V-style state of a VM from its VPG's lifecycle (None: not protected).
pub(crate) fn vm_state(vpg: Option<&(String, bool)>) -> VmReplicationState {
    let facts = match vpg {
        None => VmFacts::default(),
        Some((lifecycle, paused)) => VmFacts {
            protected: true,
            initial_sync_done: lifecycle != "creating",
            paused: *paused,
            failed_over: lifecycle == "recovered",
            ..VmFacts::default()
        },
    };
    derive_vm_state(&facts)
}

// ---- inventory reported by agents ---------------------------------------------------

/// Most VMs one inventory may list (a bound on one message's work, not a product limit).
const MAX_VMS_PER_INVENTORY: usize = 10_000;

/// The same rules as VMs and disks entered through the API, plus: names and disk ids
/// unique on the host. A refused inventory changes nothing.
pub(super) fn check_inventory(inv: &Inventory) -> Result<(), StoreError> {
    if inv.vms.len() > MAX_VMS_PER_INVENTORY {
        return Err(ValidationError::new(
            "inventory.too_many_vms",
            "vms",
            format!("an inventory lists at most {MAX_VMS_PER_INVENTORY} VMs"),
        )
        .into());
    }
    let mut names = HashSet::new();
    let mut disk_ids = HashSet::new();
    for (i, v) in inv.vms.iter().enumerate() {
        let at = format!("vms[{i}]");
        let name = Name::parse(&v.name).map_err(|e| e.under(&at))?;
        if !names.insert(name.to_string()) {
            return Err(ValidationError::new(
                "inventory.duplicate_vm",
                at,
                format!("VM `{name}` is listed twice"),
            )
            .into());
        }
        check_cpus(v.cpus).map_err(|e| e.under(&at))?;
        check_memory(v.memory_mib)?;
        machine::check_nic_count(v.nics.len()).map_err(|e| e.under(&at))?;
        for (j, n) in v.nics.iter().enumerate() {
            machine::check_mac(&format!("{at}.nics[{j}].mac"), &n.mac)?;
        }
        if let Some(b) = &v.boot {
            check_boot(b).map_err(|e| e.under(&at))?;
        }
        if v.disks.len() > MAX_DISKS_PER_VM {
            return Err(ValidationError::new(
                "vm.too_many_disks",
                format!("{at}.disks"),
                format!("a VM has at most {MAX_DISKS_PER_VM} disks"),
            )
            .into());
        }
        for (j, d) in v.disks.iter().enumerate() {
            let at = format!("{at}.disks[{j}]");
            check_disk(&reported_disk(d)).map_err(|e| e.under(&at))?;
            if v.disks[..j].iter().any(|o| o.name.trim() == d.name.trim()) {
                return Err(ValidationError::new(
                    "vm.duplicate_disk",
                    format!("{at}.name"),
                    format!("disk `{}` is listed twice", d.name),
                )
                .into());
            }
            i64_of(d.disk_id, &format!("{at}.disk_id"))?;
            if !disk_ids.insert(d.disk_id) {
                return Err(ValidationError::new(
                    "inventory.duplicate_disk_id",
                    format!("{at}.disk_id"),
                    format!("disk id {} is used twice on the host", d.disk_id),
                )
                .into());
            }
        }
    }
    Ok(())
}

fn reported_disk(d: &InventoryDisk) -> DiskCreate {
    DiskCreate {
        name: d.name.clone(),
        size_bytes: d.size_bytes,
        path: Some(d.export.clone()),
    }
}

impl Store {
    /// Makes the host's VMs and disks what its agent reports: VMs and disks by name
    /// are created or updated; VMs no longer reported are deleted, except VPG members,
    /// which are kept with power state `missing` and their disk ids cleared (nothing of
    /// theirs can replicate until the agent reports them again). Returns whether
    /// anything changed.
    pub async fn apply_host_inventory(
        &self,
        actor: &Actor,
        host_id: &str,
        inv: &Inventory,
    ) -> Result<bool, StoreError> {
        check_inventory(inv)?;
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let current = vm::Entity::find()
            .filter(vm::Column::HostId.eq(host_id))
            .all(&txn)
            .await?;
        let ids: Vec<String> = current.iter().map(|v| v.id.clone()).collect();
        let mut disks: HashMap<String, Vec<disk::Model>> = HashMap::new();
        for d in disk::Entity::find()
            .filter(disk::Column::VmId.is_in(ids.clone()))
            .all(&txn)
            .await?
        {
            disks.entry(d.vm_id.clone()).or_default().push(d);
        }
        let members: HashSet<String> = member::Entity::find()
            .filter(member::Column::VmId.is_in(ids))
            .select_only()
            .column(member::Column::VmId)
            .into_tuple::<String>()
            .all(&txn)
            .await?
            .into_iter()
            .collect();
        let mut by_name: HashMap<String, vm::Model> =
            current.into_iter().map(|v| (v.name.clone(), v)).collect();
        let mut changed = false;
        let t = now();
        for r in &inv.vms {
            let name = r.name.trim().to_string();
            let power = r.power_state.as_str();
            let cpus = check_cpus(r.cpus)?;
            let memory = check_memory(r.memory_mib)?;
            let vm_id = match by_name.remove(&name) {
                Some(cur) => {
                    let id = cur.id.clone();
                    let stored_nics = nics_of(&cur.nics);
                    let nics = reported_nics(&r.nics, &stored_nics);
                    if cur.power_state != power
                        || cur.cpus != cpus
                        || cur.memory_mib != memory
                        || boot_of(cur.boot.as_deref()) != r.boot
                        || stored_nics != nics
                    {
                        let returned = cur.power_state == PowerState::Missing.as_str();
                        let mut am = cur.into_active_model();
                        am.power_state = Set(power.to_string());
                        am.cpus = Set(cpus);
                        am.memory_mib = Set(memory);
                        am.boot = Set(boot_json(r.boot.as_ref()));
                        am.nics = Set(serde_json::to_value(&nics).unwrap_or_default());
                        am.updated_at = Set(t);
                        am.update(&txn).await?;
                        if returned {
                            NewEvent::info(
                                "vm.returned",
                                "vm",
                                &id,
                                format!("VM {name} is reported by its host again"),
                            )
                            .write(&txn, actor)
                            .await?;
                        }
                        changed = true;
                    }
                    id
                }
                None => {
                    let id = new_id();
                    vm::ActiveModel {
                        id: Set(id.clone()),
                        host_id: Set(host_id.to_string()),
                        name: Set(name.clone()),
                        power_state: Set(power.to_string()),
                        cpus: Set(cpus),
                        memory_mib: Set(memory),
                        nics: Set(serde_json::to_value(reported_nics(&r.nics, &[]))
                            .unwrap_or_else(|_| serde_json::json!([]))),
                        boot: Set(boot_json(r.boot.as_ref())),
                        created_at: Set(t),
                        updated_at: Set(t),
                    }
                    .insert(&txn)
                    .await?;
                    NewEvent::info(
                        "vm.discovered",
                        "vm",
                        &id,
                        format!("VM {name} reported by its host"),
                    )
                    .write(&txn, actor)
                    .await?;
                    changed = true;
                    id
                }
            };
            let mut have: HashMap<String, disk::Model> = disks
                .remove(&vm_id)
                .unwrap_or_default()
                .into_iter()
                .map(|d| (d.name.clone(), d))
                .collect();
            for d in &r.disks {
                let device_id = Some(i64_of(d.disk_id, "disk_id")?);
                let size = i64_of(d.size_bytes, "size_bytes")?;
                match have.remove(d.name.trim()) {
                    Some(cur) => {
                        if cur.device_id != device_id
                            || cur.size_bytes != size
                            || cur.path.as_deref() != Some(d.export.as_str())
                        {
                            let mut am = cur.into_active_model();
                            am.device_id = Set(device_id);
                            am.size_bytes = Set(size);
                            am.path = Set(Some(d.export.clone()));
                            am.update(&txn).await?;
                            changed = true;
                        }
                    }
                    None => {
                        insert_disk(&txn, &vm_id, reported_disk(d), device_id).await?;
                        changed = true;
                    }
                }
            }
            // Disks the agent no longer reports: a protected VM's are kept (without an
            // id, so they are not replicated), others go.
            for (_, gone) in have {
                if members.contains(&vm_id) {
                    if gone.device_id.is_some() {
                        let mut am = gone.into_active_model();
                        am.device_id = Set(None);
                        am.update(&txn).await?;
                        changed = true;
                    }
                } else {
                    disk::Entity::delete_by_id(&gone.id).exec(&txn).await?;
                    changed = true;
                }
            }
        }
        for (name, gone) in by_name {
            if members.contains(&gone.id) {
                if gone.power_state == PowerState::Missing.as_str() {
                    continue;
                }
                let id = gone.id.clone();
                let mut am = gone.into_active_model();
                am.power_state = Set(PowerState::Missing.as_str().to_string());
                am.updated_at = Set(t);
                am.update(&txn).await?;
                disk::Entity::update_many()
                    .col_expr(
                        disk::Column::DeviceId,
                        sea_orm::sea_query::Expr::value(Option::<i64>::None),
                    )
                    .filter(disk::Column::VmId.eq(id.as_str()))
                    .exec(&txn)
                    .await?;
                NewEvent {
                    severity: "warning",
                    ..NewEvent::info(
                        "vm.missing",
                        "vm",
                        &id,
                        format!("protected VM {name} is no longer reported by its host"),
                    )
                }
                .write(&txn, actor)
                .await?;
            } else {
                vm::Entity::delete_by_id(&gone.id).exec(&txn).await?;
                NewEvent::info(
                    "vm.removed",
                    "vm",
                    &gone.id,
                    format!("VM {name} is no longer reported by its host"),
                )
                .write(&txn, actor)
                .await?;
            }
            changed = true;
        }
        self.commit(txn).await?;
        Ok(changed)
    }
}
