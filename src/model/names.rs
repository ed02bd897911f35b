//! Names of things people create (sites, hosts, VMs, VPGs, tokens): parsed once at the
//! edge so everything inside can trust them.

use super::ValidationError;
use serde::{Deserialize, Serialize};
use std::fmt;

pub const MAX_NAME_LEN: usize = 128;

/// A trimmed, non-empty name of at most [`MAX_NAME_LEN`] characters with no control
/// characters. Spaces are allowed: "web - Test" is a real VM name in a failover test.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl Name {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let s = raw.trim();
        if s.is_empty() {
            return Err(ValidationError::new(
                "validation.name_empty",
                "name",
                "name must not be empty",
            ));
        }
        if s.chars().count() > MAX_NAME_LEN {
            return Err(ValidationError::new(
                "validation.name_too_long",
                "name",
                format!("name must be at most {MAX_NAME_LEN} characters"),
            ));
        }
        if s.chars().any(char::is_control) {
            return Err(ValidationError::new(
                "validation.name_invalid",
                "name",
                "name must not contain control characters",
            ));
        }
        Ok(Self(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(Name::parse("  web  ").unwrap().as_str(), "web");
        assert_eq!(Name::parse("web - Test").unwrap().as_str(), "web - Test");
        assert_eq!(
            Name::parse("   ").unwrap_err().code,
            "validation.name_empty"
        );
        assert_eq!(
            Name::parse(&"x".repeat(MAX_NAME_LEN + 1)).unwrap_err().code,
            "validation.name_too_long"
        );
        assert!(Name::parse(&"é".repeat(MAX_NAME_LEN)).is_ok());
        assert_eq!(
            Name::parse("a\nb").unwrap_err().code,
            "validation.name_invalid"
        );
    }
}
