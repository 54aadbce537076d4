//! Distribution's token scopes (`repository:team/app:pull,push`,
//! `registry:catalog:*`) and the `access` claim they become.

use serde::{Deserialize, Serialize};

/// One entry of a token's `access` claim, and one requested scope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    /// `repository` or `registry`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The repository name, or `catalog`.
    pub name: String,
    /// `pull`, `push`, `delete`, `*`.
    pub actions: Vec<String>,
}

/// Why a scope string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid scope {scope:?}: {reason}")]
pub struct ScopeError {
    /// The offending scope (shortened).
    pub scope: String,
    /// What is wrong.
    pub reason: &'static str,
}

const MAX_SCOPES: usize = 64;

/// Parses a `scope` parameter: scopes separated by spaces.
pub fn parse(param: &str) -> Result<Vec<Access>, ScopeError> {
    let mut out = Vec::new();
    for s in param.split(' ').filter(|s| !s.is_empty()) {
        if out.len() == MAX_SCOPES {
            return Err(err(s, "too many scopes in one request"));
        }
        out.push(parse_one(s)?);
    }
    Ok(out)
}

fn err(scope: &str, reason: &'static str) -> ScopeError {
    ScopeError {
        scope: scope.chars().take(80).collect(),
        reason,
    }
}

fn parse_one(s: &str) -> Result<Access, ScopeError> {
    if s.len() > 512 {
        return Err(err(s, "longer than 512 bytes"));
    }
    // type[(class)]:name:actions; the name may hold a registry host's ':port'.
    let (kind, rest) = s
        .split_once(':')
        .ok_or_else(|| err(s, "write type:name:actions"))?;
    let (name, actions) = rest
        .rsplit_once(':')
        .ok_or_else(|| err(s, "write type:name:actions"))?;
    let kind = kind.split_once('(').map_or(kind, |(k, _)| k);
    if kind.is_empty() || !kind.bytes().all(|b| b.is_ascii_lowercase()) {
        return Err(err(s, "the type is lowercase letters"));
    }
    if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace() || b < 0x21) {
        return Err(err(s, "the name is empty or holds spaces"));
    }
    let actions: Vec<String> = actions
        .split(',')
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect();
    if actions
        .iter()
        .any(|a| !a.bytes().all(|b| b.is_ascii_lowercase() || b == b'*'))
    {
        return Err(err(s, "actions are lowercase words or *"));
    }
    Ok(Access {
        kind: kind.to_owned(),
        name: name.to_owned(),
        actions,
    })
}

/// Renders scopes for a `WWW-Authenticate` challenge.
pub fn render(access: &Access) -> String {
    format!(
        "{}:{}:{}",
        access.kind,
        access.name,
        access.actions.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_as_clients_send_them() {
        let got = parse("repository:team/app:pull,push registry:catalog:*").expect("scopes");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].kind, "repository");
        assert_eq!(got[0].name, "team/app");
        assert_eq!(got[0].actions, ["pull", "push"]);
        assert_eq!(got[1].actions, ["*"]);
        let plugin = parse("repository(plugin):x:pull").expect("class");
        assert_eq!(plugin[0].kind, "repository");
        let host = parse("repository:localhost:5000/x:pull").expect("host");
        assert_eq!(host[0].name, "localhost:5000/x");
        assert_eq!(render(&got[0]), "repository:team/app:pull,push");
        for bad in [
            "repository",
            "repository:x",
            "Repo:x:pull",
            "repository::pull",
            "repository:x:PULL",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn scope_parsing_never_panics(s in "\\PC{0,200}") {
            let _ = parse(&s);
        }

        #[test]
        fn rendered_scopes_parse_back(name in "[a-z0-9]{1,10}(/[a-z0-9]{1,10}){0,3}",
                                      acts in proptest::collection::vec("pull|push|delete", 1..3)) {
            let a = Access { kind: "repository".into(), name, actions: acts };
            proptest::prop_assert_eq!(parse(&render(&a)).expect("parse"), vec![a]);
        }
    }
}
