//! SDK authorization requests (SPEC 4.2): URL-safe base64 without padding of
//! `{"v":1,"nonce":"<32 hex>","issued_at":<unix s>,"device_id":"<32 hex>"}`, fresh for every
//! login. Pure apart from the random nonce, which the caller may pin in tests.

use base64::Engine as _;

/// A new random 128-bit id as 32 lowercase hex digits (nonces and the device id).
pub fn random_hex128() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Builds the authorization request from its parts.
pub fn build(nonce: &str, issued_at: u64, device_id: &str) -> String {
    let json = serde_json::json!({
        "v": 1,
        "nonce": nonce,
        "issued_at": issued_at,
        "device_id": device_id,
    });
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json.to_string())
}

/// A fresh authorization request with a random nonce.
pub fn generate(now_unix: f64, device_id: &str) -> String {
    build(&random_hex128(), now_unix.max(0.0).floor() as u64, device_id)
}

/// Whether `s` looks like a device id: 32 lowercase hex digits.
pub fn is_device_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_is_urlsafe_base64_of_the_json() {
        let dev = "0123456789abcdef0123456789abcdef";
        let r = generate(1_700_000_000.9, dev);
        assert!(!r.contains('=') && !r.contains('+') && !r.contains('/'));
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&r).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["v"], 1);
        assert_eq!(v["issued_at"], 1_700_000_000u64);
        assert_eq!(v["device_id"], dev);
        assert!(is_device_id(v["nonce"].as_str().unwrap()));
        assert_ne!(generate(0.0, dev), generate(0.0, dev), "nonces are fresh");
    }

    #[test]
    fn device_ids() {
        assert!(is_device_id(&random_hex128()));
        assert!(!is_device_id("ABCDEF0123456789abcdef0123456789"));
        assert!(!is_device_id("abc"));
    }
}
