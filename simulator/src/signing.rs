//! The cryptographic half of the simulator: the format of the SDK authorization request
//! the daemon generates (SPEC 4.1), and the signed authorization request the fake backend
//! hands out and the fake Entrupy accepts.
//!
//! A signed request is `base64url(payload JSON) "." base64url(HMAC-SHA256(key, first part))`,
//! where the key is random per simulator instance. The payload embeds the whole SDK
//! authorization request, so the signature binds the user to one request, and therefore to
//! one nonce: this is what lets `/login` detect a replayed or tampered signed request.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The decoded SDK authorization request, as SPEC 4.1 defines it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationRequest {
    /// Format version; always 1.
    pub v: u32,
    /// 128 random bits as 32 hex digits; fresh for every login.
    pub nonce: String,
    /// Unix seconds (an integer) when the daemon made the request.
    pub issued_at: i64,
    /// 32 hex digits, random once per installation.
    pub device_id: String,
}

/// Decodes and validates an SDK authorization request the way the fake Entrupy does:
/// URL-safe base64 without padding of exactly the JSON object SPEC 4.1 describes.
///
/// The error is a human-readable reason, used as the `description` of a 401.
pub fn decode_authorization_request(s: &str) -> Result<AuthorizationRequest, String> {
    let raw = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|e| format!("sdk authorization request is not unpadded URL-safe base64: {e}"))?;
    let req: AuthorizationRequest =
        serde_json::from_slice(&raw).map_err(|e| format!("sdk authorization request is not the expected JSON: {e}"))?;
    if req.v != 1 {
        return Err(format!("unsupported sdk authorization request version {}", req.v));
    }
    if !is_hex32(&req.nonce) {
        return Err("nonce is not 32 hex digits".to_owned());
    }
    if !is_hex32(&req.device_id) {
        return Err("device_id is not 32 hex digits".to_owned());
    }
    Ok(req)
}

/// Encodes an SDK authorization request exactly as a correct daemon would.
pub fn encode_authorization_request(req: &AuthorizationRequest) -> String {
    let json = serde_json::json!({
        "v": req.v,
        "nonce": req.nonce,
        "issued_at": req.issued_at,
        "device_id": req.device_id,
    });
    URL_SAFE_NO_PAD.encode(json.to_string())
}

/// A valid, fresh SDK authorization request with a random nonce, for tests that need one
/// without running the daemon.
pub fn fresh_authorization_request(device_id: &str) -> String {
    encode_authorization_request(&AuthorizationRequest {
        v: 1,
        nonce: random_hex32(),
        issued_at: crate::state::unix_now() as i64,
        device_id: device_id.to_owned(),
    })
}

/// 128 random bits as 32 lowercase hex digits.
pub fn random_hex32() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn is_hex32(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// What the fake backend signs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct SignedPayload {
    pub sdk_authorization_request: String,
    pub unique_user_id: String,
    pub email: String,
    /// Fractional Unix seconds; lets `/login` reject stale signed requests.
    pub signed_at: f64,
}

/// Signs and verifies with a per-instance random key, so that a signed request from one
/// simulator (or a test's hand-made string) never verifies at another.
pub(crate) struct Signer {
    key: [u8; 32],
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is a secret even in a simulator: keep it out of debug output.
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

impl Signer {
    pub fn random() -> Self {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        Signer { key }
    }

    // Invariant: HMAC is defined for keys of any length, so this cannot fail.
    #[allow(clippy::expect_used)]
    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.key).expect("HMAC accepts keys of any length")
    }

    pub fn sign(&self, payload: &SignedPayload) -> String {
        let json = serde_json::json!({
            "sdk_authorization_request": payload.sdk_authorization_request,
            "unique_user_id": payload.unique_user_id,
            "email": payload.email,
            "signed_at": payload.signed_at,
        });
        let body = URL_SAFE_NO_PAD.encode(json.to_string());
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        let tag = mac.finalize().into_bytes();
        format!("{body}.{}", URL_SAFE_NO_PAD.encode(tag))
    }

    /// Checks the tag in constant time, then decodes the payload.
    pub fn verify(&self, signed: &str) -> Result<SignedPayload, &'static str> {
        let (body, tag) = signed.split_once('.').ok_or("signed request is not in the expected format")?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| "signed request is not in the expected format")?;
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        mac.verify_slice(&tag).map_err(|_| "signature does not verify")?;
        let raw = URL_SAFE_NO_PAD.decode(body).map_err(|_| "signed request payload is not base64")?;
        serde_json::from_slice(&raw).map_err(|_| "signed request payload is not valid")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_round_trip_and_tamper() {
        let s = Signer::random();
        let p = SignedPayload {
            sdk_authorization_request: fresh_authorization_request(&random_hex32()),
            unique_user_id: "user-0001".into(),
            email: "a@b.c".into(),
            signed_at: 1.5,
        };
        let signed = s.sign(&p);
        assert_eq!(s.verify(&signed).unwrap(), p);
        assert!(Signer::random().verify(&signed).is_err());
        let mut tampered = signed.clone();
        tampered.insert(3, 'A');
        assert!(s.verify(&tampered).is_err());
        assert!(s.verify("nodot").is_err());
    }

    #[test]
    fn authorization_request_validation() {
        let dev = random_hex32();
        let ok = fresh_authorization_request(&dev);
        let req = decode_authorization_request(&ok).unwrap();
        assert_eq!(req.device_id, dev);
        assert_eq!(req.v, 1);
        // Padding, standard alphabet, extra fields, float issued_at and short hex are all bugs.
        assert!(decode_authorization_request(&format!("{ok}==")).is_err());
        let enc = |j: &str| URL_SAFE_NO_PAD.encode(j);
        let n = random_hex32();
        assert!(
            decode_authorization_request(&enc(&format!(
                r#"{{"v":1,"nonce":"{n}","issued_at":1.5,"device_id":"{dev}"}}"#
            )))
            .is_err()
        );
        assert!(
            decode_authorization_request(&enc(&format!(
                r#"{{"v":1,"nonce":"{n}","issued_at":1,"device_id":"{dev}","x":1}}"#
            )))
            .is_err()
        );
        assert!(
            decode_authorization_request(&enc(&format!(
                r#"{{"v":1,"nonce":"abc","issued_at":1,"device_id":"{dev}"}}"#
            )))
            .is_err()
        );
        assert!(
            decode_authorization_request(&enc(&format!(
                r#"{{"v":2,"nonce":"{n}","issued_at":1,"device_id":"{dev}"}}"#
            )))
            .is_err()
        );
        assert!(
            decode_authorization_request(&enc(&format!(
                r#"{{"v":1,"nonce":"{n}","issued_at":1,"device_id":"{dev}"}}"#
            )))
            .is_ok()
        );
    }
}
