//! Every type that crosses a process boundary. `api` holds the REST bodies shared by the
//! manager and the CLI; agent control and replication messages join it as they are
//! built. This module imports neither axum nor sea-orm.

pub mod agent;
pub mod api;
pub mod control;
pub mod live;
pub mod stream;
pub mod webhooks;
