//! Name globs for grants: `*` matches any run of characters (including `/`), `?`
//! matches one character, everything else matches itself.

/// Whether `name` matches `glob`.
pub fn matches(glob: &str, name: &str) -> bool {
    let (g, n) = (glob.as_bytes(), name.as_bytes());
    let (mut gi, mut ni) = (0, 0);
    // Where the last `*` was and what it had consumed up to, for backtracking.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match g.get(gi) {
            Some(b'*') => {
                star = Some((gi, ni));
                gi += 1;
            }
            Some(&c) if c == b'?' || c == n[ni] => {
                gi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sg, sn)) => {
                    gi = sg + 1;
                    ni = sn + 1;
                    star = Some((sg, sn + 1));
                }
                None => return false,
            },
        }
    }
    g[gi..].iter().all(|&c| c == b'*')
}

/// Checks a glob written by an operator: non-empty, printable, no spaces.
pub fn validate(glob: &str) -> Result<(), String> {
    if glob.is_empty() || glob.len() > 255 {
        return Err("a glob is 1 to 255 characters".into());
    }
    if let Some(c) = glob
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || *c == '=' || *c == ',')
    {
        return Err(format!("{glob:?} contains {c:?}, which no name has"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stars_span_path_separators_and_question_marks_one_character() {
        assert!(matches("*", "team/app"));
        assert!(matches("team/*", "team/app"));
        assert!(matches("team/*", "team/a/b"));
        assert!(!matches("team/*", "other/app"));
        assert!(matches("team/app", "team/app"));
        assert!(!matches("team/app", "team/app2"));
        assert!(matches("a?c", "abc"));
        assert!(!matches("a?c", "ac"));
        assert!(matches("*-prod", "web-prod"));
        assert!(!matches("*-prod", "web-prod-2"));
        assert!(matches("a*b*c", "axxbyyc"));
        assert!(!matches("a*b*c", "axxbyy"));
        assert!(matches("team/**", "team/x"));
    }

    proptest::proptest! {
        #[test]
        fn a_name_always_matches_itself_and_star(name in "[a-z0-9/._-]{0,40}") {
            proptest::prop_assert!(matches(&name, &name));
            proptest::prop_assert!(matches("*", &name));
        }
    }
}
