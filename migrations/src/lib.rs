//! Schema migrations for the manager database (SQLite and PostgreSQL alike).
pub use sea_orm_migration::prelude::*;
