//! Crash-safe whole-file replacement, shared by every small state file of the agent
//! (journal state, dirty bitmap, activity log): write a temp file, fsync it, rename it
//! over the target, fsync the directory. A reader sees the old file or the new one,
//! never a mix.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A failed step, with the file it failed on; callers wrap it in their own error.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct CrashSafeError {
    pub op: &'static str,
    pub path: PathBuf,
    pub source: std::io::Error,
}

impl CrashSafeError {
    fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CrashSafeError {
            op,
            path: path.into(),
            source,
        }
    }
}

/// The temp path used while replacing `path` (same directory, so `rename` is atomic).
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Replaces `path` with `bytes` atomically and durably.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CrashSafeError> {
    let tmp = temp_path(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| CrashSafeError::io("create", &tmp, e))?;
    f.write_all(bytes)
        .map_err(|e| CrashSafeError::io("write", &tmp, e))?;
    // fsync, not fdatasync: the file is new, its size and allocation are metadata we need.
    f.sync_all()
        .map_err(|e| CrashSafeError::io("fsync", &tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| CrashSafeError::io("rename", &tmp, e))?;
    sync_parent_dir(path)
}

/// Makes a rename or creation in `path`'s directory durable.
pub fn sync_parent_dir(path: &Path) -> Result<(), CrashSafeError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let d = File::open(dir).map_err(|e| CrashSafeError::io("open dir", dir, e))?;
    d.sync_all()
        .map_err(|e| CrashSafeError::io("fsync dir", dir, e))
}
