//! Manifests, indexes and image configs: the JSON that says what an image is.
//!
//! Only the fields hydrafy acts on are modelled; the bytes themselves are
//! kept by the caller, because they are what the digests cover (and what
//! `pull` writes out unchanged). Docker and OCI media types are both read;
//! schema 1 manifests are refused with a message saying what to do.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::oci::digest::Digest;
use crate::oci::platform::Platform;

/// Media types hydrafy knows.
pub mod media {
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
    pub const DOCKER_SCHEMA1_SIGNED: &str =
        "application/vnd.docker.distribution.manifest.v1+prettyjws";
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
}

/// What hydrafy sends in `Accept` when it asks for a manifest.
pub const MANIFEST_ACCEPT: [&str; 4] = [
    media::OCI_INDEX,
    media::DOCKER_LIST,
    media::OCI_MANIFEST,
    media::DOCKER_MANIFEST,
];

/// The most bytes a manifest or index may have (containerd uses the same bound).
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// The most bytes an image config may have.
pub const MAX_CONFIG_BYTES: u64 = 32 << 20;

/// A content descriptor: what a manifest says about a blob or child manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Descriptor {
    /// Check that `bytes` are the blob this names: its size, then its
    /// digest; `hint` says what to do when they are not.
    pub fn check(&self, what: &'static str, bytes: &[u8], hint: &'static str) -> Result<()> {
        if bytes.len() as u64 != self.size {
            return Err(Error::SizeMismatch {
                what,
                digest: self.digest,
                expected: self.size,
                found: bytes.len() as u64,
                truncated: false,
            });
        }
        self.digest.verify(what, bytes, hint)
    }
}

/// An OCI index or Docker manifest list.
#[derive(Clone, Debug)]
pub struct Index {
    pub media_type: String,
    pub manifests: Vec<Descriptor>,
}

/// A single-platform image manifest (OCI or Docker schema 2).
#[derive(Clone, Debug)]
pub struct ImageManifest {
    pub media_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// A parsed manifest body.
#[derive(Clone, Debug)]
pub enum Manifest {
    Index(Index),
    Image(ImageManifest),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<u32>,
    media_type: Option<String>,
    manifests: Option<Vec<Descriptor>>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
}

impl Manifest {
    /// Parse a manifest body; `image` names it in errors.
    ///
    /// The media type comes from the body (which the digest covers), not from
    /// the `Content-Type` header; an OCI body may omit it, and then the shape
    /// decides, as containerd does.
    pub fn parse(image: &str, bytes: &[u8]) -> Result<Manifest> {
        let raw: RawManifest = serde_json::from_slice(bytes)
            .map_err(|e| Error::unsupported(image, format!("manifest is not valid JSON: {e}")))?;
        let media_type = raw.media_type.clone();
        match (raw.schema_version, media_type.as_deref()) {
            (Some(1), _) | (_, Some(media::DOCKER_SCHEMA1 | media::DOCKER_SCHEMA1_SIGNED)) => {
                return Err(Error::unsupported(
                    image,
                    "Docker schema 1 manifests are not supported; pin a schema 2 or OCI manifest \
                     (re-push the image with a current docker, podman or skopeo)",
                ));
            }
            (Some(2), _) => {}
            (other, _) => {
                return Err(Error::unsupported(
                    image,
                    format!("manifest schemaVersion {other:?} is not supported (expected 2)"),
                ));
            }
        }
        match (media_type.as_deref(), raw) {
            (
                Some(media::OCI_INDEX | media::DOCKER_LIST) | None,
                RawManifest {
                    manifests: Some(manifests),
                    ..
                },
            ) => Ok(Manifest::Index(Index {
                media_type: media_type.unwrap_or_else(|| media::OCI_INDEX.to_string()),
                manifests,
            })),
            (
                Some(media::OCI_MANIFEST | media::DOCKER_MANIFEST) | None,
                RawManifest {
                    config: Some(config),
                    layers: Some(layers),
                    ..
                },
            ) => Ok(Manifest::Image(ImageManifest {
                media_type: media_type.unwrap_or_else(|| media::OCI_MANIFEST.to_string()),
                config,
                layers,
            })),
            (Some(mt), _) if !MANIFEST_ACCEPT.contains(&mt) => Err(Error::unsupported(
                image,
                format!(
                    "manifest media type {mt:?} is not an image manifest or index hydrafy can unpack"
                ),
            )),
            (mt, _) => Err(Error::unsupported(
                image,
                format!(
                    "manifest ({}) lacks the fields its media type requires",
                    mt.unwrap_or("no media type")
                ),
            )),
        }
    }
}

impl Index {
    /// Pick the entry for `wanted`; the error lists what the index offers.
    pub fn select(&self, image: &str, wanted: &Platform) -> Result<&Descriptor> {
        let candidates: Vec<&Descriptor> = self
            .manifests
            .iter()
            .filter(|d| MANIFEST_ACCEPT.contains(&d.media_type.as_str()))
            .filter(|d| d.platform.as_ref().is_some_and(|p| wanted.matches(p)))
            .collect();
        // An exact variant match beats "any variant of this architecture".
        let exact = candidates
            .iter()
            .find(|d| d.platform.as_ref().map(|p| &p.variant) == Some(&wanted.variant));
        if let Some(found) = exact.or(candidates.first()) {
            return Ok(found);
        }
        let offered: Vec<String> = self
            .manifests
            .iter()
            .filter_map(|d| d.platform.as_ref())
            .filter(|p| p.os != "unknown")
            .map(|p| p.to_string())
            .collect();
        Err(Error::unsupported(
            image,
            format!(
                "no manifest for platform {wanted}; the image offers {}; choose one with --platform",
                if offered.is_empty() {
                    "none".to_string()
                } else {
                    offered.join(", ")
                }
            ),
        ))
    }
}

/// The parts of an image config hydrafy reads.
#[derive(Clone, Debug, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
    pub rootfs: RootFs,
}

