//! Read side of checkpoints, tasks, events and alerts (written by the engines that
//! produce them).

use super::entity::{alert, checkpoint, event, task, vpg};
use super::{finish_page, page_limit, Store, StoreError};
use crate::model::ValidationError;
use crate::proto::api::{
    Alert, AlertQuery, Checkpoint, CheckpointQuery, Event, EventQuery, Page, PageQuery, Task,
    TaskQuery, TaskStep,
};
use crate::proto::control::QuiesceMethod;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};

fn cursor_i64(c: &Option<String>) -> Result<Option<i64>, StoreError> {
    c.as_deref()
        .map(|s| {
            s.parse::<i64>().map_err(|_| {
                StoreError::from(ValidationError::new(
                    "request.invalid_cursor",
                    "cursor",
                    "cursor is not one this list handed out",
                ))
            })
        })
        .transpose()
}

pub(super) fn to_checkpoint(m: checkpoint::Model) -> Checkpoint {
    let app_consistent = m.quiesce.as_deref() == Some(QuiesceMethod::GuestAgent.as_str());
    Checkpoint {
        id: m.id,
        vpg_id: m.vpg_id,
        taken_at: m.taken_at,
        kind: m.kind,
        tag: m.tag,
        recoverable: m.recoverable,
        quiesce: m.quiesce,
        app_consistent,
    }
}

pub(super) fn to_task(m: task::Model) -> Task {
    let details = super::operations::task_details(&m.kind, &m.params);
    Task {
        id: m.id,
        vpg_id: m.vpg_id,
        kind: m.kind,
        state: m.state,
        progress: m.progress,
        steps: serde_json::from_value::<Vec<TaskStep>>(m.steps).unwrap_or_default(),
        current_step: u32::try_from(m.current_step).unwrap_or(0),
        details,
        error: m.error,
        created_by: m.created_by,
        created_at: m.created_at,
        started_at: m.started_at,
        finished_at: m.finished_at,
    }
}

pub(super) fn to_event(m: event::Model) -> Event {
    Event {
        id: m.id,
        at: m.at,
        kind: m.kind,
        severity: m.severity,
        actor: m.actor,
        vpg_id: m.vpg_id,
        subject_type: m.subject_type,
        subject_id: m.subject_id,
        message: m.message,
        details: m.details,
    }
}

pub(super) fn to_alert(m: alert::Model) -> Alert {
    Alert {
        id: m.id,
        kind: m.kind,
        severity: m.severity,
        vpg_id: m.vpg_id,
        host_id: m.host_id,
        site_id: m.site_id,
        message: m.message,
        affected_count: u32::try_from(m.affected_count).unwrap_or(0),
        raised_at: m.raised_at,
        cleared_at: m.cleared_at,
        acknowledged_by: m.acknowledged_by,
        acknowledged_at: m.acknowledged_at,
        details: m.details,
    }
}

impl Store {
    /// Newest first.
    pub async fn list_checkpoints(
        &self,
        vpg_id: &str,
        q: &CheckpointQuery,
        p: &PageQuery,
    ) -> Result<Page<Checkpoint>, StoreError> {
        if vpg::Entity::find_by_id(vpg_id)
            .one(&self.db)
            .await?
            .is_none()
        {
            return Err(StoreError::not_found("vpg", vpg_id));
        }
        let limit = page_limit(p.limit)?;
        let mut sel = checkpoint::Entity::find()
            .filter(checkpoint::Column::VpgId.eq(vpg_id))
            .order_by_desc(checkpoint::Column::Id);
        if let Some(c) = cursor_i64(&p.cursor)? {
            sel = sel.filter(checkpoint::Column::Id.lt(c));
        }
        if let Some(r) = q.recoverable {
            sel = sel.filter(checkpoint::Column::Recoverable.eq(r));
        }
        match q.tagged {
            Some(true) => sel = sel.filter(checkpoint::Column::Tag.is_not_null()),
            Some(false) => sel = sel.filter(checkpoint::Column::Tag.is_null()),
            None => {}
        }
        let rows = sel.limit(limit + 1).all(&self.db).await?;
        Ok(finish_page(
            rows,
            limit,
            |m| m.id.to_string(),
            to_checkpoint,
        ))
    }

