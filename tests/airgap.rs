//! Air-gapped hosts: `hydrafy pull` to a file, `hydrafy extract` offline,
//! and interoperability with skopeo and umoci, tested against the real tools.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::image::{
    Comp, Image, Media, Pushed, Tar, layer, push, push_index, push_two_platforms, sha256,
};
use crate::support::proxy::{Action, Proxy};
use crate::support::registry::Registry;
use crate::support::{
    TestEnv, assert_fails, assert_no_op, assert_ok, fingerprint, listing, nix, require_tool,
    stderr, stdout,
};

/// A Nix-layered image of a real store, pushed as a one-platform index.
struct NixImage {
    reg: Registry,
    index: Pushed,
    manifest: Pushed,
    _work: tempfile::TempDir,
}

fn nix_image(media: Media) -> NixImage {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    nix::sample_source(&src, "airgap", 500);
    let store = nix::make_store(&work.path().join("store"), &[("airgap", src.as_path())]);
    let reg = Registry::start();
    let layers = nix::layers(&store)
        .iter()
        .map(|t| layer(t, Comp::Gzip, media))
        .collect();
    let manifest = push(&reg.addr, "nixos/nix", None, &Image::new(media, layers));
    let index = push_index(&reg.addr, "nixos/nix", Some("latest"), media, &[&manifest]);
    NixImage {
        reg,
        index,
        manifest,
        _work: work,
    }
}

fn skopeo(args: &[&str]) -> std::process::Output {
    require_tool("skopeo", "skopeo");
    Command::new("skopeo")
        .args(args)
        .output()
        .expect("run skopeo")
}

fn assert_cmd_ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `hydrafy extract` inside a network namespace with no network at all.
fn extract_offline(env: &TestEnv, source: &Path, out: &str) -> std::process::Output {
    require_tool("unshare", "util-linux");
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root for `unshare -n` (CI runs as root)"
    );
    Command::new("unshare")
        .arg("-n")
        .arg(env!("CARGO_BIN_EXE_hydrafy"))
        .args([
            "extract",
            &source.display().to_string(),
            "-o",
            out,
            "--json",
        ])
        .env("HOME", env.join("home"))
        .current_dir(env.path())
        .output()
        .expect("run unshare")
}

#[test]
fn pull_to_an_archive_then_extract_with_no_network_passes_nix_store_verify() {
    let img = nix_image(Media::Docker);
    let env = TestEnv::new();
    let out = env.run(&[
        "pull",
        "--plain-http",
        &img.index.reference,
        "-o",
        "nix.tar",
        "--checksum",
        "nix.tar.sha256",
        "--json",
    ]);
    assert_ok(&out);
    let summary: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(summary["format"], "oci-archive");
    assert!(
        summary["extract_command"]
            .as_str()
            .unwrap()
            .contains("hydrafy extract nix.tar")
    );
    assert!(
        stderr(&out).contains("hydrafy extract nix.tar"),
        "the extract command is printed: {}",
        stderr(&out)
    );
    let check = Command::new("sha256sum")
        .args(["-c", "nix.tar.sha256"])
        .current_dir(env.path())
        .output()
        .unwrap();
    assert_cmd_ok(&check, "sha256sum -c");
    assert_eq!(
        sha256(&std::fs::read(env.join("nix.tar")).unwrap()),
        format!("sha256:{}", summary["sha256"].as_str().unwrap())
    );

    let out = extract_offline(&env, &env.join("nix.tar"), "nix-backup");
    assert_ok(&out);
    let (ok, text) = nix::verify(&env.join("nix-backup"));
    assert!(
        ok,
        "nix-store --verify --check-contents failed after extract: {text}"
    );
    // A second extract of the same archive is a no-op.
    let again = extract_offline(&env, &env.join("nix.tar"), "nix-backup");
    assert_no_op(&again);
}

#[test]
fn pull_to_a_layout_directory_keeps_manifests_byte_for_byte() {
    let img = nix_image(Media::Docker);
    let env = TestEnv::new();
    assert_ok(&env.run(&[
        "pull",
        "--plain-http",
        &img.index.reference,
        "-o",
        "layout",
        "-q",
    ]));
    let blob = |d: &str| {
        std::fs::read(
            env.join("layout/blobs/sha256")
                .join(d.trim_start_matches("sha256:")),
        )
        .unwrap()
    };
    assert_eq!(
        blob(&img.index.digest),
        img.index.body,
        "the manifest list is kept byte for byte"
    );
    assert_eq!(
        blob(&img.manifest.digest),
        img.manifest.body,
        "the Docker manifest is kept, not converted"
    );
    for name in listing(&env.join("layout/blobs/sha256")) {
        let bytes = std::fs::read(env.join("layout/blobs/sha256").join(&name)).unwrap();
        assert_eq!(
            sha256(&bytes),
            format!("sha256:{name}"),
            "every blob is stored under its digest"
        );
    }
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.join("layout/index.json")).unwrap()).unwrap();
    let entry = &index["manifests"][0];
    assert_eq!(entry["digest"], img.index.digest.as_str());
    assert_eq!(
        entry["annotations"]["org.opencontainers.image.ref.name"],
        format!("{}/nixos/nix@{}", img.reg.addr, img.index.digest)
    );
    assert_eq!(
        listing(env.path()),
        ["cache", "docker", "home", "layout"],
        "no temporary folder left"
    );
}

