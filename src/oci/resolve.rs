//! What an image is: its manifest chain fetched (or read) and verified.
//!
//! A reference pins an index or a manifest. From an index the platform's
//! manifest is chosen and checked against its descriptor (digest and size),
//! then the config blob; the layers must match `rootfs.diff_ids` in number
//! and have media types hydrafy can unpack. `fetch` reads the chain from a
//! registry and `extract` from an image file; [`finish_resolve`] is the part
//! they share.

use crate::error::{Error, Result};
use crate::oci::digest::Digest;
use crate::oci::manifest::{self, Compression, ImageConfig, ImageManifest};
use crate::oci::platform::Platform;
use crate::ui::progress::Reporter;

/// An image whose manifest chain has been fetched (or read) and verified.
#[derive(Clone, Debug)]
pub struct ResolvedImage {
    /// How the image is named in messages and the state file.
    pub name: String,
    /// What pins it: the index or manifest digest (the config digest for a
    /// `docker save` archive, which keeps no manifest).
    pub top_digest: Digest,
    pub index_digest: Option<Digest>,
    pub manifest_digest: Option<Digest>,
    pub manifest: ImageManifest,
    pub config: ImageConfig,
    pub platform: Platform,
    pub compression: Vec<Compression>,
}

impl ResolvedImage {
    /// A one-line description for progress output.
    pub fn describe(&self) -> String {
        format!(
            "{} for {}: {} layers, {:.1} MB",
            self.name,
            self.platform,
            self.manifest.layers.len(),
            self.manifest.layers.iter().map(|l| l.size).sum::<u64>() as f64 / 1e6
        )
    }
}

/// The parts of resolution that do not depend on where manifests come from.
pub struct FinishResolve<'a> {
    pub name: String,
    pub top_digest: Digest,
    pub index_digest: Option<Digest>,
    pub manifest_digest: Option<Digest>,
    pub manifest: ImageManifest,
    /// The config blob, already verified against its descriptor.
    pub config_bytes: &'a [u8],
    /// The platform the index entry named, if the image came from an index.
    pub offered: Option<Platform>,
    pub platform: &'a Platform,
    pub explicit: bool,
    pub reporter: &'a dyn Reporter,
}

/// Parse and cross-check config and layers; shared by every image source.
pub fn finish_resolve(f: FinishResolve<'_>) -> Result<ResolvedImage> {
    let name = f.name;
    let config = ImageConfig::parse(&name, f.config_bytes)?;
    let from_config = Platform {
        os: config.os.clone(),
        arch: config.architecture.clone(),
        variant: config.variant.clone(),
    };
    let platform = f.offered.unwrap_or_else(|| from_config.clone());
    if f.index_digest.is_none() && !config.os.is_empty() && !f.platform.matches(&from_config) {
        let msg = format!("the image is built for {from_config}, not {}", f.platform);
        if f.explicit {
            return Err(Error::unsupported(&name, msg));
        }
        f.reporter
            .warn(&format!("{name}: {msg}; unpacking it anyway"));
    }
    if f.manifest.layers.len() != config.rootfs.diff_ids.len() {
        return Err(Error::unsupported(
            &name,
            format!(
                "the manifest lists {} layers but the config's rootfs.diff_ids has {}; the image is inconsistent",
                f.manifest.layers.len(),
                config.rootfs.diff_ids.len()
            ),
        ));
    }
    let compression = f
        .manifest
        .layers
        .iter()
        .map(|l| manifest::layer_compression(&name, &l.media_type))
        .collect::<Result<Vec<_>>>()?;
    Ok(ResolvedImage {
        name,
        top_digest: f.top_digest,
        index_digest: f.index_digest,
        manifest_digest: f.manifest_digest,
        manifest: f.manifest,
        config,
        platform,
        compression,
    })
}
