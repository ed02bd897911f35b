//! The run-time set of exports, one per disk, by name. The agent adds protected disks and,
//! later, recovered disk views; removing an export disconnects its clients once their
//! in-flight requests are answered.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;

use super::device::BlockDevice;
use super::proto;
use super::NbdError;

/// One exported device.
pub struct Export {
    name: String,
    description: String,
    device: Arc<dyn BlockDevice>,
    /// Cancelled when the export is removed; its connections watch it.
    removed: CancellationToken,
    /// One token per connection in transmission on this export.
    connections: TaskTracker,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("size", &self.device.size())
            .field("read_only", &self.device.read_only())
            .finish_non_exhaustive()
    }
}

impl Export {
    /// Export name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Human-readable description (may be empty).
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The device.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }

    pub(crate) fn removed(&self) -> &CancellationToken {
        &self.removed
    }

    /// Registers a connection; it counts until the token is dropped.
    pub(crate) fn connection_token(&self) -> TaskTrackerToken {
        self.connections.token()
    }

    /// Number of connections currently in transmission on this export.
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }
}

/// Handle to the exports of one server; cheap to clone, shared with the agent.
#[derive(Debug, Clone, Default)]
pub struct ExportRegistry {
    inner: Arc<RwLock<BTreeMap<String, Arc<Export>>>>,
}

impl ExportRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Exports `device` as `name`.
    pub fn add(&self, name: &str, device: Arc<dyn BlockDevice>) -> Result<(), NbdError> {
        self.add_with_description(name, "", device)
    }

    /// Exports `device` as `name` with a description shown by `NBD_OPT_LIST`/`NBD_OPT_INFO`.
    pub fn add_with_description(
        &self,
        name: &str,
        description: &str,
        device: Arc<dyn BlockDevice>,
    ) -> Result<(), NbdError> {
        proto::parse_name(name.as_bytes())
            .map_err(|e| NbdError::InvalidExportName(format!("{name:?}: {}", e.0)))?;
        proto::parse_name(description.as_bytes())
            .map_err(|e| NbdError::InvalidExportName(format!("description: {}", e.0)))?;
        let mut map = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if map.contains_key(name) {
            return Err(NbdError::ExportExists(name.to_string()));
        }
        map.insert(
            name.to_string(),
            Arc::new(Export {
                name: name.to_string(),
                description: description.to_string(),
                device,
                removed: CancellationToken::new(),
                connections: TaskTracker::new(),
            }),
        );
        tracing::info!(export = name, "export added");
        Ok(())
    }

    /// Removes an export: new clients are refused at once; connected ones are answered for
    /// what they already sent, then disconnected. Returns the device if it existed.
    pub fn remove(&self, name: &str) -> Option<Arc<dyn BlockDevice>> {
        let removed = self
            .inner
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name)?;
        removed.removed.cancel();
        removed.connections.close();
        tracing::info!(export = name, "export removed");
        Some(Arc::clone(&removed.device))
    }

    /// [`remove`](Self::remove), then waits until every connection to the export has
    /// answered its in-flight requests and closed: afterwards nothing touches the device
    /// through this server, so it can be shut down cleanly.
    pub async fn remove_and_drain(&self, name: &str) -> Option<Arc<dyn BlockDevice>> {
        let export = self
            .inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()?;
        let device = self.remove(name)?;
        export.connections.wait().await;
        Some(device)
    }

    /// Whether `name` is exported.
    pub fn contains(&self, name: &str) -> bool {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(name)
    }

    /// Export names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    pub(crate) fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    pub(crate) fn list(&self) -> Vec<Arc<Export>> {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }
}