    /// Newest first.
    pub async fn list_tasks(&self, q: &TaskQuery, p: &PageQuery) -> Result<Page<Task>, StoreError> {
        let limit = page_limit(p.limit)?;
        let mut sel = task::Entity::find().order_by_desc(task::Column::Id);
        if let Some(c) = &p.cursor {
            sel = sel.filter(task::Column::Id.lt(c.as_str()));
        }
        if let Some(v) = &q.vpg {
            sel = sel.filter(task::Column::VpgId.eq(v.as_str()));
        }
        if let Some(s) = &q.state {
            sel = sel.filter(task::Column::State.eq(s.as_str()));
        }
        let rows = sel.limit(limit + 1).all(&self.db).await?;
        Ok(finish_page(rows, limit, |m| m.id.clone(), to_task))
    }

    pub async fn get_task(&self, id: &str) -> Result<Task, StoreError> {
        task::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .map(to_task)
            .ok_or_else(|| StoreError::not_found("task", id))
    }

    /// Newest first.
    pub async fn list_events(
        &self,
        q: &EventQuery,
        p: &PageQuery,
    ) -> Result<Page<Event>, StoreError> {
        let limit = page_limit(p.limit)?;
        let mut sel = event::Entity::find().order_by_desc(event::Column::Id);
        if let Some(c) = cursor_i64(&p.cursor)? {
            sel = sel.filter(event::Column::Id.lt(c));
        }
        if let Some(v) = &q.vpg {
            sel = sel.filter(event::Column::VpgId.eq(v.as_str()));
        }
        if let Some(k) = &q.kind {
            sel = if k.ends_with('.') {
                sel.filter(event::Column::Kind.starts_with(k.as_str()))
            } else {
                sel.filter(event::Column::Kind.eq(k.as_str()))
            };
        }
        if let Some(s) = &q.severity {
            sel = sel.filter(event::Column::Severity.eq(s.as_str()));
        }
        let rows = sel.limit(limit + 1).all(&self.db).await?;
        Ok(finish_page(rows, limit, |m| m.id.to_string(), to_event))
    }

    /// Newest first.
    pub async fn list_alerts(
        &self,
        q: &AlertQuery,
        p: &PageQuery,
    ) -> Result<Page<Alert>, StoreError> {
        let limit = page_limit(p.limit)?;
        let mut sel = alert::Entity::find().order_by_desc(alert::Column::Id);
        if let Some(c) = &p.cursor {
            sel = sel.filter(alert::Column::Id.lt(c.as_str()));
        }
        if let Some(v) = &q.vpg {
            sel = sel.filter(alert::Column::VpgId.eq(v.as_str()));
        }
        match q.open {
            Some(true) => sel = sel.filter(alert::Column::ClearedAt.is_null()),
            Some(false) => sel = sel.filter(alert::Column::ClearedAt.is_not_null()),
            None => {}
        }
        if let Some(s) = &q.severity {
            sel = sel.filter(alert::Column::Severity.eq(s.as_str()));
        }
        if let Some(k) = &q.kind {
            sel = sel.filter(alert::Column::Kind.eq(k.as_str()));
        }
        if let Some(h) = &q.host {
            sel = sel.filter(alert::Column::HostId.eq(h.as_str()));
        }
        if let Some(s) = &q.site {
            sel = sel.filter(alert::Column::SiteId.eq(s.as_str()));
        }
        match q.acknowledged {
            Some(true) => sel = sel.filter(alert::Column::AcknowledgedAt.is_not_null()),
            Some(false) => sel = sel.filter(alert::Column::AcknowledgedAt.is_null()),
            None => {}
        }
        let rows = sel.limit(limit + 1).all(&self.db).await?;
        Ok(finish_page(rows, limit, |m| m.id.clone(), to_alert))
    }

    pub async fn get_alert(&self, id: &str) -> Result<Alert, StoreError> {
        alert::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .map(to_alert)
            .ok_or_else(|| StoreError::not_found("alert", id))
    }
}
