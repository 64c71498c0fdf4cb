//! Image references: `[REGISTRY/]REPO[:TAG][@sha256:HEX]`, normalised as docker does.
//!
//! The grammar and docker's normalisation (`ubuntu` is `docker.io/library/ubuntu`,
//! `index.docker.io` is `docker.io`) come from `oci_client::Reference`, which
//! implements the distribution project's rules. On top of it hydrafy checks
//! what that parser lets through or explains poorly: the digest (only a
//! well-formed sha256 pins anything) and lowercase repository names. All of it
//! happens before any network use.

use std::fmt;

use crate::error::{Error, Result};
use crate::oci::digest::Digest;

/// Where docker.io's registry API really lives.
pub const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";

const GRAMMAR: &str = "expected [REGISTRY/]REPO[:TAG][@sha256:HEX], e.g. nixos/nix@sha256:<64 hex>";

/// A parsed, normalised image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// `docker.io`, `ghcr.io`, `localhost:5000`, ...
    pub registry: String,
    /// `library/ubuntu`, `nixos/nix`, ...
    pub repository: String,
    /// The tag, if one was given.
    pub tag: Option<String>,
    /// The pinned digest, if one was given.
    pub digest: Option<Digest>,
}

impl ImageRef {
    /// Parse and normalise a reference as docker does.
    pub fn parse(input: &str) -> Result<Self> {
        let bad = |reason: String| Error::invalid("image reference", input, reason);
        if input.trim() != input || input.is_empty() {
            return Err(bad(GRAMMAR.to_string()));
        }
        let (name, digest) = match input.rsplit_once('@') {
            Some((name, digest)) => {
                let digest: Digest = digest.parse().map_err(|e| match e {
                    Error::Invalid { reason, .. } => bad(reason),
                    other => other,
                })?;
                (name, Some(digest))
            }
            None => (input, None),
        };
        let parsed: oci_client::Reference =
            name.parse().map_err(|e| bad(format!("{e}; {GRAMMAR}")))?;
        let repository = parsed.repository().to_string();
        if repository.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(bad(format!(
                "repository name {repository:?} must be lowercase"
            )));
        }
        // oci-client fills in "latest" for a bare name; keep the tag only if the user wrote one.
        let explicit_tag = name
            .rsplit_once('/')
            .map_or(name, |(_, last)| last)
            .contains(':');
        Ok(ImageRef {
            registry: parsed.registry().to_string(),
            repository,
            tag: parsed.tag().filter(|_| explicit_tag).map(str::to_string),
            digest,
        })
    }

    /// True for images on Docker Hub.
    pub fn is_docker_hub(&self) -> bool {
        self.registry == "docker.io"
    }

    /// The host that serves the registry API for this image.
    pub fn api_host(&self) -> &str {
        if self.is_docker_hub() {
            DOCKER_HUB_API_HOST
        } else {
            &self.registry
        }
    }

    /// `docker.io/library/ubuntu`: the repository with its registry.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// What to ask the registry for: the digest when pinned, else the tag, else `latest`.
    pub fn manifest_ref(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// The same image pinned to `digest` (the tag is kept for the reader).
    pub fn pinned(&self, digest: Digest) -> ImageRef {
        ImageRef {
            digest: Some(digest),
            ..self.clone()
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name())?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        if self.tag.is_none() && self.digest.is_none() {
            write!(f, ":latest")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn docker_hub_names_are_normalised_as_docker_does() {
        let r = ImageRef::parse("nixos/nix").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.api_host()),
            ("docker.io", "nixos/nix", "registry-1.docker.io")
        );
        assert_eq!(r.tag, None);
        assert_eq!(r.to_string(), "docker.io/nixos/nix:latest");
        let r = ImageRef::parse("ubuntu:24.04").unwrap();
        assert_eq!(r.repository, "library/ubuntu");
        assert_eq!(r.tag.as_deref(), Some("24.04"));
        let r = ImageRef::parse("index.docker.io/nixos/nix").unwrap();
        assert_eq!(r.registry, "docker.io");
    }

    #[test]
    fn local_registries_keep_their_host_and_port() {
        for (input, registry) in [
            ("localhost:5000/x", "localhost:5000"),
            ("127.0.0.1:5000/x", "127.0.0.1:5000"),
            ("localhost/x/y:t", "localhost"),
        ] {
            let r = ImageRef::parse(input).unwrap();
            assert_eq!(r.registry, registry, "{input}");
            assert_eq!(r.api_host(), registry, "{input}");
        }
        let r = ImageRef::parse(&format!("127.0.0.1:5000/nixos/nix@{D}")).unwrap();
        assert_eq!(r.repository, "nixos/nix");
        assert_eq!(r.digest.unwrap().to_string(), D);
        assert_eq!(r.manifest_ref(), D);
    }

    #[test]
    fn tag_and_digest_together_keep_both() {
        let r = ImageRef::parse(&format!("nixos/nix:2.24@{D}")).unwrap();
        assert_eq!(r.tag.as_deref(), Some("2.24"));
        assert_eq!(r.manifest_ref(), D);
        assert_eq!(r.to_string(), format!("docker.io/nixos/nix:2.24@{D}"));
    }

    #[test]
    fn malformed_references_are_refused_before_any_network_use() {
        let cases = [
            ("nixos/nix@sha256:abc", "64 hex"),
            ("nixos/nix@sha256:../x", "64 hex"),
            (
                "nixos/nix@sha256:0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef",
                "lowercase hex",
            ),
            (
                "nixos/nix@md5:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "unsupported digest algorithm",
            ),
            ("Nixos/nix", "must be lowercase"),
            ("a//b", "expected [REGISTRY/]REPO"),
            ("", "expected [REGISTRY/]REPO"),
            (" nixos/nix", "expected [REGISTRY/]REPO"),
        ];
        for (input, reason) in cases {
            let err = ImageRef::parse(input).unwrap_err();
            assert!(matches!(err, Error::Invalid { .. }), "{input}: {err}");
            let text = err.to_string();
            assert!(text.contains(reason), "{input}: {text}");
            assert!(text.contains("image reference"), "{input}: {text}");
        }
    }
}
