//! `hydrafy fetch` against a real distribution registry: the layer semantics,
//! the output contract, and every bad input leaving DIR untouched.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use crate::support::image::{
    Comp, Image, Media, Pushed, Tar, layer, push, push_index, push_manifest, sha256,
};
use crate::support::proxy::{Action, Proxy};
use crate::support::registry::Registry;
use crate::support::{
    TestEnv, assert_fails, assert_ok, catches, fingerprint, json, listing, nix, stderr, wait_until,
};

/// A minimal Nix-shaped image: one store path and a database file.
fn seed_image(reg: &Registry, repo: &str, tag: &str, marker: &str) -> Pushed {
    let mut t = Tar::new();
    t.dir("/nix", 0o755).dir("/nix/store", 0o755);
    t.dir(&format!("/nix/store/{marker}-pkg"), 0o555);
    t.file(
        &format!("/nix/store/{marker}-pkg/data"),
        marker.as_bytes(),
        0o444,
    );
    t.dir("nix/var", 0o755)
        .dir("nix/var/nix", 0o755)
        .dir("nix/var/nix/db", 0o755);
    t.file(
        "nix/var/nix/db/db.sqlite",
        format!("db of {marker}").as_bytes(),
        0o644,
    );
    push(
        reg.addr.as_str(),
        repo,
        Some(tag),
        &Image::new(
            Media::Docker,
            vec![layer(&t.finish(), Comp::Gzip, Media::Docker)],
        ),
    )
}

/// DIR holds image A; `run` must fail and leave DIR and its parent exactly as they were.
fn assert_untouched(env: &TestEnv, reg: &Registry, run: impl FnOnce() -> Output) -> Output {
    let a = seed_image(reg, "keep/me", "a", "aaaa");
    assert_ok(&env.run(&["fetch", "--plain-http", &a.reference, "-q", "-o", "out/dir"]));
    let before_dir = fingerprint(&env.join("out/dir"));
    let before_parent = listing(&env.join("out"));
    let out = run();
    assert!(
        !out.status.success(),
        "the run should fail: {}",
        stderr(&out)
    );
    assert_eq!(fingerprint(&env.join("out/dir")), before_dir, "DIR changed");
    assert_eq!(
        listing(&env.join("out")),
        before_parent,
        "something was left beside DIR"
    );
    out
}

#[test]
fn kitchen_sink_layers_apply_per_the_oci_image_spec() {
    let reg = Registry::start();
    // Layer 1 (Docker gzip): the base.
    let mut l1 = Tar::new();
    l1.dir("etc", 0o755)
        .file("etc/passwd", b"root:x:0:0\n", 0o644);
    l1.dir("opaque", 0o755)
        .file("opaque/lower-a", b"a", 0o644)
        .file("opaque/lower-b", b"b", 0o644);
    l1.file("becomes-dir", b"file", 0o644);
    l1.dir("becomes-file", 0o755)
        .file("becomes-file/child", b"c", 0o644);
    l1.file("gone", b"x", 0o644)
        .dir("gone-dir", 0o755)
        .file("gone-dir/x", b"x", 0o644);
    l1.file("lower-target", b"shared inode", 0o640);
    l1.dir("ro", 0o555).file("ro/f", b"read-only dir", 0o444);
    l1.dir("var", 0o755)
        .dir("run", 0o755)
        .symlink("var/run", "/run");
    // Layer 2 (OCI zstd): changes on top.
    let mut l2 = Tar::new();
    l2.whiteout("gone").whiteout("gone-dir");
    l2.dir("opaque", 0o755)
        .opaque("opaque")
        .file("opaque/upper", b"u", 0o644);
    l2.dir("becomes-dir", 0o750)
        .file("becomes-dir/inner", b"i", 0o644);
    l2.file("becomes-file", b"now a file", 0o600);
    l2.file("same-layer", b"kept", 0o644).whiteout("same-layer");
    l2.hardlink("link-to-lower", "lower-target");
    l2.file("ro/g", b"written into a 0555 dir", 0o444);
    l2.file("var/run/pid", b"42", 0o644);
    l2.whiteout("never-existed");
    // Layer 3 (plain tar, absolute names and a symlink never followed when writing).
    let mut l3 = Tar::new();
    l3.dir("/nix", 0o755)
        .dir("/nix/store", 0o755)
        .dir("/nix/store/aaaa-hello", 0o555);
    l3.file("/nix/store/aaaa-hello/hello", b"#!/bin/sh\n", 0o555);
    l3.symlink("/nix/store/aaaa-hello/self", "/nix/store/aaaa-hello/hello");
    l3.file("etc/passwd", b"root:x:0:0:replaced\n", 0o644);
    let image = Image::new(
        Media::Oci,
        vec![
            layer(&l1.finish(), Comp::Gzip, Media::Docker),
            layer(&l2.finish(), Comp::Zstd, Media::Oci),
            layer(&l3.finish(), Comp::None, Media::Oci),
        ],
    );
    let img = push(&reg.addr, "sink", Some("v1"), &image);
    let env = TestEnv::new();
    assert_ok(&env.run(&[
        "fetch",
        "--plain-http",
        "--rootfs",
        &img.reference,
        "-q",
        "-o",
        "root",
    ]));
    let r = |p: &str| env.join("root").join(p);
    let read = |p: &str| std::fs::read_to_string(r(p)).unwrap();
    let mode = |p: &str| std::fs::symlink_metadata(r(p)).unwrap().mode() & 0o7777;

    assert!(
        !r("gone").exists() && !r("gone-dir").exists(),
        "whiteouts remove lower entries"
    );
    assert_eq!(
        listing(&r("opaque")),
        ["upper"],
        "opaque keeps only this layer's children"
    );
    assert_eq!(read("becomes-dir/inner"), "i");
    assert_eq!(mode("becomes-dir"), 0o750);
    assert_eq!(read("becomes-file"), "now a file");
    assert_eq!(
        read("same-layer"),
        "kept",
        "a file and its whiteout in one layer keep the file"
    );
    assert_eq!(read("link-to-lower"), "shared inode");
    assert_eq!(
        std::fs::metadata(r("link-to-lower")).unwrap().ino(),
        std::fs::metadata(r("lower-target")).unwrap().ino(),
        "a hardlink to a lower layer's file shares its inode"
    );
    assert_eq!(
        mode("ro"),
        0o555,
        "read-only directories keep their mode after being written into"
    );
    assert_eq!(read("ro/g"), "written into a 0555 dir");
    assert_eq!(
        read("run/pid"),
        "42",
        "an absolute symlink resolves inside the root"
    );
    assert_eq!(std::fs::read_link(r("var/run")).unwrap(), Path::new("/run"));
    assert!(!r("never-existed").exists());
    assert_eq!(read("nix/store/aaaa-hello/hello"), "#!/bin/sh\n");
    assert_eq!(mode("nix/store/aaaa-hello/hello"), 0o555);
    assert_eq!(mode("nix/store/aaaa-hello"), 0o555);
    assert_eq!(
        std::fs::read_link(r("nix/store/aaaa-hello/self")).unwrap(),
        Path::new("/nix/store/aaaa-hello/hello")
    );
    assert_eq!(
        read("etc/passwd"),
        "root:x:0:0:replaced\n",
        "a later layer replaces a file"
    );
    for p in [
        "nix/store/aaaa-hello/hello",
        "nix/store/aaaa-hello",
        "etc/passwd",
        "ro",
    ] {
        assert_eq!(
            std::fs::symlink_metadata(r(p)).unwrap().mtime(),
            1,
            "{p} keeps mtime 1"
        );
    }
    assert_eq!(
        std::fs::symlink_metadata(r("nix/store/aaaa-hello/self"))
            .unwrap()
            .mtime(),
        1
    );
}

