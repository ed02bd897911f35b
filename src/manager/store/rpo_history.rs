//! Per-VPG RPO history (`rpo_history` table): the recorder that stores the evaluator's
//! samples, retention, and the range query behind `GET /api/v1/vpgs/{id}/rpo-history`.
//! Tiers, folding and query planning are pure and live in `model::rpo_history`.
//!
//! Write path, built for 1,000+ VPGs sampled every second without slowing the
//! evaluator (the busiest loop of the manager):
//! - the evaluator hands each pass's samples over as ONE message on a bounded channel
//!   (`try_send`): when the writer lags, the pass's samples are dropped and counted in
//!   `bulwark_rpo_history_dropped_samples_total`, never queued without bound;
//! - the writer task folds samples into per-VPG open buckets of every tier in memory
//!   (`model::rpo_history::Aggregator`): minute and hour rows are written once, when
//!   their bucket closes, never read back and rewritten;
//! - every [`FLUSH_EVERY`] it writes the closed rows in one transaction of multi-row
//!   `INSERT`s (one turn of the SQLite write lock), without ticking the store's
//!   commit watch (no events are written, so nobody needs waking);
//! - rows that could not be written are retried at the next flush, up to
//!   [`MAX_PENDING`] rows; beyond that the oldest are dropped and counted;
//! - every [`PRUNE_EVERY`] each tier's rows older than its retention are deleted by time
//!   range through the `(tier, at_secs)` index, at most one slice of time per tier and
//!   pass, so a backlog (after a long stop) is worked off without a long write lock.
//!
//! Limits: open buckets are written at shutdown; a restart within the same minute or
//! hour then finds that bucket's row stored and keeps it (`ON CONFLICT DO NOTHING`), so
//! that tier misses what the new process saw in the rest of the bucket (raw samples
//! keep it for their two hours). Rows of a removed VPG stay until retention drops
//! them; the API answers 404 for it meanwhile.

use super::entity::{rpo_sample, vpg};
use super::{Store, StoreError};
use crate::manager::metrics::Metrics;
use crate::model::rpo_history::{downsample, plan, Aggregator, Point, Row, Sample, Tier};
use crate::model::status::VpgStatus;
use crate::proto::api::{RpoHistory, RpoHistorySample};
use chrono::{DateTime, Utc};
use prometheus_client::metrics::counter::Counter;
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Set,
    TransactionTrait,
};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Passes of samples the channel holds before the evaluator's samples are dropped
/// (passes run every second, up to ten a second when agents poke: the writer may stall
/// for several seconds without losing any).
const CHANNEL_PASSES: usize = 64;
/// How often closed buckets are written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(3);
/// How often retention runs.
pub const PRUNE_EVERY: Duration = Duration::from_secs(30);
/// Rows per INSERT statement: 6 parameters a row stays under SQLite's historical limit
/// of 999 parameters a statement.
const ROWS_PER_STATEMENT: usize = 150;
/// Rows kept for retry when writes fail (about three minutes of raw rows of 1,000 VPGs).
const MAX_PENDING: usize = 200_000;
/// How long shutdown waits for the final write.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// The longest span of time one prune pass deletes per tier.
fn prune_slice_secs(t: Tier) -> i64 {
    match t {
        Tier::Raw => 60,
        Tier::Minute => 3600,
        Tier::Hour => 86_400,
    }
}

fn point_of(m: &rpo_sample::Model) -> Point {
    Point {
        at: m.at_secs,
        rpo_ms: m.rpo_ms,
        history_secs: m.history_secs,
        // Only the evaluator writes this column, from the same vocabulary; a status a
        // later version dropped counts as not meeting the SLA rather than vanishing.
        status: VpgStatus::parse(&m.status).unwrap_or(VpgStatus::NotMeetingSla),
    }
}

/// Hands the evaluator's samples to the writer task (see the module docs).
pub struct RpoRecorder {
    tx: mpsc::Sender<Vec<Sample>>,
    dropped: Counter,
    task: JoinHandle<()>,
}

