//! The state file: what an output directory holds.
//!
//! `DIR/.hydrafy-state.json` records every image the directory was built
//! from (one after `fetch`/`extract`, more after `--merge`), so that a second
//! run for an image the directory already holds does nothing, and a run for
//! another image knows it must not overwrite silently. It also says whether
//! DIR is still exactly what one run published, which is what `--replace`
//! needs to know before it may do nothing.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::oci::digest::Digest;
use crate::oci::platform::Platform;
use crate::oci::resolve::ResolvedImage;

/// The state file's name inside an output directory.
pub const STATE_FILE: &str = ".hydrafy-state.json";
const VERSION: u32 = 1;

/// What was unpacked: the Nix seed (store and database) or the whole filesystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Nix,
    Rootfs,
}

impl Layout {
    /// The layout `--rootfs` asks for.
    pub fn of(rootfs: bool) -> Layout {
        if rootfs { Layout::Rootfs } else { Layout::Nix }
    }
}

/// One image an output directory was built from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The reference as the user gave it, normalised.
    pub reference: String,
    /// The index or manifest list digest, when the reference named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_digest: Option<Digest>,
    /// The platform-specific manifest's digest (none for a `docker save`
    /// archive, which does not keep the registry's manifest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_digest: Option<Digest>,
    /// The config digest, which docker calls the image ID.
    pub config_digest: Digest,
    pub platform: String,
    pub layers: usize,
    /// The layers that held store paths only, and which: a later `--merge`
    /// of an image with the same layer skips it when the seed has them all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub store_layers: Vec<StoreLayer>,
    /// Every store path (`HASH-NAME`) the image's own database registered:
    /// what `hydrafy gc` keeps (with its closure) while the image is recorded.
    /// Records written before hydrafy kept this list have only `store_layers`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub store_paths: Vec<String>,
    /// When the image was fetched or merged into the directory (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded_at: Option<u64>,
}

impl ImageRecord {
    /// The record of `image`, with the store-only layers unpacking found;
    /// recorded now, its store paths yet unknown.
    pub fn new(image: &ResolvedImage, store_layers: Vec<StoreLayer>) -> ImageRecord {
        ImageRecord {
            reference: image.name.clone(),
            index_digest: image.index_digest,
            manifest_digest: image.manifest_digest,
            config_digest: image.manifest.config.digest,
            platform: image.platform.to_string(),
            layers: image.manifest.layers.len(),
            store_layers,
            store_paths: Vec::new(),
            recorded_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs()),
        }
    }
}

/// A layer (by diff_id) that held nothing but these store paths (`HASH-NAME`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreLayer {
    pub diff_id: Digest,
    pub store_paths: Vec<String>,
}

/// The whole state file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub layout: Layout,
    pub images: Vec<ImageRecord>,
    /// True when DIR is the one image a run published whole; false once a
    /// `--merge` added to it or adopted a seed hydrafy did not write (DIR then
    /// holds more than its images), and for state files older than this field,
    /// which did not say.
    #[serde(default)]
    pub exact: bool,
}

impl State {
    /// The state of a tree published whole: exactly this one image.
    pub fn new(layout: Layout, image: ImageRecord) -> State {
        State {
            version: VERSION,
            layout,
            images: vec![image],
            exact: true,
        }
    }

    /// The state of a seed after `--merge` added `image` to it: the images
    /// `prior` records (none for a seed hydrafy did not write) and `image`.
    pub fn merged(prior: Option<&State>, image: ImageRecord) -> State {
        let mut images = prior.map(|s| s.images.clone()).unwrap_or_default();
        images.push(image);
        State {
            version: VERSION,
            layout: Layout::Nix,
            images,
            exact: false,
        }
    }

    /// Is this the state file format this hydrafy writes?
    pub fn is_current_format(&self) -> bool {
        self.version == VERSION
    }

