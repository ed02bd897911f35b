//! Webhook subscriptions as values: which event kinds a subscription takes (`*`, a
//! prefix such as `vpg.*`, or an exact kind) and what a valid receiver URL is. Pure: the
//! store validates with it and the delivery worker filters with it.

use super::ValidationError;

/// Most kinds one subscription may list; more is a configuration mistake.
pub const MAX_KINDS: usize = 64;
/// Longest accepted receiver URL.
pub const MAX_URL_LEN: usize = 2048;

/// Whether `kind` (e.g. `vpg.status_changed`) is selected by `pattern`: `*` takes every
/// kind, `vpg.*` every kind starting with `vpg.`, anything else only itself.
pub fn kind_matches(pattern: &str, kind: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_suffix('*') {
        // The prefix keeps its dot, so `vpg.*` does not take `vpgx.created`.
        Some(prefix) => kind.starts_with(prefix),
        None => pattern == kind,
    }
}

/// Whether any of `patterns` selects `kind`.
pub fn any_matches(patterns: &[String], kind: &str) -> bool {
    patterns.iter().any(|p| kind_matches(p, kind))
}

/// Checks and normalises (trims, de-duplicates, keeps order) a list of kind patterns.
pub fn validate_kinds(kinds: &[String]) -> Result<Vec<String>, ValidationError> {
    if kinds.is_empty() {
        return Err(ValidationError::new(
            "webhook.no_event_kinds",
            "event_kinds",
            "list at least one event kind (`*` for all, `vpg.*` for a prefix)",
        ));
    }
    if kinds.len() > MAX_KINDS {
        return Err(ValidationError::new(
            "webhook.too_many_event_kinds",
            "event_kinds",
            format!("at most {MAX_KINDS} event kinds"),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(kinds.len());
    for (i, k) in kinds.iter().enumerate() {
        let k = k.trim();
        if !valid_pattern(k) {
            return Err(ValidationError::new(
                "webhook.invalid_event_kind",
                format!("event_kinds[{i}]"),
                "an event kind is `*`, a dotted kind such as `vpg.created`, or a prefix such as `vpg.*`",
            ));
        }
        if !out.iter().any(|o| o == k) {
            out.push(k.to_string());
        }
    }
    Ok(out)
}

fn valid_pattern(p: &str) -> bool {
    if p == "*" {
        return true;
    }
    // A wildcard only as a whole last segment (`vpg.*`), never inside a segment.
    let body = p.strip_suffix(".*").unwrap_or(p);
    !body.is_empty()
        && body.len() <= 100
        && body.split('.').all(|seg| {
            !seg.is_empty()
                && seg
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
}

/// Checks a receiver URL: `http` or `https`, a host, no spaces, no credentials.
pub fn validate_url(url: &str) -> Result<String, ValidationError> {
    let url = url.trim();
    let invalid = |msg: &str| ValidationError::new("webhook.invalid_url", "url", msg);
    if url.len() > MAX_URL_LEN {
        return Err(invalid("the URL is too long"));
    }
    let rest = if let Some(r) = url.strip_prefix("https://") {
        r
    } else if let Some(r) = url.strip_prefix("http://") {
        r
    } else {
        return Err(invalid("the URL must start with http:// or https://"));
    };
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid("the URL must not contain spaces"));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        // Credentials in the URL would be shown by every GET; the signature authenticates.
        return Err(invalid("the URL must not carry credentials"));
    }
    let host = if authority.starts_with('[') {
        authority
            .split(']')
            .next()
            .map(|h| h.trim_start_matches('['))
    } else {
        authority.split(':').next()
    }
    .unwrap_or("");
    if host.is_empty() {
        return Err(invalid("the URL needs a host"));
    }
    if let Some((_, port)) = authority.rsplit_once(':') {
        if !authority.ends_with(']') && port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(invalid("the URL's port must be 1 to 65535"));
        }
    }
    Ok(url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_select_kinds() {
        assert!(kind_matches("*", "vpg.created"));
        assert!(kind_matches("vpg.*", "vpg.status_changed"));
        assert!(!kind_matches("vpg.*", "vpgx.created"));
        assert!(!kind_matches("vpg.*", "site.created"));
        assert!(kind_matches("site.created", "site.created"));
        assert!(!kind_matches("site.created", "site.created_x"));
        assert!(!kind_matches("site", "site.created"));
        let ps = vec!["site.created".to_string(), "alert.*".to_string()];
        assert!(any_matches(&ps, "alert.raised"));
        assert!(!any_matches(&ps, "site.deleted"));
    }

    #[test]
    fn kinds_are_validated() {
        assert_eq!(
            validate_kinds(&[]).unwrap_err().code,
            "webhook.no_event_kinds"
        );
        for bad in ["", "vpg*", "vpg.*.x", "Vpg.created", ".x", "a..b", "*.x"] {
            assert_eq!(
                validate_kinds(&[bad.to_string()]).unwrap_err().code,
                "webhook.invalid_event_kind",
                "{bad}"
            );
        }
        let ok = validate_kinds(&[" vpg.* ".into(), "vpg.*".into(), "*".into()]).unwrap();
        assert_eq!(ok, vec!["vpg.*".to_string(), "*".to_string()]);
    }

    #[test]
    fn urls_are_validated() {
        for ok in [
            "http://127.0.0.1:8080/hook",
            "https://example.com",
            "https://[::1]:9/x?y=1",
        ] {
            assert!(validate_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "ftp://x",
            "example.com",
            "http://",
            "http:///path",
            "http://a b/",
            "http://user:pw@host/",
            "http://host:0/",
            "http://host:99999/",
        ] {
            assert_eq!(
                validate_url(bad).unwrap_err().code,
                "webhook.invalid_url",
                "{bad}"
            );
        }
    }
}
