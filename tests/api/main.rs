//! The HTTP API, exercised through a real server on a loopback port, against SQLite
//! and against PostgreSQL (each test gets its own fresh database, dropped after).

#![allow(clippy::unwrap_used)]

/// `on_both!(name, f)`: tests `name::sqlite` and `name::postgres` running `f(backend)`.
macro_rules! on_both {
    ($name:ident, $f:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$f(crate::helpers::Backend::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$f(crate::helpers::Backend::Postgres).await;
            }
        }
    };
}

mod fake_agent;
mod helpers;

mod access;
mod alerts;
mod bandwidth;
mod checkpoints;
mod concurrency;
mod control;
mod crud;
mod live;
mod migrations;
mod openapi;
mod pagination;
mod rpo_history;
mod validation;
mod vms;
mod webhooks;