#[test]
fn a_seed_whose_layers_interfere_is_applied_again_in_order_saying_why() {
    // Layer 2 removes layer 0's store path: applied side by side, the
    // whiteout could run before the path exists, so the lanes stop and the
    // layers are applied again in order.
    let reg = Registry::start();
    let store_path = |t: &mut Tar, name: &str| {
        t.dir(&format!("nix/store/{name}"), 0o555);
        t.file(&format!("nix/store/{name}/data"), name.as_bytes(), 0o444);
    };
    let mut l0 = Tar::new();
    l0.dir("nix", 0o755).dir("nix/store", 0o755);
    store_path(&mut l0, "aaaa-pkg");
    let mut l1 = Tar::new();
    store_path(&mut l1, "bbbb-pkg");
    let mut l2 = Tar::new();
    l2.whiteout("nix/store/aaaa-pkg");
    store_path(&mut l2, "cccc-pkg");
    let mut l3 = Tar::new();
    l3.dir("nix/var", 0o755)
        .dir("nix/var/nix", 0o755)
        .dir("nix/var/nix/db", 0o755)
        .file("nix/var/nix/db/db.sqlite", b"db", 0o644);
    let layers = [l0, l1, l2, l3].map(|t| layer(&t.finish(), Comp::Gzip, Media::Docker));
    let img = push(
        &reg.addr,
        "nixos/nix",
        Some("v1"),
        &Image::new(Media::Docker, layers.to_vec()),
    );
    let env = TestEnv::new();
    let out = env.run(&["fetch", "--plain-http", &img.reference]);
    assert_ok(&out);
    assert_eq!(
        listing(&env.join("nix-backup/nix/store")),
        ["bbbb-pkg", "cccc-pkg"]
    );
    let said = stderr(&out);
    let why = format!(
        "applying the layers again, in order: layer {}: entry \"nix/store/.wh.aaaa-pkg\" is a whiteout",
        img.layer_digests[2]
    );
    let lanes = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(
        said.contains(&why),
        lanes > 1,
        "{lanes} cores, stderr:\n{said}"
    );
}