impl RpoRecorder {
    /// Starts the writer task; its drop counter joins `metrics`.
    pub fn spawn(store: Store, metrics: &Metrics) -> Self {
        let dropped = Counter::default();
        metrics.register_counter(
            "rpo_history_dropped_samples",
            "RPO history samples dropped because the history writer lagged or failed",
            dropped.clone(),
        );
        let (tx, rx) = mpsc::channel(CHANNEL_PASSES);
        let task = tokio::spawn(write_loop(store, rx, dropped.clone()));
        Self { tx, dropped, task }
    }

    /// One evaluator pass's samples; never waits.
    pub fn record(&self, samples: Vec<Sample>) {
        if samples.is_empty() {
            return;
        }
        let n = samples.len() as u64;
        if self.tx.try_send(samples).is_err() {
            self.dropped.inc_by(n);
        }
    }

    /// Stops the writer after it stored everything received, open buckets included
    /// (waits at most [`CLOSE_WAIT`]).
    pub async fn close(self) {
        drop(self.tx);
        let mut task = self.task;
        if tokio::time::timeout(CLOSE_WAIT, &mut task).await.is_err() {
            tracing::warn!("RPO history writer did not finish in time; aborted");
            task.abort();
        }
    }
}

fn unix_now() -> i64 {
    Utc::now().timestamp()
}

async fn write_loop(store: Store, mut rx: mpsc::Receiver<Vec<Sample>>, dropped: Counter) {
    let mut agg = Aggregator::default();
    let mut pending: Vec<Row> = Vec::new();
    let mut flush = tokio::time::interval(FLUSH_EVERY);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            batch = rx.recv() => match batch {
                Some(batch) => {
                    for s in batch {
                        agg.add(s, &mut pending);
                    }
                }
                None => break,
            },
            _ = flush.tick() => {
                agg.close(unix_now(), false, &mut pending);
                write_pending(&store, &mut pending, &dropped).await;
            }
            _ = prune.tick() => {
                if let Err(e) = store.prune_rpo_history(unix_now()).await {
                    tracing::warn!(error = %e, "RPO history retention failed");
                }
            }
        }
    }
    agg.close(unix_now(), true, &mut pending);
    write_pending(&store, &mut pending, &dropped).await;
}

async fn write_pending(store: &Store, pending: &mut Vec<Row>, dropped: &Counter) {
    if pending.is_empty() {
        return;
    }
    match store.insert_rpo_rows(pending).await {
        Ok(()) => pending.clear(),
        Err(e) => {
            tracing::warn!(error = %e, rows = pending.len(), "RPO history write failed; retrying at the next flush");
            if pending.len() > MAX_PENDING {
                let excess = pending.len() - MAX_PENDING;
                pending.drain(..excess);
                dropped.inc_by(excess as u64);
            }
        }
    }
}

