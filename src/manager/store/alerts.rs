//! Alerts as the control plane raises, updates and clears them, and as operators
//! acknowledge them. Each change writes its `alert.*` event in the same transaction, so
//! the event log (and the webhooks fed from it) never misses or invents one.

use super::entity::{alert, host, vpg};
use super::records::to_alert;
use super::{new_id, now, Actor, NewEvent, Store, StoreError};
use crate::model::alerts::{AlertKind, Severity};
use crate::proto::api::Alert;
use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, Set, TransactionTrait};
use std::collections::HashMap;

/// What the alert rules need from the database besides the live facts.
#[derive(Debug, Clone, Default)]
pub struct AlertContext {
    pub vpgs: HashMap<String, VpgAlertContext>,
    /// Enrolled hosts only: a host that never had an agent cannot be disconnected.
    pub hosts: Vec<HostAlertContext>,
}

#[derive(Debug, Clone)]
pub struct VpgAlertContext {
    pub protected_site_id: Option<String>,
    pub recovery_site_id: String,
    pub last_test_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub struct HostAlertContext {
    pub id: String,
    pub name: String,
    pub site_id: String,
}

/// An alert to raise.
#[derive(Debug, Clone)]
pub struct NewAlert {
    pub kind: String,
    pub severity: String,
    pub vpg_id: Option<String>,
    pub host_id: Option<String>,
    pub site_id: Option<String>,
    pub message: String,
    pub affected_count: u32,
    pub details: Option<serde_json::Value>,
}

fn event_for<'a>(kind: &'a str, a: &'a alert::Model, message: String) -> NewEvent<'a> {
    let mut ev = NewEvent::info(kind, "alert", &a.id, message).details(serde_json::json!({
        "alert_id": a.id,
        "kind": a.kind,
        "severity": a.severity,
        "vpg_id": a.vpg_id,
        "host_id": a.host_id,
        "site_id": a.site_id,
        "affected_count": a.affected_count,
        "details": a.details,
    }));
    ev.severity = if kind == "alert.raised" {
        a.severity.as_str()
    } else {
        "info"
    };
    if let Some(v) = a.vpg_id.as_deref() {
        ev = ev.vpg(v);
    }
    ev
}

impl Store {
    pub async fn alert_context(&self) -> Result<AlertContext, StoreError> {
        let vpgs = vpg::Entity::find()
            .all(&self.db)
            .await?
            .into_iter()
            .map(|v| {
                (
                    v.id,
                    VpgAlertContext {
                        protected_site_id: v.protected_site_id,
                        recovery_site_id: v.recovery_site_id,
                        last_test_at: v.last_test_at,
                    },
                )
            })
            .collect();
        let hosts = host::Entity::find()
            .filter(host::Column::EnrolledAt.is_not_null())
            .all(&self.db)
            .await?
            .into_iter()
            .map(|h| HostAlertContext {
                id: h.id,
                name: h.name,
                site_id: h.site_id,
            })
            .collect();
        Ok(AlertContext { vpgs, hosts })
    }

    /// Alerts not cleared yet (the control plane resumes them after a restart).
    pub async fn open_alerts(&self) -> Result<Vec<Alert>, StoreError> {
        Ok(alert::Entity::find()
            .filter(alert::Column::ClearedAt.is_null())
            .all(&self.db)
            .await?
            .into_iter()
            .map(to_alert)
            .collect())
    }

    /// Inserts an open alert and its `alert.raised` event; returns its id.
    pub async fn raise_alert(&self, a: &NewAlert) -> Result<String, StoreError> {
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let m = alert::ActiveModel {
            id: Set(new_id()),
            kind: Set(a.kind.clone()),
            severity: Set(a.severity.clone()),
            vpg_id: Set(a.vpg_id.clone()),
            host_id: Set(a.host_id.clone()),
            site_id: Set(a.site_id.clone()),
            message: Set(a.message.clone()),
            affected_count: Set(i32::try_from(a.affected_count).unwrap_or(i32::MAX)),
            raised_at: Set(now()),
            cleared_at: Set(None),
            acknowledged_by: Set(None),
            acknowledged_at: Set(None),
            details: Set(a.details.clone()),
        }
        .insert(&txn)
        .await?;
        event_for("alert.raised", &m, format!("alert raised: {}", m.message))
            .write(&txn, &Actor::system())
            .await?;
        self.commit(txn).await?;
        Ok(m.id)
    }

