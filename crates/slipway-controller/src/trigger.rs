//! Image triggers: which pushed (or polled) tags roll out, and the one latest-wins
//! slot per service where they wait for the actor.

use std::sync::Mutex;

use slipway_core::service::Trigger;
use tokio::sync::Notify;

/// The tag of a reference `[host[:port]/]repo:tag`, if it has one.
pub fn tag_of(image: &str) -> Option<&str> {
    let image = image.split('@').next().unwrap_or(image);
    let (head, tag) = image.rsplit_once(':')?;
    let _ = head;
    (!tag.contains('/')).then_some(tag)
}

/// The repository part of a reference, without host, tag or digest.
pub fn repo_of(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    let image = match image.rsplit_once(':') {
        Some((head, tag)) if !tag.contains('/') => head,
        _ => image,
    };
    match image.split_once('/') {
        Some((host, rest)) if host.contains('.') || host.contains(':') || host == "localhost" => {
            rest
        }
        _ => image,
    }
}

/// A semver tag (`1.2.3` or `v1.2.3`).
pub fn version(tag: &str) -> Option<semver::Version> {
    slipway_core::tag_version(tag)
}

/// Whether `tag` should roll out, given the tag the service runs or has queued:
/// an exact tag, a regex match, or a semver match above the current version (a
/// service never moves to a lower version).
pub fn matches(t: &Trigger, tag: &str, current: Option<&str>) -> bool {
    if let Some(exact) = &t.tag {
        return exact == tag;
    }
    if let Some(re) = &t.regex {
        return regex::Regex::new(&format!("^(?:{re})$")).is_ok_and(|r| r.is_match(tag));
    }
    if let Some(range) = &t.semver {
        let (Ok(req), Some(v)) = (semver::VersionReq::parse(range), version(tag)) else {
            return false;
        };
        if !req.matches(&v) {
            return false;
        }
        return current.and_then(version).is_none_or(|c| v > c);
    }
    false
}

/// Among `tags`, the one to roll out: the highest matching semver, else the
/// greatest matching tag in lexical order.
pub fn best<'a>(
    t: &Trigger,
    tags: impl IntoIterator<Item = &'a str>,
    current: Option<&str>,
) -> Option<String> {
    let mut best: Option<&str> = None;
    for tag in tags.into_iter().filter(|tag| matches(t, tag, current)) {
        let better = match best {
            None => true,
            Some(b) if t.semver.is_some() => version(tag) > version(b),
            Some(b) => tag > b,
        };
        if better {
            best = Some(tag);
        }
    }
    best.map(str::to_owned)
}

/// A tag offered to a service by a push or a poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// The tag.
    pub tag: String,
    /// The image reference to deploy (`[host/]repo:tag`).
    pub image: String,
}

/// One latest-wins slot: offers that arrive while the actor is busy coalesce, and
/// for a semver trigger a lower version never replaces a higher one.
#[derive(Debug, Default)]
pub struct TriggerSlot {
    slot: Mutex<Option<Offer>>,
    notify: Notify,
}

impl TriggerSlot {
    /// Puts an offer in the slot (unless a higher version already waits there).
    pub fn offer(&self, trigger: &Trigger, offer: Offer) {
        {
            let mut slot = self
                .slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let keep_waiting = trigger.semver.is_some()
                && slot
                    .as_ref()
                    .is_some_and(|w| version(&w.tag) >= version(&offer.tag));
            if !keep_waiting {
                *slot = Some(offer);
            }
        }
        self.notify.notify_one();
    }

    /// Takes what waits.
    pub fn take(&self) -> Option<Offer> {
        self.slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Resolves when something was offered since the last wait.
    pub async fn offered(&self) {
        self.notify.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn t(tag: Option<&str>, semver: Option<&str>, regex: Option<&str>) -> Trigger {
        Trigger {
            tag: tag.map(str::to_owned),
            semver: semver.map(str::to_owned),
            regex: regex.map(str::to_owned),
            poll_interval: slipway_core::service::Dur(Duration::from_secs(30)),
        }
    }

    #[test]
    fn triggers_match_exact_tags_regexes_and_semver_without_downgrading() {
        assert!(matches(&t(Some("stable"), None, None), "stable", None));
        assert!(!matches(&t(Some("stable"), None, None), "latest", None));
        let semver = t(None, Some("^1"), None);
        assert!(matches(&semver, "1.4.0", Some("1.2.0")));
        assert!(!matches(&semver, "2.0.0", Some("1.2.0")));
        assert!(
            !matches(&semver, "1.1.0", Some("1.2.0")),
            "never downgrades"
        );
        assert!(!matches(&semver, "not-a-version", None));
        let re = t(None, None, Some(r"release-\d+"));
        assert!(matches(&re, "release-42", None));
        assert!(!matches(&re, "xrelease-42", None));
        assert_eq!(
            best(
                &semver,
                ["1.1.0", "1.10.0", "1.9.0", "2.0.0"],
                Some("1.0.0")
            )
            .as_deref(),
            Some("1.10.0"),
            "the highest version, not the lexically greatest"
        );
    }

    #[test]
    fn references_split_into_repository_and_tag() {
        assert_eq!(tag_of("hello:1.2.0"), Some("1.2.0"));
        assert_eq!(tag_of("127.0.0.1:5000/team/hello:1.2.0"), Some("1.2.0"));
        assert_eq!(tag_of("127.0.0.1:5000/team/hello"), None);
        assert_eq!(tag_of("hello@sha256:abc"), None);
        assert_eq!(repo_of("127.0.0.1:5000/team/hello:1.2.0"), "team/hello");
        assert_eq!(repo_of("team/hello:1"), "team/hello");
        assert_eq!(repo_of("hello@sha256:abc"), "hello");
    }

    #[test]
    fn a_lower_version_offered_later_never_replaces_a_higher_one() {
        let slot = TriggerSlot::default();
        let semver = t(None, Some("^1"), None);
        let offer = |tag: &str| Offer {
            tag: tag.into(),
            image: format!("hello:{tag}"),
        };
        slot.offer(&semver, offer("1.2.0"));
        slot.offer(&semver, offer("1.1.0"));
        assert_eq!(slot.take(), Some(offer("1.2.0")));
        assert_eq!(slot.take(), None, "taken once");
        let exact = t(Some("stable"), None, None);
        slot.offer(&exact, offer("stable"));
        slot.offer(
            &exact,
            Offer {
                tag: "stable".into(),
                image: "other:stable".into(),
            },
        );
        assert_eq!(
            slot.take().map(|o| o.image).as_deref(),
            Some("other:stable"),
            "latest wins"
        );
    }
}
