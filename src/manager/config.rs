//! Manager configuration: defaults, then `bulwark.toml`, then `BULWARK_*` variables,
//! then flags (later wins). The CLI merges the last two through clap; this module owns
//! the file and the defaults.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8470";
pub const DEFAULT_DATABASE_URL: &str = "sqlite://bulwark.db?mode=rwc";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("listen address `{0}` is not host:port")]
    Listen(String),
}

/// `bulwark.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// `text` or `json`.
    pub log_format: Option<String>,
    /// A tracing filter such as `info,bulwark=debug`.
    pub log: Option<String>,
    #[serde(default)]
    pub manager: ManagerSection,
    /// `bulwark agent`'s section (its own module checks it).
    #[serde(default)]
    pub agent: crate::agent::host::AgentSection,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagerSection {
    pub listen: Option<String>,
    pub database_url: Option<String>,
    pub web_dir: Option<PathBuf>,
    /// Agents report this often (ms).
    pub heartbeat_ms: Option<u64>,
    /// Silence after which a host counts as disconnected (ms).
    pub disconnect_after_ms: Option<u64>,
    /// The longest an agent holds write completions in a checkpoint round (ms).
    pub checkpoint_hold_bound_ms: Option<u64>,
    /// Test-only: run checkpoint rounds without the consistency barrier.
    #[serde(default)]
    pub test_disable_checkpoint_barrier: bool,
    /// Live stream: frames kept for clients reconnecting with `since`.
    pub live_history_frames: Option<usize>,
    /// Live stream: frames a client may fall behind before it is dropped.
    pub live_client_queue: Option<usize>,
    /// Live stream: how long one frame may take to go into a client's socket (ms).
    pub live_send_timeout_ms: Option<u64>,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Everything `bulwark manager` needs, resolved.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub listen: SocketAddr,
    pub database_url: String,
    /// The console's files; None serves no console.
    pub web_dir: Option<PathBuf>,
    /// Create and print an admin token when the database has none.
    pub bootstrap_token: bool,
    pub control: crate::manager::control::ControlSettings,
}

impl ManagerConfig {
    /// Resolves flags/env (`cli_*`, already merged by clap) over the file over defaults.
    pub fn resolve(
        file: &ConfigFile,
        cli_listen: Option<String>,
        cli_database_url: Option<String>,
        cli_web_dir: Option<PathBuf>,
    ) -> Result<Self, ConfigError> {
        let listen = cli_listen
            .or_else(|| file.manager.listen.clone())
            .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen = listen
            .parse()
            .map_err(|_| ConfigError::Listen(listen.clone()))?;
        Ok(Self {
            listen,
            database_url: cli_database_url
                .or_else(|| file.manager.database_url.clone())
                .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_string()),
            web_dir: cli_web_dir
                .or_else(|| file.manager.web_dir.clone())
                .or_else(default_web_dir),
            bootstrap_token: true,
            control: control_settings(&file.manager),
        })
    }
}

fn control_settings(m: &ManagerSection) -> crate::manager::control::ControlSettings {
    use std::time::Duration;
    let mut c = crate::manager::control::ControlSettings::default();
    if let Some(v) = m.heartbeat_ms {
        c.heartbeat = Duration::from_millis(v.max(50));
    }
    if let Some(v) = m.disconnect_after_ms {
        c.disconnect_after = Duration::from_millis(v.max(100));
    }
    if let Some(v) = m.checkpoint_hold_bound_ms {
        c.hold_bound = Duration::from_millis(v.clamp(1, 10_000));
    }
    if let Some(v) = m.live_history_frames {
        c.live.history_frames = v.clamp(1, 1 << 20);
    }
    if let Some(v) = m.live_client_queue {
        c.live.client_queue = v.clamp(1, 1 << 16);
    }
    if let Some(v) = m.live_send_timeout_ms {
        c.live.send_timeout = Duration::from_millis(v.max(10));
    }
    if m.test_disable_checkpoint_barrier {
        tracing::warn!(
            "test_disable_checkpoint_barrier: checkpoints are NOT crash-consistent across hosts"
        );
        c.barrier = false;
    }
    c
}

/// `./web` when run from a checkout, else the checkout this binary was built from.
pub fn default_web_dir() -> Option<PathBuf> {
    let local = PathBuf::from("web");
    if local.join("index.html").is_file() {
        return Some(local);
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("web");
    built.join("index.html").is_file().then_some(built)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_file_beats_defaults() {
        let file: ConfigFile = toml::from_str(
            "log_format = \"json\"\n[manager]\nlisten = \"127.0.0.1:9000\"\ndatabase_url = \"sqlite://x.db\"\n",
        )
        .unwrap();
        let c = ManagerConfig::resolve(&file, None, None, None).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.database_url, "sqlite://x.db");
        let c = ManagerConfig::resolve(&file, Some("127.0.0.1:9100".into()), None, None).unwrap();
        assert_eq!(c.listen.port(), 9100);
        let c = ManagerConfig::resolve(&ConfigFile::default(), None, None, None).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.database_url, DEFAULT_DATABASE_URL);
        assert!(
            ManagerConfig::resolve(&ConfigFile::default(), Some("nope".into()), None, None)
                .is_err()
        );
        assert!(toml::from_str::<ConfigFile>("[manager]\nlisen = \"x\"").is_err());
    }
}
