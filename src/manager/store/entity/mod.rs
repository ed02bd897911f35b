//! sea-orm entities, one per table; the schema itself lives in `migrations/`.

pub mod alert;
pub mod api_token;
pub mod checkpoint;
pub mod disk;
pub mod enrolment_token;
pub mod event;
pub mod host;
pub mod member;
pub mod recovery_report;
pub mod rpo_sample;
pub mod site;
pub mod task;
pub mod vm;
pub mod vpg;
pub mod webhook;
pub mod webhook_cursor;
pub mod webhook_delivery;
