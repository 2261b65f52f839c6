//! A session's record on disk: the store's [`SessionRecord`] made from a profile and what
//! the core keeps ([`Persisted`]), and back.

use super::core::Persisted;
use super::{Credential, Definition, Origin};
use crate::error::ErrorName;
use crate::store::{SessionRecord, StoredProfile};

/// The record of a session.
pub fn to_record(p: &Definition, s: &Persisted) -> SessionRecord {
    SessionRecord {
        version: crate::store::FORMAT_VERSION,
        id: p.id.clone(),
        profile: (p.origin == Origin::Bus).then(|| StoredProfile {
            profile: p.profile.clone(),
            backend_token: match &p.credential {
                Credential::Inline(s) => Some(s.clone()),
                _ => None,
            },
        }),
        unique_user_id: p.profile.unique_user_id.clone(),
        username: s.username.clone(),
        token: s.token.clone(),
        expires_at: s.expires_at,
        last_login_at: s.last_login_at,
        refresh_at: s.refresh_at,
        last_error: s.last_error.map(|e| e.as_str().to_owned()),
        logged_out: s.logged_out,
    }
}

/// What the core keeps of a record; nothing when the record is another user's (a token
/// belongs to the user it was issued for).
pub fn persisted(rec: &SessionRecord, unique_user_id: &str) -> Option<Persisted> {
    if !rec.unique_user_id.is_empty() && rec.unique_user_id != unique_user_id {
        return None;
    }
    Some(Persisted {
        username: rec.username.clone(),
        token: rec.token.clone(),
        expires_at: rec.expires_at,
        last_login_at: rec.last_login_at,
        refresh_at: rec.refresh_at,
        last_error: rec.last_error.as_deref().and_then(ErrorName::parse),
        logged_out: rec.logged_out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    #[test]
    fn a_record_round_trips_and_keeps_the_profile_of_bus_sessions_only() {
        let mut p = Definition {
            id: "s".into(),
            profile: crate::profile::Profile {
                unique_user_id: "user-0001".into(),
                email: "a@b.c".into(),
                first_name: None,
                last_name: None,
            },
            credential: Credential::Inline(Secret::new("cred")),
            origin: Origin::Bus,
        };
        let s = Persisted {
            username: "Ada".into(),
            token: Some(Secret::new("t")),
            expires_at: Some(10.5),
            last_error: Some(ErrorName::NetworkError),
            ..Default::default()
        };
        let rec = to_record(&p, &s);
        assert_eq!(rec.profile.as_ref().and_then(|p| p.backend_token.clone()), Some(Secret::new("cred")));
        assert_eq!(persisted(&rec, "user-0001"), Some(s.clone()));
        assert_eq!(persisted(&rec, "user-0002"), None);
        p.origin = Origin::Config;
        assert_eq!(to_record(&p, &s).profile, None);
    }
}
