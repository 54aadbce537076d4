//! Secret values sealed with ChaCha20-Poly1305 under a key file kept apart from
//! the database, so a copy of the database alone reveals nothing.

use std::path::Path;

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom as _, SystemRandom};

/// The sealing key.
pub struct SealKey(LessSafeKey);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(<redacted>)")
    }
}

/// Why a value could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the secret cannot be decrypted with this key: was the key file replaced?")]
pub struct OpenError;

impl SealKey {
    /// Loads the 32-byte key at `path`, creating it (mode 0600, fsync'd) if absent.
    pub fn load_or_create(path: &Path) -> std::io::Result<Self> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut k = [0u8; 32];
                SystemRandom::new()
                    .fill(&mut k)
                    .map_err(|_| std::io::Error::other("the system RNG failed"))?;
                crate::write_private(path, &k)?;
                k.to_vec()
            }
            Err(e) => return Err(e),
        };
        Self::from_bytes(&bytes).ok_or_else(|| {
            std::io::Error::other(format!("{} is not a 32-byte key", path.display()))
        })
    }

    /// A key from 32 raw bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let k = UnboundKey::new(&CHACHA20_POLY1305, bytes).ok()?;
        Some(Self(LessSafeKey::new(k)))
    }

    /// Seals `plain`, bound to `name` (a value cannot be moved to another name).
    pub fn seal(&self, name: &str, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        if SystemRandom::new().fill(&mut nonce).is_err() {
            std::process::abort();
        }
        let mut buf = plain.to_vec();
        // Sealing in place only fails for inputs beyond 256 GiB.
        if self
            .0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut buf,
            )
            .is_err()
        {
            std::process::abort();
        }
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        out
    }

    /// Opens what [`seal`](Self::seal) produced for `name`.
    pub fn open(&self, name: &str, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        if sealed.len() < NONCE_LEN {
            return Err(OpenError);
        }
        let (n, ct) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(n).map_err(|_| OpenError)?;
        let mut buf = ct.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut buf)
            .map_err(|_| OpenError)?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_under_their_key_and_name() {
        let k = SealKey::from_bytes(&[7; 32]).expect("key");
        let s = k.seal("db-password", b"hunter2");
        assert!(!s.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(k.open("db-password", &s).expect("open"), b"hunter2");
        assert_eq!(k.open("other", &s), Err(OpenError));
        let k2 = SealKey::from_bytes(&[8; 32]).expect("key");
        assert_eq!(k2.open("db-password", &s), Err(OpenError));
        assert_eq!(k.open("db-password", &s[..5]), Err(OpenError));
    }
}
