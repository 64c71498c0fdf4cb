//! Two Nix-layered images made from two real stores that share most store
//! paths: an upgrade, as `--merge` and `pull --have` meet it.

use std::path::Path;

use crate::support::image::{Comp, Image, Media, Pushed, layer, push, push_index};
use crate::support::nix;
use crate::support::registry::Registry;

/// Two Nix-layered images made from two real stores that share store paths:
/// `old` = {base, tools, old-only}, `new` = {base, tools, new-only}.
pub struct Upgrade {
    pub reg: Registry,
    pub old: Pushed,
    pub new: Pushed,
    pub new_manifest: Pushed,
    /// The stores the images were made from (their files are read-only).
    pub old_store: nix::NixStore,
    pub new_store: nix::NixStore,
    pub shared: Vec<String>,
    pub new_only: Vec<String>,
    _work: tempfile::TempDir,
}

pub fn upgrade() -> Upgrade {
    let work = tempfile::tempdir().unwrap();
    let src = |name: &str, bulk: usize| {
        let dir = work.path().join(format!("src-{name}"));
        nix::sample_source(&dir, name, bulk);
        dir
    };
    let (base, tools, old_only, new_only) = (
        src("base", 800),
        src("tools", 400),
        src("old-only", 300),
        src("new-only", 300),
    );
    let old = nix::make_store(
        &work.path().join("old"),
        &[
            ("base", base.as_path()),
            ("tools", tools.as_path()),
            ("old-only", old_only.as_path()),
        ],
    );
    let new = nix::make_store(
        &work.path().join("new"),
        &[
            ("base", base.as_path()),
            ("tools", tools.as_path()),
            ("new-only", new_only.as_path()),
        ],
    );
    let shared: Vec<String> = new
        .paths
        .iter()
        .filter(|p| old.paths.contains(p))
        .cloned()
        .collect();
    let new_only: Vec<String> = new
        .paths
        .iter()
        .filter(|p| !old.paths.contains(p))
        .cloned()
        .collect();
    assert_eq!(
        shared.len(),
        4,
        "the stores share base, tools and their wrappers: {shared:?}"
    );
    let reg = Registry::start();
    let image = |store: &nix::NixStore, tag: &str| {
        let layers = nix::layers(store)
            .iter()
            .map(|t| layer(t, Comp::Gzip, Media::Docker))
            .collect();
        let manifest = push(
            &reg.addr,
            "nixos/nix",
            None,
            &Image::new(Media::Docker, layers),
        );
        let index = push_index(
            &reg.addr,
            "nixos/nix",
            Some(tag),
            Media::Docker,
            &[&manifest],
        );
        (index, manifest)
    };
    let ((old_image, _), (new_image, new_manifest)) = (image(&old, "old"), image(&new, "new"));
    Upgrade {
        reg,
        old: old_image,
        old_store: old,
        new: new_image,
        new_manifest,
        new_store: new,
        shared,
        new_only,
        _work: work,
    }
}

impl Upgrade {
    /// The new image as an optimised store has it, tagged `linked`: the new
    /// path's empty file is a hard link to the (identical) one in `base`,
    /// which the old image holds and a merge would skip.
    pub fn push_linked(&self) -> Pushed {
        let base = self.shared.iter().find(|p| p.ends_with("-base")).unwrap();
        let fresh = self
            .new_only
            .iter()
            .find(|p| p.ends_with("-new-only"))
            .unwrap();
        let (from, to) = (
            format!("{fresh}/share/empty"),
            format!("{base}/share/empty"),
        );
        let layers = nix::layers_linking(&self.new_store, Some((&from, &to)))
            .iter()
            .map(|t| layer(t, Comp::Gzip, Media::Docker))
            .collect();
        push(
            &self.reg.addr,
            "nixos/nix",
            Some("linked"),
            &Image::new(Media::Docker, layers),
        )
    }
}

pub fn store_path(seed: &Path, path: &str) -> std::path::PathBuf {
    seed.join(path.trim_start_matches('/'))
}