    /// Read `dir`'s state file; `Ok(None)` when there is none.
    pub fn read(dir: &Path) -> Result<Option<State>> {
        let path = dir.join(STATE_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, "cannot read hydrafy state file", e)),
        };
        let state: State = serde_json::from_slice(&bytes).map_err(|e| Error::Output {
            dir: dir.to_path_buf(),
            reason: format!("the state file {STATE_FILE} is damaged ({e}); use --replace to rebuild the directory"),
        })?;
        if !state.is_current_format() {
            return Err(Error::Output {
                dir: dir.to_path_buf(),
                reason: format!(
                    "the state file was written by another hydrafy version (format {}); use --replace to rebuild",
                    state.version
                ),
            });
        }
        Ok(Some(state))
    }

    /// Write the state file into `dir`: a staging tree before it is
    /// published, or a seed after `--merge`, where it replaces the old file
    /// in one rename so a reader never sees half of it.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(format!("{STATE_FILE}.{}.tmp", std::process::id()));
        let mut bytes = serde_json::to_vec_pretty(self).expect("state serialises");
        bytes.push(b'\n');
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &bytes).and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(&path, "cannot write hydrafy state file", e));
        }
        Ok(())
    }

    /// The record of the image pinned by `digest` for `platform` in
    /// `layout`, if this directory holds it. `digest` may name an index, a
    /// manifest, or a config (the image ID, for `docker save` archives).
    pub fn find(
        &self,
        layout: Layout,
        digest: &Digest,
        platform: &Platform,
    ) -> Option<&ImageRecord> {
        if self.layout != layout {
            return None;
        }
        self.images.iter().find(|img| {
            img.manifest_digest.as_ref() == Some(digest)
                || (img.manifest_digest.is_none() && img.config_digest == *digest)
                || (img.index_digest.as_ref() == Some(digest)
                    && img
                        .platform
                        .parse::<Platform>()
                        .is_ok_and(|p| platform.matches(&p)))
        })
    }

    /// The record of that image (see [`State::find`]) if this directory holds
    /// it and nothing else: the one image a run published, with nothing merged
    /// in since. Only then is `--replace` with it a no-op.
    pub fn find_exact(
        &self,
        layout: Layout,
        digest: &Digest,
        platform: &Platform,
    ) -> Option<&ImageRecord> {
        if !self.exact || self.images.len() != 1 {
            return None;
        }
        self.find(layout, digest, platform)
    }

    /// Does this directory already hold that image? See [`State::find`].
    pub fn holds(&self, layout: Layout, digest: &Digest, platform: &Platform) -> bool {
        self.find(layout, digest, platform).is_some()
    }

    /// Every store-only layer any image here was built from, by diff_id.
    pub fn store_layers(&self) -> std::collections::HashMap<Digest, Vec<String>> {
        self.images
            .iter()
            .flat_map(|i| &i.store_layers)
            .map(|l| (l.diff_id, l.store_paths.clone()))
            .collect()
    }

    /// One line naming what the directory holds, for messages.
    pub fn describe(&self) -> String {
        let names: Vec<String> = self
            .images
            .iter()
            .map(|i| format!("{} ({})", i.reference, i.platform))
            .collect();
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(index: Option<Digest>) -> ImageRecord {
        ImageRecord {
            reference: "docker.io/nixos/nix@x".into(),
            index_digest: index,
            manifest_digest: Some(Digest::of(b"manifest")),
            config_digest: Digest::of(b"config"),
            platform: "linux/amd64".into(),
            layers: 3,
            store_layers: Vec::new(),
            store_paths: Vec::new(),
            recorded_at: None,
        }
    }

    #[test]
    fn holds_matches_manifest_or_index_with_platform_and_layout() {
        let index = Digest::of(b"index");
        let s = State::new(Layout::Nix, record(Some(index)));
        let amd64: Platform = "linux/amd64".parse().unwrap();
        let arm64: Platform = "linux/arm64".parse().unwrap();
        assert!(s.holds(Layout::Nix, &Digest::of(b"manifest"), &arm64));
        assert!(s.holds(Layout::Nix, &index, &amd64));
        assert!(!s.holds(Layout::Nix, &index, &arm64));
        assert!(!s.holds(Layout::Rootfs, &index, &amd64));
        assert!(!s.holds(Layout::Nix, &Digest::of(b"other"), &amd64));
    }

    #[test]
    fn only_a_published_single_image_is_held_exactly() {
        let amd64: Platform = "linux/amd64".parse().unwrap();
        let manifest = Digest::of(b"manifest");
        let published = State::new(Layout::Nix, record(None));
        assert!(
            published
                .find_exact(Layout::Nix, &manifest, &amd64)
                .is_some()
        );
        let mut other = record(None);
        other.manifest_digest = Some(Digest::of(b"other manifest"));
        // Merged with another image, or into a seed hydrafy did not write.
        let merged = State::merged(Some(&State::new(Layout::Nix, other)), record(None));
        assert!(merged.holds(Layout::Nix, &manifest, &amd64));
        assert!(merged.find_exact(Layout::Nix, &manifest, &amd64).is_none());
        let adopted = State::merged(None, record(None));
        assert!(adopted.holds(Layout::Nix, &manifest, &amd64));
        assert!(adopted.find_exact(Layout::Nix, &manifest, &amd64).is_none());
        // A state file from before `exact` was written does not vouch for it.
        let mut old = serde_json::to_value(&published).unwrap();
        old.as_object_mut().unwrap().remove("exact");
        let old: State = serde_json::from_value(old).unwrap();
        assert!(old.holds(Layout::Nix, &manifest, &amd64));
        assert!(old.find_exact(Layout::Nix, &manifest, &amd64).is_none());
    }

    #[test]
    fn state_round_trips_through_its_file() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(State::read(tmp.path()).unwrap(), None);
        let s = State::new(Layout::Rootfs, record(None));
        s.write(tmp.path()).unwrap();
        assert_eq!(State::read(tmp.path()).unwrap(), Some(s));
        std::fs::write(tmp.path().join(STATE_FILE), "{").unwrap();
        let err = State::read(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("--replace"), "{err}");
    }
}