#[test]
fn default_output_is_only_the_store_and_database_the_runners_mount() {
    let reg = Registry::start();
    let img = seed_image(&reg, "nixos/nix", "v1", "bbbb");
    let env = TestEnv::new();
    let out = env.run(&["fetch", "--plain-http", &img.reference, "--json"]);
    assert_ok(&out);
    assert_eq!(
        listing(&env.join("nix-backup")),
        [".hydrafy-state.json", "nix"]
    );
    assert_eq!(listing(&env.join("nix-backup/nix")), ["store", "var"]);
    assert_eq!(listing(&env.join("nix-backup/nix/var/nix")), ["db"]);
    let pkg = env.join("nix-backup/nix/store/bbbb-pkg");
    assert_eq!(std::fs::metadata(&pkg).unwrap().mode() & 0o7777, 0o555);
    assert_eq!(std::fs::metadata(pkg.join("data")).unwrap().mtime(), 1);
    // Regression: the seed's parents took the time of the run, so two fetches of one image differed.
    for dir in ["nix", "nix/var", "nix/var/nix"] {
        assert_eq!(
            std::fs::metadata(env.join("nix-backup").join(dir))
                .unwrap()
                .mtime(),
            1,
            "{dir} keeps the image's mtime"
        );
    }
    let summary = json(&out);
    for field in [
        "image",
        "digest",
        "platform",
        "layers",
        "bytes_downloaded",
        "bytes_written",
        "seconds",
        "output",
    ] {
        assert!(
            summary.get(field).is_some(),
            "--json lacks {field}: {summary}"
        );
    }
    assert_eq!(summary["digest"], img.digest.as_str());
    assert_eq!(summary["layers"], 1);
    assert_eq!(summary["unchanged"], false);
    assert_eq!(
        listing(env.path()),
        ["cache", "docker", "home", "nix-backup"],
        "no staging folder left"
    );
}

#[test]
fn second_fetch_of_the_same_digest_does_nothing_and_needs_no_network() {
    let reg = Registry::start();
    let img = seed_image(&reg, "nixos/nix", "v1", "cccc");
    // Both runs go through a proxy that logs every request; for the second
    // it drops each connection unanswered, as a network that is down would.
    let offline = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let proxy = {
        let offline = offline.clone();
        Proxy::start("127.0.0.1", &reg.addr, move |_| {
            if offline.load(std::sync::atomic::Ordering::SeqCst) {
                Action::Drop
            } else {
                Action::Pass
            }
        })
    };
    let reference = img.reference.replace(&reg.addr, &proxy.addr);
    let env = TestEnv::new();
    assert_ok(&env.run(&["fetch", "--plain-http", &reference, "-q"]));
    let before = fingerprint(&env.join("nix-backup"));
    let first_run = proxy.seen_settled().len();
    offline.store(true, std::sync::atomic::Ordering::SeqCst);
    drop(reg); // the registry is gone: a second run must not need it
    let out = env.run(&["fetch", "--plain-http", &reference, "--json"]);
    assert_ok(&out);
    let summary = json(&out);
    assert_eq!(summary["unchanged"], true);
    assert_eq!(summary["bytes_downloaded"], 0);
    // Not one request, so no retry or backoff either.
    let asked: Vec<String> = proxy.seen_settled()[first_run..]
        .iter()
        .map(|s| format!("{} {}", s.request.method, s.request.path))
        .collect();
    assert!(asked.is_empty(), "the second run asked {asked:?}");
    assert_eq!(fingerprint(&env.join("nix-backup")), before);
}

#[test]
fn a_new_dir_reuses_verified_cached_blobs() {
    let reg = Registry::start();
    let img = seed_image(&reg, "nixos/nix", "v1", "dddd");
    let env = TestEnv::new();
    let first = env.run(&[
        "fetch",
        "--plain-http",
        &img.reference,
        "--json",
        "-o",
        "one",
    ]);
    assert_ok(&first);
    assert!(json(&first)["bytes_downloaded"].as_u64().unwrap() > 0);
    let second = env.run(&[
        "fetch",
        "--plain-http",
        &img.reference,
        "--json",
        "-o",
        "two",
    ]);
    assert_ok(&second);
    assert_eq!(
        json(&second)["bytes_downloaded"],
        0,
        "every blob came from the cache"
    );
    for tree in ["nix/store", "nix/var/nix/db"] {
        assert_eq!(
            fingerprint(&env.join("one").join(tree)),
            fingerprint(&env.join("two").join(tree))
        );
    }
    // --no-cache neither reads nor fills the cache.
    let third = env.run(&[
        "fetch",
        "--plain-http",
        &img.reference,
        "--json",
        "--no-cache",
        "-o",
        "three",
    ]);
    assert_ok(&third);
    assert!(json(&third)["bytes_downloaded"].as_u64().unwrap() > 0);
}

