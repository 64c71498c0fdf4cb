//! `pull --have STATE`: an archive of only what the far side lacks, and
//! `extract --merge` completing the far side's seed from it, checked with
//! real `nix-store`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::Command;

use crate::support::image::{Comp, Image, Media, Pushed, Tar, layer, push, sha256};
use crate::support::upgrade::{Upgrade, store_path, upgrade};
use crate::support::{
    TestEnv, assert_fails, assert_no_op, assert_ok, json, listing, nix, seed_fingerprint, stdout,
};

/// The far side's seed of the old image in `nix-backup`, and its state file
/// carried over to `far-state.json`.
fn far_side(u: &Upgrade, env: &TestEnv) -> std::path::PathBuf {
    assert_ok(&env.run(&["fetch", "--plain-http", &u.old.reference, "-q"]));
    let state = env.join("far-state.json");
    std::fs::copy(env.join("nix-backup/.hydrafy-state.json"), &state).unwrap();
    state
}

/// The test's folder holds only what the far side started with and the
/// delta: no DIR made, no staging folder left.
fn assert_only_inputs(dir: &Path, what: &str) {
    assert_eq!(
        listing(dir),
        [
            "cache",
            "delta.tar",
            "docker",
            "far-state.json",
            "home",
            "nix-backup"
        ],
        "{what}"
    );
}

/// `pull` the new image against the far side's state, into `delta.tar`.
fn pull_delta(u: &Upgrade, env: &TestEnv) {
    assert_ok(&env.run(&[
        "pull",
        "--plain-http",
        &u.new.reference,
        "-o",
        "delta.tar",
        "--have",
        "far-state.json",
        "-q",
    ]));
}

/// The size of a blob the registry holds.
fn blob_size(u: &Upgrade, digest: &str) -> u64 {
    std::fs::metadata(u.reg.blob_data(digest)).unwrap().len()
}

/// The new image's layer digests the old one shares (the first ones: one
/// layer per store path, in store order) and those it does not.
fn shared_and_new_layers(u: &Upgrade) -> (Vec<String>, Vec<String>) {
    let layers = &u.new_manifest.layer_digests;
    let (shared, fresh) = layers.split_at(u.shared.len());
    (shared.to_vec(), fresh.to_vec())
}

/// An archive's regular files: name -> bytes.
fn tar_files(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut archive = tar::Archive::new(std::fs::File::open(path).unwrap());
    let mut out = BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let name = entry.path().unwrap().display().to_string();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        out.insert(name, data);
    }
    out
}

/// DIR passes `nix-store --verify --check-contents` and holds every store
/// path of both images, valid.
fn assert_holds_both(seed: &Path, u: &Upgrade) {
    let (ok, text) = nix::verify(seed);
    assert!(ok, "nix-store --verify --check-contents: {text}");
    for p in u.old_store.paths.iter().chain(&u.new_store.paths) {
        assert!(nix::is_valid(seed, p), "{p} is valid in the seed");
    }
}

