//! The control plane: configuration in a database, the REST API, and (as they land)
//! agent control, checkpoint rounds, SLA evaluation and recovery operations.

pub mod store;