/// `rootfs` of an image config.
#[derive(Clone, Debug, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<Digest>,
}

impl ImageConfig {
    /// Parse a config blob; `image` names it in errors.
    pub fn parse(image: &str, bytes: &[u8]) -> Result<ImageConfig> {
        let config: ImageConfig = serde_json::from_slice(bytes)
            .map_err(|e| Error::unsupported(image, format!("image config is not valid: {e}")))?;
        if config.rootfs.kind != "layers" {
            return Err(Error::unsupported(
                image,
                format!(
                    "image config rootfs.type is {:?}, expected \"layers\"",
                    config.rootfs.kind
                ),
            ));
        }
        Ok(config)
    }
}

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// The compression a layer media type announces; unknown types are refused.
pub fn layer_compression(image: &str, media_type: &str) -> Result<Compression> {
    let base = media_type
        .strip_prefix("application/vnd.oci.image.layer.nondistributable.v1.tar")
        .or_else(|| media_type.strip_prefix("application/vnd.oci.image.layer.v1.tar"));
    match (media_type, base) {
        (media::DOCKER_LAYER_GZIP, _) => Ok(Compression::Gzip),
        ("application/vnd.docker.image.rootfs.diff.tar", _) => Ok(Compression::None),
        (_, Some("")) => Ok(Compression::None),
        (_, Some("+gzip")) => Ok(Compression::Gzip),
        (_, Some("+zstd")) => Ok(Compression::Zstd),
        _ => Err(Error::unsupported(
            image,
            format!("layer media type {media_type:?} is not a tar layer hydrafy can unpack"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use media::{OCI_CONFIG, OCI_LAYER_ZSTD};
    const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn desc(mt: &str, platform: Option<&str>) -> String {
        let p = platform.map_or(String::new(), |p| {
            let parts: Vec<&str> = p.split('/').collect();
            let variant = parts
                .get(2)
                .map_or(String::new(), |v| format!(",\"variant\":\"{v}\""));
            format!(
                ",\"platform\":{{\"os\":\"{}\",\"architecture\":\"{}\"{variant}}}",
                parts[0], parts[1]
            )
        });
        format!("{{\"mediaType\":\"{mt}\",\"digest\":\"{D}\",\"size\":7{p}}}")
    }

    #[test]
    fn docker_list_and_oci_index_parse_and_select_a_platform() {
        let body = format!(
            "{{\"schemaVersion\":2,\"mediaType\":\"{}\",\"manifests\":[{},{},{}]}}",
            media::DOCKER_LIST,
            desc(media::DOCKER_MANIFEST, Some("linux/amd64")),
            desc(media::DOCKER_MANIFEST, Some("linux/arm64/v8")),
            desc(media::OCI_MANIFEST, Some("unknown/unknown")),
        );
        let Manifest::Index(index) = Manifest::parse("img", body.as_bytes()).unwrap() else {
            panic!("not an index")
        };
        let amd = index
            .select("img", &"linux/amd64".parse().unwrap())
            .unwrap();
        assert_eq!(amd.platform.as_ref().unwrap().arch, "amd64");
        let arm = index
            .select("img", &"linux/arm64".parse().unwrap())
            .unwrap();
        assert_eq!(arm.platform.as_ref().unwrap().arch, "arm64");
        let err = index
            .select("img", &"linux/s390x".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no manifest for platform linux/s390x"),
            "{err}"
        );
        assert!(err.contains("linux/amd64, linux/arm64/v8"), "{err}");
        assert!(err.contains("--platform"), "{err}");
    }

    #[test]
    fn oci_manifest_without_media_type_is_recognised_by_shape() {
        let body = format!(
            "{{\"schemaVersion\":2,\"config\":{},\"layers\":[{}]}}",
            desc(OCI_CONFIG, None),
            desc(OCI_LAYER_GZIP, None)
        );
        let Manifest::Image(m) = Manifest::parse("img", body.as_bytes()).unwrap() else {
            panic!("not a manifest")
        };
        assert_eq!(m.media_type, media::OCI_MANIFEST);
        assert_eq!(m.layers.len(), 1);
    }

    #[test]
    fn schema1_and_unknown_types_are_refused_clearly() {
        let err = Manifest::parse("img", br#"{"schemaVersion":1,"name":"x","fsLayers":[]}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("schema 1") && err.contains("re-push"), "{err}");
        let err = Manifest::parse(
            "img",
            br#"{"schemaVersion":2,"mediaType":"application/vnd.example+json","layers":[]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("application/vnd.example+json"), "{err}");
        let err = Manifest::parse("img", b"<html>").unwrap_err().to_string();
        assert!(err.contains("not valid JSON"), "{err}");
    }

    #[test]
    fn layer_media_types_map_to_compression() {
        for (mt, c) in [
            (media::DOCKER_LAYER_GZIP, Compression::Gzip),
            (OCI_LAYER_GZIP, Compression::Gzip),
            (OCI_LAYER_ZSTD, Compression::Zstd),
            (OCI_LAYER_TAR, Compression::None),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                Compression::Gzip,
            ),
        ] {
            assert_eq!(layer_compression("img", mt).unwrap(), c, "{mt}");
        }
        assert!(layer_compression("img", "application/vnd.oci.image.layer.v1.tar+xz").is_err());
        assert!(layer_compression("img", "application/octet-stream").is_err());
    }
}
