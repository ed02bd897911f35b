//! The `bulwark` command line.
