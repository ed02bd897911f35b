//! Checkpoint rows of scheduled rounds, written in batches: one transaction (and, on
//! SQLite, one turn of the write lock) for every round completed in the last few tens of
//! milliseconds instead of one each. Scheduled rows write no audit event (see
//! `checkpoints.rs`); operator-tagged rounds keep `Store::insert_checkpoint`.

use super::entity::checkpoint;
use super::{NewCheckpoint, Store, StoreError};
use sea_orm::{EntityTrait, Set, TransactionTrait};

/// Rows per INSERT statement: at 7 parameters a row, stays under SQLite's historical
/// limit of 999 parameters a statement.
const ROWS_PER_STATEMENT: usize = 140;

fn i64_id(id: u64) -> i64 {
    // As `checkpoints.rs`: round ids are microseconds since the epoch, far below
    // i64::MAX; saturate rather than wrap.
    i64::try_from(id).unwrap_or(i64::MAX)
}

impl Store {
    /// Stores the checkpoints of completed rounds (not recoverable yet) in ONE
    /// transaction: all of them or none. Ids are the round ids, as given.
    pub async fn insert_checkpoints(&self, batch: &[NewCheckpoint]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        for chunk in batch.chunks(ROWS_PER_STATEMENT) {
            checkpoint::Entity::insert_many(chunk.iter().map(|c| checkpoint::ActiveModel {
                id: Set(i64_id(c.id)),
                vpg_id: Set(c.vpg_id.clone()),
                taken_at: Set(c.taken_at),
                kind: Set(c.kind.as_str().to_string()),
                tag: Set(c.tag.clone()),
                recoverable: Set(false),
                quiesce: Set(c.quiesce.map(|q| q.as_str().to_string())),
            }))
            .exec_without_returning(&txn)
            .await?;
        }
        self.commit(txn).await?;
        Ok(())
    }
}
