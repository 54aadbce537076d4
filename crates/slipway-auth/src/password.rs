//! Password hashes: argon2id for what Slipway sets, bcrypt for what an htpasswd
//! file brought in (verified as is, re-hashed with argon2id on the next login).

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

/// OWASP's argon2id baseline: 19 MiB, 2 passes, 1 lane.
fn hasher() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Why a password was not accepted for storage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswordError {
    /// Too short or too long.
    #[error("a password is 8 to 1024 characters")]
    Length,
    /// The hash could not be computed.
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

/// Hashes `password` with argon2id and a random salt (PHC string format).
pub fn hash(password: &str) -> Result<String, PasswordError> {
    if password.chars().count() < 8 || password.len() > 1024 {
        return Err(PasswordError::Length);
    }
    let salt = SaltString::generate(&mut OsRng);
    hasher()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| PasswordError::Hash(e.to_string()))
}

/// Whether `password` matches `stored` (argon2id or bcrypt). Both comparisons
/// are constant-time in the hash libraries.
pub fn verify(password: &str, stored: &str) -> bool {
    if password.len() > 1024 {
        return false;
    }
    if is_bcrypt(stored) {
        return bcrypt::verify(password, stored).unwrap_or(false);
    }
    match PasswordHash::new(stored) {
        Ok(h) => hasher().verify_password(password.as_bytes(), &h).is_ok(),
        Err(_) => false,
    }
}

/// Whether a stored hash should be replaced by argon2id at the next login.
pub fn needs_rehash(stored: &str) -> bool {
    !stored.starts_with("$argon2id$")
}

fn is_bcrypt(h: &str) -> bool {
    ["$2a$", "$2b$", "$2y$", "$2x$"]
        .iter()
        .any(|p| h.starts_with(p))
}

/// One `user:hash` line of an htpasswd file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HtpasswdEntry {
    /// The user name.
    pub user: String,
    /// Its bcrypt hash.
    pub hash: String,
}

/// Parses an htpasswd file. Only bcrypt hashes (`htpasswd -B`) are accepted:
/// the others (MD5-crypt, SHA-1, crypt) are too weak to keep.
pub fn parse_htpasswd(text: &str) -> Result<Vec<HtpasswdEntry>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, hash) = line
            .split_once(':')
            .ok_or_else(|| format!("line {}: expected user:hash", i + 1))?;
        if !is_bcrypt(hash) {
            return Err(format!(
                "line {}: {user:?} does not have a bcrypt hash; recreate it with `htpasswd -B`",
                i + 1
            ));
        }
        if bcrypt::verify("", hash).is_err() {
            return Err(format!(
                "line {}: the bcrypt hash of {user:?} is malformed",
                i + 1
            ));
        }
        out.push(HtpasswdEntry {
            user: user.to_owned(),
            hash: hash.to_owned(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2id_hashes_verify_only_their_password() {
        let h = hash("correct horse").expect("hash");
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify("correct horse", &h));
        assert!(!verify("correct horsE", &h));
        assert!(!verify("correct horse", "garbage"));
        assert!(!needs_rehash(&h));
        assert_eq!(hash("short"), Err(PasswordError::Length));
    }

    #[test]
    fn htpasswd_bcrypt_entries_import_and_weak_hashes_are_refused() {
        let b = bcrypt::hash("s3cret-pass", 4).expect("bcrypt");
        let file = format!("# users\nalice:{b}\n\n");
        let got = parse_htpasswd(&file).expect("parse");
        assert_eq!(got.len(), 1);
        assert!(verify("s3cret-pass", &got[0].hash));
        assert!(!verify("wrong", &got[0].hash));
        assert!(needs_rehash(&got[0].hash));
        let md5 = parse_htpasswd("bob:$apr1$x$y").expect_err("md5");
        assert!(md5.contains("htpasswd -B"), "{md5}");
        assert!(parse_htpasswd("nocolon").is_err());
    }
}
