//! Applying layers in several lanes at once must give exactly the tree of
//! applying them in order: same bytes, modes, owners, mtimes, directory
//! metadata, symlinks and hard links, and the same stats, warnings and
//! filter notes. Layers that could interact must stop the lanes
//! (`LanesInterfered`), and the one-lane retry must then equal the
//! in-order tree (or fail as it does).

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use hydrafy::Error;
use hydrafy::oci::{Compression, Descriptor, Digest};
use hydrafy::ui::Recorder;
use hydrafy::unpack::{Applier, ApplyOptions, ApplyStats, EntryFilter, LayerInput, unpack};

use crate::support::image::{Tar, sha256};
use crate::support::{TestEnv, fingerprint};

/// Records every note, per layer, so lanes can be checked to give them in order.
#[derive(Default)]
struct Notes(Vec<Vec<PathBuf>>);

impl EntryFilter for Notes {
    fn start_layer(&mut self) {
        self.0.push(Vec::new());
    }
    fn note(&mut self, rel: &Path) {
        self.0.last_mut().unwrap().push(rel.to_path_buf());
    }
}

/// What an unpack produced, everything the comparison looks at.
#[derive(Debug, PartialEq)]
pub(crate) struct Outcome {
    tree: BTreeMap<PathBuf, String>,
    stats: ApplyStats,
    notes: Vec<Vec<PathBuf>>,
    warnings: Vec<String>,
    layers_applied: u64,
}

/// Holds layer `held`'s stream back until layer `until`'s has been read to
/// its end (or dropped), so that a lane runs ahead of an earlier layer: the
/// interleaving the lane rules exist for, made to happen on every run rather
/// than by luck. When `until` cannot move (it rightly waits for `held`), the
/// hold gives way after [`HOLD_LIMIT`]; that decides how long a test takes,
/// never what it sees.
#[derive(Clone, Copy)]
struct Hold {
    held: usize,
    until: usize,
}

const HOLD_LIMIT: Duration = Duration::from_secs(3);

/// Opened once layer `until` has been read through.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }

    fn pass(&self) {
        let open = self.open.lock().unwrap();
        let _ = self
            .opened
            .wait_timeout_while(open, HOLD_LIMIT, |open| !*open)
            .unwrap();
    }
}

/// A layer's stream, taking part in a [`Hold`] as the held or the awaited one.
struct Gated {
    inner: std::io::Cursor<Vec<u8>>,
    gate: Arc<Gate>,
    held: bool,
}

impl Read for Gated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.held {
            self.gate.pass();
            self.held = false;
        }
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.gate.release();
        }
        Ok(n)
    }
}

impl Drop for Gated {
    fn drop(&mut self) {
        self.gate.release();
    }
}

fn inputs(layers: &[Vec<u8>], hold: Option<Hold>) -> Vec<LayerInput> {
    let gate = Arc::new(Gate::default());
    layers
        .iter()
        .enumerate()
        .map(|(index, tar)| {
            let bytes = tar.clone();
            let digest: Digest = sha256(tar).parse().unwrap();
            let role = hold.and_then(|h| {
                (h.held == index)
                    .then_some(true)
                    .or((h.until == index).then_some(false))
            });
            let gate = Arc::clone(&gate);
            LayerInput {
                index,
                descriptor: Descriptor {
                    media_type: "application/vnd.oci.image.layer.v1.tar".into(),
                    digest,
                    size: bytes.len() as u64,
                    platform: None,
                    urls: None,
                    annotations: None,
                },
                diff_id: digest,
                compression: Compression::None,
                open: Box::new(move || {
                    let inner = std::io::Cursor::new(bytes);
                    Ok(match role {
                        Some(held) => Box::new(Gated { inner, gate, held }),
                        None => Box::new(inner) as Box<dyn Read + Send>,
                    })
                }),
                verify_blob: true,
            }
        })
        .collect()
}

/// Unpack `layers` into a fresh `root` with `lanes` lanes, as the library
/// pipeline does it.
pub(crate) fn unpack_into(root: &Path, layers: &[Vec<u8>], lanes: usize) -> Result<Outcome, Error> {
    unpack_held(root, layers, lanes, None)
}

