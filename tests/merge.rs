//! `fetch --merge` and `extract --merge`: upgrading a shared seed without
//! losing cached builds, checked with real `nix-store`.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::support::upgrade::{Upgrade, store_path, upgrade};
use crate::support::{
    TestEnv, assert_fails, assert_no_op, assert_ok, fingerprint, listing, nix, seed_fingerprint,
    stdout,
};

/// The merged `seed` passes `nix-store --verify --check-contents`, and the
/// new image's paths, the shared ones and the `cached` build are all valid.
fn assert_merged(seed: &Path, u: &Upgrade, cached: &str) {
    let (ok, text) = nix::verify(seed);
    assert!(
        ok,
        "nix-store --verify --check-contents after the merge: {text}"
    );
    for p in u
        .new_only
        .iter()
        .chain(&u.shared)
        .map(String::as_str)
        .chain([cached])
    {
        assert!(
            !nix::query(seed, &["--hash", p]).is_empty(),
            "{p} is valid in the merged store"
        );
    }
}

#[test]
fn merge_keeps_a_cached_build_and_adds_the_new_image_and_nix_store_agrees() {
    let u = upgrade();
    let env = TestEnv::new();
    assert_ok(&env.run(&["fetch", "--plain-http", &u.old.reference, "-q"]));
    let seed = env.join("nix-backup");
    // A job built something into the shared store: a real `nix-store --add`.
    std::fs::write(env.join("artifact"), "built once, used by every job\n").unwrap();
    let cached = nix::add(&seed, &env.join("artifact"));
    let shared_inode = std::fs::metadata(store_path(&seed, &u.shared[0]))
        .unwrap()
        .ino();

    // No cache: what the merge downloads shows which layers it needed.
    let out = env.run(&[
        "fetch",
        "--plain-http",
        &u.new.reference,
        "--merge",
        "--json",
        "--no-cache",
    ]);
    assert_ok(&out);
    let summary: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    // One layer per store path, the database last: the layers of the four
    // shared paths are skipped outright; only the new paths' and the db's come.
    let sizes: Vec<u64> = u
        .new_manifest
        .layer_digests
        .iter()
        .map(|d| std::fs::metadata(u.reg.blob_data(d)).unwrap().len())
        .collect();
    assert_eq!(sizes.len(), u.shared.len() + u.new_only.len() + 1);
    let needed: u64 = sizes[u.shared.len()..].iter().sum();
    assert_eq!(
        summary["bytes_downloaded"], needed,
        "layers of paths the seed has were not downloaded"
    );
    let added: Vec<String> = serde_json::from_value(summary["merge"]["added"].clone()).unwrap();
    let mut want = u.new_only.clone();
    want.sort();
    assert_eq!(added, want, "exactly the new image's new paths were added");
    assert_eq!(summary["merge"]["already_present"], u.shared.len());

    assert_merged(&seed, &u, &cached);
    // The old image's own path and the cached build are still there.
    assert!(!nix::query(&seed, &["--hash", &cached]).is_empty());
    assert_eq!(
        std::fs::metadata(store_path(&seed, &u.shared[0]))
            .unwrap()
            .ino(),
        shared_inode,
        "a path the seed already had was not written again"
    );
    // Nix can still add to the merged store.
    std::fs::write(env.join("artifact2"), "built after the upgrade\n").unwrap();
    nix::add(&seed, &env.join("artifact2"));
    assert!(nix::verify(&seed).0);
    // DIR now holds both images: fetching either again changes nothing.
    for img in [&u.old, &u.new] {
        let again = env.run(&["fetch", "--plain-http", &img.reference, "--merge", "--json"]);
        assert_no_op(&again);
    }
    let left: Vec<String> = listing(env.path())
        .into_iter()
        .filter(|n| !n.ends_with(".nix-home"))
        .collect();
    assert_eq!(
        left,
        [
            "artifact",
            "artifact2",
            "cache",
            "docker",
            "home",
            "nix-backup"
        ],
        "no staging folder left"
    );
}

