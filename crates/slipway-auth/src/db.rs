//! `<data>/auth.redb`: users, API and refresh tokens, sealed secrets. Every
//! change is one durable redb commit.

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::policy::Permissions;

const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const SECRETS: TableDefinition<&str, &[u8]> = TableDefinition::new("secrets");

/// A user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// The login name.
    pub name: String,
    /// argon2id (or imported bcrypt) hash.
    pub hash: String,
    /// What the user may do.
    pub permissions: Permissions,
    /// Milliseconds since the epoch.
    pub created_ms: u64,
}

/// An API token or a refresh token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The id in the token text.
    pub id: String,
    /// `api` or `refresh`.
    pub kind: String,
    /// The token's name (API tokens), or the user it was issued to (refresh).
    pub name: String,
    /// Who created it.
    pub created_by: String,
    /// SHA-256 of the secret.
    pub hash: String,
    /// What an API token may do (a refresh token acts with its user's rights).
    pub permissions: Permissions,
    /// Milliseconds since the epoch.
    pub created_ms: u64,
    /// When it stops working, if ever.
    pub expires_ms: Option<u64>,
    /// When it was revoked.
    pub revoked_ms: Option<u64>,
}

impl TokenRecord {
    /// Whether it may be used at `now_ms`.
    pub fn usable(&self, now_ms: u64) -> bool {
        self.revoked_ms.is_none() && self.expires_ms.is_none_or(|e| now_ms < e)
    }
}

/// A sealed secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRecord {
    /// Its name.
    pub name: String,
    /// Bumped by every change of value.
    pub version: u64,
    /// Nonce and ciphertext.
    pub sealed: Vec<u8>,
    /// Service globs that may use it.
    pub services: Vec<String>,
    /// Milliseconds since the epoch.
    pub updated_ms: u64,
}

/// A database failure.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// Another process (a running server) holds the database.
    #[error(
        "{0} is in use by a running server: run the command against it (without --data), \
         or stop the server first"
    )]
    InUse(String),
    /// Anything else.
    #[error("auth database: {0}")]
    Other(String),
}

fn other(e: impl std::fmt::Display) -> DbError {
    DbError::Other(e.to_string())
}

/// The auth database.
pub struct AuthDb {
    db: Database,
}

impl std::fmt::Debug for AuthDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthDb")
    }
}