#[test]
fn skopeo_reads_what_pull_writes_for_docker_and_oci_media_types() {
    for media in [Media::Docker, Media::Oci] {
        let img = nix_image(media);
        let env = TestEnv::new();
        assert_ok(&env.run(&[
            "pull",
            "--plain-http",
            &img.index.reference,
            "-o",
            "img.tar",
            "-q",
        ]));
        let archive = format!("oci-archive:{}", env.join("img.tar").display());
        let out = skopeo(&["inspect", &archive]);
        assert_cmd_ok(&out, "skopeo inspect");
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            info["Layers"].as_array().unwrap().len(),
            img.manifest.layer_digests.len(),
            "{media:?}"
        );
        let copy = skopeo(&[
            "copy",
            &archive,
            &format!("oci:{}:copied", env.join("copy").display()),
        ]);
        assert_cmd_ok(&copy, "skopeo copy oci-archive: oci:");
        assert!(env.join("copy/index.json").is_file());
    }
}

#[test]
fn umoci_unpacks_what_pull_writes_for_an_oci_image() {
    require_tool("umoci", "umoci");
    let img = nix_image(Media::Oci);
    let env = TestEnv::new();
    assert_ok(&env.run(&[
        "pull",
        "--plain-http",
        &img.manifest.reference,
        "-o",
        "layout",
        "-q",
    ]));
    let tag = format!("{}/nixos/nix@{}", img.reg.addr, img.manifest.digest);
    let out = Command::new("umoci")
        .args([
            "unpack",
            "--rootless",
            "--image",
            &format!("{}:{tag}", env.join("layout").display()),
        ])
        .arg(env.join("bundle"))
        .output()
        .unwrap();
    assert_cmd_ok(&out, "umoci unpack");
    assert_ok(&env.run(&["extract", "layout", "-o", "ours", "-q"]));
    let theirs = env.join("bundle/rootfs/nix/store");
    let ours = env.join("ours/nix/store");
    assert_eq!(listing(&theirs), listing(&ours));
    for name in listing(&ours) {
        let a = fingerprint(&theirs.join(&name));
        let b = fingerprint(&ours.join(&name));
        assert_eq!(a, b, "{name} differs between umoci and hydrafy");
    }
}

#[test]
fn extract_reads_skopeo_made_oci_layouts_and_docker_archives() {
    let img = nix_image(Media::Docker);
    let env = TestEnv::new();
    let src = format!("docker://{}", img.manifest.reference);
    let layout = format!("oci:{}:nix", env.join("skopeo-layout").display());
    assert_cmd_ok(
        &skopeo(&["copy", "--src-tls-verify=false", &src, &layout]),
        "skopeo copy to oci",
    );
    let archive = format!(
        "docker-archive:{}:nixos/nix:latest",
        env.join("saved.tar").display()
    );
    assert_cmd_ok(
        &skopeo(&["copy", "--src-tls-verify=false", &src, &archive]),
        "skopeo copy to docker-archive",
    );
    for (source, out) in [
        ("skopeo-layout", "from-layout"),
        ("saved.tar", "from-archive"),
    ] {
        let run = extract_offline(&env, &env.join(source), out);
        assert_ok(&run);
        let (ok, text) = nix::verify(&env.join(out));
        assert!(ok, "{source}: {text}");
    }
}

/// Byte offset of `name`'s data inside the tar at `path`.
fn offset_in_tar(path: &Path, name: &str) -> u64 {
    let mut archive = tar::Archive::new(std::fs::File::open(path).unwrap());
    for entry in archive.entries_with_seek().unwrap() {
        let entry = entry.unwrap();
        if entry.path().unwrap().to_string_lossy() == name {
            return entry.raw_file_position();
        }
    }
    panic!("{name} not in {}", path.display());
}