#[test]
fn pull_have_state_carries_only_the_changed_layers_and_extract_merge_completes_the_seed() {
    let u = upgrade();
    let env = TestEnv::new();
    let state = far_side(&u, &env);
    let out = env.run(&[
        "pull",
        "--plain-http",
        &u.new.reference,
        "-o",
        "delta.tar",
        "--have",
        "far-state.json",
        "--json",
        "--no-cache",
    ]);
    assert_ok(&out);
    let summary = json(&out);
    let (shared, fresh) = shared_and_new_layers(&u);
    let new_bytes: u64 = fresh.iter().map(|d| blob_size(&u, d)).sum();
    assert_eq!(
        summary["bytes_downloaded"], new_bytes,
        "the layers left out are not even downloaded"
    );
    assert_eq!(summary["layers_omitted"], shared.len(), "{summary}");
    let omitted_bytes: u64 = shared.iter().map(|d| blob_size(&u, d)).sum();
    assert_eq!(summary["bytes_omitted"], omitted_bytes, "{summary}");
    let state_digest = sha256(&std::fs::read(&state).unwrap());
    assert_eq!(summary["partial_against"], state_digest.as_str());
    assert!(
        summary["extract_command"]
            .as_str()
            .unwrap()
            .contains("extract delta.tar --merge"),
        "{summary}"
    );

    // The archive holds the index, manifest, config and the new layers:
    // exactly their bytes, nothing of the shared ones.
    let files = tar_files(&env.join("delta.tar"));
    let blobs: BTreeMap<String, u64> = files
        .iter()
        .filter_map(|(name, data)| {
            let hex = name.strip_prefix("blobs/sha256/")?;
            Some((format!("sha256:{hex}"), data.len() as u64))
        })
        .collect();
    let config = u.new_manifest.config_digest.clone().unwrap();
    let mut want: Vec<String> = fresh.clone();
    want.extend([u.new.digest.clone(), u.new_manifest.digest.clone(), config]);
    want.sort();
    assert_eq!(
        blobs.keys().cloned().collect::<Vec<_>>(),
        want,
        "the archive's blobs are the new layers, the manifests and the config"
    );
    let small = (u.new.body.len() + u.new_manifest.body.len()) as u64
        + blob_size(&u, u.new_manifest.config_digest.as_ref().unwrap());
    assert_eq!(
        blobs.values().sum::<u64>(),
        new_bytes + small,
        "the archive's blob bytes are the new layers' plus manifests and config"
    );
    let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
    let notes = &index["annotations"];
    assert_eq!(notes["io.hydrafy.partial"], "true", "{index}");
    assert_eq!(notes["io.hydrafy.partial.against"], state_digest.as_str());
    assert_eq!(notes["io.hydrafy.partial.omitted"], shared.join(","));

    // DIR itself (a copy, or mounted) stands for its state file.
    let out = env.run(&[
        "pull",
        "--plain-http",
        &u.new.reference,
        "-o",
        "delta-dir.tar",
        "--have",
        "nix-backup",
        "--json",
    ]);
    assert_ok(&out);
    assert_eq!(json(&out)["partial_against"], state_digest.as_str());

    // The far side: the delta merged into the seed it was made against.
    let out = env.run(&["extract", "delta.tar", "--merge", "--json"]);
    assert_ok(&out);
    let summary = json(&out);
    let added: Vec<String> = serde_json::from_value(summary["merge"]["added"].clone()).unwrap();
    let mut want = u.new_only.clone();
    want.sort();
    assert_eq!(added, want, "exactly the new image's new paths were added");
    assert_holds_both(&env.join("nix-backup"), &u);
    // DIR now holds the new image: the delta again changes nothing.
    assert_no_op(&env.run(&["extract", "delta.tar", "--merge", "--json"]));
}

#[test]
fn pull_have_an_earlier_archive_leaves_out_the_layers_it_holds() {
    let u = upgrade();
    let env = TestEnv::new();
    // The first trip carried the whole old image; the far side extracted it.
    assert_ok(&env.run(&[
        "pull",
        "--plain-http",
        &u.old.reference,
        "-o",
        "old.tar",
        "-q",
    ]));
    assert_ok(&env.run(&["extract", "old.tar", "-q"]));
    let (shared, _) = shared_and_new_layers(&u);
    let status = Command::new("gzip")
        .args(["-k", "old.tar"])
        .current_dir(env.path())
        .status()
        .expect("run gzip");
    assert!(status.success());
    assert_ok(&env.run(&[
        "pull",
        "--plain-http",
        &u.old.reference,
        "-o",
        "old-layout",
        "-q",
    ]));
    // The earlier archive as a tar, compressed, or a layout directory.
    for (have, delta) in [
        ("old.tar", "delta.tar"),
        ("old.tar.gz", "delta-gz.tar"),
        ("old-layout", "delta-dir.tar"),
    ] {
        let out = env.run(&[
            "pull",
            "--plain-http",
            &u.new.reference,
            "-o",
            delta,
            "--have",
            have,
            "--json",
        ]);
        assert_ok(&out);
        let summary = json(&out);
        assert_eq!(summary["layers_omitted"], shared.len(), "{have}: {summary}");
        let files = tar_files(&env.join(delta));
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
        assert_eq!(
            index["annotations"]["io.hydrafy.partial.omitted"],
            shared.join(","),
            "{have}"
        );
        for d in &shared {
            let name = format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
            assert!(!files.contains_key(&name), "{have}: {d} is left out");
        }
    }
    let summary = json(&env.run(&[
        "pull",
        "--plain-http",
        &u.new.reference,
        "-o",
        "again.tar",
        "--have",
        "old.tar",
        "--json",
    ]));
    assert_eq!(
        summary["partial_against"],
        sha256(&std::fs::read(env.join("old.tar")).unwrap()).as_str(),
        "made against the earlier archive's sha256"
    );
    assert_ok(&env.run(&["extract", "delta.tar", "--merge", "-q"]));
    assert_holds_both(&env.join("nix-backup"), &u);
}

