//! Opaque tokens: API tokens (`slw_…`) and refresh tokens (`slr_…`).
//!
//! A token is `<prefix><id>_<secret>`: the id finds the record, the secret is
//! 32 random bytes of which only the SHA-256 is stored. Secrets this long need
//! no slow hash; the comparison is constant-time.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::{SecureRandom as _, SystemRandom};
use sha2::Digest as _;
use subtle::ConstantTimeEq as _;

/// Which table a token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// A named API token (robot account).
    Api,
    /// A refresh (identity) token issued at login.
    Refresh,
}

impl TokenKind {
    fn prefix(self) -> &'static str {
        match self {
            Self::Api => "slw_",
            Self::Refresh => "slr_",
        }
    }
}

/// A freshly minted token: the text to hand out once, and what to store.
#[derive(Clone)]
pub struct Minted {
    /// The record id.
    pub id: String,
    /// The full token, shown once.
    pub token: String,
    /// SHA-256 of the secret, hex.
    pub hash: String,
}

/// `n` bytes from the system RNG.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    // The system RNG failing is unrecoverable.
    if SystemRandom::new().fill(&mut b).is_err() {
        std::process::abort();
    }
    b
}

/// Mints a new token of `kind`.
pub fn mint(kind: TokenKind) -> Minted {
    let id = hex::encode(random_bytes(8));
    let secret = B64.encode(random_bytes(32));
    Minted {
        token: format!("{}{id}_{secret}", kind.prefix()),
        hash: hash_secret(&secret),
        id,
    }
}

fn hash_secret(secret: &str) -> String {
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}

/// Splits a presented token into its kind, id and secret, or `None` if it is
/// not one of ours.
pub fn parse(token: &str) -> Option<(TokenKind, &str, &str)> {
    let (kind, rest) = if let Some(r) = token.strip_prefix("slw_") {
        (TokenKind::Api, r)
    } else if let Some(r) = token.strip_prefix("slr_") {
        (TokenKind::Refresh, r)
    } else {
        return None;
    };
    let (id, secret) = rest.split_once('_')?;
    (id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) && secret.len() == 43)
        .then_some((kind, id, secret))
}

/// Whether `secret` hashes to `stored`, in constant time.
pub fn verify(secret: &str, stored: &str) -> bool {
    hash_secret(secret)
        .as_bytes()
        .ct_eq(stored.as_bytes())
        .into()
}

/// Whether two shared secrets (a cluster's join token) are equal, in constant
/// time whatever their lengths.
pub fn same_secret(given: &str, expected: &str) -> bool {
    hash_secret(given)
        .as_bytes()
        .ct_eq(hash_secret(expected).as_bytes())
        .into()
}

/// A random identifier for JWT ids and the like.
pub fn random_id() -> String {
    hex::encode(random_bytes(12))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_parse_and_verify_only_with_their_secret() {
        let m = mint(TokenKind::Api);
        let (kind, id, secret) = parse(&m.token).expect("parse");
        assert_eq!(kind, TokenKind::Api);
        assert_eq!(id, m.id);
        assert!(verify(secret, &m.hash));
        let other = mint(TokenKind::Api);
        let (_, _, other_secret) = parse(&other.token).expect("parse");
        assert!(!verify(other_secret, &m.hash));
        assert!(!verify("", &m.hash));
        let r = mint(TokenKind::Refresh);
        assert_eq!(parse(&r.token).map(|t| t.0), Some(TokenKind::Refresh));
        assert!(!r.token.contains(&r.hash));
        assert_eq!(parse("slw_short_x"), None);
        assert_eq!(parse("eyJ.a.b"), None);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_strings_never_parse_as_tokens_unless_well_formed(s in "\\PC{0,80}") {
            if let Some((_, id, secret)) = parse(&s) {
                proptest::prop_assert_eq!(id.len(), 16);
                proptest::prop_assert_eq!(secret.len(), 43);
            }
        }
    }
}
