//! The public names of the D-Bus API: bus name, object paths, interface names.
//!
//! Shared by the daemon, `entrupy-tokenctl` and the tests, so that none of them can drift
//! from the others. Owns nothing else.

/// The well-known bus name the daemon owns.
pub const BUS_NAME: &str = "com.entrupy.TokenDaemon1";
/// Path of the manager object (and of the `ObjectManager`).
pub const MANAGER_PATH: &str = "/com/entrupy/TokenDaemon1";
/// Prefix of every session object's path; the encoded id follows.
pub const SESSION_PATH_PREFIX: &str = "/com/entrupy/TokenDaemon1/session";
/// Manager interface name.
pub const MANAGER_INTERFACE: &str = "com.entrupy.TokenDaemon1.Manager";
/// Session interface name.
pub const SESSION_INTERFACE: &str = "com.entrupy.TokenDaemon1.Session";
/// Prefix of every error name the daemon returns.
pub const ERROR_PREFIX: &str = "com.entrupy.TokenDaemon1.Error";
/// The daemon's version, shown in the `Version` property and the `User-Agent`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `User-Agent` header value of every HTTP request.
pub fn user_agent() -> String {
    format!("entrupy-tokend/{VERSION}")
}

/// Encodes a path element as systemd's `sd_bus_path_encode` does: every byte other than an
/// ASCII letter or digit, and a leading digit, becomes `_` and two lowercase hex digits; the
/// empty string becomes `_`.
pub fn encode_path_element(id: &str) -> String {
    if id.is_empty() {
        return "_".to_owned();
    }
    let mut out = String::with_capacity(id.len() * 3);
    for (i, b) in id.bytes().enumerate() {
        if b.is_ascii_alphabetic() || (b.is_ascii_digit() && i > 0) {
            out.push(char::from(b));
        } else {
            out.push('_');
            out.push_str(&format!("{b:02x}"));
        }
    }
    out
}

/// Decodes what [`encode_path_element`] produced; `None` for text it could not have made.
pub fn decode_path_element(encoded: &str) -> Option<String> {
    if encoded == "_" {
        return Some(String::new());
    }
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'_' {
            let hex = encoded.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Object path of the session with this id.
pub fn session_path(id: &str) -> String {
    format!("{SESSION_PATH_PREFIX}/{}", encode_path_element(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_sd_bus_path_encode() {
        for (id, enc) in
            [("my-id", "my_2did"), ("a_b", "a_5fb"), ("1x", "_31x"), ("default", "default"), ("x1", "x1"), ("", "_")]
        {
            assert_eq!(encode_path_element(id), enc, "{id}");
            assert_eq!(decode_path_element(enc).as_deref(), Some(id));
        }
        assert_eq!(session_path("my-id"), "/com/entrupy/TokenDaemon1/session/my_2did");
    }

    #[test]
    fn decode_rejects_garbage() {
        assert_eq!(decode_path_element("_zz"), None);
        assert_eq!(decode_path_element("a_2"), None);
    }
}
