//! Persistence of the manager: the only module that speaks sea-orm. Every public
//! function takes and returns domain or `proto::api` types; every mutation writes its
//! audit event in the same transaction as the change itself.

mod alerts;
mod checkpoints;
mod control;
pub mod entity;
mod inventory;
mod live;
pub mod operations;
mod records;
mod rounds;
pub mod rpo_history;
mod tokens;
mod vpgs;
mod webhooks;

pub use alerts::{AlertContext, HostAlertContext, NewAlert, VpgAlertContext};
pub use checkpoints::{
    CheckpointSummary, ListedVpg, LiveMember, LiveVpg, NewCheckpoint, RecoverableMark,
    StatusUpdate, VpgFingerprint,
};
pub use control::{Admitted, DesiredRows, ReplicaTarget, DEFAULT_ENROLMENT_SECS, ENROLMENT_PREFIX};
pub(crate) use inventory::unknown_host;
pub use inventory::{check_vm_create, MAX_NICS_PER_VM};
pub use tokens::{hash_secret, AuthenticatedToken};
pub use vpgs::{MetricCounts, VpgDeletion};
pub use webhooks::{
    AttemptOutcome, NextDelivery, PendingDelivery, WebhookTarget, WEBHOOK_SECRET_PREFIX,
};

use crate::model::ValidationError;
use chrono::{DateTime, Utc};
use migration::{Migrator, MigratorTrait};
use sea_orm::{
    ActiveModelTrait, ConnectOptions, ConnectionTrait, Database, DatabaseConnection,
    DatabaseTransaction, DbBackend, DbErr, Set, SqlErr, Statement,
};
use std::sync::Arc;
use std::time::Duration;

/// What can go wrong in the store, in terms the API maps one to one onto problems.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("the VPG changed since version {expected} (now {current})")]
    VersionMismatch { expected: u64, current: u64 },
    #[error("database error: {0}")]
    Db(#[from] DbErr),
}

impl StoreError {
    pub(crate) fn not_found(kind: &'static str, id: &str) -> Self {
        StoreError::NotFound {
            kind,
            id: id.to_string(),
        }
    }

    pub(crate) fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        StoreError::Conflict {
            code,
            message: message.into(),
        }
    }
}

/// Turns a unique-constraint violation into a named conflict; other errors pass.
pub(crate) fn on_unique(code: &'static str, message: String) -> impl FnOnce(DbErr) -> StoreError {
    move |e| match e.sql_err() {
        Some(SqlErr::UniqueConstraintViolation(_)) => StoreError::conflict(code, message),
        _ => StoreError::Db(e),
    }
}

/// Who made a change, for the audit log.
#[derive(Debug, Clone)]
pub struct Actor(pub String);

impl Actor {
    pub fn system() -> Self {
        Actor("system".into())
    }
}

/// The manager's database.
#[derive(Clone, Debug)]
pub struct Store {
    db: DatabaseConnection,
    /// SQLite allows one writer; taking this before a write transaction turns what
    /// would be SQLITE_BUSY failures of concurrent requests into a short queue.
    /// PostgreSQL needs none: row locks and conditional updates do the job.
    write_lock: Option<Arc<tokio::sync::Mutex<()>>>,
    /// Counts committed write transactions. Every mutation writes its event in the
    /// transaction it commits, so a tick here means "new events may be visible": the
    /// live stream and the webhook worker wait on it instead of polling.
    commits: Arc<tokio::sync::watch::Sender<u64>>,
}

/// A migration and whether it is applied.
#[derive(Debug, Clone)]
pub struct MigrationState {
    pub name: String,
    pub applied: bool,
}

pub const DEFAULT_PAGE: u64 = 100;
pub const MAX_PAGE: u64 = 1000;