#[test]
fn a_new_path_hard_linked_into_a_path_the_seed_has_is_merged_from_a_full_unpack() {
    let u = upgrade();
    let env = TestEnv::new();
    assert_ok(&env.run(&["fetch", "--plain-http", &u.old.reference, "-q"]));
    let seed = env.join("nix-backup");
    // The new image as an optimised store has it: the new path's empty file
    // is a hard link to the (identical) one in `base`, which the seed holds
    // and a merge would skip.
    let linked = u.push_linked();

    let out = env.run(&[
        "fetch",
        "--plain-http",
        &linked.reference,
        "--merge",
        "--json",
    ]);
    assert_ok(&out);
    assert!(
        crate::support::stderr(&out)
            .contains("hard-links into one the seed already has; unpacking the whole image"),
        "{}",
        crate::support::stderr(&out)
    );
    let summary: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let added: Vec<String> = serde_json::from_value(summary["merge"]["added"].clone()).unwrap();
    let mut want = u.new_only.clone();
    want.sort();
    assert_eq!(added, want);
    let (ok, text) = nix::verify(&seed);
    assert!(
        ok,
        "nix-store --verify --check-contents after the merge: {text}"
    );

    // The same from an archive, offline.
    assert_ok(&env.run(&[
        "pull",
        "--plain-http",
        &linked.reference,
        "-o",
        "linked.tar",
        "-q",
    ]));
    assert_ok(&env.run(&[
        "fetch",
        "--plain-http",
        &u.old.reference,
        "-o",
        "seed2",
        "-q",
    ]));
    let out = env.run(&["extract", "linked.tar", "-o", "seed2", "--merge"]);
    assert_ok(&out);
    assert!(
        crate::support::stderr(&out).contains("unpacking the whole image"),
        "{}",
        crate::support::stderr(&out)
    );
    let (ok, text) = nix::verify(&env.join("seed2"));
    assert!(
        ok,
        "nix-store --verify --check-contents after extract --merge: {text}"
    );
}

#[test]
fn extract_merge_adds_an_archived_image_offline() {
    let u = upgrade();
    let env = TestEnv::new();
    assert_ok(&env.run(&["fetch", "--plain-http", &u.old.reference, "-q"]));
    assert_ok(&env.run(&[
        "pull",
        "--plain-http",
        &u.new.reference,
        "-o",
        "new.tar",
        "-q",
    ]));
    let out = env.run(&["extract", "new.tar", "--merge", "-q"]);
    assert_ok(&out);
    let seed = env.join("nix-backup");
    assert!(nix::verify(&seed).0);
    for p in &u.new_only {
        assert!(store_path(&seed, p).exists(), "{p} was added");
    }
}

#[test]
fn merge_adopts_a_seed_made_by_the_docker_cp_recipe_and_keeps_its_cached_builds() {
    let u = upgrade();
    let env = TestEnv::new();
    // The old recipe: `docker run` the image and `cp -r` its /nix out. The
    // store the image was made from is that /nix: a real Nix store and
    // database, with no hydrafy state file.
    let seed = env.join("nix-backup");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(u.old_store.root.join("nix"))
        .arg(&seed)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::write(
        env.join("artifact"),
        "built by a job under the old recipe\n",
    )
    .unwrap();
    let cached = nix::add(&seed, &env.join("artifact"));
    assert!(nix::verify(&seed).0);

    let out = env.run(&["fetch", "--plain-http", &u.new.reference, "--merge"]);
    assert_ok(&out);
    assert!(
        crate::support::stderr(&out).contains("was not written by hydrafy; merging"),
        "{}",
        crate::support::stderr(&out)
    );
    assert_merged(&seed, &u, &cached);
    // hydrafy now knows the seed: the same merge again is a no-op.
    let again = env.run(&[
        "fetch",
        "--plain-http",
        &u.new.reference,
        "--merge",
        "--json",
    ]);
    assert_no_op(&again);
}

#[test]
fn merge_refuses_what_it_cannot_merge_and_changes_nothing() {
    let u = upgrade();
    let env = TestEnv::new();
    // Into a directory of foreign files: nothing to merge into.
    std::fs::create_dir_all(env.join("foreign/nix/store/zzzz-copied")).unwrap();
    let before = fingerprint(&env.join("foreign"));
    let out = env.run(&[
        "fetch",
        "--plain-http",
        &u.new.reference,
        "--merge",
        "-o",
        "foreign",
    ]);
    assert_fails(
        &out,
        1,
        &[
            "foreign",
            "did not write",
            "nix/var/nix/db/db.sqlite",
            "--replace",
        ],
    );
    assert_eq!(fingerprint(&env.join("foreign")), before);
    // With --rootfs: a usage error before any work.
    let out = env.run(&[
        "fetch",
        "--plain-http",
        &u.new.reference,
        "--merge",
        "--rootfs",
    ]);
    assert_fails(&out, 2, &["--merge", "--rootfs"]);
    // A seed whose database disagrees with the image about a shared path.
    assert_ok(&env.run(&["fetch", "--plain-http", &u.old.reference, "-q"]));
    let seed = env.join("nix-backup");
    let db = seed.join("nix/var/nix/db/db.sqlite");
    let sql = format!(
        "update ValidPaths set hash = 'sha256:{}' where path = '{}';",
        "0".repeat(64),
        u.shared[0]
    );
    let status = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg(&sql)
        .status()
        .expect("run sqlite3 (apt-get install sqlite3)");
    assert!(status.success());
    let before = seed_fingerprint(&seed);
    let out = env.run(&["fetch", "--plain-http", &u.new.reference, "--merge"]);
    assert_fails(&out, 1, &[&u.shared[0]]);
    assert_eq!(
        seed_fingerprint(&seed),
        before,
        "a refused merge changes nothing"
    );
    assert_eq!(
        listing(env.path()),
        ["cache", "docker", "foreign", "home", "nix-backup"],
        "no staging folder left"
    );
    drop(u.reg);
}

