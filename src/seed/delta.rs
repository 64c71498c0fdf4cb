//! `pull --have STATE`: what the far side already holds, so that the archive
//! carried to it leaves those layers out.
//!
//! STATE is what the far side can show of itself: its seed's state file
//! (`DIR/.hydrafy-state.json`, copied over, or DIR itself), or an earlier
//! archive made by `pull` that it extracted. Which one is told by content,
//! not by name.
//!
//! A layer may be left out only where the far side's `--merge` will skip it
//! anyway: a layer that holds nothing but store paths, all of which the far
//! side holds. That is the record [`crate::seed::publish::SkipPlan`] reads
//! (`store_layers`, by diff_id), so the delta and the merge agree by
//! construction. From a state file the record is read as it is; from an
//! earlier archive, each of its layer blobs that the new image shares is
//! read (and hashed, so only a blob that is what its name says counts), and
//! counts when it holds store paths only, as the far side recorded it when
//! it unpacked that archive.

use std::collections::{HashMap, HashSet};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use crate::error::{Error, Result};
use crate::oci::digest::{Digest, HashingReader};
use crate::oci::layout::Archive;
use crate::oci::manifest::Descriptor;
use crate::oci::source::{Format, SourceName};
use crate::seed::layers::StoreLayers;
use crate::seed::state::{Layout, STATE_FILE, State};
use crate::ui::progress::Reporter;
use crate::unpack::apply::EntryFilter;
use crate::unpack::decoder;
use crate::unpack::fsroot::normalize;
use crate::unpack::tar::{Kind, Reader};

/// A state file bigger than this is not one.
const MAX_STATE_BYTES: u64 = 64 << 20;

/// What the far side holds, as STATE shows it.
pub struct Have {
    /// `sha256:...` of STATE (of its `index.json`, for a layout directory).
    pub against: Digest,
    /// STATE in words, for the archive's annotations and messages.
    pub what: String,
    held: Held,
}

enum Held {
    /// A state file: the store-only layers its images were built from, and
    /// every store path its records show.
    Records {
        layers: HashMap<Digest, Vec<String>>,
        paths: HashSet<String>,
    },
    /// An earlier archive and the blobs it holds.
    Archive {
        archive: Box<Archive>,
        blobs: HashSet<Digest>,
    },
}

impl Have {
    /// Read STATE at `path`: a state file (JSON) or an image file made by
    /// `pull` (a layout directory or an archive, maybe compressed, which is
    /// decompressed into `scratch`).
    pub fn read(
        path: &Path,
        scratch: &Path,
        cancel: &AtomicBool,
        reporter: &dyn Reporter,
    ) -> Result<Have> {
        let meta = std::fs::metadata(path)
            .map_err(|e| Error::io(path, "cannot open the --have STATE", e))?;
        if !meta.is_dir() && looks_like_json(path)? {
            return Have::from_state_file(path);
        }
        // The far side's DIR itself (a copy of it, or mounted): its state file.
        let in_dir = path.join(STATE_FILE);
        if meta.is_dir() && in_dir.is_file() {
            return Have::from_state_file(&in_dir);
        }
        let name = SourceName {
            path: path.to_path_buf(),
            format: Format::Detect,
            pick: None,
        };
        let archive = Archive::open(&name, scratch, cancel, reporter).map_err(|e| {
            Error::Archive {
                what: "--have STATE",
                input: path.display().to_string(),
                reason: format!(
                    "is neither a hydrafy state file (DIR/{}) nor an image file made by `hydrafy pull` ({})",
                    STATE_FILE,
                    crate::error::report(&e)
                ),
            }
        })?;
        let against = if meta.is_dir() {
            Digest::of(
                &std::fs::read(path.join("index.json"))
                    .map_err(|e| Error::io(path.join("index.json"), "cannot read", e))?,
            )
        } else {
            hash_file(path)?
        };
        let blobs = archive.blob_digests();
        Ok(Have {
            against,
            what: format!("the image file {}", file_name(path)),
            held: Held::Archive {
                archive: Box::new(archive),
                blobs,
            },
        })
    }

