//! Registry bearer tokens: compact JWS with EdDSA (Ed25519), as Distribution's
//! token authentication expects, and the JWKS that publishes the key.
//!
//! The verifier accepts exactly one algorithm, `EdDSA`, and one key per `kid`:
//! `alg: none`, HS256 "signed" with the public key and every other substitution
//! are refused before any signature check.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::scope::Access;

/// The claims of a registry token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer.
    pub iss: String,
    /// The principal (`alice`, `token:ci`), or empty for anonymous.
    pub sub: String,
    /// The service the token is for.
    pub aud: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Not before.
    pub nbf: u64,
    /// Issued at.
    pub iat: u64,
    /// Unique id.
    pub jti: String,
    /// What it grants.
    #[serde(default)]
    pub access: Vec<Access>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    kid: Option<String>,
}

/// Why a token was refused. The message never includes the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts of JSON.
    #[error("the token is not a well-formed JWT")]
    Malformed,
    /// An algorithm other than EdDSA.
    #[error("the token's algorithm is not EdDSA")]
    Algorithm,
    /// A `kid` that names no key of this server.
    #[error("the token was not signed by this server's key")]
    UnknownKey,
    /// The signature does not verify.
    #[error("the token's signature is invalid")]
    Signature,
    /// Past `exp` or before `nbf`.
    #[error("the token has expired")]
    Expired,
    /// Issued for another service or by another issuer.
    #[error("the token was issued for another service")]
    Audience,
}

/// The signing key.
pub struct Signer {
    key: Ed25519KeyPair,
    kid: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.kid)
    }
}

/// Leeway for clock differences, in seconds.
const LEEWAY: u64 = 30;