/// [`unpack_into`], with one layer's stream held back (see [`Hold`]).
fn unpack_held(
    root: &Path,
    layers: &[Vec<u8>],
    lanes: usize,
    hold: Option<Hold>,
) -> Result<Outcome, Error> {
    let _ = hydrafy::unpack::remove_tree(root);
    std::fs::create_dir_all(root).unwrap();
    let mut applier =
        Applier::filtered(root, ApplyOptions::for_current_user(true), Notes::default())?;
    applier.set_lanes(lanes);
    let reporter = Recorder::default();
    unpack(
        &mut applier,
        inputs(layers, hold),
        &Arc::new(AtomicBool::new(false)),
        &reporter,
    )?;
    applier.finish()?;
    Ok(Outcome {
        tree: tree(root),
        stats: applier.stats().clone(),
        warnings: reporter.warnings.lock().unwrap().clone(),
        layers_applied: *reporter.layers_applied.lock().unwrap(),
        notes: applier.into_filter().0,
    })
}

/// [`fingerprint`] plus owners and hard link groups (by the first path of each inode).
fn tree(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut first_of_inode: BTreeMap<u64, PathBuf> = BTreeMap::new();
    fingerprint(root)
        .into_iter()
        .map(|(rel, desc)| {
            let m = std::fs::symlink_metadata(root.join(&rel)).unwrap();
            let group = if m.is_file() {
                let first = first_of_inode.entry(m.ino()).or_insert_with(|| rel.clone());
                format!(" links {} with {}", m.nlink(), first.display())
            } else {
                String::new()
            };
            let mtime = if m.file_type().is_symlink() {
                format!(" mtime {}", m.mtime())
            } else {
                String::new()
            };
            let desc = format!("{desc} owner {}:{}{mtime}{group}", m.uid(), m.gid());
            (rel, desc)
        })
        .collect()
}

/// What a caller does: lanes first, and on `LanesInterfered` one lane again.
/// Returns whether the lanes interfered, and the outcome.
fn unpack_like_callers(
    root: &Path,
    layers: &[Vec<u8>],
    hold: Option<Hold>,
) -> (bool, Result<Outcome, String>) {
    match unpack_held(root, layers, 2, hold) {
        Err(Error::LanesInterfered { .. }) => (
            true,
            unpack_into(root, layers, 1).map_err(|e| hydrafy::report(&e)),
        ),
        other => (false, other.map_err(|e| hydrafy::report(&e))),
    }
}

/// A store path name for layer `i`.
fn store_name(i: usize) -> String {
    format!("{:032}-pkg{i}", i)
}

/// One Nix-like layer: the store's ancestors (modes and mtimes differing by
/// layer), and one store path with directories, files, a symlink, a hard
/// link inside it and read-only directories.
fn store_layer(i: usize, files: usize) -> Tar {
    let name = store_name(i);
    let mut t = Tar::new();
    t.mtime = 1000 + i as u64;
    t.dir("nix/", 0o755 - (i as u32 % 3) * 0o010);
    t.mtime = 2000 + i as u64;
    t.dir("nix/store/", 0o775 + (i as u32 % 2) * 0o1000);
    t.mtime = 1;
    t.dir(&format!("nix/store/{name}"), 0o555);
    t.dir(&format!("nix/store/{name}/bin"), 0o555);
    t.dir(&format!("nix/store/{name}/share"), 0o555);
    t.dir(&format!("nix/store/{name}/share/doc"), 0o555);
    for f in 0..files {
        let data = format!("layer {i} file {f}\n").repeat(1 + f * 37);
        let mode = if f % 3 == 0 { 0o555 } else { 0o444 };
        t.file(&format!("nix/store/{name}/bin/f{f}"), data.as_bytes(), mode);
    }
    t.symlink(&format!("nix/store/{name}/bin/link"), "f0");
    t.hardlink(
        &format!("nix/store/{name}/share/doc/copy"),
        &format!("nix/store/{name}/bin/f0"),
    );
    t.symlink(
        &format!("nix/store/{name}/share/dep"),
        &format!("/nix/store/{}", store_name(i.saturating_sub(1))),
    );
    t
}