#[test]
fn an_index_yields_the_requested_platform_or_the_hosts() {
    let reg = Registry::start();
    let make = |arch: &str| {
        let mut t = Tar::new();
        t.dir("/nix", 0o755).dir("/nix/store", 0o755).file(
            "/nix/store/arch",
            arch.as_bytes(),
            0o444,
        );
        t.dir("/nix/var", 0o755)
            .dir("/nix/var/nix", 0o755)
            .dir("/nix/var/nix/db", 0o755);
        let mut image = Image::new(Media::Oci, vec![layer(&t.finish(), Comp::Gzip, Media::Oci)]);
        image.arch = arch.to_string();
        push(&reg.addr, "multi", None, &image)
    };
    let (amd, arm) = (make("amd64"), make("arm64"));
    for media in [Media::Docker, Media::Oci] {
        let index = push_index(&reg.addr, "multi", Some("latest"), media, &[&amd, &arm]);
        let env = TestEnv::new();
        let out = env.run(&[
            "fetch",
            "--plain-http",
            &index.reference,
            "--platform",
            "linux/arm64",
            "--json",
            "-o",
            "arm",
        ]);
        assert_ok(&out);
        assert_eq!(
            std::fs::read_to_string(env.join("arm/nix/store/arch")).unwrap(),
            "arm64"
        );
        assert_eq!(json(&out)["manifest_digest"], arm.digest.as_str());
        assert_eq!(json(&out)["index_digest"], index.digest.as_str());
        let out = env.run(&[
            "fetch",
            "--plain-http",
            &index.reference,
            "-q",
            "-o",
            "host",
        ]);
        assert_ok(&out);
        assert_eq!(
            std::fs::read_to_string(env.join("host/nix/store/arch")).unwrap(),
            "amd64"
        );
    }
}

#[test]
fn a_tag_alone_works_but_warns_with_the_digest_to_pin() {
    let reg = Registry::start();
    let img = seed_image(&reg, "nixos/nix", "2.24", "eeee");
    let env = TestEnv::new();
    let out = env.run(&[
        "fetch",
        "--plain-http",
        &format!("{}/nixos/nix:2.24", reg.addr),
        "-q",
    ]);
    assert_ok(&out);
    let err = stderr(&out);
    assert!(err.contains("is not pinned"), "{err}");
    assert!(
        err.contains(&format!("{}/nixos/nix:2.24@{}", reg.addr, img.digest)),
        "{err}"
    );
}

#[test]
fn a_dir_holding_another_image_is_refused_unless_replace() {
    let reg = Registry::start();
    let b = seed_image(&reg, "nixos/nix", "b", "bbbb");
    let env = TestEnv::new();
    let out = assert_untouched(&env, &reg, || {
        env.run(&["fetch", "--plain-http", &b.reference, "-o", "out/dir"])
    });
    assert_fails(
        &out,
        1,
        &[
            "out/dir",
            "already holds",
            "keep/me",
            "--replace",
            "--merge",
        ],
    );
    let out = env.run(&[
        "fetch",
        "--plain-http",
        &b.reference,
        "-q",
        "-o",
        "out/dir",
        "--replace",
    ]);
    assert_ok(&out);
    assert!(env.join("out/dir/nix/store/bbbb-pkg/data").exists());
    assert!(
        !env.join("out/dir/nix/store/aaaa-pkg").exists(),
        "--replace leaves exactly the new image"
    );
    assert_eq!(listing(&env.join("out")), ["dir"]);
}

#[test]
fn a_dir_of_foreign_files_is_refused_unless_replace() {
    let reg = Registry::start();
    let img = seed_image(&reg, "nixos/nix", "v1", "ffff");
    let env = TestEnv::new();
    std::fs::create_dir_all(env.join("old/nix/store/zzzz-copied-by-docker-cp")).unwrap();
    let before = fingerprint(&env.join("old"));
    let out = env.run(&["fetch", "--plain-http", &img.reference, "-o", "old"]);
    assert_fails(
        &out,
        1,
        &["old", "files hydrafy did not write", "--replace"],
    );
    assert_eq!(fingerprint(&env.join("old")), before);
}

#[test]
fn a_tampered_manifest_is_refused() {
    let reg = Registry::start();
    let env = TestEnv::new();
    let bad = seed_image(&reg, "nixos/nix", "bad", "9999");
    let stored = reg.blob_data(&bad.digest);
    let mut body = std::fs::read(&stored).unwrap();
    let at = body.windows(6).position(|w| w == b"layers").unwrap();
    body[at] = b'L'; // same length, different bytes
    std::fs::write(&stored, body).unwrap();
    let out = assert_untouched(&env, &reg, || {
        env.run(&[
            "fetch",
            "--plain-http",
            &bad.reference,
            "-o",
            "out/dir",
            "--replace",
        ])
    });
    assert_fails(&out, 1, &["manifest", &bad.digest, "content hashes to"]);
}

#[test]
fn a_tampered_layer_blob_is_refused() {
    let reg = Registry::start();
    let env = TestEnv::new();
    let bad = seed_image(&reg, "nixos/nix", "bad", "8888");
    let stored = reg.blob_data(&bad.layer_digests[0]);
    let mut blob = std::fs::read(&stored).unwrap();
    let n = blob.len();
    blob[n - 9] ^= 0x55; // inside the gzip trailer: still the same size
    std::fs::write(&stored, blob).unwrap();
    let out = assert_untouched(&env, &reg, || {
        env.run(&[
            "fetch",
            "--plain-http",
            &bad.reference,
            "-o",
            "out/dir",
            "--replace",
        ])
    });
    assert_fails(
        &out,
        1,
        &["blob", &bad.layer_digests[0], "content hashes to"],
    );
}

