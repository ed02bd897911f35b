//! The error every domain rule returns: a stable machine code, the offending field, and
//! a sentence for people. The API turns it into a problem document unchanged, and the
//! console shows the same sentence.

use std::fmt;

/// A rejected input. `code` is stable (clients match on it); `message` may be reworded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    pub code: &'static str,
    /// Dotted path of the offending field, e.g. `settings.rpo_target_secs`, or empty.
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(code: &'static str, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code,
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same error reported under a parent path (`members[2]` + `vm_id`).
    pub fn under(mut self, parent: &str) -> Self {
        self.field = if self.field.is_empty() {
            parent.to_string()
        } else {
            format!("{parent}.{}", self.field)
        };
        self
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{} ({})", self.message, self.code)
        } else {
            write!(f, "{}: {} ({})", self.field, self.message, self.code)
        }
    }
}

impl std::error::Error for ValidationError {}