    fn from_state_file(path: &Path) -> Result<Have> {
        let bad = |reason: String| Error::Archive {
            what: "--have STATE",
            input: path.display().to_string(),
            reason,
        };
        let size = std::fs::metadata(path)
            .map_err(|e| Error::io(path, "cannot read the --have STATE", e))?
            .len();
        if size > MAX_STATE_BYTES {
            return Err(bad(format!(
                "is {size} bytes, too big for a hydrafy state file"
            )));
        }
        let bytes =
            std::fs::read(path).map_err(|e| Error::io(path, "cannot read the --have STATE", e))?;
        let state: State = serde_json::from_slice(&bytes).map_err(|e| {
            bad(format!(
                "is JSON but not a hydrafy state file ({e}); copy DIR/{} from the far side",
                STATE_FILE
            ))
        })?;
        if !state.is_current_format() {
            return Err(bad(format!(
                "was written by another hydrafy version (format {}); copy it again after running this version there",
                state.version
            )));
        }
        if state.layout != Layout::Nix {
            return Err(bad(
                "is the state of a --rootfs DIR, which --merge cannot add to; pull without --have"
                    .to_string(),
            ));
        }
        let layers = state.store_layers();
        let paths = state
            .images
            .iter()
            .flat_map(|i| {
                i.store_paths
                    .iter()
                    .chain(i.store_layers.iter().flat_map(|l| &l.store_paths))
            })
            .cloned()
            .collect();
        Ok(Have {
            against: Digest::of(&bytes),
            what: format!("the state file of a seed holding {}", state.describe()),
            held: Held::Records { layers, paths },
        })
    }

    /// Which of `layers` (each with its diff_id) the far side can do without.
    pub fn omits(&self, layers: &[(Descriptor, Digest)], cancel: &AtomicBool) -> Result<Vec<bool>> {
        layers
            .iter()
            .map(|(desc, diff_id)| {
                if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(Error::Interrupted);
                }
                match &self.held {
                    Held::Records { layers, paths } => Ok(layers
                        .get(diff_id)
                        .is_some_and(|names| names.iter().all(|n| paths.contains(n)))),
                    Held::Archive { archive, blobs } => {
                        if !blobs.contains(&desc.digest) {
                            return Ok(false);
                        }
                        store_only(archive, desc)
                    }
                }
            })
            .collect()
    }
}

/// Does the archive's blob `desc` hash to its digest and hold nothing but
/// store paths (as the far side recorded when it unpacked it)?
fn store_only(archive: &Archive, desc: &Descriptor) -> Result<bool> {
    let layer = desc.digest.to_string();
    let compression = crate::oci::manifest::layer_compression(&layer, &desc.media_type)?;
    let mut hashing = HashingReader::new(archive.blob_stream(&desc.digest)?);
    let mut filter = StoreLayers::default();
    filter.start_layer();
    // Read as the applier reads layers; a blob that cannot be read is not
    // one the far side unpacked.
    let Ok(input) = decoder(&layer, BufReader::new(&mut hashing), compression) else {
        return Ok(false);
    };
    let mut tar = Reader::new(input);
    loop {
        match tar.next_entry() {
            Ok(Some(entry)) if matches!(entry.header.kind, Kind::GLOBAL | Kind::GNU_VOLUME) => {}
            Ok(Some(entry)) => filter.note(&normalize(&entry.header.name)),
            Ok(None) => break,
            Err(_) => return Ok(false),
        }
    }
    drop(tar);
    hashing
        .drain()
        .map_err(|e| Error::io(PathBuf::from(&layer), "cannot read", e))?;
    let (digest, _) = hashing.finish();
    if digest != desc.digest {
        return Ok(false);
    }
    Ok(filter
        .take_log()
        .pop()
        .flatten()
        .is_some_and(|paths| !paths.is_empty()))
}

/// Does the file start (after white space) with `{`?
fn looks_like_json(path: &Path) -> Result<bool> {
    let mut head = [0u8; 64];
    let mut file = std::fs::File::open(path)
        .map_err(|e| Error::io(path, "cannot open the --have STATE", e))?;
    let n = file
        .read(&mut head)
        .map_err(|e| Error::io(path, "cannot read the --have STATE", e))?;
    Ok(head[..n]
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{'))
}

fn hash_file(path: &Path) -> Result<Digest> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::io(path, "cannot open the --have STATE", e))?;
    let mut hashing = HashingReader::new(file);
    hashing
        .drain()
        .map_err(|e| Error::io(path, "cannot read the --have STATE", e))?;
    Ok(hashing.finish().0)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_is_left_out_only_when_the_records_hold_all_its_paths() {
        let (a, b, c) = (Digest::of(b"a"), Digest::of(b"b"), Digest::of(b"c"));
        let have = Have {
            against: Digest::of(b"state"),
            what: "a state".to_string(),
            held: Held::Records {
                layers: HashMap::from([
                    (a, vec!["aaa-x".to_string()]),
                    (b, vec!["bbb-y".to_string(), "ccc-gone".to_string()]),
                ]),
                paths: HashSet::from(["aaa-x".to_string(), "bbb-y".to_string()]),
            },
        };
        let desc = |d: Digest| Descriptor {
            media_type: crate::oci::manifest::media::DOCKER_LAYER_GZIP.to_string(),
            digest: d,
            size: 1,
            platform: None,
            urls: None,
            annotations: None,
        };
        let layers = [(desc(a), a), (desc(b), b), (desc(c), c)];
        assert_eq!(
            have.omits(&layers, &AtomicBool::new(false)).unwrap(),
            [true, false, false],
            "known and held; known but a path is gone; unknown"
        );
    }
}
