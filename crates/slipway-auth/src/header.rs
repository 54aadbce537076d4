//! The `Authorization` header: `Basic` and `Bearer`.

use base64::Engine as _;

/// Credentials a request carries.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// A user name and password (or a token as the password).
    Basic {
        /// The user name.
        user: String,
        /// The password.
        password: String,
    },
    /// A bearer token: a registry JWT, an API token or a refresh token.
    Bearer(String),
}

impl std::fmt::Debug for Credentials {
    // Never print a secret, even in a debug log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Basic { user, .. } => write!(f, "Basic({user:?}, <redacted>)"),
            Self::Bearer(_) => f.write_str("Bearer(<redacted>)"),
        }
    }
}

/// Why the header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Not `Basic` or `Bearer`.
    #[error("the Authorization header must use the Basic or Bearer scheme")]
    Scheme,
    /// Bad base64, no `:` or not UTF-8.
    #[error("the Basic credentials are not base64 of user:password")]
    Basic,
    /// Empty or not a token.
    #[error("the Bearer token is empty or malformed")]
    Bearer,
    /// Longer than the limit.
    #[error("the Authorization header is longer than 8 KiB")]
    TooLong,
}

/// Parses an `Authorization` header value.
pub fn parse(value: &[u8]) -> Result<Credentials, HeaderError> {
    if value.len() > 8192 {
        return Err(HeaderError::TooLong);
    }
    let value = std::str::from_utf8(value).map_err(|_| HeaderError::Scheme)?;
    let (scheme, rest) = value.trim().split_once(' ').ok_or(HeaderError::Scheme)?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .map_err(|_| HeaderError::Basic)?;
        let text = String::from_utf8(raw).map_err(|_| HeaderError::Basic)?;
        let (user, password) = text.split_once(':').ok_or(HeaderError::Basic)?;
        if user.is_empty() {
            return Err(HeaderError::Basic);
        }
        Ok(Credentials::Basic {
            user: user.to_owned(),
            password: password.to_owned(),
        })
    } else if scheme.eq_ignore_ascii_case("bearer") {
        if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(HeaderError::Bearer);
        }
        Ok(Credentials::Bearer(rest.to_owned()))
    } else {
        Err(HeaderError::Scheme)
    }
}

/// Encodes Basic credentials (for clients and tests).
pub fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_and_bearer_parse_and_everything_else_is_refused() {
        assert_eq!(
            parse(basic("alice", "pa:ss").as_bytes()),
            Ok(Credentials::Basic {
                user: "alice".into(),
                password: "pa:ss".into()
            })
        );
        assert_eq!(
            parse(b"bearer abc.def"),
            Ok(Credentials::Bearer("abc.def".into()))
        );
        assert_eq!(parse(b"Digest x"), Err(HeaderError::Scheme));
        assert_eq!(parse(b"Basic !!!"), Err(HeaderError::Basic));
        assert_eq!(parse(b"Basic Zm9v"), Err(HeaderError::Basic), "no colon");
        assert_eq!(parse(b"Bearer "), Err(HeaderError::Scheme));
        assert_eq!(parse(&[b'x'; 9000]), Err(HeaderError::TooLong));
        let dbg = format!("{:?}", parse(basic("u", "hunter2").as_bytes()));
        assert!(!dbg.contains("hunter2"), "{dbg}");
    }

    proptest::proptest! {
        #[test]
        fn header_parsing_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn basic_round_trips(user in "[^:\\x00]{1,20}", pass in "\\PC{0,30}") {
            let got = parse(basic(&user, &pass).as_bytes());
            proptest::prop_assert_eq!(got, Ok(Credentials::Basic { user, password: pass }));
        }
    }
}