impl Store {
    /// Stores closed buckets in one transaction; rows already stored are kept as they
    /// are (see the module docs on restarts).
    pub async fn insert_rpo_rows(&self, rows: &[Row]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            rpo_sample::Entity::insert_many(chunk.iter().map(|r| rpo_sample::ActiveModel {
                vpg_id: Set(r.vpg_id.clone()),
                tier: Set(r.tier.code()),
                at_secs: Set(r.point.at),
                rpo_ms: Set(r.point.rpo_ms),
                history_secs: Set(r.point.history_secs),
                status: Set(r.point.status.as_str().to_string()),
            }))
            .on_conflict(
                OnConflict::columns([
                    rpo_sample::Column::VpgId,
                    rpo_sample::Column::Tier,
                    rpo_sample::Column::AtSecs,
                ])
                .do_nothing()
                .to_owned(),
            )
            .exec_without_returning(&txn)
            .await?;
        }
        // Not `Store::commit`: no events were written, nobody needs waking.
        txn.commit().await?;
        Ok(())
    }

    /// Deletes rows past their tier's retention at `now` (seconds since the epoch), at
    /// most one slice of time per tier (see the module docs). Returns the rows deleted.
    pub async fn prune_rpo_history(&self, now: i64) -> Result<u64, StoreError> {
        let mut deleted = 0;
        for tier in Tier::ALL {
            let cutoff = now - tier.retention_secs();
            let oldest: Option<Option<i64>> = rpo_sample::Entity::find()
                .select_only()
                .column_as(rpo_sample::Column::AtSecs.min(), "oldest")
                .filter(rpo_sample::Column::Tier.eq(tier.code()))
                .into_tuple()
                .one(&self.db)
                .await?;
            let Some(oldest) = oldest.flatten() else {
                continue;
            };
            if oldest >= cutoff {
                continue;
            }
            let below = cutoff.min(oldest + prune_slice_secs(tier));
            let _w = self.write_guard().await;
            deleted += rpo_sample::Entity::delete_many()
                .filter(rpo_sample::Column::Tier.eq(tier.code()))
                .filter(rpo_sample::Column::AtSecs.lt(below))
                .exec(&self.db)
                .await?
                .rows_affected;
        }
        Ok(deleted)
    }

    async fn rpo_rows(
        &self,
        vpg_id: &str,
        tier: Tier,
        from: i64,
        until: i64,
    ) -> Result<Vec<rpo_sample::Model>, StoreError> {
        Ok(rpo_sample::Entity::find()
            .filter(rpo_sample::Column::VpgId.eq(vpg_id))
            .filter(rpo_sample::Column::Tier.eq(tier.code()))
            .filter(rpo_sample::Column::AtSecs.gte(from))
            .filter(rpo_sample::Column::AtSecs.lt(until))
            .order_by_asc(rpo_sample::Column::AtSecs)
            .all(&self.db)
            .await?)
    }

    /// The VPG's history over `[since, until)` in at most `max_points` buckets, at
    /// `now` (which decides the tiers still holding the range). The caller validated
    /// `since < until` and `max_points >= 1`.
    pub async fn rpo_history(
        &self,
        vpg_id: &str,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        max_points: u32,
        now: DateTime<Utc>,
    ) -> Result<RpoHistory, StoreError> {
        if vpg::Entity::find_by_id(vpg_id).count(&self.db).await? == 0 {
            return Err(StoreError::not_found("vpg", vpg_id));
        }
        // Whole seconds (the current second is not stored yet anyway).
        let since_s = since.timestamp();
        let until_s = until.timestamp().max(since_s + 1);
        let p = plan(since_s, until_s, max_points, now.timestamp());
        // Every bucket, the first included, holds a whole step (see `Plan::from`).
        let from = p.from;
        let mut rows = self.rpo_rows(vpg_id, p.tier, from, until_s).await?;
        // The newest buckets of a coarse tier are still open in the writer (or were
        // never closed): finer tiers fill the span after the last stored row.
        let mut covered = rows
            .last()
            .map_or(from, |r| r.at_secs + p.tier.resolution_secs());
        let mut finer = p.tier.finer();
        while let Some(t) = finer {
            if covered < until_s {
                let more = self.rpo_rows(vpg_id, t, covered, until_s).await?;
                if let Some(last) = more.last() {
                    covered = last.at_secs + t.resolution_secs();
                }
                rows.extend(more);
            }
            finer = t.finer();
        }
        // Rows of every tier start on their own resolution, which divides the step, so
        // each lies within one bucket; finer rows come after coarser ones in time.
        let samples = downsample(rows.iter().map(point_of), p.step_secs)
            .into_iter()
            .filter_map(|pt| {
                Some(RpoHistorySample {
                    at: DateTime::from_timestamp(pt.at, 0)?,
                    rpo_ms: pt.rpo_ms,
                    history_secs: pt.history_secs,
                    status: pt.status,
                })
            })
            .collect();
        Ok(RpoHistory {
            vpg_id: vpg_id.to_string(),
            step_secs: u64::try_from(p.step_secs).unwrap_or(1),
            samples,
        })
    }
}