#[test]
fn a_blob_of_the_wrong_size_is_refused() {
    let reg = Registry::start();
    let env = TestEnv::new();
    let mut t = Tar::new();
    t.file("x", b"x", 0o644);
    let l = layer(&t.finish(), Comp::Gzip, Media::Oci);
    let image = Image::new(Media::Oci, vec![l.clone()]);
    let ok = push(&reg.addr, "sized", None, &image);
    // The same image, but the manifest says the layer is one byte longer.
    let body = String::from_utf8(ok.body.clone()).unwrap().replace(
        &format!("\"size\":{}", l.bytes.len()),
        &format!("\"size\":{}", l.bytes.len() + 1),
    );
    let digest = push_manifest(
        &reg.addr,
        "sized",
        None,
        body.as_bytes(),
        "application/vnd.oci.image.manifest.v1+json",
    );
    let reference = format!("{}/sized@{digest}", reg.addr);
    let out = assert_untouched(&env, &reg, || {
        env.run(&[
            "fetch",
            "--plain-http",
            &reference,
            "-o",
            "out/dir",
            "--replace",
            "--rootfs",
        ])
    });
    assert_fails(&out, 1, &["blob", &l.digest, "expected", "bytes"]);
}

#[test]
fn a_layer_that_does_not_match_its_diff_id_is_refused() {
    let reg = Registry::start();
    let env = TestEnv::new();
    let mut t = Tar::new();
    t.file("x", b"x", 0o644);
    let mut image = Image::new(
        Media::Docker,
        vec![layer(&t.finish(), Comp::Gzip, Media::Docker)],
    );
    let wrong = sha256(b"something else");
    image.diff_ids = Some(vec![wrong.clone()]);
    let img = push(&reg.addr, "diffid", None, &image);
    let out = assert_untouched(&env, &reg, || {
        env.run(&[
            "fetch",
            "--plain-http",
            &img.reference,
            "-o",
            "out/dir",
            "--replace",
            "--rootfs",
        ])
    });
    assert_fails(
        &out,
        1,
        &["layer", &img.layer_digests[0], "diff_ids[0]", &wrong],
    );
}

#[test]
fn a_layer_count_that_disagrees_with_diff_ids_is_refused() {
    let reg = Registry::start();
    let env = TestEnv::new();
    let mut t = Tar::new();
    t.file("x", b"x", 0o644);
    let mut image = Image::new(
        Media::Docker,
        vec![layer(&t.finish(), Comp::Gzip, Media::Docker)],
    );
    image.diff_ids = Some(vec![sha256(b"a"), sha256(b"b")]);
    let img = push(&reg.addr, "count", None, &image);
    let out = assert_untouched(&env, &reg, || {
        env.run(&[
            "fetch",
            "--plain-http",
            &img.reference,
            "-o",
            "out/dir",
            "--replace",
        ])
    });
    assert_fails(&out, 1, &["1 layers", "diff_ids has 2"]);
}

#[test]
fn a_platform_the_index_lacks_is_refused_with_what_it_offers() {
    let reg = Registry::start();
    let env = TestEnv::new();
    let one = seed_image(&reg, "plat", "one", "1111");
    let index = push_index(&reg.addr, "plat", Some("latest"), Media::Oci, &[&one]);
    let out = assert_untouched(&env, &reg, || {
        env.run(&[
            "fetch",
            "--plain-http",
            &index.reference,
            "--platform",
            "linux/s390x",
            "-o",
            "out/dir",
            "--replace",
        ])
    });
    assert_fails(
        &out,
        1,
        &[
            "no manifest for platform linux/s390x",
            "linux/amd64",
            "--platform",
        ],
    );
}

#[test]
fn an_unreachable_registry_is_a_clear_failure() {
    let reg = Registry::start();
    let env = TestEnv::new();
    let port = crate::support::registry::free_port();
    let reference = format!("127.0.0.1:{port}/nixos/nix@sha256:{}", "0".repeat(64));
    let out = assert_untouched(&env, &reg, || {
        env.run(&[
            "fetch",
            "--plain-http",
            &reference,
            "-o",
            "out/dir",
            "--replace",
        ])
    });
    assert_fails(
        &out,
        1,
        &[
            &format!("127.0.0.1:{port}/nixos/nix"),
            "cannot reach the registry",
        ],
    );
}

#[test]
fn an_unknown_digest_is_a_404_naming_it() {
    let reg = Registry::start();
    let env = TestEnv::new();
    let reference = format!("{}/nixos/nix@sha256:{}", reg.addr, "1".repeat(64));
    let out = assert_untouched(&env, &reg, || {
        env.run(&[
            "fetch",
            "--plain-http",
            &reference,
            "-o",
            "out/dir",
            "--replace",
        ])
    });
    assert_fails(
        &out,
        1,
        &["404", &"1".repeat(64), "check the tag or digest"],
    );
}

