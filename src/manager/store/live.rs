//! What the live stream reads: new events after a cursor, the records they name, and
//! the whole picture for a snapshot.

use super::entity::{alert, event, task};
use super::records::{to_alert, to_event, to_task};
use super::{Store, StoreError};
use crate::proto::api::{
    Alert, Event, EventQuery, Host, HostQuery, Page, PageQuery, Site, SiteQuery, Task,
};
use sea_orm::{ColumnTrait, Condition, EntityTrait, QueryFilter, QueryOrder, QuerySelect};

/// Finished tasks a snapshot carries besides the running ones.
const RECENT_TASKS: u64 = 20;
/// Events a snapshot carries.
const RECENT_EVENTS: u32 = 50;

impl Store {
    /// The id of the newest event (0 when there is none).
    pub async fn newest_event_id(&self) -> Result<i64, StoreError> {
        super::webhooks::newest_event_id(&self.db).await
    }

    /// Events with an id above `cursor`, and those among `also` (ids skipped earlier that
    /// may have committed since), in id order, at most `limit`.
    pub async fn events_after(
        &self,
        cursor: i64,
        also: &[i64],
        limit: u64,
    ) -> Result<Vec<Event>, StoreError> {
        let mut cond = Condition::any().add(event::Column::Id.gt(cursor));
        if !also.is_empty() {
            cond = cond.add(event::Column::Id.is_in(also.iter().copied()));
        }
        Ok(event::Entity::find()
            .filter(cond)
            .order_by_asc(event::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(to_event)
            .collect())
    }

    pub async fn alerts_by_ids(&self, ids: &[String]) -> Result<Vec<Alert>, StoreError> {
        let mut out = Vec::new();
        for chunk in ids.chunks(500) {
            out.extend(
                alert::Entity::find()
                    .filter(alert::Column::Id.is_in(chunk.iter().cloned()))
                    .order_by_asc(alert::Column::Id)
                    .all(&self.db)
                    .await?
                    .into_iter()
                    .map(to_alert),
            );
        }
        Ok(out)
    }

    pub async fn tasks_by_ids(&self, ids: &[String]) -> Result<Vec<Task>, StoreError> {
        let mut out = Vec::new();
        for chunk in ids.chunks(500) {
            out.extend(
                task::Entity::find()
                    .filter(task::Column::Id.is_in(chunk.iter().cloned()))
                    .order_by_asc(task::Column::Id)
                    .all(&self.db)
                    .await?
                    .into_iter()
                    .map(to_task),
            );
        }
        Ok(out)
    }

    /// Tasks not finished, then the most recent finished ones.
    pub async fn live_tasks(&self) -> Result<Vec<Task>, StoreError> {
        // Not finished: a failover or move waiting for commit or rollback included.
        let running = ["pending", "running", "waiting"];
        let mut out: Vec<Task> = task::Entity::find()
            .filter(task::Column::State.is_in(running))
            .order_by_desc(task::Column::Id)
            .all(&self.db)
            .await?
            .into_iter()
            .map(to_task)
            .collect();
        out.extend(
            task::Entity::find()
                .filter(task::Column::State.is_not_in(running))
                .order_by_desc(task::Column::Id)
                .limit(RECENT_TASKS)
                .all(&self.db)
                .await?
                .into_iter()
                .map(to_task),
        );
        Ok(out)
    }

    /// The newest events, oldest first.
    pub async fn recent_events(&self) -> Result<Vec<Event>, StoreError> {
        let page = self
            .list_events(
                &EventQuery::default(),
                &PageQuery {
                    limit: Some(RECENT_EVENTS),
                    cursor: None,
                },
            )
            .await?;
        let mut events = page.items;
        events.reverse();
        Ok(events)
    }

    pub async fn all_sites(&self) -> Result<Vec<Site>, StoreError> {
        let q = SiteQuery::default();
        all_pages(|p| {
            let q = &q;
            async move { self.list_sites(q, &p).await }
        })
        .await
    }

    pub async fn all_hosts(&self) -> Result<Vec<Host>, StoreError> {
        let q = HostQuery::default();
        all_pages(|p| {
            let q = &q;
            async move { self.list_hosts(q, &p).await }
        })
        .await
    }

    /// The hosts among `ids` that exist (a missing one was deleted).
    pub async fn hosts_by_ids(&self, ids: &[String]) -> Result<Vec<Host>, StoreError> {
        let mut out = Vec::new();
        for id in ids {
            match self.get_host(id).await {
                Ok(h) => out.push(h),
                Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The sites among `ids` that exist.
    pub async fn sites_by_ids(&self, ids: &[String]) -> Result<Vec<Site>, StoreError> {
        let mut out = Vec::new();
        for id in ids {
            match self.get_site(id).await {
                Ok(s) => out.push(s),
                Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

/// Follows a paged list to its end.
async fn all_pages<T, F, Fut>(mut list: F) -> Result<Vec<T>, StoreError>
where
    F: FnMut(PageQuery) -> Fut,
    Fut: std::future::Future<Output = Result<Page<T>, StoreError>>,
{
    let mut out = Vec::new();
    let mut p = PageQuery {
        limit: Some(super::MAX_PAGE as u32),
        cursor: None,
    };
    // Bounded: a million rows is far beyond any inventory this serves.
    for _ in 0..1000 {
        let page = list(p.clone()).await?;
        out.extend(page.items);
        match page.next_cursor {
            Some(c) => p.cursor = Some(c),
            None => break,
        }
    }
    Ok(out)
}