/// The old and new images of `u` with one more layer each, the same one:
/// a file outside the store, as an image's `/etc` layer has.
fn with_etc_layer(u: &Upgrade) -> (Pushed, Pushed, String) {
    let mut etc = Tar::new();
    etc.dir("etc", 0o755)
        .file("etc/os-release", b"ID=nixos\n", 0o644);
    let etc = layer(&etc.finish(), Comp::Gzip, Media::Docker);
    let image = |store: &nix::NixStore, tag: &str| {
        let mut layers: Vec<_> = nix::layers(store)
            .iter()
            .map(|t| layer(t, Comp::Gzip, Media::Docker))
            .collect();
        layers.insert(0, etc.clone());
        push(
            &u.reg.addr,
            "nixos/nix",
            Some(tag),
            &Image::new(Media::Docker, layers),
        )
    };
    (
        image(&u.old_store, "old-etc"),
        image(&u.new_store, "new-etc"),
        etc.digest.clone(),
    )
}

/// A blob the earlier archive holds is left out only when the far side
/// recorded it, which it does for layers of store paths only: a shared
/// `/etc` layer is carried, or the far side could not apply the delta.
#[test]
fn pull_have_an_earlier_archive_carries_a_shared_layer_that_is_not_only_store_paths() {
    let u = upgrade();
    let env = TestEnv::new();
    let (old, new, etc) = with_etc_layer(&u);
    assert_ok(&env.run(&[
        "pull",
        "--plain-http",
        &old.reference,
        "-o",
        "old.tar",
        "-q",
    ]));
    assert_ok(&env.run(&["extract", "old.tar", "-q"]));
    let out = env.run(&[
        "pull",
        "--plain-http",
        &new.reference,
        "-o",
        "delta.tar",
        "--have",
        "old.tar",
        "--json",
    ]);
    assert_ok(&out);
    assert_eq!(json(&out)["layers_omitted"], u.shared.len());
    let files = tar_files(&env.join("delta.tar"));
    let name = format!("blobs/sha256/{}", etc.trim_start_matches("sha256:"));
    assert!(
        files.contains_key(&name),
        "the shared /etc layer is carried"
    );
    assert_ok(&env.run(&["extract", "delta.tar", "--merge", "-q"]));
    assert_holds_both(&env.join("nix-backup"), &u);
}

#[test]
fn plain_extract_of_a_partial_archive_is_refused_and_changes_nothing() {
    let u = upgrade();
    let env = TestEnv::new();
    far_side(&u, &env);
    pull_delta(&u, &env);
    let seed = env.join("nix-backup");
    let before = seed_fingerprint(&seed);
    let out = env.run(&["extract", "delta.tar", "-o", "fresh"]);
    assert_fails(&out, 1, &["delta.tar", "partial archive", "--merge"]);
    let out = env.run(&["extract", "delta.tar", "--replace"]);
    assert_fails(&out, 1, &["delta.tar", "partial archive", "--merge"]);
    assert_eq!(seed_fingerprint(&seed), before, "the seed is unchanged");
    assert_only_inputs(env.path(), "no output and no staging folder");
    // --list says what the file is.
    let out = env.run(&["extract", "delta.tar", "--list"]);
    assert_ok(&out);
    assert!(
        stdout(&out).contains(&format!("leaves out {} layers", u.shared.len())),
        "{}",
        stdout(&out)
    );
    let listed = json(&env.run(&["extract", "delta.tar", "--list", "--json"]));
    let mut shared = shared_and_new_layers(&u).0;
    shared.sort();
    assert_eq!(listed["partial"]["omitted"], serde_json::json!(shared));
}