#[test]
fn a_401_explains_names_and_credentials() {
    // htpasswd with user hydrafy / password s3cret (bcrypt), and no credentials configured.
    let reg =
        Registry::start_with("auth:\n  htpasswd:\n    realm: test\n    path: {dir}/htpasswd\n");
    std::fs::write(
        reg.dir().join("htpasswd"),
        "hydrafy:$2b$12$TE1kcjnVB3qZ58lMChAZ/.vlVoNTjE/J52a8GbRQ3gmo2KIRV5Wgi\n",
    )
    .unwrap();
    let env = TestEnv::new();
    let reference = format!("{}/nixos/nix@sha256:{}", reg.addr, "2".repeat(64));
    let before = listing(env.path());
    let out = env.run(&["fetch", "--plain-http", &reference, "-o", "dir"]);
    assert_fails(
        &out,
        1,
        &["401", "not authorised", "library/NAME", "docker login"],
    );
    assert_eq!(listing(env.path()), before);
}

#[test]
fn malformed_references_fail_with_exit_2_before_any_network_use() {
    let env = TestEnv::new();
    for bad in [
        "nixos/nix@sha256:abc",
        "nixos/nix@sha256:../x",
        "Nixos/nix",
        "nixos/nix@md5:00",
    ] {
        let out = env.run(&["fetch", bad]);
        assert_fails(&out, 2, &["image reference", bad]);
    }
    let out = env.run(&["fetch", "nixos/nix", "--platform", "linux"]);
    assert_fails(&out, 2, &["platform", "OS/ARCH"]);
    assert_eq!(listing(env.path()), ["cache", "docker", "home"]);
}

#[test]
fn a_schema1_manifest_is_refused_with_what_to_do() {
    let reg = Registry::start();
    let schema1 =
        r#"{"schemaVersion":1,"name":"old/image","tag":"latest","fsLayers":[],"history":[]}"#;
    let proxy = Proxy::start("127.0.0.1", &reg.addr, move |r| {
        if r.is_manifest() {
            Action::Status(
                200,
                vec![(
                    "Content-Type".into(),
                    "application/vnd.docker.distribution.manifest.v1+prettyjws".into(),
                )],
                schema1.into(),
            )
        } else {
            Action::Pass
        }
    });
    let env = TestEnv::new();
    let out = env.run(&[
        "fetch",
        "--plain-http",
        &format!("{}/old/image:latest", proxy.addr),
    ]);
    assert_fails(&out, 1, &["schema 1", "re-push"]);
}

