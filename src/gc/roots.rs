//! What gc must keep whatever the times say: the images DIR was built from,
//! and the roots an operator made under `nix/var/nix/gcroots`.
//!
//! An image's store paths are the ones its own database registered, which
//! the state file records (`store_paths`) since gc exists. A record written
//! before has only its store-only layers (`store_layers`, the paths each
//! layer held when it held nothing else); their union stands in for the
//! image's paths. For nixpkgs' layered images, nixos/nix's among them, that
//! is every store path, because each sits in a layer of its own or in the
//! last "rest" layer. Either way gc keeps the closure. A record with neither
//! list cannot say what its image needs, so gc refuses to run until the
//! image is protected another way (a gc root) and dropped.
//!
//! Roots are read as Nix's collector reads them (`findRoots` in
//! `gc.cc`): every symlink under `nix/var/nix/gcroots` and
//! `nix/var/nix/profiles`, recursively, whose target is in the store is a
//! root; a symlink to a symlink outside the store (an indirect root, as
//! `gcroots/auto` holds) is followed once. Targets are written as jobs see
//! them (`/nix/store/...`, `/nix/var/nix/profiles/...`), so those are read
//! inside DIR; a target already naming `DIR/nix/store/...` works too.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::nix::db::STORE_DIR;
use crate::nix::store_path::StorePath;
use crate::oci::digest::Digest;
use crate::oci::reference::ImageRef;
use crate::seed::state::{ImageRecord, State};

/// The store paths (`HASH-NAME`) one recorded image needs directly.
#[derive(Clone, Debug)]
pub struct ImageRoots {
    pub names: Vec<String>,
}

/// The store paths each kept image needs, and the records `--drop-image` names.
pub struct Images {
    pub kept: Vec<ImageRoots>,
    /// Indices into the state's `images` that `--drop-image` releases.
    pub dropped: Vec<usize>,
}

