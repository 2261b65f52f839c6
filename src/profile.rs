//! Who a session's user is: the profile sent to the app's backend with every signing
//! request. One type for the config file's `[[session]]` tables, the state of sessions added
//! over D-Bus, `AddSession`'s arguments and the loop.

use serde::{Deserialize, Serialize};

/// A user's profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// 8-40 chars of `A-Za-z0-9@.+_-`; sessions with the same one share its login budget.
    pub unique_user_id: String,
    /// The user's e-mail address.
    pub email: String,
    /// Optional given name.
    #[serde(default)]
    pub first_name: Option<String>,
    /// Optional family name.
    #[serde(default)]
    pub last_name: Option<String>,
}

impl Profile {
    /// Checks every field; the error names the key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        crate::config::validate_unique_user_id(&self.unique_user_id).map_err(|m| ("unique_user_id", m))?;
        crate::config::validate_email(&self.email).map_err(|m| ("email", m))?;
        for (key, name) in [("first_name", &self.first_name), ("last_name", &self.last_name)] {
            if let Some(n) = name {
                crate::config::validate_name(n).map_err(|m| (key, m))?;
            }
        }
        Ok(())
    }
}