    /// Raises an event alert of a VPG (see `AlertKind::is_event`) unless one of that kind
    /// is open for it already (an operation's end may be handled twice across a restart).
    /// Returns the open alert's id.
    pub async fn raise_event_alert(
        &self,
        kind: AlertKind,
        vpg_id: &str,
        severity: Severity,
        message: String,
        details: serde_json::Value,
    ) -> Result<String, StoreError> {
        if let Some(open) = alert::Entity::find()
            .filter(alert::Column::Kind.eq(kind.as_str()))
            .filter(alert::Column::VpgId.eq(vpg_id))
            .filter(alert::Column::ClearedAt.is_null())
            .one(&self.db)
            .await?
        {
            return Ok(open.id);
        }
        self.raise_alert(&NewAlert {
            kind: kind.as_str().to_string(),
            severity: severity.as_str().to_string(),
            vpg_id: Some(vpg_id.to_string()),
            host_id: None,
            site_id: None,
            message,
            affected_count: 1,
            details: Some(details),
        })
        .await
    }

    /// Clears the VPG's open event alerts (its operations ended as asked since).
    pub async fn clear_event_alerts(&self, vpg_id: &str) -> Result<usize, StoreError> {
        let kinds: Vec<&str> = AlertKind::ALL
            .iter()
            .filter(|k| k.is_event())
            .map(|k| k.as_str())
            .collect();
        let open = alert::Entity::find()
            .filter(alert::Column::Kind.is_in(kinds))
            .filter(alert::Column::VpgId.eq(vpg_id))
            .filter(alert::Column::ClearedAt.is_null())
            .all(&self.db)
            .await?;
        let mut n = 0;
        for a in open {
            n += usize::from(self.clear_alert(&a.id).await?);
        }
        Ok(n)
    }

    /// Sets `cleared_at` and writes `alert.cleared`; false if it was not open.
    pub async fn clear_alert(&self, id: &str) -> Result<bool, StoreError> {
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let Some(m) = alert::Entity::find_by_id(id).one(&txn).await? else {
            return Ok(false);
        };
        if m.cleared_at.is_some() {
            return Ok(false);
        }
        alert::Entity::update_many()
            .col_expr(alert::Column::ClearedAt, Expr::value(Some(now())))
            .filter(alert::Column::Id.eq(id))
            .filter(alert::Column::ClearedAt.is_null())
            .exec(&txn)
            .await?;
        event_for("alert.cleared", &m, format!("alert cleared: {}", m.message))
            .write(&txn, &Actor::system())
            .await?;
        self.commit(txn).await?;
        Ok(true)
    }

    /// An open alert whose severity or reach changed (e.g. a third VPG lost the same
    /// site): one row, updated, with an `alert.updated` event.
    pub async fn update_alert(
        &self,
        id: &str,
        severity: &str,
        affected_count: u32,
        message: &str,
    ) -> Result<(), StoreError> {
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let Some(m) = alert::Entity::find_by_id(id).one(&txn).await? else {
            return Ok(());
        };
        let count = i32::try_from(affected_count).unwrap_or(i32::MAX);
        if m.cleared_at.is_some() || (m.severity == severity && m.affected_count == count) {
            return Ok(());
        }
        let mut am: alert::ActiveModel = m.into();
        am.severity = Set(severity.to_string());
        am.affected_count = Set(count);
        am.message = Set(message.to_string());
        let m = am.update(&txn).await?;
        event_for("alert.updated", &m, format!("alert updated: {}", m.message))
            .write(&txn, &Actor::system())
            .await?;
        self.commit(txn).await?;
        Ok(())
    }

    /// An operator saw the alert. Once only: a second acknowledgement is a conflict.
    pub async fn acknowledge_alert(&self, actor: &Actor, id: &str) -> Result<Alert, StoreError> {
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let m = alert::Entity::find_by_id(id)
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::not_found("alert", id))?;
        if let (Some(by), Some(at)) = (&m.acknowledged_by, m.acknowledged_at) {
            return Err(StoreError::conflict(
                "alert.already_acknowledged",
                format!("alert {id} was acknowledged by {by} at {at}"),
            ));
        }
        let at = now();
        // Guarded by the column, so two concurrent acknowledgements cannot both win.
        let res = alert::Entity::update_many()
            .col_expr(
                alert::Column::AcknowledgedBy,
                Expr::value(Some(actor.0.clone())),
            )
            .col_expr(alert::Column::AcknowledgedAt, Expr::value(Some(at)))
            .filter(alert::Column::Id.eq(id))
            .filter(alert::Column::AcknowledgedAt.is_null())
            .exec(&txn)
            .await?;
        if res.rows_affected == 0 {
            return Err(StoreError::conflict(
                "alert.already_acknowledged",
                format!("alert {id} was acknowledged meanwhile"),
            ));
        }
        let mut m = m;
        m.acknowledged_by = Some(actor.0.clone());
        m.acknowledged_at = Some(at);
        event_for(
            "alert.acknowledged",
            &m,
            format!("alert acknowledged by {}: {}", actor.0, m.message),
        )
        .write(&txn, actor)
        .await?;
        self.commit(txn).await?;
        Ok(to_alert(m))
    }
}
