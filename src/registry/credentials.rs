//! Registry credentials, read the way docker reads them.
//!
//! `$DOCKER_CONFIG/config.json` when `DOCKER_CONFIG` is set, else
//! `~/.docker/config.json`: `auths` entries, then `credHelpers` and
//! `credsStore` by running `docker-credential-<name> get`. The file format and
//! the helper protocol are handled by the `docker_credential` crate; this
//! module maps docker.io to the key docker uses for it and turns the crate's
//! outcomes into "credentials", "none" or a warning worth showing.
//!
//! Credentials are a username and password (or access token), or an
//! identity token: the OAuth2 refresh token that `docker login` stores as
//! `identitytoken` (or a helper returns as user `<token>`) for registries
//! whose token service speaks OAuth2, such as Azure Container Registry.

use docker_credential::{CredentialRetrievalError, DockerCredential};

use crate::error::{Error, Result};

/// What docker's config holds for one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// Sent as HTTP Basic, to a token service or to the registry itself.
    Password { username: String, password: String },
    /// An OAuth2 refresh token, exchanged at the token service for access
    /// tokens (a form POST with `grant_type=refresh_token`).
    IdentityToken(String),
}

impl Credentials {
    /// Who, for messages: the username, or that it is an identity token.
    pub fn who(&self) -> String {
        match self {
            Credentials::Password { username, .. } => {
                format!("user {}", crate::error::sanitize(username))
            }
            Credentials::IdentityToken(_) => "an identity token".to_string(),
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Password { username, .. } => f
                .debug_struct("Password")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Credentials::IdentityToken(_) => f.write_str("IdentityToken(<redacted>)"),
        }
    }
}

/// The key docker stores Docker Hub credentials under.
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

/// Look up credentials for `registry` (as written in image references:
/// `docker.io`, `ghcr.io`, `localhost:5000`). `Ok(None)` means "pull
/// anonymously"; `Err` is a warning for the user (a broken helper, an
/// unreadable file), after which the pull also goes on anonymously.
pub fn lookup(registry: &str) -> Result<Option<Credentials>> {
    let warning = |reason: String| Error::Credentials {
        registry: registry.to_string(),
        reason,
    };
    // No config file is the common case on build hosts: pull anonymously, say nothing.
    if !config_path().is_some_and(|p| p.is_file()) {
        return Ok(None);
    }
    let server = if matches!(
        registry,
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    ) {
        DOCKER_HUB_KEY
    } else {
        registry
    };
    match docker_credential::get_credential(server) {
        Ok(DockerCredential::UsernamePassword(username, password)) => {
            Ok(Some(Credentials::Password { username, password }))
        }
        Ok(DockerCredential::IdentityToken(token)) => Ok(Some(Credentials::IdentityToken(token))),
        Err(
            CredentialRetrievalError::ConfigNotFound
            | CredentialRetrievalError::NoCredentialConfigured,
        ) => Ok(None),
        Err(CredentialRetrievalError::HelperFailure { stdout, .. })
            if stdout
                .to_ascii_lowercase()
                .contains("credentials not found") =>
        {
            Ok(None)
        }
        Err(CredentialRetrievalError::HelperFailure {
            helper,
            stderr,
            stdout,
        }) => Err(warning(format!(
            "{helper} failed: {}",
            if stderr.trim().is_empty() {
                stdout.trim()
            } else {
                stderr.trim()
            }
        ))),
        Err(CredentialRetrievalError::HelperCommunicationError) => Err(warning(
            "cannot run the credential helper that docker's config.json names; \
             is docker-credential-<name> on PATH?"
                .to_string(),
        )),
        Err(e) => Err(warning(format!("cannot be read: {e}"))),
    }
}

/// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub fn config_path() -> Option<std::path::PathBuf> {
    let dir = match std::env::var_os("DOCKER_CONFIG") {
        Some(d) => std::path::PathBuf::from(d),
        None => std::path::PathBuf::from(std::env::var_os("HOME")?).join(".docker"),
    };
    Some(dir.join("config.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_password() {
        let c = Credentials::Password {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        let c = Credentials::IdentityToken("hunter2".into());
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