/// The last layer of a Nix image: the database, `etc`, a profile symlink
/// into the store, and ancestors again.
fn customisation_layer(store_paths: usize) -> Vec<u8> {
    let mut t = Tar::new();
    t.mtime = 7777;
    t.dir("./", 0o755);
    t.dir("nix", 0o751);
    t.dir("nix/var", 0o755);
    t.dir("nix/var/nix", 0o755);
    t.dir("nix/var/nix/db", 0o755);
    t.file(
        "nix/var/nix/db/db.sqlite",
        b"SQLite format 3\0pretend",
        0o644,
    );
    t.file("nix/var/nix/db/big-lock", b"", 0o644);
    t.dir("nix/var/nix/profiles", 0o755);
    t.symlink(
        "nix/var/nix/profiles/default",
        &format!("/nix/store/{}", store_name(store_paths - 1)),
    );
    t.dir("etc", 0o755);
    t.file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", 0o644);
    t.symlink("etc/profile", "/nix/var/nix/profiles/default/etc/profile");
    t.dir("tmp", 0o1777);
    t.finish()
}

/// A Nix-like image: `n` store-path layers and the customisation layer.
pub(crate) fn nix_image(n: usize) -> Vec<Vec<u8>> {
    let mut layers: Vec<Vec<u8>> = (0..n).map(|i| store_layer(i, 3 + i % 5).finish()).collect();
    layers.push(customisation_layer(n));
    layers
}

#[test]
fn a_nix_layered_image_applied_in_two_lanes_equals_one_lane() {
    let env = TestEnv::new();
    let layers = nix_image(24);
    let one = unpack_into(&env.join("one"), &layers, 1).expect("one lane");
    let two = unpack_into(&env.join("two"), &layers, 2).expect("two lanes must not interfere");
    for (k, v) in &one.tree {
        if two.tree.get(k) != Some(v) {
            eprintln!("{k:?}: {v} | {:?}", two.tree.get(k));
        }
    }
    assert_eq!(one.tree, two.tree);
    assert_eq!(one.stats, two.stats);
    assert_eq!(one.notes, two.notes);
    assert_eq!(one, two);
    // The image really is what the test claims: later layers won the ancestors.
    assert!(
        one.tree[Path::new("nix")].starts_with("dir 751 7777"),
        "{:?}",
        one.tree[Path::new("nix")]
    );
    assert!(one.tree[Path::new("nix/store")].starts_with("dir 1775 2023"));
    assert_eq!(one.layers_applied, 25);
    let three = unpack_into(&env.join("three"), &layers, 3).expect("three lanes");
    assert_eq!(one, three);
}

#[test]
fn ancestors_named_only_by_an_early_layer_keep_its_metadata() {
    // Only layer 0 names `nix` and `nix/store`; later layers create them implicitly, if at all.
    let env = TestEnv::new();
    let mut layers = vec![store_layer(0, 2).finish()];
    for i in 1..8 {
        let name = store_name(i);
        let mut t = Tar::new();
        t.mtime = 5;
        t.file(
            &format!("nix/store/{name}"),
            format!("{i}").as_bytes(),
            0o444,
        );
        layers.push(t.finish());
    }
    // The root is never named: its mtime is the clock's.
    let one = unmtimed(unpack_into(&env.join("one"), &layers, 1).unwrap(), &[""]);
    let two = unmtimed(unpack_into(&env.join("two"), &layers, 2).unwrap(), &[""]);
    assert_eq!(one, two);
    assert!(one.tree[Path::new("nix/store")].starts_with("dir 775 2000"));
    // An image that never names them: implicit metadata, and no directory counted.
    let implicit: Vec<Vec<u8>> = layers[1..].to_vec();
    let clock = ["", "nix", "nix/store"];
    let one = unmtimed(unpack_into(&env.join("one"), &implicit, 1).unwrap(), &clock);
    let two = unmtimed(unpack_into(&env.join("two"), &implicit, 2).unwrap(), &clock);
    assert_eq!(one, two);
    assert_eq!(one.stats.dirs, 0);
}

