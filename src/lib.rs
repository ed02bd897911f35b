//! Bulwark: a multi-VM protection-group disaster-recovery orchestrator.
//!
//! Code map:
//! - [`model`]: the pure domain (VPG settings, statuses, SLA maths). No I/O.
//! - [`proto`]: every type that crosses a process boundary (REST bodies, agent messages).
//! - [`manager`]: the control plane (HTTP API, database, SLA evaluation, operations).
//! - [`agent`]: the data path (NBD interception, replication stream, journal).
//! - [`cli`]: the `bulwark` command line.
//! - [`net`]: socket options of the long-lived connections of both roles.
//! - [`lab`]: the whole system in one process (manager, agents, REST helpers), for
//!   benches and the demo; [`demo`]: `bulwark demo`.

pub mod agent;
pub mod bench_guests;
pub mod cli;
pub mod demo;
pub mod guest;
pub mod lab;
pub mod manager;
pub mod model;
pub mod net;
pub mod proto;
