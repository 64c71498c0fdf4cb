//! What a seed's unpacking skips and learns, layer by layer.
//!
//! The applier knows tar, not Nix; this filter is where the seed tells it
//! which store paths not to write (a `--merge` target already holds them),
//! and where it learns which store paths each layer carried, for the state
//! file's layer records: a later `--merge` skips a layer outright when the
//! seed still has every store path it holds.

use std::collections::{BTreeSet, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use crate::unpack::apply::{EntryFilter, WHITEOUT_PREFIX};

/// Skips the named store paths; records the store paths of each layer.
#[derive(Debug, Default)]
pub struct StoreLayers {
    /// Store path names (`HASH-NAME` under `nix/store`) not to write.
    skip: HashSet<OsString>,
    /// Per layer: the store paths it holds, or `None` once it holds
    /// anything else too (a file outside the store, a whiteout).
    log: Vec<Option<BTreeSet<String>>>,
}

impl StoreLayers {
    /// A filter that writes everything but the store paths in `skip`.
    pub fn skipping(skip: HashSet<OsString>) -> StoreLayers {
        StoreLayers {
            skip,
            log: Vec::new(),
        }
    }

    /// For each layer applied so far, in order: the store paths it holds
    /// when it holds nothing but store paths, else `None`.
    pub fn take_log(&mut self) -> Vec<Option<Vec<String>>> {
        std::mem::take(&mut self.log)
            .into_iter()
            .map(|l| l.map(|set| set.into_iter().collect()))
            .collect()
    }
}

/// The store path name `rel` lies in (`nix/store/NAME/...`), if any.
fn store_path_of(rel: &Path) -> Option<&OsStr> {
    let mut parts = rel.components();
    match (parts.next(), parts.next(), parts.next()) {
        (
            Some(Component::Normal(nix)),
            Some(Component::Normal(store)),
            Some(Component::Normal(name)),
        ) if nix == "nix" && store == "store" => Some(name),
        _ => None,
    }
}

/// Whether `rel` is the root, `nix` or `nix/store` itself.
fn is_store_parent(rel: &Path) -> bool {
    let parts: Vec<&OsStr> = rel.components().map(|c| c.as_os_str()).collect();
    match parts.as_slice() {
        [] => true,
        [nix] => *nix == "nix",
        [nix, store] => *nix == "nix" && *store == "store",
        _ => false,
    }
}

impl EntryFilter for StoreLayers {
    fn start_layer(&mut self) {
        self.log.push(Some(BTreeSet::new()));
    }

    fn note(&mut self, rel: &Path) {
        let Some(Some(paths)) = self.log.last_mut() else {
            return;
        };
        let whiteout = rel
            .components()
            .any(|c| c.as_os_str().as_bytes().starts_with(WHITEOUT_PREFIX));
        let only_store = !whiteout
            && match store_path_of(rel) {
                Some(name) => {
                    paths.insert(name.to_string_lossy().into_owned());
                    true
                }
                None => is_store_parent(rel),
            };
        if !only_store {
            *self.log.last_mut().expect("a layer is being applied") = None;
        }
    }

    fn skip(&self, rel: &Path) -> bool {
        !self.skip.is_empty() && store_path_of(rel).is_some_and(|name| self.skip.contains(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_of_store_paths_only_is_logged_with_its_paths() {
        let mut f = StoreLayers::default();
        f.start_layer();
        for rel in [
            "nix",
            "nix/store",
            "nix/store/aaa-x",
            "nix/store/aaa-x/bin/x",
            "nix/store/bbb-y",
        ] {
            f.note(Path::new(rel));
        }
        f.start_layer();
        f.note(Path::new("nix/store/ccc-z"));
        f.note(Path::new("etc/passwd"));
        f.start_layer();
        f.note(Path::new("nix/store/.wh.ddd-w"));
        assert_eq!(
            f.take_log(),
            vec![
                Some(vec!["aaa-x".to_string(), "bbb-y".to_string()]),
                None,
                None
            ]
        );
    }

    #[test]
    fn only_entries_inside_a_skipped_store_path_are_skipped() {
        let f = StoreLayers::skipping(HashSet::from([OsString::from("aaa-x")]));
        assert!(f.skip(Path::new("nix/store/aaa-x")));
        assert!(f.skip(Path::new("nix/store/aaa-x/bin/x")));
        assert!(!f.skip(Path::new("nix/store/aaa-xy")));
        assert!(!f.skip(Path::new("nix/store")));
        assert!(!f.skip(Path::new("aaa-x")));
    }
}
