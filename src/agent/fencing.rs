//! Fencing on the agent: the highest fencing generation this host has seen for each VPG,
//! kept across restarts in `state/fencing.json`.
//!
//! A generation only goes up (the manager bumps it at every failover and move). Whatever
//! carries a VPG's generation — a desired state, a command, a replication stream or sync
//! session — is admitted only if it is not older than the one recorded here, and a newer
//! one is recorded before it is acted on. So an old primary that comes back with its old
//! state can never act on, or overwrite, what the new primary has.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use crate::agent::crashsafe::{self, CrashSafeError};

/// File under the agent's state directory.
pub const FENCING_FILE: &str = "fencing.json";

/// Why something was not admitted, or the record could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum FencingError {
    #[error(
        "fenced: VPG {vpg_id} is at fencing generation {current}, this carries {offered} \
         (a failover or move has happened since)"
    )]
    Stale {
        vpg_id: String,
        offered: u64,
        current: u64,
    },
    #[error("fencing state {}: {reason}", path.display())]
    State { path: PathBuf, reason: String },
    #[error(transparent)]
    Persist(#[from] CrashSafeError),
}

/// The per-VPG generations of one host.
#[derive(Debug)]
pub struct Fencing {
    path: PathBuf,
    known: Mutex<BTreeMap<String, u64>>,
}

impl Fencing {
    /// Loads `<state_dir>/fencing.json` (empty when absent). A damaged file is an error:
    /// starting with no record would let a stale primary through.
    pub fn open(state_dir: &Path) -> Result<Fencing, FencingError> {
        let path = state_dir.join(FENCING_FILE);
        let known = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| FencingError::State {
                path: path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                return Err(FencingError::State {
                    path,
                    reason: e.to_string(),
                })
            }
        };
        Ok(Fencing {
            path,
            known: Mutex::new(known),
        })
    }

    /// The generation recorded for a VPG (0 = none yet).
    pub fn current(&self, vpg_id: &str) -> u64 {
        self.lock().get(vpg_id).copied().unwrap_or(0)
    }

    /// Every recorded generation.
    pub fn all(&self) -> BTreeMap<String, u64> {
        self.lock().clone()
    }

    /// Admits `generation` for `vpg_id`: refused if older than the recorded one;
    /// recorded (durably, before returning) if newer. Generation 0 means "not fenced"
    /// (static configuration without a manager) and is admitted only while nothing is
    /// recorded for the VPG.
    pub fn admit(&self, vpg_id: &str, generation: u64) -> Result<(), FencingError> {
        let mut known = self.lock();
        let current = known.get(vpg_id).copied().unwrap_or(0);
        if generation < current {
            return Err(FencingError::Stale {
                vpg_id: vpg_id.to_string(),
                offered: generation,
                current,
            });
        }
        if generation > current {
            let mut next = known.clone();
            next.insert(vpg_id.to_string(), generation);
            self.persist(&next)?;
            *known = next;
        }
        Ok(())
    }

    /// Records every generation of `seen` that is newer than the recorded one (a
    /// desired state from the manager); older ones are ignored, never lowered.
    pub fn observe(&self, seen: &BTreeMap<String, u64>) -> Result<(), FencingError> {
        let mut known = self.lock();
        let mut next = known.clone();
        let mut changed = false;
        for (vpg, &g) in seen {
            let cur = next.entry(vpg.clone()).or_insert(0);
            if g > *cur {
                *cur = g;
                changed = true;
            }
        }
        if changed {
            self.persist(&next)?;
            *known = next;
        }
        Ok(())
    }

    fn persist(&self, m: &BTreeMap<String, u64>) -> Result<(), FencingError> {
        let bytes = serde_json::to_vec_pretty(m).map_err(|e| FencingError::State {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        crashsafe::write_atomically(&self.path, &bytes)?;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_only_go_up_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let f = Fencing::open(dir.path()).unwrap();
        assert_eq!(f.current("v"), 0);
        f.admit("v", 0).unwrap();
        f.admit("v", 2).unwrap();
        assert_eq!(f.current("v"), 2);
        f.admit("v", 2).unwrap();
        let e = f.admit("v", 1).unwrap_err();
        assert!(
            matches!(
                e,
                FencingError::Stale {
                    offered: 1,
                    current: 2,
                    ..
                }
            ),
            "{e}"
        );
        assert!(f.admit("v", 0).is_err(), "0 is not admitted once fenced");
        f.observe(&[("v".to_string(), 1), ("w".to_string(), 5)].into())
            .unwrap();
        assert_eq!(f.current("v"), 2, "observe never lowers");
        assert_eq!(f.current("w"), 5);
        drop(f);
        let f = Fencing::open(dir.path()).unwrap();
        assert_eq!(f.current("v"), 2);
        assert_eq!(f.current("w"), 5);
        assert!(f.admit("w", 4).is_err());
    }

    #[test]
    fn a_damaged_record_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FENCING_FILE), b"{not json").unwrap();
        assert!(matches!(
            Fencing::open(dir.path()),
            Err(FencingError::State { .. })
        ));
    }
}