#[test]
fn a_corrupted_missing_or_foreign_archive_is_refused_and_dir_untouched() {
    let img = nix_image(Media::Oci);
    let env = TestEnv::new();
    assert_ok(&env.run(&[
        "pull",
        "--plain-http",
        &img.index.reference,
        "-o",
        "good.tar",
        "-q",
    ]));
    assert_ok(&env.run(&[
        "pull",
        "--plain-http",
        &img.index.reference,
        "-o",
        "layout",
        "-q",
    ]));
    // DIR holds an extracted image; every bad source must leave it as it is.
    let other = {
        let mut t = Tar::new();
        t.dir("/nix", 0o755)
            .dir("/nix/store", 0o755)
            .file("/nix/store/other", b"o", 0o444);
        t.dir("nix/var", 0o755)
            .dir("nix/var/nix", 0o755)
            .dir("nix/var/nix/db", 0o755);
        push(
            &img.reg.addr,
            "other",
            Some("v"),
            &Image::new(Media::Oci, vec![layer(&t.finish(), Comp::Gzip, Media::Oci)]),
        )
    };
    assert_ok(&env.run(&[
        "fetch",
        "--plain-http",
        &other.reference,
        "-q",
        "-o",
        "out/dir",
    ]));
    let before = fingerprint(&env.join("out/dir"));

    let victim = &img.manifest.layer_digests[0];
    let name = format!("blobs/sha256/{}", victim.trim_start_matches("sha256:"));
    std::fs::copy(env.join("good.tar"), env.join("bad.tar")).unwrap();
    let at = offset_in_tar(&env.join("bad.tar"), &name) + 40;
    let mut bytes = std::fs::read(env.join("bad.tar")).unwrap();
    bytes[at as usize] ^= 0x20;
    std::fs::write(env.join("bad.tar"), bytes).unwrap();
    let out = env.run(&["extract", "bad.tar", "-o", "out/dir", "--replace"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(victim.as_str()),
        "the error names the blob: {}",
        stderr(&out)
    );

    std::fs::remove_file(env.join("layout").join(&name)).unwrap();
    let out = env.run(&["extract", "layout", "-o", "out/dir", "--replace"]);
    assert_fails(&out, 1, &["layer blob", victim.as_str(), "missing"]);

    let out = env.run(&[
        "extract",
        "good.tar",
        "-o",
        "out/dir",
        "--replace",
        "--platform",
        "linux/arm64",
    ]);
    assert_fails(
        &out,
        1,
        &["no manifest for platform linux/arm64", "linux/amd64"],
    );

    let out = env.run(&["extract", "nix.tar.sha256", "-o", "out/dir", "--replace"]);
    assert!(!out.status.success());

    assert_eq!(fingerprint(&env.join("out/dir")), before, "DIR changed");
    assert_eq!(
        listing(&env.join("out")),
        ["dir"],
        "a staging folder was left"
    );
}

#[test]
fn pull_keeps_one_platform_or_all_of_them() {
    let reg = Registry::start();
    let (index, amd, arm) = push_two_platforms(&reg.addr, "multi");
    let env = TestEnv::new();
    assert_ok(&env.run(&["pull", "--plain-http", &index.reference, "-o", "one", "-q"]));
    assert_ok(&env.run(&[
        "pull",
        "--plain-http",
        &index.reference,
        "-o",
        "all",
        "--all-platforms",
        "-q",
    ]));
    let has = |dir: &str, d: &str| {
        env.join(dir)
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
            .is_file()
    };
    assert!(has("one", &index.digest) && has("one", &amd.digest) && !has("one", &arm.digest));
    assert!(has("all", &index.digest) && has("all", &amd.digest) && has("all", &arm.digest));
    assert!(has("all", &arm.layer_digests[0]));
}

#[test]
fn an_interrupted_pull_leaves_no_half_file() {
    let reg = Registry::start();
    let mut t = Tar::new();
    t.file("noise", &vec![7u8; 2_000_000], 0o644);
    let img = push(
        &reg.addr,
        "big",
        Some("v1"),
        &Image::new(Media::Oci, vec![layer(&t.finish(), Comp::None, Media::Oci)]),
    );
    let layer_digest = img.layer_digests[0].clone();
    let proxy = Proxy::start("127.0.0.1", &reg.addr, move |r| {
        if r.path.ends_with(&layer_digest) {
            Action::StallAfter(500_000)
        } else {
            Action::Pass
        }
    });
    let env = TestEnv::new();
    let reference = img.reference.replace(&reg.addr, &proxy.addr);
    let child = env
        .hydrafy()
        .args([
            "pull",
            "--plain-http",
            &reference,
            "-o",
            "img.tar",
            "--no-cache",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !proxy
        .seen()
        .iter()
        .any(|s| s.request.is_blob() && s.body_bytes >= 500_000)
    {
        assert!(
            Instant::now() < deadline,
            "the pull never reached the stalled blob"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::INT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert_eq!(
        listing(env.path()),
        ["cache", "docker", "home"],
        "no archive and no temporary folder"
    );
}
