//! Answering a registry's 401: the `WWW-Authenticate` challenge and the
//! bearer-token handshake of the distribution token spec, as Docker Hub runs it.
//!
//! A registry that wants a token answers 401 with
//! `Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull"`.
//! The client asks the realm for a token for that service and scope,
//! anonymously or with the user's credentials as HTTP Basic, and gets back
//! `{"token": "...", "expires_in": 300}`. The token is opaque to the client:
//! how long it lasts comes from `expires_in` (60 seconds when absent, as the
//! spec says), never from peeking into it. With an identity token instead of
//! a password, the client POSTs an OAuth2 refresh-token form to the same
//! realm and gets `{"access_token": ..., "expires_in": ...}` back.
//!
//! hydrafy once had oci-client do this handshake, but its `Client::auth`
//! returns the token alone: `expires_in` is dropped (so a long pull could only
//! guess when to renew), it asks `/v2/` for a second challenge instead of
//! answering the one the 401 carried, and its request is not retried. This
//! module is small, and it runs on the same HTTP client as everything else
//! (proxies, extra CAs, timeouts).

use std::time::{Duration, Instant};

use crate::error::Result;
use crate::registry::credentials::Credentials;

/// When a token response has no `expires_in` (the distribution token spec).
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Renew a token this long before it expires, at most.
const MAX_MARGIN: Duration = Duration::from_secs(10);

/// What a 401's `WWW-Authenticate` header asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    /// Get a token from `realm`.
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    /// Send credentials as HTTP Basic.
    Basic,
    /// No header, or a scheme hydrafy does not speak.
    Other,
}

impl Challenge {
    /// Parse a `WWW-Authenticate` value: a scheme, then `key="value"` pairs.
    pub fn parse(header: &str) -> Challenge {
        let header = header.trim();
        let (scheme, params) = header
            .split_once(char::is_whitespace)
            .unwrap_or((header, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Challenge::Basic;
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Challenge::Other;
        }
        let params = parse_params(params);
        let get = |k: &str| {
            params
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.clone())
        };
        match get("realm") {
            Some(realm) if !realm.is_empty() => Challenge::Bearer {
                realm,
                service: get("service"),
                scope: get("scope"),
            },
            _ => Challenge::Other,
        }
    }
}

/// `key="quoted, with \" escapes", key2=token` into pairs.
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ','))
            .collect::<String>()
            .trim()
            .to_string();
        if key.is_empty() {
            break;
        }
        if chars.next_if_eq(&'=').is_none() {
            out.push((key, String::new()));
            continue;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = std::iter::from_fn(|| chars.next_if(|c| *c != ','))
                .collect::<String>()
                .trim()
                .to_string();
        }
        out.push((key, value));
    }
    out
}

/// The scope to ask for. Always pull on the image's repository, whatever the
/// challenge names: hydrafy never needs more, and a registry must not be able
/// to make it ask the realm for more with the user's credentials.
pub fn pull_scope(repository: &str) -> String {
    format!("repository:{repository}:pull")
}

/// A token realm's answer.
#[derive(Debug, serde::Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// A token and when to stop using it.
#[derive(Clone, Debug)]
pub struct Token {
    pub header: String,
    pub renew_at: Instant,
}

/// Why a token service's answer gives no token.
#[derive(Debug, thiserror::Error)]
pub enum BadToken {
    #[error("the token service's answer is not a token: {0}")]
    NotJson(#[from] serde_json::Error),
    #[error("the token service's answer holds no token")]
    Empty,
}

/// Read a realm's JSON answer, received at `received`.
pub fn parse_token(body: &[u8], received: Instant) -> Result<Token, BadToken> {
    let resp: TokenResponse = serde_json::from_slice(body)?;
    let token = resp
        .token
        .or(resp.access_token)
        .filter(|t| !t.is_empty())
        .ok_or(BadToken::Empty)?;
    let lifetime = resp
        .expires_in
        .filter(|s| *s > 0)
        .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
    Ok(Token {
        header: format!("Bearer {token}"),
        renew_at: received + lifetime.saturating_sub(margin(lifetime)),
    })
}

/// Renew a little before the end, so a request does not arrive just too late:
/// a tenth of the lifetime, at most ten seconds.
fn margin(lifetime: Duration) -> Duration {
    (lifetime / 10).min(MAX_MARGIN)
}

/// `Authorization: Basic ...` for a username and password; `None` for an
/// identity token, which only a token service takes (see [`refresh_form`]).
pub fn basic_header(c: &Credentials) -> Option<String> {
    use base64::Engine as _;
    let Credentials::Password { username, password } = c else {
        return None;
    };
    let raw = format!("{username}:{password}");
    Some(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    ))
}

/// The OAuth2 form that trades an identity token for an access token
/// (the distribution spec's `grant_type=refresh_token`, as docker sends it).
pub fn refresh_form<'a>(
    refresh_token: &'a str,
    service: Option<&'a str>,
    scope: &'a str,
) -> Vec<(&'static str, &'a str)> {
    let mut form = vec![
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh_token),
        ("client_id", "hydrafy"),
        ("scope", scope),
    ];
    if let Some(s) = service {
        form.push(("service", s));
    }
    form
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_challenges_parse() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull""#,
        );
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/ubuntu:pull".into()),
            }
        );
        assert_eq!(
            Challenge::parse(r#"Basic realm="basic-realm""#),
            Challenge::Basic
        );
        assert_eq!(Challenge::parse(""), Challenge::Other);
        assert_eq!(Challenge::parse("Bearer service=x"), Challenge::Other);
        let c = Challenge::parse(r#"bearer  realm = "http://a/t\"x" , service=reg"#);
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "http://a/t\"x".into(),
                service: Some("reg".into()),
                scope: None,
            }
        );
    }

    #[test]
    fn token_lifetime_comes_from_expires_in_with_a_margin() {
        let now = Instant::now();
        let t = parse_token(br#"{"token":"abc","expires_in":300}"#, now).unwrap();
        assert_eq!(t.header, "Bearer abc");
        assert_eq!(t.renew_at - now, Duration::from_secs(290));
        let t = parse_token(br#"{"access_token":"abc","expires_in":3}"#, now).unwrap();
        assert_eq!(t.renew_at - now, Duration::from_millis(2700));
        let t = parse_token(br#"{"token":"abc"}"#, now).unwrap();
        assert_eq!(t.renew_at - now, Duration::from_secs(54));
        assert!(matches!(
            parse_token(br#"{"token":""}"#, now),
            Err(BadToken::Empty)
        ));
        assert!(matches!(
            parse_token(b"<html>", now),
            Err(BadToken::NotJson(_))
        ));
    }
}