/// `seed` is exactly what a fresh fetch of the same image made in `fresh`:
/// the same entries, the same `nix` tree (store and database, byte for byte,
/// with modes and times, but for the database folder's mtime, which reading
/// a WAL database moves) and the same state file (but for when each image
/// was recorded).
fn assert_same_seed(seed: &Path, fresh: &Path) {
    assert_eq!(listing(seed), listing(fresh), "top-level entries");
    assert_eq!(
        seed_fingerprint(seed)
            .into_iter()
            .filter(|(p, _)| p.starts_with("nix"))
            .collect::<Vec<_>>(),
        seed_fingerprint(fresh)
            .into_iter()
            .filter(|(p, _)| p.starts_with("nix"))
            .collect::<Vec<_>>(),
        "the store and database are exactly the image's"
    );
    let state = |dir: &Path| {
        let text = std::fs::read_to_string(dir.join(".hydrafy-state.json")).unwrap();
        let mut state: serde_json::Value = serde_json::from_str(&text).unwrap();
        for image in state["images"].as_array_mut().expect("images") {
            image.as_object_mut().unwrap().remove("recorded_at");
        }
        state
    };
    assert_eq!(
        state(seed),
        state(fresh),
        "the state file names only the image"
    );
}

/// The bug: after `--merge` of B into a seed of A, `--replace B` said "already
/// holds ...; nothing to do" and left A's paths and the cached builds.
#[test]
fn replace_after_merge_is_not_a_no_op_and_leaves_exactly_the_image() {
    let u = upgrade();
    let env = TestEnv::new();
    assert_ok(&env.run(&["fetch", "--plain-http", &u.old.reference, "-q"]));
    let seed = env.join("nix-backup");
    std::fs::write(env.join("artifact"), "a cached build\n").unwrap();
    let cached = nix::add(&seed, &env.join("artifact"));
    assert_ok(&env.run(&["fetch", "--plain-http", &u.new.reference, "--merge", "-q"]));

    let out = env.run(&[
        "fetch",
        "--plain-http",
        &u.new.reference,
        "--replace",
        "--json",
    ]);
    assert_ok(&out);
    assert!(
        !crate::support::stderr(&out).contains("nothing to do"),
        "{}",
        crate::support::stderr(&out)
    );
    let summary: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(summary["unchanged"], false, "{summary}");
    for p in u
        .old_store
        .paths
        .iter()
        .filter(|p| !u.shared.contains(p))
        .chain([&cached])
    {
        assert!(
            !store_path(&seed, p).exists(),
            "{p} is gone after --replace"
        );
    }
    assert_ok(&env.run(&[
        "fetch",
        "--plain-http",
        &u.new.reference,
        "-o",
        "fresh",
        "-q",
    ]));
    assert_same_seed(&seed, &env.join("fresh"));
    let (ok, text) = nix::verify(&seed);
    assert!(
        ok,
        "nix-store --verify --check-contents after --replace: {text}"
    );

    // Now DIR holds exactly that one image: replacing it again is a no-op.
    let again = env.run(&[
        "fetch",
        "--plain-http",
        &u.new.reference,
        "--replace",
        "--json",
    ]);
    assert_no_op(&again);
}

/// The same bug through `extract`, on a seed the docker-cp recipe made: the
/// merge adopts it, so it holds more than the image and `--replace` must swap.
#[test]
fn extract_replace_after_merge_into_an_adopted_seed_is_not_a_no_op() {
    let u = upgrade();
    let env = TestEnv::new();
    assert_ok(&env.run(&[
        "pull",
        "--plain-http",
        &u.new.reference,
        "-o",
        "new.tar",
        "-q",
    ]));
    // The docker-cp recipe: the image's /nix copied to nix-backup/nix.
    let seed = env.join("nix-backup");
    std::fs::create_dir(&seed).unwrap();
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(u.old_store.root.join("nix"))
        .arg(seed.join("nix"))
        .status()
        .unwrap();
    assert!(status.success());
    assert!(store_path(&seed, &u.old_store.paths[0]).exists());
    assert_ok(&env.run(&["extract", "new.tar", "--merge", "-q"]));

    let out = env.run(&["extract", "new.tar", "--replace", "--json"]);
    assert_ok(&out);
    let summary: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(summary["unchanged"], false, "{summary}");
    for p in u.old_store.paths.iter().filter(|p| !u.shared.contains(p)) {
        assert!(
            !store_path(&seed, p).exists(),
            "{p} is gone after --replace"
        );
    }
    assert_ok(&env.run(&["extract", "new.tar", "-o", "fresh", "-q"]));
    assert_same_seed(&seed, &env.join("fresh"));
    let (ok, text) = nix::verify(&seed);
    assert!(
        ok,
        "nix-store --verify --check-contents after --replace: {text}"
    );

    let again = env.run(&["extract", "new.tar", "--replace", "--json"]);
    assert_no_op(&again);
}