impl AuthDb {
    /// Opens or creates the database at `path`.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => DbError::InUse(path.display().to_string()),
            e => other(e),
        })?;
        let w = db.begin_write().map_err(other)?;
        {
            w.open_table(USERS).map_err(other)?;
            w.open_table(TOKENS).map_err(other)?;
            w.open_table(SECRETS).map_err(other)?;
        }
        w.commit().map_err(other)?;
        Ok(Self { db })
    }

    fn get<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>, DbError> {
        let r = self.db.begin_read().map_err(other)?;
        let t = r.open_table(table).map_err(other)?;
        match t.get(key).map_err(other)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(other)?)),
            None => Ok(None),
        }
    }

    fn list<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, DbError> {
        let r = self.db.begin_read().map_err(other)?;
        let t = r.open_table(table).map_err(other)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(other)? {
            let (_, v) = item.map_err(other)?;
            out.push(serde_json::from_slice(v.value()).map_err(other)?);
        }
        Ok(out)
    }

    /// Writes `value` at `key`; with `create_only`, refuses (returns `false`) if
    /// the key exists.
    fn put<T: Serialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &T,
        create_only: bool,
    ) -> Result<bool, DbError> {
        let bytes = serde_json::to_vec(value).map_err(other)?;
        let w = self.db.begin_write().map_err(other)?;
        {
            let mut t = w.open_table(table).map_err(other)?;
            if create_only && t.get(key).map_err(other)?.is_some() {
                return Ok(false);
            }
            t.insert(key, bytes.as_slice()).map_err(other)?;
        }
        w.commit().map_err(other)?;
        Ok(true)
    }

    fn remove(&self, table: TableDefinition<&str, &[u8]>, key: &str) -> Result<bool, DbError> {
        let w = self.db.begin_write().map_err(other)?;
        let found = {
            let mut t = w.open_table(table).map_err(other)?;
            t.remove(key).map_err(other)?.is_some()
        };
        w.commit().map_err(other)?;
        Ok(found)
    }

    /// Whether any user exists.
    pub fn has_users(&self) -> Result<bool, DbError> {
        let r = self.db.begin_read().map_err(other)?;
        let t = r.open_table(USERS).map_err(other)?;
        Ok(t.iter().map_err(other)?.next().is_some())
    }

    /// A user by name.
    pub fn user(&self, name: &str) -> Result<Option<UserRecord>, DbError> {
        self.get(USERS, name)
    }

    /// Every user, by name.
    pub fn users(&self) -> Result<Vec<UserRecord>, DbError> {
        self.list(USERS)
    }

    /// Adds a user; `false` if the name is taken.
    pub fn add_user(&self, u: &UserRecord) -> Result<bool, DbError> {
        self.put(USERS, &u.name, u, true)
    }

    /// Replaces a user's record.
    pub fn update_user(&self, u: &UserRecord) -> Result<(), DbError> {
        self.put(USERS, &u.name, u, false).map(|_| ())
    }

    /// Removes a user and revokes its refresh tokens; `false` if unknown.
    pub fn remove_user(&self, name: &str, now_ms: u64) -> Result<bool, DbError> {
        let found = self.remove(USERS, name)?;
        for mut t in self.tokens()? {
            if t.kind == "refresh" && t.name == name && t.revoked_ms.is_none() {
                t.revoked_ms = Some(now_ms);
                self.put_token(&t)?;
            }
        }
        Ok(found)
    }

    /// A token by id.
    pub fn token(&self, id: &str) -> Result<Option<TokenRecord>, DbError> {
        self.get(TOKENS, id)
    }

    /// Every token.
    pub fn tokens(&self) -> Result<Vec<TokenRecord>, DbError> {
        self.list(TOKENS)
    }

    /// Stores a token record.
    pub fn put_token(&self, t: &TokenRecord) -> Result<(), DbError> {
        self.put(TOKENS, &t.id, t, false).map(|_| ())
    }

    /// A secret by name.
    pub fn secret(&self, name: &str) -> Result<Option<SecretRecord>, DbError> {
        self.get(SECRETS, name)
    }

    /// Every secret.
    pub fn secrets(&self) -> Result<Vec<SecretRecord>, DbError> {
        self.list(SECRETS)
    }

    /// Stores a secret.
    pub fn put_secret(&self, s: &SecretRecord) -> Result<(), DbError> {
        self.put(SECRETS, &s.name, s, false).map(|_| ())
    }

    /// Removes a secret; `false` if unknown.
    pub fn remove_secret(&self, name: &str) -> Result<bool, DbError> {
        self.remove(SECRETS, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_tokens_survive_reopening_and_a_second_opener_is_told_why() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("auth.redb");
        {
            let db = AuthDb::open(&path).expect("open");
            assert!(!db.has_users().expect("users"));
            let u = UserRecord {
                name: "alice".into(),
                hash: "h".into(),
                permissions: Permissions::admin(),
                created_ms: 1,
            };
            assert!(db.add_user(&u).expect("add"));
            assert!(!db.add_user(&u).expect("dup"), "names are unique");
            db.put_token(&TokenRecord {
                id: "0123456789abcdef".into(),
                kind: "refresh".into(),
                name: "alice".into(),
                created_by: "alice".into(),
                hash: "x".into(),
                permissions: Permissions::default(),
                created_ms: 1,
                expires_ms: None,
                revoked_ms: None,
            })
            .expect("token");
            assert!(matches!(AuthDb::open(&path), Err(DbError::InUse(_))));
        }
        let db = AuthDb::open(&path).expect("reopen");
        assert!(db.has_users().expect("users"));
        assert!(db.remove_user("alice", 5).expect("rm"));
        let t = db.token("0123456789abcdef").expect("get").expect("exists");
        assert_eq!(
            t.revoked_ms,
            Some(5),
            "a removed user's refresh tokens are revoked"
        );
        assert!(!t.usable(6));
    }
}
