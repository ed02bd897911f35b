//! The per-disk write journal kept at the recovery site.