impl Store {
    /// Connects; for SQLite the file is created if missing and put in WAL mode so the
    /// CLI and a running manager can share it.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let mut opts = ConnectOptions::new(url.to_string());
        let sqlite = url.starts_with("sqlite:");
        opts.max_connections(if sqlite { 8 } else { 16 })
            .min_connections(1)
            .connect_timeout(Duration::from_secs(10))
            .acquire_timeout(Duration::from_secs(10))
            .sqlx_logging(false);
        if sqlite {
            // Per connection, not once: every pooled connection must run in WAL with
            // NORMAL sync (one fsync per checkpoint, not per commit) and wait for the
            // writer instead of failing with "database is locked".
            opts.map_sqlx_sqlite_opts(|o| {
                o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(10))
            });
        }
        let db = Database::connect(opts).await?;
        Ok(Self {
            db,
            write_lock: sqlite.then(|| Arc::new(tokio::sync::Mutex::new(()))),
            commits: Arc::new(tokio::sync::watch::Sender::new(0)),
        })
    }

    /// Commits a write transaction and tells the watchers of [`Store::commits`].
    pub(crate) async fn commit(&self, txn: DatabaseTransaction) -> Result<(), DbErr> {
        txn.commit().await?;
        self.commits.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }

    /// Ticks after every committed write (see the field's note): wait on it to read new
    /// events as soon as they are visible.
    pub fn commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.commits.subscribe()
    }

    pub(crate) async fn write_guard(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match &self.write_lock {
            Some(l) => Some(l.lock().await),
            None => None,
        }
    }

    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    pub fn backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    pub async fn migrate_up(&self) -> Result<(), StoreError> {
        Ok(Migrator::up(&self.db, None).await?)
    }

    /// Reverts the last `steps` migrations (all of them when None).
    pub async fn migrate_down(&self, steps: Option<u32>) -> Result<(), StoreError> {
        Ok(Migrator::down(&self.db, steps).await?)
    }

    pub async fn migration_status(&self) -> Result<Vec<MigrationState>, StoreError> {
        let applied: Vec<String> = Migrator::get_applied_migrations(&self.db)
            .await?
            .into_iter()
            .map(|m| m.name().to_string())
            .collect();
        Ok(Migrator::migrations()
            .into_iter()
            .map(|m| {
                let name = m.name().to_string();
                MigrationState {
                    applied: applied.contains(&name),
                    name,
                }
            })
            .collect())
    }

    /// Whether the database answers (for `/readyz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let backend = self.backend();
        self.db
            .query_one(Statement::from_string(backend, "SELECT 1"))
            .await?;
        Ok(())
    }

    pub async fn close(self) -> Result<(), StoreError> {
        Ok(self.db.close().await?)
    }
}

pub(crate) fn now() -> DateTime<Utc> {
    // Microsecond precision: what both databases store, so values read back compare equal.
    let t = Utc::now();
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

pub(crate) fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

pub(crate) fn page_limit(limit: Option<u32>) -> Result<u64, StoreError> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(l) if (1..=MAX_PAGE as u32).contains(&l) => Ok(u64::from(l)),
        Some(_) => Err(ValidationError::new(
            "request.invalid_limit",
            "limit",
            format!("limit must be 1 to {MAX_PAGE}"),
        )
        .into()),
    }
}

/// Cuts one extra row off a keyset query and turns it into the next cursor.
pub(crate) fn finish_page<M, T>(
    mut rows: Vec<M>,
    limit: u64,
    key: impl Fn(&M) -> String,
    map: impl FnMut(M) -> T,
) -> crate::proto::api::Page<T> {
    let more = rows.len() as u64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = if more { rows.last().map(key) } else { None };
    crate::proto::api::Page {
        items: rows.into_iter().map(map).collect(),
        next_cursor,
    }
}

/// An audit event, written by every mutation next to the change it records.
pub(crate) struct NewEvent<'a> {
    pub kind: &'a str,
    pub severity: &'a str,
    pub vpg_id: Option<&'a str>,
    pub subject_type: &'a str,
    pub subject_id: Option<&'a str>,
    pub message: String,
    pub details: Option<serde_json::Value>,
}

impl<'a> NewEvent<'a> {
    pub fn info(
        kind: &'a str,
        subject_type: &'a str,
        subject_id: &'a str,
        message: String,
    ) -> Self {
        Self {
            kind,
            severity: "info",
            vpg_id: None,
            subject_type,
            subject_id: Some(subject_id),
            message,
            details: None,
        }
    }

    pub fn vpg(mut self, vpg_id: &'a str) -> Self {
        self.vpg_id = Some(vpg_id);
        self
    }

    pub fn details(mut self, d: serde_json::Value) -> Self {
        self.details = Some(d);
        self
    }

    pub async fn write(self, db: &impl ConnectionTrait, actor: &Actor) -> Result<(), DbErr> {
        entity::event::ActiveModel {
            at: Set(now()),
            kind: Set(self.kind.to_string()),
            severity: Set(self.severity.to_string()),
            actor: Set(actor.0.clone()),
            vpg_id: Set(self.vpg_id.map(str::to_string)),
            subject_type: Set(self.subject_type.to_string()),
            subject_id: Set(self.subject_id.map(str::to_string)),
            message: Set(self.message),
            details: Set(self.details),
            ..Default::default()
        }
        .insert(db)
        .await
        .map(|_| ())
    }
}

pub(crate) fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(crate) fn i64_of(v: u64, field: &str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| {
        ValidationError::new("request.number_out_of_range", field, "number is too large").into()
    })
}