/// `outcome` with the mtimes of the directories `dirs` (set by the clock) left out.
fn unmtimed(mut outcome: Outcome, dirs: &[&str]) -> Outcome {
    for dir in dirs {
        let desc = outcome.tree.get_mut(Path::new(dir)).unwrap();
        let mut words: Vec<&str> = desc.split(' ').collect();
        words[2] = "<clock>";
        *desc = words.join(" ");
    }
    outcome
}

/// The adversarial cases: each must come out as in order, by stopping the
/// lanes where noted and only there.
fn assert_as_in_order(layers: &[Vec<u8>], must_interfere: bool) {
    assert_held_as_in_order(layers, must_interfere, None);
}

/// [`assert_as_in_order`], the lanes holding one layer back (see [`Hold`]);
/// returns the in-order outcome, if the layers apply.
fn assert_held_as_in_order(
    layers: &[Vec<u8>],
    must_interfere: bool,
    hold: Option<Hold>,
) -> Option<Outcome> {
    let env = TestEnv::new();
    let one = unpack_into(&env.join("one"), layers, 1).map_err(|e| hydrafy::report(&e));
    let (interfered, lanes) = unpack_like_callers(&env.join("two"), layers, hold);
    assert_eq!(one, lanes);
    let want = if must_interfere { "stopped" } else { "run on" };
    assert_eq!(interfered, must_interfere, "the lanes should have {want}");
    one.ok()
}

#[test]
fn a_later_layer_rewriting_a_file_of_an_earlier_store_path_stops_the_lanes() {
    let mut layers = nix_image(6);
    let mut t = Tar::new();
    t.mtime = 99;
    t.file(
        &format!("nix/store/{}/bin/f0", store_name(1)),
        b"rewritten\n",
        0o600,
    );
    layers.insert(4, t.finish());
    assert_as_in_order(&layers, true);
}

#[test]
fn a_whiteout_of_an_earlier_store_path_stops_the_lanes() {
    let mut layers = nix_image(6);
    let mut t = Tar::new();
    t.whiteout(&format!("nix/store/{}", store_name(2)));
    layers.insert(5, t.finish());
    assert_as_in_order(&layers, true);
}

#[test]
fn an_opaque_store_stops_the_lanes() {
    let mut layers = nix_image(6);
    let mut t = store_layer(40, 2);
    t.opaque("nix/store");
    layers.insert(4, t.finish());
    assert_as_in_order(&layers, true);
}

#[test]
fn a_store_path_split_over_two_layers_stops_the_lanes() {
    let mut layers = nix_image(6);
    let mut t = Tar::new();
    t.file(
        &format!("nix/store/{}/share/extra", store_name(3)),
        b"the rest of the path\n",
        0o444,
    );
    layers.insert(2, t.finish());
    assert_as_in_order(&layers, true);
}

#[test]
fn a_non_directory_at_the_store_stops_the_lanes() {
    let mut layers = nix_image(6);
    let mut t = Tar::new();
    t.symlink("nix/store", "/elsewhere");
    layers.insert(3, t.finish());
    assert_as_in_order(&layers, true);
}

#[test]
fn a_hard_link_to_an_earlier_layers_file_equals_in_order() {
    // Ordered, not refused: the link waits until every earlier layer is applied.
    let mut layers = nix_image(8);
    let mut t = store_layer(50, 2);
    t.hardlink(
        &format!("nix/store/{}/bin/shared", store_name(50)),
        &format!("nix/store/{}/bin/f1", store_name(0)),
    );
    layers.insert(6, t.finish());
    let mut etc = Tar::new();
    etc.hardlink("etc/passwd-copy", "etc/passwd");
    layers.push(etc.finish());
    let env = TestEnv::new();
    let one = unpack_into(&env.join("one"), &layers, 1).unwrap();
    let two =
        unpack_into(&env.join("two"), &layers, 2).expect("a link into an earlier layer is ordered");
    assert_eq!(one, two);
    let shared = &one.tree[&PathBuf::from(format!("nix/store/{}/bin/shared", store_name(50)))];
    assert!(shared.contains("links 2"), "{shared}");
}