/// Split the state's images into kept and dropped, and list each kept one's
/// store paths. `Err` for a `--drop-image` that names nothing, or names
/// several images by repository or tag alone, and for a kept record that
/// does not say what its image needs.
pub fn images(dir: &Path, state: Option<&State>, drop: &[String]) -> Result<Images> {
    let records: &[ImageRecord] = state.map_or(&[], |s| &s.images);
    let mut dropped = BTreeSet::new();
    for arg in drop {
        let hits: Vec<usize> = (0..records.len())
            .filter(|&i| names_image(arg, &records[i]))
            .collect();
        let by_digest =
            arg.parse::<Digest>().is_ok() || ImageRef::parse(arg).is_ok_and(|r| r.digest.is_some());
        let recorded = || {
            let list: Vec<&str> = records.iter().map(|r| r.reference.as_str()).collect();
            if list.is_empty() {
                "none".to_string()
            } else {
                list.join(", ")
            }
        };
        match hits.len() {
            0 => {
                return Err(Error::invalid(
                    "--drop-image",
                    arg.as_str(),
                    format!(
                        "{} records no such image (recorded: {}); see `hydrafy status {}`",
                        dir.display(),
                        recorded(),
                        dir.display()
                    ),
                ));
            }
            n if n > 1 && !by_digest => {
                return Err(Error::invalid(
                    "--drop-image",
                    arg.as_str(),
                    format!(
                        "names {n} recorded images ({}); name one by its digest",
                        hits.iter()
                            .map(|&i| records[i].reference.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            _ => dropped.extend(hits),
        }
    }
    let mut kept = Vec::new();
    for (i, record) in records.iter().enumerate() {
        if dropped.contains(&i) {
            continue;
        }
        let names = image_names(record);
        if names.is_empty() {
            return Err(Error::Store {
                dir: dir.to_path_buf(),
                reason: format!(
                    "the state file records {} without its store paths (an older hydrafy wrote it), \
                     so gc cannot tell what that image needs; changed nothing. Protect its paths with \
                     a root (ln -s /nix/store/<path> {}/nix/var/nix/gcroots/<name>) and pass \
                     --drop-image {}",
                    record.reference,
                    dir.display(),
                    record.reference
                ),
            });
        }
        kept.push(ImageRoots { names });
    }
    Ok(Images {
        kept,
        dropped: dropped.into_iter().collect(),
    })
}

/// The store paths (`HASH-NAME`) a record says its image needs directly:
/// its database's paths, or else the union of its store-only layers' paths
/// (see the module documentation); empty when it says neither.
pub fn image_names(record: &ImageRecord) -> Vec<String> {
    if !record.store_paths.is_empty() {
        return record.store_paths.clone();
    }
    let set: BTreeSet<&String> = record
        .store_layers
        .iter()
        .flat_map(|l| &l.store_paths)
        .collect();
    set.into_iter().cloned().collect()
}

/// Does `arg` (a reference or a digest) name `record`? A digest matches the
/// index, manifest or config digest; a reference matches by repository, and
/// by its tag and digest when it has them.
fn names_image(arg: &str, record: &ImageRecord) -> bool {
    let digests = [
        record.index_digest,
        record.manifest_digest,
        Some(record.config_digest),
    ];
    if let Ok(d) = arg.parse::<Digest>() {
        return digests.contains(&Some(d));
    }
    if arg == record.reference {
        return true;
    }
    let (Ok(want), Ok(have)) = (ImageRef::parse(arg), ImageRef::parse(&record.reference)) else {
        return false;
    };
    want.name() == have.name()
        && want
            .tag
            .as_ref()
            .is_none_or(|t| have.tag.as_ref() == Some(t))
        && want
            .digest
            .is_none_or(|d| have.digest == Some(d) || digests.contains(&Some(d)))
}

/// One root: the link that makes it, and the store path (`HASH-NAME`) it keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GcRoot {
    pub link: PathBuf,
    pub name: String,
}

/// Every root under `DIR/nix/var/nix/gcroots` and `DIR/nix/var/nix/profiles`.
pub fn gc_roots(dir: &Path) -> Result<Vec<GcRoot>> {
    let dir = fs::canonicalize(dir).map_err(|e| Error::io(dir, "cannot resolve", e))?;
    let store = dir.join(STORE_DIR);
    let mut out = Vec::new();
    for top in ["nix/var/nix/gcroots", "nix/var/nix/profiles"] {
        let mut stack = vec![dir.join(top)];
        while let Some(at) = stack.pop() {
            let meta = match fs::symlink_metadata(&at) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&at, "cannot read gc root", e)),
            };
            if meta.is_dir() {
                let entries =
                    fs::read_dir(&at).map_err(|e| Error::io(&at, "cannot list gc roots", e))?;
                for entry in entries {
                    let entry = entry.map_err(|e| Error::io(&at, "cannot list gc roots", e))?;
                    stack.push(entry.path());
                }
            } else if meta.file_type().is_symlink()
                && let Some(name) = root_target(&dir, &store, &at)?
            {
                out.push(GcRoot { link: at, name });
            }
        }
    }
    out.sort_by(|a, b| a.link.cmp(&b.link));
    Ok(out)
}

/// The store path the symlink `link` keeps, following one indirection as Nix does.
fn root_target(dir: &Path, store: &Path, link: &Path) -> Result<Option<String>> {
    let read = |at: &Path| fs::read_link(at).map_err(|e| Error::io(at, "cannot read gc root", e));
    let target = read(link)?;
    if let Some(name) = store_name(store, link, &target) {
        return Ok(Some(name));
    }
    // An indirect root: a link to a link (a `result` symlink) that names the path.
    let at = inside(dir, &lexical(&link.parent().unwrap_or(dir).join(&target)));
    match fs::symlink_metadata(&at) {
        Ok(m) if m.file_type().is_symlink() => Ok(store_name(store, &at, &read(&at)?)),
        _ => Ok(None),
    }
}

/// A path jobs would see as `/nix/...`, read inside DIR; others as they are.
fn inside(dir: &Path, path: &Path) -> PathBuf {
    match path.strip_prefix("/nix") {
        Ok(rest) => dir.join("nix").join(rest),
        Err(_) => path.to_path_buf(),
    }
}

/// `HASH-NAME` when the symlink `link`'s `target` points into the store:
/// `/nix/store/X/...` as jobs see it, or (absolute, or relative to the link)
/// `DIR/nix/store/X/...`, where `store` is DIR's store, absolute.
fn store_name(store: &Path, link: &Path, target: &Path) -> Option<String> {
    let rest = match target.strip_prefix("/nix/store") {
        Ok(rest) => rest.to_path_buf(),
        Err(_) => {
            let full = lexical(&link.parent()?.join(target));
            full.strip_prefix(store).ok()?.to_path_buf()
        }
    };
    let name = rest.components().next()?.as_os_str().to_str()?;
    StorePath::from_name(name).map(|p| p.name().to_string())
}

/// `path` with `.` and `..` resolved by name (as the kernel would, were
/// there no symlinks on the way).
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seed::state::{Layout, StoreLayer};

    const A: &str = "3ykzfjksfn40zgrnv6rp4cj8wcvmyyic-a";
    const B: &str = "20b3qxnjjhvzc6dm9n58hif2dl86b445-b";

    fn record(reference: &str, seed: &[u8]) -> ImageRecord {
        ImageRecord {
            reference: reference.to_string(),
            index_digest: None,
            manifest_digest: Some(Digest::of(seed)),
            config_digest: Digest::of(b"config"),
            platform: "linux/amd64".into(),
            layers: 2,
            store_layers: vec![StoreLayer {
                diff_id: Digest::of(b"layer"),
                store_paths: vec![A.to_string()],
            }],
            store_paths: Vec::new(),
            recorded_at: None,
        }
    }

    #[test]
    fn roots_resolve_store_targets_indirect_links_and_dir_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let roots = dir.join("nix/var/nix/gcroots");
        fs::create_dir_all(roots.join("auto")).unwrap();
        fs::create_dir_all(dir.join("nix/store").join(B)).unwrap();
        std::os::unix::fs::symlink(format!("/nix/store/{A}/bin/x"), roots.join("a")).unwrap();
        std::os::unix::fs::symlink(dir.join("nix/store").join(B), roots.join("b")).unwrap();
        let result = tmp.path().join("result");
        std::os::unix::fs::symlink(format!("/nix/store/{B}"), &result).unwrap();
        std::os::unix::fs::symlink(&result, roots.join("auto/r")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", roots.join("junk")).unwrap();
        std::os::unix::fs::symlink(format!("../../../../nix/store/{A}"), roots.join("rel"))
            .unwrap();
        let names: Vec<String> = gc_roots(dir).unwrap().into_iter().map(|r| r.name).collect();
        assert_eq!(names, vec![A, B, B, A]);
    }

    #[test]
    fn drop_image_matches_reference_or_digest_and_refuses_ambiguity() {
        let tmp = tempfile::tempdir().unwrap();
        let mut state = State::new(Layout::Nix, record("docker.io/nixos/nix:2.3", b"one"));
        state.images.push(record("docker.io/nixos/nix:2.4", b"two"));
        let images = images(tmp.path(), Some(&state), &["nixos/nix:2.3".into()]).unwrap();
        assert_eq!(images.dropped, vec![0]);
        assert_eq!(images.kept.len(), 1);
        assert_eq!(images.kept[0].names, vec![A]);
        let by_digest = Digest::of(b"two").to_string();
        assert_eq!(
            super::images(tmp.path(), Some(&state), &[by_digest])
                .unwrap()
                .dropped,
            vec![1]
        );
        let err = super::images(tmp.path(), Some(&state), &["nixos/nix".into()])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("name one by its digest"), "{err}");
        let err = super::images(tmp.path(), Some(&state), &["ubuntu".into()])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("records no such image"), "{err}");
    }

    #[test]
    fn a_record_without_store_paths_stops_gc() {
        let tmp = tempfile::tempdir().unwrap();
        let mut r = record("docker.io/nixos/nix:2.3", b"one");
        r.store_layers.clear();
        let state = State::new(Layout::Nix, r);
        let err = images(tmp.path(), Some(&state), &[])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("without its store paths"), "{err}");
        assert!(images(tmp.path(), Some(&state), &["nixos/nix:2.3".into()]).is_ok());
    }
}