#[test]
fn extract_merge_of_a_delta_whose_omitted_layer_the_seed_lacks_names_it_and_changes_nothing() {
    let u = upgrade();
    let env = TestEnv::new();
    far_side(&u, &env);
    pull_delta(&u, &env);
    // Since the state was copied, the far side lost a shared path.
    let seed = env.join("nix-backup");
    let lost = u.shared.iter().position(|p| p.ends_with("-tools")).unwrap();
    let gone = store_path(&seed, &u.shared[lost]);
    nix::make_writable(&gone);
    std::fs::remove_dir_all(&gone).unwrap();
    let before = seed_fingerprint(&seed);
    let layer = &u.new_manifest.layer_digests[lost];
    let out = env.run(&["extract", "delta.tar", "--merge"]);
    assert_fails(&out, 1, &["delta.tar", layer, "left out", "nix-backup"]);
    assert_eq!(seed_fingerprint(&seed), before, "the seed is unchanged");

    // A seed the delta was not made against: an empty DIR.
    let out = env.run(&["extract", "delta.tar", "--merge", "-o", "other"]);
    assert_fails(
        &out,
        1,
        &["delta.tar", &u.new_manifest.layer_digests[0], "left out"],
    );
    assert_only_inputs(env.path(), "no DIR made and no staging folder left");
}

/// A new path stored as a hard link into a file of a path the seed holds
/// (as `nix-store --optimise` leaves an image) makes `--merge` unpack the
/// whole image, omitted layers too: the delta cannot do, and says why.
#[test]
fn extract_merge_of_a_delta_whose_new_path_hard_links_into_an_omitted_layer_names_it() {
    let u = upgrade();
    let env = TestEnv::new();
    far_side(&u, &env);
    let linked = u.push_linked();
    let out = env.run(&[
        "pull",
        "--plain-http",
        &linked.reference,
        "-o",
        "delta.tar",
        "--have",
        "far-state.json",
        "--json",
    ]);
    assert_ok(&out);
    assert_eq!(json(&out)["layers_omitted"], u.shared.len());
    let seed = env.join("nix-backup");
    let before = seed_fingerprint(&seed);
    let out = env.run(&["extract", "delta.tar", "--merge"]);
    assert_fails(
        &out,
        1,
        &[
            "delta.tar",
            &linked.layer_digests[0],
            "left out",
            "hard-links",
            "without --have",
        ],
    );
    assert_eq!(seed_fingerprint(&seed), before, "the seed is unchanged");
}

#[test]
fn pull_have_a_file_that_is_no_state_is_refused_in_one_line() {
    let u = upgrade();
    let env = TestEnv::new();
    std::fs::write(env.join("notes.txt"), "not a state file\n").unwrap();
    std::fs::write(env.join("other.json"), "{\"hello\": 1}\n").unwrap();
    let out = env.run(&[
        "pull",
        "--plain-http",
        &u.new.reference,
        "-o",
        "delta.tar",
        "--have",
        "notes.txt",
    ]);
    assert_fails(&out, 1, &["notes.txt", "neither a hydrafy state file"]);
    let out = env.run(&[
        "pull",
        "--plain-http",
        &u.new.reference,
        "-o",
        "delta.tar",
        "--have",
        "other.json",
    ]);
    assert_fails(&out, 1, &["other.json", "not a hydrafy state file"]);
    // A --rootfs DIR: --merge cannot complete it.
    assert_ok(&env.run(&[
        "fetch",
        "--plain-http",
        &u.old.reference,
        "--rootfs",
        "-o",
        "rootfs",
        "-q",
    ]));
    let out = env.run(&[
        "pull",
        "--plain-http",
        &u.new.reference,
        "-o",
        "delta.tar",
        "--have",
        "rootfs/.hydrafy-state.json",
    ]);
    assert_fails(
        &out,
        1,
        &["rootfs/.hydrafy-state.json", "--rootfs", "without --have"],
    );
    assert!(!env.join("delta.tar").exists());
}
