//! Crash-safe whole-file replacement: write a temp file, fsync it, rename it over the
//! target, fsync the directory. A reader sees the old file or the new one, never a mix.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::DirtyError;

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
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), DirtyError> {
    let tmp = temp_path(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| DirtyError::io("create", &tmp, e))?;
    f.write_all(bytes)
        .map_err(|e| DirtyError::io("write", &tmp, e))?;
    // fsync, not fdatasync: the file is new, its size and allocation are metadata we need.
    f.sync_all().map_err(|e| DirtyError::io("fsync", &tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| DirtyError::io("rename", &tmp, e))?;
    sync_parent_dir(path)
}

/// Makes a rename or creation in `path`'s directory durable.
pub fn sync_parent_dir(path: &Path) -> Result<(), DirtyError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let d = File::open(dir).map_err(|e| DirtyError::io("open dir", dir, e))?;
    d.sync_all()
        .map_err(|e| DirtyError::io("fsync dir", dir, e))
}
