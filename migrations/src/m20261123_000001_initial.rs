//! The first schema: inventory (sites, hosts, VMs, disks), VPGs and members,
//! checkpoints, tasks, events, alerts, webhooks and API tokens.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

fn id(c: impl IntoIden + 'static) -> ColumnDef {
    ColumnDef::new(c)
        .string_len(36)
        .not_null()
        .primary_key()
        .to_owned()
}

fn serial(c: impl IntoIden + 'static) -> ColumnDef {
    ColumnDef::new(c)
        .big_integer()
        .not_null()
        .auto_increment()
        .primary_key()
        .to_owned()
}

fn fk_id(c: impl IntoIden + 'static) -> ColumnDef {
    ColumnDef::new(c).string_len(36).not_null().to_owned()
}

fn opt_id(c: impl IntoIden + 'static) -> ColumnDef {
    ColumnDef::new(c).string_len(36).null().to_owned()
}

fn ts(c: impl IntoIden + 'static) -> ColumnDef {
    ColumnDef::new(c)
        .timestamp_with_time_zone()
        .not_null()
        .to_owned()
}

fn opt_ts(c: impl IntoIden + 'static) -> ColumnDef {
    ColumnDef::new(c)
        .timestamp_with_time_zone()
        .null()
        .to_owned()
}

fn text(c: impl IntoIden + 'static) -> ColumnDef {
    ColumnDef::new(c).string().not_null().to_owned()
}

fn opt_text(c: impl IntoIden + 'static) -> ColumnDef {
    ColumnDef::new(c).string().null().to_owned()
}