impl Signer {
    /// Loads the PKCS#8 key at `path`, creating it (mode 0600, fsync'd) if absent.
    pub fn load_or_create(path: &Path) -> std::io::Result<Self> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                    .map_err(|_| std::io::Error::other("cannot generate an Ed25519 key"))?;
                crate::write_private(path, doc.as_ref())?;
                doc.as_ref().to_vec()
            }
            Err(e) => return Err(e),
        };
        Self::from_pkcs8(&bytes).map_err(|_| {
            std::io::Error::other(format!(
                "{} is not an Ed25519 PKCS#8 key; move it away to create a new one",
                path.display()
            ))
        })
    }

    /// Builds a signer from a PKCS#8 document.
    pub fn from_pkcs8(bytes: &[u8]) -> Result<Self, ring::error::KeyRejected> {
        let key = Ed25519KeyPair::from_pkcs8(bytes)?;
        let digest = sha2::Sha256::digest(key.public_key().as_ref());
        let kid = B64.encode(&digest[..12]);
        Ok(Self { key, kid })
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Signs `claims`.
    pub fn sign(&self, claims: &Claims) -> String {
        let header = Header {
            alg: "EdDSA".into(),
            typ: Some("JWT".into()),
            kid: Some(self.kid.clone()),
        };
        let enc = |v: &[u8]| B64.encode(v);
        let mut out = format!(
            "{}.{}",
            enc(&serde_json::to_vec(&header).unwrap_or_default()),
            enc(&serde_json::to_vec(claims).unwrap_or_default())
        );
        let sig = self.key.sign(out.as_bytes());
        out.push('.');
        out.push_str(&enc(sig.as_ref()));
        out
    }

    /// Verifies a token for `audience` at `now` (seconds since the epoch).
    pub fn verify(&self, token: &str, audience: &str, now: u64) -> Result<Claims, JwtError> {
        if token.len() > 16 * 1024 {
            return Err(JwtError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        let header: Header = B64
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(JwtError::Malformed)?;
        if header.alg != "EdDSA" {
            return Err(JwtError::Algorithm);
        }
        if header.kid.as_deref() != Some(self.kid.as_str()) {
            return Err(JwtError::UnknownKey);
        }
        let sig = B64.decode(s).map_err(|_| JwtError::Malformed)?;
        let signed = &token[..h.len() + 1 + c.len()];
        UnparsedPublicKey::new(&ED25519, self.key.public_key().as_ref())
            .verify(signed.as_bytes(), &sig)
            .map_err(|_| JwtError::Signature)?;
        let claims: Claims = B64
            .decode(c)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(JwtError::Malformed)?;
        if now >= claims.exp.saturating_add(LEEWAY) || now.saturating_add(LEEWAY) < claims.nbf {
            return Err(JwtError::Expired);
        }
        if claims.aud != audience {
            return Err(JwtError::Audience);
        }
        Ok(claims)
    }

    /// The JWKS document publishing the public key.
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({
            "keys": [{
                "kty": "OKP",
                "crv": "Ed25519",
                "alg": "EdDSA",
                "use": "sig",
                "kid": self.kid,
                "x": B64.encode(self.key.public_key().as_ref()),
            }]
        })
    }
}

/// Whether a bearer value looks like a JWT (three dot-separated parts).
pub fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Signer {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("key");
        Signer::from_pkcs8(doc.as_ref()).expect("signer")
    }

    fn claims(exp: u64) -> Claims {
        Claims {
            iss: "slipway".into(),
            sub: "alice".into(),
            aud: "slipway".into(),
            exp,
            nbf: 900,
            iat: 900,
            jti: "1".into(),
            access: vec![Access {
                kind: "repository".into(),
                name: "team/app".into(),
                actions: vec!["pull".into()],
            }],
        }
    }

    fn forge(header: &str, claims: &Claims, sig: &[u8]) -> String {
        format!(
            "{}.{}.{}",
            B64.encode(header),
            B64.encode(serde_json::to_vec(claims).expect("json")),
            B64.encode(sig)
        )
    }

    #[test]
    fn signed_tokens_verify_until_they_expire_and_only_for_their_audience() {
        let s = signer();
        let t = s.sign(&claims(1000));
        assert_eq!(s.verify(&t, "slipway", 950), Ok(claims(1000)));
        assert_eq!(s.verify(&t, "slipway", 1100), Err(JwtError::Expired));
        assert_eq!(s.verify(&t, "other", 950), Err(JwtError::Audience));
        assert_eq!(
            signer().verify(&t, "slipway", 950),
            Err(JwtError::UnknownKey)
        );
        // A flipped claim byte breaks the signature.
        let mut c = claims(1000);
        c.access[0].actions.push("push".into());
        let parts: Vec<&str> = t.split('.').collect();
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            B64.encode(serde_json::to_vec(&c).expect("json")),
            parts[2]
        );
        assert_eq!(
            s.verify(&tampered, "slipway", 950),
            Err(JwtError::Signature)
        );
        let jwks = s.jwks();
        assert_eq!(jwks["keys"][0]["kid"], s.kid());
    }

    #[test]
    fn forged_algorithms_are_refused_before_any_signature_check() {
        let s = signer();
        let kid = s.kid().to_owned();
        let none = forge(
            &format!(r#"{{"alg":"none","kid":"{kid}"}}"#),
            &claims(1000),
            b"",
        );
        assert_eq!(s.verify(&none, "slipway", 950), Err(JwtError::Algorithm));
        // HS256 "signed" with the public key as the HMAC secret.
        let header = format!(r#"{{"alg":"HS256","kid":"{kid}"}}"#);
        let unsigned = format!(
            "{}.{}",
            B64.encode(&header),
            B64.encode(serde_json::to_vec(&claims(1000)).expect("json"))
        );
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, s.key.public_key().as_ref());
        let tag = ring::hmac::sign(&key, unsigned.as_bytes());
        let hs = format!("{unsigned}.{}", B64.encode(tag.as_ref()));
        assert_eq!(s.verify(&hs, "slipway", 950), Err(JwtError::Algorithm));
        let no_kid = forge(r#"{"alg":"EdDSA"}"#, &claims(1000), &[0; 64]);
        assert_eq!(s.verify(&no_kid, "slipway", 950), Err(JwtError::UnknownKey));
        let bad_sig = forge(
            &format!(r#"{{"alg":"EdDSA","kid":"{kid}"}}"#),
            &claims(1000),
            &[0; 64],
        );
        assert_eq!(s.verify(&bad_sig, "slipway", 950), Err(JwtError::Signature));
        assert_eq!(s.verify("a.b", "slipway", 950), Err(JwtError::Malformed));
        assert_eq!(
            s.verify("a.b.c.d", "slipway", 950),
            Err(JwtError::Malformed)
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_tokens_never_verify_or_panic(t in "[A-Za-z0-9_.-]{0,400}") {
            let s = signer();
            proptest::prop_assert!(s.verify(&t, "slipway", 950).is_err());
        }

        #[test]
        fn arbitrary_headers_never_verify(alg in "\\PC{0,20}", kid in "\\PC{0,20}", sig in proptest::collection::vec(proptest::num::u8::ANY, 0..80)) {
            let s = signer();
            let header = serde_json::json!({"alg": alg, "kid": kid}).to_string();
            let t = forge(&header, &claims(1000), &sig);
            proptest::prop_assert!(s.verify(&t, "slipway", 950).is_err());
        }
    }
}