#[test]
fn ctrl_c_mid_download_exits_130_and_leaves_dir_as_it_was() {
    let reg = Registry::start();
    let env = TestEnv::new();
    let big = {
        let mut t = Tar::new();
        let noise: Vec<u8> = (0..4_000_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        t.file("noise", &noise, 0o644);
        push(
            &reg.addr,
            "big",
            Some("v1"),
            &Image::new(Media::Oci, vec![layer(&t.finish(), Comp::Gzip, Media::Oci)]),
        )
    };
    let proxy = Proxy::start("127.0.0.1", &reg.addr, |r| {
        if r.is_blob() {
            Action::StallAfter(100_000)
        } else {
            Action::Pass
        }
    });
    let reference = big.reference.replace(&reg.addr, &proxy.addr);
    let a = seed_image(&reg, "keep/me", "a", "aaaa");
    assert_ok(&env.run(&["fetch", "--plain-http", &a.reference, "-q", "-o", "out/dir"]));
    let before = fingerprint(&env.join("out/dir"));
    let layer = big.layer_digests[0].clone();
    let signals = [rustix::process::Signal::INT, rustix::process::Signal::TERM];
    for (round, signal) in signals.into_iter().enumerate() {
        let mut child = env
            .hydrafy()
            .args([
                "fetch",
                "--plain-http",
                &reference,
                "-o",
                "out/dir",
                "--replace",
                "--rootfs",
                "--no-cache",
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Send the signal once hydrafy is mid-download (staged, 100 kB of
        // this round's layer relayed and the rest held back) and catches it.
        let mid_download = || {
            let staged = listing(&env.join("out"))
                .iter()
                .any(|n| n.contains("hydrafy-staging"));
            let started = proxy
                .seen()
                .iter()
                .filter(|s| s.request.path.ends_with(&layer) && s.body_bytes >= 100_000)
                .count();
            staged && started > round
        };
        wait_until("hydrafy to be mid-download", || {
            mid_download() || child.try_wait().unwrap().is_some()
        });
        assert!(
            child.try_wait().unwrap().is_none(),
            "hydrafy ended before the signal"
        );
        wait_until(&format!("hydrafy to catch {signal:?}"), || {
            catches(child.id(), signal)
        });
        let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(130), "{signal:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("interrupted"), "{}", stderr(&out));
        assert_eq!(fingerprint(&env.join("out/dir")), before);
        assert_eq!(
            listing(&env.join("out")),
            ["dir"],
            "no staging folder left after {signal:?}"
        );
    }
}

#[test]
fn a_staging_folder_left_by_a_killed_run_is_removed_by_the_next_run() {
    let reg = Registry::start();
    let env = TestEnv::new();
    let img = seed_image(&reg, "nixos/nix", "v1", "7777");
    let layer_digest = img.layer_digests[0].clone();
    let proxy = Proxy::start("127.0.0.1", &reg.addr, move |r| {
        if r.path.ends_with(&layer_digest) {
            Action::StallAfter(10)
        } else {
            Action::Pass
        }
    });
    let stalled = img.reference.replace(&reg.addr, &proxy.addr);
    let mut child = env
        .hydrafy()
        .args([
            "fetch",
            "--plain-http",
            &stalled,
            "-o",
            "out/dir",
            "--no-cache",
        ])
        .spawn()
        .unwrap();
    wait_for_staging(&env.join("out"));
    child.kill().unwrap(); // SIGKILL: no cleanup possible
    child.wait().unwrap();
    assert!(
        listing(&env.join("out"))
            .iter()
            .any(|n| n.contains("hydrafy-staging")),
        "the killed run left its staging folder"
    );
    assert_ok(&env.run(&[
        "fetch",
        "--plain-http",
        &img.reference,
        "-q",
        "-o",
        "out/dir",
    ]));
    assert_eq!(listing(&env.join("out")), ["dir"]);
}

fn wait_for_staging(parent: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if listing(parent)
            .iter()
            .any(|n| n.contains("hydrafy-staging"))
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no staging folder appeared in {}", parent.display());
}

#[test]
fn a_nix_image_from_a_real_store_passes_nix_store_verify() {
    let work = tempfile::tempdir().unwrap();
    let mut sources = Vec::new();
    for (i, name) in ["hello", "toolchain", "cuda-ish"].iter().enumerate() {
        let dir = work.path().join(format!("src-{name}"));
        nix::sample_source(&dir, name, 1000 * (i + 1));
        sources.push((name.to_string(), dir));
    }
    let refs: Vec<(&str, &Path)> = sources
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_path()))
        .collect();
    let store = nix::make_store(&work.path().join("store"), &refs);
    let (ok, text) = nix::verify(&store.root);
    assert!(ok, "the source store itself must verify: {text}");
    let reg = Registry::start();
    let layers = nix::layers(&store)
        .iter()
        .map(|t| layer(t, Comp::Gzip, Media::Docker))
        .collect();
    let img = push(
        &reg.addr,
        "nixos/nix",
        Some("latest"),
        &Image::new(Media::Docker, layers),
    );
    let index = push_index(
        &reg.addr,
        "nixos/nix",
        Some("latest"),
        Media::Docker,
        &[&img],
    );
    let env = TestEnv::new();
    assert_ok(&env.run(&["fetch", "--plain-http", &index.reference, "-q"]));
    let (ok, text) = nix::verify(&env.join("nix-backup"));
    assert!(
        ok,
        "nix-store --verify --check-contents failed on hydrafy's output: {text}"
    );
    // The oracle is not blind: a modified file is caught.
    let victim = env
        .join("nix-backup")
        .join(store.paths[0].trim_start_matches('/'))
        .join("bin/run");
    let dir = victim.parent().unwrap().to_path_buf();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(&victim, "#!/bin/sh\necho tampered\n").unwrap();
    let (ok, text) = nix::verify(&env.join("nix-backup"));
    assert!(!ok && text.contains("was modified"), "{text}");
}

#[test]
fn a_large_layer_is_unpacked_while_it_is_still_downloading() {
    let reg = Registry::start();
    let mut t = Tar::new();
    for i in 0..200u32 {
        t.file(&format!("f{i:03}"), &vec![i as u8; 64 << 10], 0o644);
    }
    let img = push(
        &reg.addr,
        "big",
        Some("v1"),
        &Image::new(Media::Oci, vec![layer(&t.finish(), Comp::None, Media::Oci)]),
    );
    let blob = img.layer_digests[0].clone();
    let pause = Duration::from_secs(3);
    let proxy = Proxy::start("127.0.0.1", &reg.addr, move |r| {
        if r.path.ends_with(&blob) {
            Action::PauseAfter(2 << 20, pause)
        } else {
            Action::Pass
        }
    });
    let env = TestEnv::new();
    let reference = img.reference.replace(&reg.addr, &proxy.addr);
    let child = env
        .hydrafy()
        .args([
            "fetch",
            "--plain-http",
            &reference,
            "--rootfs",
            "--no-cache",
            "-q",
            "-o",
            "out",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // While the registry holds the rest of the blob back, the first files are already written.
    let deadline = Instant::now() + Duration::from_secs(20);
    let early = loop {
        let staged = listing(env.path())
            .into_iter()
            .find(|n| n.contains("hydrafy-staging"));
        if let Some(dir) = staged
            && env.join(&dir).join("rootfs/f000").is_file()
        {
            break true;
        }
        if !proxy.seen().is_empty()
            && proxy
                .seen()
                .iter()
                .any(|s| s.request.is_blob() && s.body_bytes > (2 << 20))
        {
            break false;
        }
        assert!(Instant::now() < deadline, "no staged file appeared");
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    assert_ok(&out);
    assert!(
        early,
        "f000 was written only after the whole blob had arrived"
    );
    assert_eq!(
        std::fs::read(env.join("out/f199")).unwrap(),
        vec![199u8; 64 << 10]
    );
}

/// The last line of stderr.
fn last_line(out: &Output) -> String {
    stderr(out).lines().last().unwrap_or("").to_string()
}

/// `line` says how long the run took: `... in 1.2 s` somewhere in it.
fn says_how_long(line: &str) -> bool {
    line.split(" in ").skip(1).any(|rest| {
        rest.split_once(" s")
            .is_some_and(|(n, _)| n.parse::<f64>().is_ok())
    })
}

const NEXT_STEP: &str =
    "hydrafy runner-config --config /etc/gitlab-runner/config.toml --nix-backup";

/// The bug: on a terminal the bars cleared and the run ended silently; off
/// one the last line was a progress line. Now one line says what DIR holds.
#[test]
fn a_finished_run_ends_with_one_line_saying_what_dir_holds() {
    let reg = Registry::start();
    let a = seed_image(&reg, "nixos/nix", "a", "aaaa");
    let b = seed_image(&reg, "nixos/nix", "b", "bbbb");
    let env = TestEnv::new();

    // A first fetch into a new DIR: what it holds, how long, and the next step.
    let out = env.run(&["fetch", "--plain-http", &a.reference]);
    assert_ok(&out);
    let line = last_line(&out);
    for needle in [
        "hydrafy: nix-backup now holds",
        a.reference.as_str(),
        "1 store path,",
        &format!("next: {NEXT_STEP} nix-backup"),
    ] {
        assert!(line.contains(needle), "last line lacks {needle:?}: {line}");
    }
    assert!(says_how_long(&line), "{line}");

    // The same again: one line says there was nothing to do.
    let out = env.run(&["fetch", "--plain-http", &a.reference]);
    assert_ok(&out);
    let line = last_line(&out);
    assert!(
        line.contains("nix-backup already holds") && line.contains("nothing to do"),
        "{line}"
    );
    assert!(!line.contains(NEXT_STEP), "{line}");

    // --quiet drops it.
    let out = env.run(&["fetch", "--plain-http", &b.reference, "--replace", "-q"]);
    assert_ok(&out);
    assert_eq!(stderr(&out), "", "--quiet prints nothing on success");

    // --json keeps stdout for the JSON object; the line is on stderr, and DIR
    // was not new, so there is no next step.
    let out = env.run(&["fetch", "--plain-http", &a.reference, "--replace", "--json"]);
    assert_ok(&out);
    let summary = json(&out);
    assert_eq!(summary["image"], a.reference.as_str());
    let line = last_line(&out);
    assert!(line.contains("nix-backup now holds"), "{line}");
    let files = format!(" in {} files", summary["files"]);
    assert!(
        line.contains(&files),
        "the line and the JSON agree on {files:?}: {line}"
    );
    assert!(
        !line.contains(NEXT_STEP),
        "no next step for a DIR that was not new: {line}"
    );

    // pull and extract end the same way; extract into a new DIR shows the next step.
    let out = env.run(&["pull", "--plain-http", &a.reference, "-o", "a.tar"]);
    assert_ok(&out);
    let line = last_line(&out);
    assert!(
        line.contains("wrote a.tar") && line.contains("hydrafy extract a.tar"),
        "{line}"
    );
    assert!(says_how_long(&line), "{line}");
    let out = env.run(&["extract", "a.tar", "-o", "offline"]);
    assert_ok(&out);
    let line = last_line(&out);
    assert!(line.contains("offline now holds"), "{line}");
    assert!(
        line.contains(&format!("next: {NEXT_STEP} offline")),
        "{line}"
    );
}

/// A merge adds to a seed that was there: the line sums up the union and
/// shows no first-fetch hint.
#[test]
fn a_finished_merge_says_what_dir_holds_and_gives_no_first_fetch_hint() {
    let work = tempfile::tempdir().unwrap();
    let reg = Registry::start();
    let image = |name: &str, tag: &str| {
        let src = work.path().join(format!("src-{name}"));
        nix::sample_source(&src, name, 10);
        let store = nix::make_store(&work.path().join(name), &[(name, src.as_path())]);
        let layers = nix::layers(&store)
            .iter()
            .map(|t| layer(t, Comp::Gzip, Media::Docker))
            .collect();
        push(
            &reg.addr,
            "nixos/nix",
            Some(tag),
            &Image::new(Media::Docker, layers),
        )
    };
    let (old, new) = (image("old", "old"), image("new", "new"));
    let env = TestEnv::new();
    assert_ok(&env.run(&["fetch", "--plain-http", &old.reference, "-q"]));
    let out = env.run(&["fetch", "--plain-http", &new.reference, "--merge"]);
    assert_ok(&out);
    let line = last_line(&out);
    for needle in [
        "hydrafy: nix-backup now holds 4 store paths",
        "merged",
        new.reference.as_str(),
        "2 new",
    ] {
        assert!(line.contains(needle), "last line lacks {needle:?}: {line}");
    }
    assert!(says_how_long(&line), "{line}");
    assert!(
        !line.contains(NEXT_STEP),
        "no next step after a merge: {line}"
    );
}
