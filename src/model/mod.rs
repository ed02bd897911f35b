//! The pure domain model: no I/O.
