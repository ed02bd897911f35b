//! Starting and stopping the manager: `Application::build` connects, migrates, binds
//! and returns the bound address; `run_until` serves until the shutdown future ends.

use super::api;
use super::config::ManagerConfig;
use super::control::ControlPlane;
use super::metrics::Metrics;
use super::store::{Store, StoreError};
use axum::serve::ListenerExt;
use axum::Router;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server failed: {0}")]
    Serve(std::io::Error),
}

pub struct Application {
    listener: TcpListener,
    router: Router,
    store: Store,
    control: Arc<ControlPlane>,
    /// The admin token created on first start, if this start created one.
    pub bootstrap_secret: Option<String>,
}

impl Application {
    pub async fn build(config: &ManagerConfig) -> Result<Self, ServerError> {
        tracing::info!(database = %redact(&config.database_url), "connecting to the database");
        let store = Store::connect(&config.database_url).await?;
        tracing::info!("applying migrations");
        store.migrate_up().await?;
        let bootstrap_secret = if config.bootstrap_token {
            store.bootstrap_admin_token().await?.map(|t| t.secret)
        } else {
            None
        };
        let metrics = Arc::new(Metrics::new());
        let control =
            ControlPlane::new(store.clone(), config.control.clone(), Arc::clone(&metrics));
        control.start();
        let router = api::router(
            store.clone(),
            metrics,
            Arc::clone(&control),
            config.web_dir.as_deref(),
        );
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        Ok(Self {
            listener,
            router,
            store,
            control,
            bootstrap_secret,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn control(&self) -> &Arc<ControlPlane> {
        &self.control
    }

    /// Serves until `shutdown` completes, then lets in-flight requests finish.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        tracing::info!(addr = %self.local_addr(), "manager listening");
        // Agent connections are long-lived: they end with the control plane, which ends
        // when shutdown begins, so the graceful shutdown does not wait for them forever.
        let control = Arc::clone(&self.control);
        let shutdown = async move {
            shutdown.await;
            control.shutdown().await;
        };
        // Agents' control channels and live-stream clients stay connected for days: a
        // peer that vanished without a reset is found by keepalive, and a write to it
        // ends instead of waiting on a full socket buffer.
        let listener = self.listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
            crate::net::tune_long_lived(tcp, Duration::from_secs(30));
        });
        axum::serve(listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(ServerError::Serve)?;
        tracing::info!("manager stopped; closing the database");
        self.store.close().await?;
        Ok(())
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is *called* (inside
/// a runtime), not when the future is first polled: call it before announcing readiness,
/// so a signal sent right after never meets the default action (exit without cleanup).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).ok();
    let mut term = signal(SignalKind::terminate()).ok();
    async move {
        let wait = |s: &mut Option<tokio::signal::unix::Signal>| {
            let s = s.take();
            async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
        };
        tokio::select! {
            _ = wait(&mut int) => tracing::info!("SIGINT received, shutting down"),
            _ = wait(&mut term) => tracing::info!("SIGTERM received, shutting down"),
        }
    }
}

/// A database URL with any password replaced, for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            super::redact("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(super::redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(super::redact("sqlite://bulwark.db"), "sqlite://bulwark.db");
    }
}