fn index(
    name: &str,
    table: impl IntoIden + 'static,
    cols: &[&'static str],
) -> IndexCreateStatement {
    let mut i = Index::create();
    i.name(name).table(table);
    for c in cols {
        i.col(Alias::new(*c));
    }
    i.to_owned()
}

fn fk(
    name: &str,
    from: (impl IntoIden + 'static, impl IntoIden + 'static),
    to: (impl IntoIden + 'static, impl IntoIden + 'static),
    on_delete: ForeignKeyAction,
) -> ForeignKeyCreateStatement {
    ForeignKey::create()
        .name(name)
        .from(from.0, from.1)
        .to(to.0, to.1)
        .on_delete(on_delete)
        .to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(Sites::Table)
                .col(id(Sites::Id))
                .col(text(Sites::Name).unique_key())
                .col(text(Sites::Description))
                .col(opt_text(Sites::Location))
                .col(ts(Sites::CreatedAt))
                .col(ts(Sites::UpdatedAt))
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Hosts::Table)
                .col(id(Hosts::Id))
                .col(fk_id(Hosts::SiteId))
                .col(text(Hosts::Name).unique_key())
                .col(opt_text(Hosts::Address))
                .col(opt_text(Hosts::DataAddress))
                .col(opt_text(Hosts::NbdAddress))
                .col(opt_text(Hosts::StoragePath))
                .col(text(Hosts::Connectivity))
                .col(opt_text(Hosts::AgentVersion))
                .col(opt_ts(Hosts::LastSeenAt))
                .col(ts(Hosts::CreatedAt))
                .col(ts(Hosts::UpdatedAt))
                .foreign_key(&mut fk(
                    "fk_hosts_site",
                    (Hosts::Table, Hosts::SiteId),
                    (Sites::Table, Sites::Id),
                    ForeignKeyAction::Restrict,
                ))
                .to_owned(),
        )
        .await?;
        m.create_index(index("idx_hosts_site", Hosts::Table, &["site_id"]))
            .await?;

        m.create_table(
            Table::create()
                .table(Vms::Table)
                .col(id(Vms::Id))
                .col(fk_id(Vms::HostId))
                .col(text(Vms::Name))
                .col(text(Vms::PowerState))
                .col(ColumnDef::new(Vms::Cpus).integer().not_null())
                .col(ColumnDef::new(Vms::MemoryMib).big_integer().not_null())
                .col(ColumnDef::new(Vms::Nics).json().not_null())
                .col(ts(Vms::CreatedAt))
                .col(ts(Vms::UpdatedAt))
                .foreign_key(&mut fk(
                    "fk_vms_host",
                    (Vms::Table, Vms::HostId),
                    (Hosts::Table, Hosts::Id),
                    ForeignKeyAction::Restrict,
                ))
                .to_owned(),
        )
        .await?;
        m.create_index(
            index("uq_vms_host_name", Vms::Table, &["host_id", "name"])
                .unique()
                .to_owned(),
        )
        .await?;
        m.create_index(index("idx_vms_name", Vms::Table, &["name"]))
            .await?;

        m.create_table(
            Table::create()
                .table(Disks::Table)
                .col(id(Disks::Id))
                .col(fk_id(Disks::VmId))
                .col(text(Disks::Name))
                .col(ColumnDef::new(Disks::SizeBytes).big_integer().not_null())
                .col(opt_text(Disks::Path))
                .col(ts(Disks::CreatedAt))
                .foreign_key(&mut fk(
                    "fk_disks_vm",
                    (Disks::Table, Disks::VmId),
                    (Vms::Table, Vms::Id),
                    ForeignKeyAction::Cascade,
                ))
                .to_owned(),
        )
        .await?;
        m.create_index(
            index("uq_disks_vm_name", Disks::Table, &["vm_id", "name"])
                .unique()
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Vpgs::Table)
                .col(id(Vpgs::Id))
                .col(text(Vpgs::Name).unique_key())
                .col(text(Vpgs::Description))
                .col(opt_id(Vpgs::ProtectedSiteId))
                .col(fk_id(Vpgs::RecoverySiteId))
                .col(ColumnDef::new(Vpgs::Settings).json().not_null())
                .col(text(Vpgs::Lifecycle))
                .col(ColumnDef::new(Vpgs::Paused).boolean().not_null())
                .col(text(Vpgs::Status))
                .col(text(Vpgs::SubStatus))
                .col(ColumnDef::new(Vpgs::RpoActualMs).big_integer().null())
                .col(ColumnDef::new(Vpgs::HistoryActualSecs).big_integer().null())
                .col(ColumnDef::new(Vpgs::JournalBytes).big_integer().not_null())
                .col(opt_ts(Vpgs::ProtectedSince))
                .col(opt_ts(Vpgs::LastTestAt))
                .col(ColumnDef::new(Vpgs::Version).big_integer().not_null())
                .col(ts(Vpgs::CreatedAt))
                .col(ts(Vpgs::UpdatedAt))
                .foreign_key(&mut fk(
                    "fk_vpgs_protected_site",
                    (Vpgs::Table, Vpgs::ProtectedSiteId),
                    (Sites::Table, Sites::Id),
                    ForeignKeyAction::Restrict,
                ))
                .foreign_key(&mut fk(
                    "fk_vpgs_recovery_site",
                    (Vpgs::Table, Vpgs::RecoverySiteId),
                    (Sites::Table, Sites::Id),
                    ForeignKeyAction::Restrict,
                ))
                .to_owned(),
        )
        .await?;
        m.create_index(index("idx_vpgs_status", Vpgs::Table, &["status"]))
            .await?;
        m.create_index(index(
            "idx_vpgs_protected_site",
            Vpgs::Table,
            &["protected_site_id"],
        ))
        .await?;
        m.create_index(index(
            "idx_vpgs_recovery_site",
            Vpgs::Table,
            &["recovery_site_id"],
        ))
        .await?;

        m.create_table(
            Table::create()
                .table(VpgMembers::Table)
                .col(id(VpgMembers::Id))
                .col(fk_id(VpgMembers::VpgId))
                .col(fk_id(VpgMembers::VmId).unique_key())
                .col(opt_id(VpgMembers::RecoveryHostId))
                .col(ColumnDef::new(VpgMembers::BootGroup).integer().not_null())
                .col(ColumnDef::new(VpgMembers::Settings).json().not_null())
                .col(ts(VpgMembers::CreatedAt))
                .col(ts(VpgMembers::UpdatedAt))
                .foreign_key(&mut fk(
                    "fk_members_vpg",
                    (VpgMembers::Table, VpgMembers::VpgId),
                    (Vpgs::Table, Vpgs::Id),
                    ForeignKeyAction::Cascade,
                ))
                .foreign_key(&mut fk(
                    "fk_members_vm",
                    (VpgMembers::Table, VpgMembers::VmId),
                    (Vms::Table, Vms::Id),
                    ForeignKeyAction::Restrict,
                ))
                .foreign_key(&mut fk(
                    "fk_members_recovery_host",
                    (VpgMembers::Table, VpgMembers::RecoveryHostId),
                    (Hosts::Table, Hosts::Id),
                    ForeignKeyAction::Restrict,
                ))
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "idx_members_vpg",
            VpgMembers::Table,
            &["vpg_id", "boot_group"],
        ))
        .await?;
        m.create_index(index(
            "idx_members_recovery_host",
            VpgMembers::Table,
            &["recovery_host_id"],
        ))
        .await?;

        m.create_table(
            Table::create()
                .table(Checkpoints::Table)
                .col(serial(Checkpoints::Id))
                .col(fk_id(Checkpoints::VpgId))
                .col(ts(Checkpoints::TakenAt))
                .col(text(Checkpoints::Kind))
                .col(opt_text(Checkpoints::Tag))
                .col(
                    ColumnDef::new(Checkpoints::Recoverable)
                        .boolean()
                        .not_null(),
                )
                .foreign_key(&mut fk(
                    "fk_checkpoints_vpg",
                    (Checkpoints::Table, Checkpoints::VpgId),
                    (Vpgs::Table, Vpgs::Id),
                    ForeignKeyAction::Cascade,
                ))
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "idx_checkpoints_vpg_taken",
            Checkpoints::Table,
            &["vpg_id", "taken_at"],
        ))
        .await?;

        m.create_table(
            Table::create()
                .table(Tasks::Table)
                .col(id(Tasks::Id))
                .col(opt_id(Tasks::VpgId))
                .col(text(Tasks::Kind))
                .col(text(Tasks::State))
                .col(ColumnDef::new(Tasks::Progress).double().not_null())
                .col(ColumnDef::new(Tasks::Steps).json().not_null())
                .col(ColumnDef::new(Tasks::CurrentStep).integer().not_null())
                .col(ColumnDef::new(Tasks::Params).json().not_null())
                .col(ColumnDef::new(Tasks::Result).json().null())
                .col(opt_text(Tasks::Error))
                .col(text(Tasks::CreatedBy))
                .col(ts(Tasks::CreatedAt))
                .col(opt_ts(Tasks::StartedAt))
                .col(opt_ts(Tasks::FinishedAt))
                .col(ts(Tasks::UpdatedAt))
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "idx_tasks_vpg",
            Tasks::Table,
            &["vpg_id", "created_at"],
        ))
        .await?;
        m.create_index(index("idx_tasks_state", Tasks::Table, &["state"]))
            .await?;

        m.create_table(
            Table::create()
                .table(Events::Table)
                .col(serial(Events::Id))
                .col(ts(Events::At))
                .col(text(Events::Kind))
                .col(text(Events::Severity))
                .col(text(Events::Actor))
                .col(opt_id(Events::VpgId))
                .col(text(Events::SubjectType))
                .col(opt_text(Events::SubjectId))
                .col(ColumnDef::new(Events::Message).text().not_null())
                .col(ColumnDef::new(Events::Details).json().null())
                .to_owned(),
        )
        .await?;
        m.create_index(index("idx_events_vpg", Events::Table, &["vpg_id", "id"]))
            .await?;
        m.create_index(index("idx_events_kind", Events::Table, &["kind", "id"]))
            .await?;
        m.create_index(index("idx_events_at", Events::Table, &["at"]))
            .await?;

        m.create_table(
            Table::create()
                .table(Alerts::Table)
                .col(id(Alerts::Id))
                .col(text(Alerts::Kind))
                .col(text(Alerts::Severity))
                .col(opt_id(Alerts::VpgId))
                .col(opt_id(Alerts::HostId))
                .col(opt_id(Alerts::SiteId))
                .col(ColumnDef::new(Alerts::Message).text().not_null())
                .col(ColumnDef::new(Alerts::AffectedCount).integer().not_null())
                .col(ts(Alerts::RaisedAt))
                .col(opt_ts(Alerts::ClearedAt))
                .col(opt_text(Alerts::AcknowledgedBy))
                .col(opt_ts(Alerts::AcknowledgedAt))
                .col(ColumnDef::new(Alerts::Details).json().null())
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "idx_alerts_open",
            Alerts::Table,
            &["cleared_at", "raised_at"],
        ))
        .await?;
        m.create_index(index(
            "idx_alerts_vpg",
            Alerts::Table,
            &["vpg_id", "raised_at"],
        ))
        .await?;
        m.create_index(index(
            "idx_alerts_kind",
            Alerts::Table,
            &["kind", "raised_at"],
        ))
        .await?;

        m.create_table(
            Table::create()
                .table(Webhooks::Table)
                .col(id(Webhooks::Id))
                .col(text(Webhooks::Name).unique_key())
                .col(ColumnDef::new(Webhooks::Url).text().not_null())
                .col(ColumnDef::new(Webhooks::EventKinds).json().not_null())
                .col(text(Webhooks::Secret))
                .col(ColumnDef::new(Webhooks::Enabled).boolean().not_null())
                .col(ts(Webhooks::CreatedAt))
                .col(ts(Webhooks::UpdatedAt))
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(ApiTokens::Table)
                .col(id(ApiTokens::Id))
                .col(text(ApiTokens::Name))
                .col(text(ApiTokens::Role))
                .col(text(ApiTokens::TokenHash).unique_key())
                .col(text(ApiTokens::Prefix))
                .col(ts(ApiTokens::CreatedAt))
                .col(opt_ts(ApiTokens::LastUsedAt))
                .col(opt_ts(ApiTokens::ExpiresAt))
                .col(opt_ts(ApiTokens::RevokedAt))
                .to_owned(),
        )
        .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for t in [
            ApiTokens::Table.into_iden(),
            Webhooks::Table.into_iden(),
            Alerts::Table.into_iden(),
            Events::Table.into_iden(),
            Tasks::Table.into_iden(),
            Checkpoints::Table.into_iden(),
            VpgMembers::Table.into_iden(),
            Vpgs::Table.into_iden(),
            Disks::Table.into_iden(),
            Vms::Table.into_iden(),
            Hosts::Table.into_iden(),
            Sites::Table.into_iden(),
        ] {
            m.drop_table(Table::drop().table(t).to_owned()).await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum Sites {
    Table,
    Id,
    Name,
    Description,
    Location,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum Hosts {
    Table,
    Id,
    SiteId,
    Name,
    Address,
    DataAddress,
    NbdAddress,
    StoragePath,
    Connectivity,
    AgentVersion,
    LastSeenAt,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum Vms {
    Table,
    Id,
    HostId,
    Name,
    PowerState,
    Cpus,
    MemoryMib,
    Nics,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum Disks {
    Table,
    Id,
    VmId,
    Name,
    SizeBytes,
    Path,
    CreatedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum Vpgs {
    Table,
    Id,
    Name,
    Description,
    ProtectedSiteId,
    RecoverySiteId,
    Settings,
    Lifecycle,
    Paused,
    Status,
    SubStatus,
    RpoActualMs,
    HistoryActualSecs,
    JournalBytes,
    ProtectedSince,
    LastTestAt,
    Version,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum VpgMembers {
    Table,
    Id,
    VpgId,
    VmId,
    RecoveryHostId,
    BootGroup,
    Settings,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum Checkpoints {
    Table,
    Id,
    VpgId,
    TakenAt,
    Kind,
    Tag,
    Recoverable,
}

#[derive(DeriveIden, Clone, Copy)]
enum Tasks {
    Table,
    Id,
    VpgId,
    Kind,
    State,
    Progress,
    Steps,
    CurrentStep,
    Params,
    Result,
    Error,
    CreatedBy,
    CreatedAt,
    StartedAt,
    FinishedAt,
    UpdatedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum Events {
    Table,
    Id,
    At,
    Kind,
    Severity,
    Actor,
    VpgId,
    SubjectType,
    SubjectId,
    Message,
    Details,
}

#[derive(DeriveIden, Clone, Copy)]
enum Alerts {
    Table,
    Id,
    Kind,
    Severity,
    VpgId,
    HostId,
    SiteId,
    Message,
    AffectedCount,
    RaisedAt,
    ClearedAt,
    AcknowledgedBy,
    AcknowledgedAt,
    Details,
}

#[derive(DeriveIden, Clone, Copy)]
enum Webhooks {
    Table,
    Id,
    Name,
    Url,
    EventKinds,
    Secret,
    Enabled,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum ApiTokens {
    Table,
    Id,
    Name,
    Role,
    TokenHash,
    Prefix,
    CreatedAt,
    LastUsedAt,
    ExpiresAt,
    RevokedAt,
}