#[test]
fn a_hard_link_to_a_later_layers_file_fails_as_in_order() {
    let mut layers = nix_image(6);
    let mut t = store_layer(60, 1);
    t.hardlink(
        &format!("nix/store/{}/bin/ahead", store_name(60)),
        &format!("nix/store/{}/bin/f0", store_name(5)),
    );
    layers.insert(1, t.finish());
    assert_as_in_order(&layers, true);
}

#[test]
fn a_symlinked_parent_in_a_store_path_stops_the_lanes() {
    // `lib` points into another layer's store path: writing through it would
    // reach a path that layer owns.
    let mut layers = nix_image(6);
    let mut t = store_layer(70, 1);
    t.symlink(
        &format!("nix/store/{}/lib", store_name(70)),
        &format!("/nix/store/{}/bin", store_name(4)),
    );
    t.file(
        &format!("nix/store/{}/lib/planted", store_name(70)),
        b"x",
        0o444,
    );
    layers.insert(2, t.finish());
    assert_as_in_order(&layers, true);
}

/// More than the pipeline buffers between a lane's decoder and its applier,
/// so a layer's stream reaches its end only once its entries are applied.
fn beyond_the_buffers() -> Vec<u8> {
    b"late\n".repeat(4 << 20)
}

#[test]
fn a_layer_run_ahead_waits_before_writing_outside_the_store() {
    // Layer 1 rewrites what layer 0 wrote in /etc; layer 0 is held back until
    // layer 1 is through. In order, layer 1's file wins.
    let mut early = store_layer(0, 2);
    early.file("etc/motd", b"early\n", 0o644);
    let mut late = Tar::new();
    late.file("etc/motd", &beyond_the_buffers(), 0o600);
    let layers = vec![early.finish(), late.finish(), customisation_layer(1)];
    let one = assert_held_as_in_order(&layers, false, Some(Hold { held: 0, until: 1 }));
    let motd = &one.expect("applies in order").tree[Path::new("etc/motd")];
    assert!(motd.starts_with("file 600"), "{motd}");
}

/// Layer 1 starts with what `first` writes, then a store path of its own
/// beyond the buffers; layer 0, a store path, is held back until layer 1
/// is through. What `first` writes must stop the lanes.
fn assert_run_ahead_stops_the_lanes(first: impl FnOnce(&mut Tar)) {
    let mut late = Tar::new();
    first(&mut late);
    late.file(
        &format!("nix/store/{}", store_name(1)),
        &beyond_the_buffers(),
        0o444,
    );
    let layers = vec![
        store_layer(0, 2).finish(),
        late.finish(),
        customisation_layer(2),
    ];
    assert_held_as_in_order(&layers, true, Some(Hold { held: 0, until: 1 }));
}

#[test]
fn a_whiteout_run_ahead_of_the_path_it_removes_stops_the_lanes() {
    assert_run_ahead_stops_the_lanes(|t| {
        t.whiteout(&format!("nix/store/{}", store_name(0)));
    });
}

#[test]
fn an_opaque_store_run_ahead_of_an_earlier_layer_stops_the_lanes() {
    assert_run_ahead_stops_the_lanes(|t| {
        t.opaque("nix/store");
    });
}

#[test]
fn a_layer_that_does_not_hash_to_its_diff_id_fails_in_lanes_as_in_order() {
    let env = TestEnv::new();
    let layers = nix_image(6);
    for lanes in [1, 2] {
        let root = env.join(&format!("lanes-{lanes}"));
        std::fs::create_dir_all(&root).unwrap();
        let mut applier = Applier::filtered(
            &root,
            ApplyOptions::for_current_user(true),
            Notes::default(),
        )
        .unwrap();
        applier.set_lanes(lanes);
        let mut lying = inputs(&layers, None);
        lying[3].diff_id = sha256(b"another layer").parse().unwrap();
        let cancel = Arc::new(AtomicBool::new(false));
        let err = unpack(&mut applier, lying, &cancel, &Recorder::default()).unwrap_err();
        assert!(
            matches!(err, Error::DiffIdMismatch { index: 3, .. }),
            "{lanes} lanes: {err:?}"
        );
    }
}
