//! The HTTP API, exercised through a real server on a loopback port, against SQLite
//! and against PostgreSQL (each test gets its own fresh database, dropped after).

#![allow(clippy::unwrap_used)]

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
mod validation;
mod webhooks;
