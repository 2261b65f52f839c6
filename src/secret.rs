//! The `Secret` newtype: tokens, signed requests and credentials.
//!
//! Its `Debug` and `Display` print `[redacted]`, so a secret that ends up in a log line, an
//! error message or a `LastError` by accident shows nothing. The only way to the text is the
//! explicit [`Secret::expose`], which makes every use easy to find.

use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A string that must never reach a log, an error message or `LastError`. Shared, not
/// copied: the session's state, its published snapshot and the callers it answers hold one
/// text.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Self(value.into())
    }

    /// The secret text itself, for the one place that must send or store it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Length in bytes, which is not secret and helps validation messages.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Default for Secret {
    fn default() -> Self {
        Self::new("")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::new)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let s = Secret::new("hunter2-token");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(s.expose(), "hunter2-token");
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, "\"hunter2-token\"");
        assert_eq!(serde_json::from_str::<Secret>(&json).unwrap(), s);
        let wrapped = Some(s);
        assert!(!format!("{wrapped:?}").contains("hunter2"));
    }
}
