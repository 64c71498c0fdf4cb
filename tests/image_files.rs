//! Image files as other tools write them (issue 13, part 2): multi-image OCI
//! layouts and archives picked with skopeo's names, compressed archives
//! (`docker save | gzip`, the releases.nixos.org docker tarball), Docker 25+
//! `docker save`, and files that hold no container image. Where skopeo and
//! umoci read a file, `hydrafy extract` must give the tree `skopeo copy`
//! followed by `umoci unpack` gives.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::image::{
    Comp, Image, Media, Pushed, Tar, layer, push, push_two_platforms, sha256,
};
use crate::support::registry::Registry;
use crate::support::{
    TestEnv, assert_fails, assert_ok, catches, fingerprint, json, listing, nix, require_tool,
    stderr, stdout, wait_until,
};

fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn skopeo(args: &[&str]) -> Output {
    require_tool("skopeo", "skopeo");
    run(
        Command::new("skopeo").args(args),
        &format!("skopeo {args:?}"),
    )
}

/// What skopeo and umoci make of SOURCE: `skopeo copy SOURCE oci:...`,
/// then `umoci unpack --rootless`; the rootfs.
fn skopeo_umoci(env: &TestEnv, source: &str, name: &str) -> PathBuf {
    require_tool("umoci", "umoci");
    let layout = env.join(&format!("{name}.skopeo-layout"));
    skopeo(&["copy", source, &format!("oci:{}:x", layout.display())]);
    let bundle = env.join(&format!("{name}.umoci-bundle"));
    run(
        Command::new("umoci")
            .args(["unpack", "--rootless", "--image"])
            .arg(format!("{}:x", layout.display()))
            .arg(&bundle),
        "umoci unpack",
    );
    bundle.join("rootfs")
}

/// `hydrafy extract SOURCE --rootfs -o NAME`; the rootfs.
fn hydrafy_rootfs(env: &TestEnv, source: &str, name: &str, extra: &[&str]) -> PathBuf {
    let mut args = vec!["extract", source, "--rootfs", "-q", "-o", name];
    args.extend_from_slice(extra);
    assert_ok(&env.run(&args));
    env.join(name)
}

/// Everything under `root` but the root itself and hydrafy's state file.
fn tree(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut t = fingerprint(root);
    t.remove(Path::new(""));
    t.remove(Path::new(".hydrafy-state.json"));
    t
}

fn assert_same_tree(ours: &Path, theirs: &Path) {
    let (a, b) = (tree(ours), tree(theirs));
    let keys: std::collections::BTreeSet<_> = a.keys().chain(b.keys()).collect();
    let diff: Vec<String> = keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            format!(
                "{}: hydrafy {:?}, umoci {:?}",
                k.display(),
                a.get(k),
                b.get(k)
            )
        })
        .collect();
    assert!(diff.is_empty(), "trees differ:\n{}", diff.join("\n"));
}

/// A small image whose files say `tag`.
fn small_image(tag: &str) -> Image {
    let mut base = Tar::new();
    base.dir("bin", 0o755)
        .file("bin/tool", b"#!/bin/sh\necho tool\n", 0o755)
        .dir("etc", 0o755)
        .file("etc/version", tag.as_bytes(), 0o644)
        .symlink("etc/current", "version");
    let mut top = Tar::new();
    top.dir("etc", 0o755)
        .file(&format!("etc/only-{tag}"), tag.as_bytes(), 0o600);
    Image::new(
        Media::Oci,
        vec![
            layer(&base.finish(), Comp::Gzip, Media::Oci),
            layer(&top.finish(), Comp::None, Media::Oci),
        ],
    )
}

/// Tags v1 and v2 of `multi`, two different images.
fn two_tags(reg: &Registry) -> [Pushed; 2] {
    ["v1", "v2"].map(|t| push(&reg.addr, "multi", Some(t), &small_image(t)))
}

/// `tar -C dir -cf out .`: an OCI layout directory as an oci-archive.
fn tar_dir(dir: &Path, out: &Path) {
    run(
        Command::new("tar")
            .arg("-C")
            .arg(dir)
            .arg("-cf")
            .arg(out)
            .arg("."),
        "tar",
    );
}

fn compress(tool: &str, file: &Path) -> PathBuf {
    require_tool(tool, if tool == "xz" { "xz-utils" } else { tool });
    let out = run(Command::new(tool).args(["-c", "-q"]).arg(file), tool);
    let dest = PathBuf::from(format!("{}.{tool}", file.display()));
    std::fs::write(&dest, out.stdout).unwrap();
    dest
}

#[test]
fn a_multi_tag_oci_layout_is_listed_and_each_tag_extracts_as_umoci_unpacks_it() {
    let reg = Registry::start();
    two_tags(&reg);
    let env = TestEnv::new();
    let layout = env.join("layout");
    for tag in ["v1", "v2"] {
        skopeo(&[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{}/multi:{tag}", reg.addr),
            &format!("oci:{}:{tag}", layout.display()),
        ]);
    }

    // Named by nothing: one line that lists both and says how to pick one.
    let out = env.run(&["extract", "layout", "-o", "out"]);
    assert_fails(
        &out,
        1,
        &[
            "holds 2 images",
            "v1",
            "v2",
            "hydrafy extract oci:layout:v1 -o out",
            "--list",
        ],
    );
    assert!(!env.join("out").exists(), "a refused extract made DIR");

    // skopeo may rewrite a manifest; index.json says what it wrote.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let digests: Vec<String> = ["v1", "v2"]
        .iter()
        .map(|tag| {
            index["manifests"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == *tag)
                .unwrap()["digest"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let out = env.run(&["extract", "layout", "--list"]);
    assert_ok(&out);
    let text = stdout(&out);
    for (tag, digest) in ["v1", "v2"].iter().zip(&digests) {
        let line = text
            .lines()
            .find(|l| l.starts_with(tag))
            .unwrap_or_else(|| panic!("--list has no {tag} line: {text}"));
        assert!(line.contains(digest.as_str()), "{line}");
        assert!(line.contains("linux/amd64"), "{line}");
        assert!(line.contains(&format!("oci:layout:{tag}")), "{line}");
    }
    let listed = json(&env.run(&["extract", "layout", "--list", "--json"]));
    let images = listed["images"].as_array().unwrap();
    assert_eq!(images.len(), 2, "{listed}");
    assert_eq!(images[1]["references"], serde_json::json!(["v2"]));
    assert_eq!(images[1]["digest"], digests[1].as_str());
    assert_eq!(images[1]["platforms"], serde_json::json!(["linux/amd64"]));
    assert_eq!(images[1]["source"], "oci:layout:v2");
    assert!(images[1]["size"].as_u64().unwrap() > 0);

    for tag in ["v1", "v2"] {
        let ours = hydrafy_rootfs(
            &env,
            &format!("oci:layout:{tag}"),
            &format!("ours-{tag}"),
            &[],
        );
        assert_eq!(
            std::fs::read_to_string(ours.join("etc/version")).unwrap(),
            tag
        );
        let theirs = skopeo_umoci(&env, &format!("oci:{}:{tag}", layout.display()), tag);
        assert_same_tree(&ours, &theirs);
    }

    // The same layout as an oci-archive, plain and gzip'd under a .tar name.
    tar_dir(&layout, &env.join("multi.tar"));
    let gz = compress("gzip", &env.join("multi.tar"));
    std::fs::rename(&gz, env.join("multi-gz.tar")).unwrap();
    for file in ["multi.tar", "multi-gz.tar"] {
        let out = env.run(&["extract", file, "-o", "out"]);
        assert_fails(
            &out,
            1,
            &["holds 2 images", &format!("oci-archive:{file}:v1")],
        );
        let ours = hydrafy_rootfs(
            &env,
            &format!("oci-archive:{file}:v2"),
            &format!("{file}-v2"),
            &[],
        );
        assert_same_tree(&ours, &env.join("v2.umoci-bundle/rootfs"));
    }
    // An oci-archive skopeo writes itself, of one image: no name needed.
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/multi:v1", reg.addr),
        &format!("oci-archive:{}:v1", env.join("one.tar").display()),
    ]);
    let ours = hydrafy_rootfs(&env, "one.tar", "one", &[]);
    assert_same_tree(&ours, &env.join("v1.umoci-bundle/rootfs"));

    let out = env.run(&["extract", "oci-archive:multi.tar:v3", "-o", "out"]);
    assert_fails(&out, 1, &["no image named \"v3\"", "v1, v2"]);
    assert!(!env.join("out").exists());
}

/// One tar holding every entry of `parts` (the first of each name) and one
/// manifest.json listing all their images: what `docker save A B` writes.
fn merge_docker_archives(parts: &[&Path], out: &Path) {
    let mut manifest: Vec<serde_json::Value> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut builder = tar::Builder::new(std::fs::File::create(out).unwrap());
    for part in parts {
        let mut archive = tar::Archive::new(std::fs::File::open(part).unwrap());
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
            if name == "manifest.json" {
                let list: Vec<serde_json::Value> = serde_json::from_slice(&data).unwrap();
                manifest.extend(list);
            } else if name != "repositories" && seen.insert(name.clone()) {
                let mut h = entry.header().clone();
                builder.append_data(&mut h, &name, data.as_slice()).unwrap();
            }
        }
    }
    let data = serde_json::to_vec(&manifest).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    builder
        .append_data(&mut h, "manifest.json", data.as_slice())
        .unwrap();
    builder.finish().unwrap();
}

#[test]
fn a_docker_save_of_two_images_is_picked_by_repo_tag_or_position_as_skopeo_does() {
    let reg = Registry::start();
    two_tags(&reg);
    let env = TestEnv::new();
    for (tag, file, name) in [
        ("v1", "a.tar", "example/a:v1"),
        ("v2", "b.tar", "example/b:v2"),
    ] {
        skopeo(&[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{}/multi:{tag}", reg.addr),
            &format!("docker-archive:{}:{name}", env.join(file).display()),
        ]);
    }
    merge_docker_archives(
        &[&env.join("a.tar"), &env.join("b.tar")],
        &env.join("saved.tar"),
    );
    let saved = env.join("saved.tar").display().to_string();

    let out = env.run(&[
        "extract",
        "saved.tar",
        "-o",
        "out",
        "--rootfs",
        "--platform",
        "linux/amd64",
    ]);
    assert_fails(
        &out,
        1,
        &[
            "holds 2 images",
            "docker.io/example/a:v1",
            "docker.io/example/b:v2",
            "hydrafy extract docker-archive:saved.tar:docker.io/example/a:v1 -o out --platform linux/amd64 --rootfs",
        ],
    );
    assert!(!env.join("out").exists());

    let listed = json(&env.run(&["extract", "saved.tar", "--list", "--json"]));
    assert_eq!(listed["format"], "docker-archive");
    let images = listed["images"].as_array().unwrap();
    // skopeo writes RepoTags in full; either form picks the image.
    assert_eq!(
        images[0]["references"],
        serde_json::json!(["docker.io/example/a:v1"])
    );
    assert_eq!(
        images[1]["source"],
        "docker-archive:saved.tar:docker.io/example/b:v2"
    );
    assert_eq!(images[1]["platforms"], serde_json::json!(["linux/amd64"]));

    for (pick, name, version) in [
        ("example/b:v2", "by-tag", "v2"),
        ("docker.io/example/b:v2", "by-full-name", "v2"),
        ("@0", "by-position", "v1"),
    ] {
        let ours = hydrafy_rootfs(&env, &format!("docker-archive:saved.tar:{pick}"), name, &[]);
        assert_eq!(
            std::fs::read_to_string(ours.join("etc/version")).unwrap(),
            version,
            "{pick}"
        );
        let theirs = skopeo_umoci(&env, &format!("docker-archive:{saved}:{pick}"), name);
        assert_same_tree(&ours, &theirs);
    }
    let out = env.run(&[
        "extract",
        "docker-archive:saved.tar:example/c:v9",
        "-o",
        "out",
    ]);
    assert_fails(
        &out,
        1,
        &[
            "no image tagged \"example/c:v9\"",
            "docker.io/example/a:v1, docker.io/example/b:v2",
        ],
    );
    let out = env.run(&["extract", "docker-archive:saved.tar:@2", "-o", "out"]);
    assert_fails(&out, 1, &["@2 is past its last image", "@0 to @1"]);
    let out = env.run(&["extract", "docker-archive:saved.tar:@x", "-o", "out"]);
    assert_fails(&out, 2, &["@x is not an image position"]);
    assert!(!env.join("out").exists());
}

/// A `docker save`-style archive as nixpkgs' dockerTools writes it: one
/// `<id>/layer.tar` (with `VERSION` and `json`) per layer, `<config>.json`,
/// `manifest.json` and `repositories`.
fn docker_tools_archive(layers: &[Vec<u8>], tag: &str) -> Vec<u8> {
    let diff_ids: Vec<String> = layers.iter().map(|l| sha256(l)).collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let config_name = format!("{}.json", &sha256(&config)["sha256:".len()..]);
    let mut out = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o444);
        h.set_mtime(1);
        out.append_data(&mut h, name, data).unwrap();
    };
    let mut names = Vec::new();
    for (l, id) in layers.iter().zip(&diff_ids) {
        let dir = &id["sha256:".len()..];
        add(&format!("{dir}/VERSION"), b"1.0");
        add(
            &format!("{dir}/json"),
            br#"{"created":"1970-01-01T00:00:01Z"}"#,
        );
        add(&format!("{dir}/layer.tar"), l);
        names.push(format!("{dir}/layer.tar"));
    }
    add(&config_name, &config);
    let (repo, version) = tag.split_once(':').unwrap();
    let manifest = serde_json::json!([{"Config": config_name, "RepoTags": [tag], "Layers": names}]);
    add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    let repositories =
        serde_json::json!({repo: {version: &diff_ids.last().unwrap()["sha256:".len()..]}});
    add("repositories", &serde_json::to_vec(&repositories).unwrap());
    out.into_inner().unwrap()
}

#[test]
fn the_releases_nixos_org_docker_tarball_extracts_gzip_zstd_or_xz_whatever_its_name() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    nix::sample_source(&src, "release", 300);
    let store = nix::make_store(&work.path().join("store"), &[("release", src.as_path())]);
    let env = TestEnv::new();
    let name = "nix-2.24.9-docker-image-x86_64.tar.gz";
    let plain = env.join("image.tar");
    std::fs::write(
        &plain,
        docker_tools_archive(&nix::layers(&store), "nix:2.24.9"),
    )
    .unwrap();
    let gz = compress("gzip", &plain);
    std::fs::rename(&gz, env.join(name)).unwrap();
    let sum = run(
        Command::new("sha256sum").arg(name).current_dir(env.path()),
        "sha256sum",
    );
    std::fs::write(env.join(&format!("{name}.sha256")), sum.stdout).unwrap();
    run(
        Command::new("sha256sum")
            .args(["-c", &format!("{name}.sha256")])
            .current_dir(env.path()),
        "sha256sum -c",
    );

    let out = env.run(&["extract", name, "-o", "nix-backup", "-q"]);
    assert_ok(&out);
    let want = tree(&env.join("nix-backup/nix/store"));
    let (ok, text) = nix::verify(&env.join("nix-backup"));
    assert!(ok, "nix-store --verify --check-contents: {text}");
    assert!(
        listing(env.path())
            .iter()
            .all(|n| !n.starts_with(".hydrafy")),
        "a temporary file was left: {:?}",
        listing(env.path())
    );
    let listed = json(&env.run(&["extract", name, "--list", "--json"]));
    assert_eq!(
        listed["images"][0]["references"],
        serde_json::json!(["nix:2.24.9"])
    );
    assert_eq!(
        listed["images"][0]["platforms"],
        serde_json::json!(["linux/amd64"])
    );

    // zstd and xz, under names that say nothing of it; the same store.
    for tool in ["zstd", "xz"] {
        let packed = compress(tool, &plain);
        let misnamed = env.join(&format!("from-{tool}.tar"));
        std::fs::rename(&packed, &misnamed).unwrap();
        let dir = format!("out-{tool}");
        assert_ok(&env.run(&["extract", &format!("from-{tool}.tar"), "-o", &dir, "-q"]));
        assert_eq!(
            tree(&env.join(&dir).join("nix/store")),
            want,
            "{tool}: the store differs"
        );
    }

    // Straight from a pipe (`curl ... | hydrafy extract /dev/stdin`).
    let mut child = env
        .hydrafy()
        .args(["extract", "/dev/stdin", "-o", "from-pipe", "-q"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    let gz = std::fs::read(env.join(name)).unwrap();
    let feeder = std::thread::spawn(move || pipe.write_all(&gz));
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert_ok(&out);
    assert_eq!(tree(&env.join("from-pipe/nix/store")), want);

    // A truncated download: one line, DIR as it was, nothing left beside it.
    let bytes = std::fs::read(env.join(name)).unwrap();
    std::fs::write(env.join("cut.tar.gz"), &bytes[..bytes.len() / 2]).unwrap();
    let before = fingerprint(&env.join("nix-backup"));
    let out = env.run(&["extract", "cut.tar.gz", "-o", "nix-backup", "--replace"]);
    assert_fails(
        &out,
        1,
        &["cut.tar.gz", "gzip stream is damaged", "copy it again"],
    );
    assert_eq!(fingerprint(&env.join("nix-backup")), before);
    let out = env.run(&["extract", "cut.tar.gz", "-o", "new/nix-backup"]);
    assert_fails(&out, 1, &["gzip stream is damaged"]);
    assert!(
        !env.join("new").exists(),
        "a failed run made the output's parent"
    );
    assert!(
        listing(env.path())
            .iter()
            .all(|n| !n.starts_with(".hydrafy"))
    );
}

/// A hand-built image file: blobs under their digests, then `index.json`
/// (and anything else) as the test says.
struct Layout {
    files: Vec<(String, Vec<u8>)>,
}

impl Layout {
    fn new() -> Layout {
        Layout {
            files: vec![(
                "oci-layout".to_string(),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            )],
        }
    }

    /// Store `bytes` as a blob; its descriptor.
    fn blob(&mut self, media_type: &str, bytes: &[u8]) -> serde_json::Value {
        let digest = sha256(bytes);
        let name = format!("blobs/sha256/{}", &digest["sha256:".len()..]);
        if !self.files.iter().any(|(n, _)| *n == name) {
            self.files.push((name, bytes.to_vec()));
        }
        serde_json::json!({"mediaType": media_type, "digest": digest, "size": bytes.len()})
    }

    fn json_blob(&mut self, media_type: &str, value: &serde_json::Value) -> serde_json::Value {
        self.blob(media_type, &serde_json::to_vec(value).unwrap())
    }

    fn file(&mut self, name: &str, value: &serde_json::Value) {
        self.files
            .push((name.to_string(), serde_json::to_vec(value).unwrap()));
    }

    fn index(&mut self, manifests: Vec<serde_json::Value>) {
        self.file(
            "index.json",
            &serde_json::json!({"schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests}),
        );
    }

    fn write_tar(&self, path: &Path) {
        let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
        for (name, data) in &self.files {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, data.as_slice()).unwrap();
        }
        b.finish().unwrap();
    }

    fn write_dir(&self, dir: &Path) {
        for (name, data) in &self.files {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, data).unwrap();
        }
    }
}

fn with_annotations(mut desc: serde_json::Value, ref_name: &str) -> serde_json::Value {
    desc["annotations"] = serde_json::json!({
        "io.containerd.image.name": format!("docker.io/library/app:{ref_name}"),
        "org.opencontainers.image.ref.name": ref_name,
    });
    desc
}

/// What Docker 25+ `docker save app:1` writes: an OCI layout with
/// `index.json` as given, plus `manifest.json` naming config and layers
/// (gzip'd when `compressed`, as Docker's containerd image store keeps them).
fn docker25_save(index: impl FnOnce(&mut Layout, serde_json::Value), compressed: bool) -> Layout {
    let mut l = Layout::new();
    let image = small_image("v25");
    let tars: Vec<Vec<u8>> = image
        .layers
        .iter()
        .map(|b| match b.media_type.as_str() {
            m if m.ends_with("+gzip") => {
                let mut out = Vec::new();
                std::io::Read::read_to_end(
                    &mut flate2::read::GzDecoder::new(b.bytes.as_slice()),
                    &mut out,
                )
                .unwrap();
                out
            }
            _ => b.bytes.clone(),
        })
        .collect();
    let layers: Vec<serde_json::Value> = tars
        .iter()
        .map(|t| {
            if compressed {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(t).unwrap();
                l.blob(
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                    &e.finish().unwrap(),
                )
            } else {
                l.blob("application/vnd.oci.image.layer.v1.tar", t)
            }
        })
        .collect();
    let config = l.blob("application/vnd.oci.image.config.v1+json", &image.config());
    let manifest = l.json_blob(
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::json!({"schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config, "layers": layers}),
    );
    let path = |d: &serde_json::Value| {
        format!(
            "blobs/sha256/{}",
            &d["digest"].as_str().unwrap()["sha256:".len()..]
        )
    };
    l.file(
        "manifest.json",
        &serde_json::json!([{"Config": path(&config), "RepoTags": ["app:1"],
            "Layers": layers.iter().map(path).collect::<Vec<_>>()}]),
    );
    index(&mut l, manifest);
    l
}

#[test]
fn a_docker_25_save_whose_index_json_lists_no_held_image_is_read_from_manifest_json() {
    let env = TestEnv::new();
    // index.json lists nothing (a save by image ID) / names an index the
    // file does not hold (a multi-platform image of the containerd store).
    let empty = docker25_save(|l, _| l.index(vec![]), false);
    let absent = docker25_save(
        |l, _| {
            let gone = serde_json::json!({"mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": sha256(b"not in the file"), "size": 15});
            l.index(vec![with_annotations(gone, "1")]);
        },
        true,
    );
    // An index.json no image index at all: skopeo reads manifest.json regardless.
    let broken = docker25_save(
        |l, _| {
            l.file(
                "index.json",
                &serde_json::json!({"schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.index.v1+json"}),
            )
        },
        false,
    );
    let usable = docker25_save(|l, m| l.index(vec![with_annotations(m, "1")]), true);
    for (file, layout) in [
        ("empty.tar", empty),
        ("absent.tar", absent),
        ("broken.tar", broken),
        ("usable.tar", usable),
    ] {
        layout.write_tar(&env.join(file));
        let name = file.trim_end_matches(".tar");
        let ours = hydrafy_rootfs(&env, file, name, &[]);
        assert_eq!(
            std::fs::read_to_string(ours.join("etc/version")).unwrap(),
            "v25",
            "{file}"
        );
        let theirs = skopeo_umoci(
            &env,
            &format!("docker-archive:{}", env.join(file).display()),
            name,
        );
        assert_same_tree(&ours, &theirs);
    }
    // Named as a docker archive, the OCI half is not looked at at all.
    hydrafy_rootfs(&env, "docker-archive:absent.tar:app:1", "named", &[]);
    // Named as an OCI archive, the usable one is picked by its containerd name.
    hydrafy_rootfs(
        &env,
        "oci-archive:usable.tar:docker.io/library/app:1",
        "by-oci-name",
        &[],
    );
}

/// A sigstore bundle referring to `subject` (an image the file does not
/// hold when `None`); its descriptor.
fn signature(l: &mut Layout, subject: Option<serde_json::Value>) -> serde_json::Value {
    let empty_config = l.blob("application/vnd.oci.empty.v1+json", b"{}");
    let bundle = l.blob(
        "application/vnd.dev.sigstore.bundle.v0.3+json",
        b"{\"sig\":1}",
    );
    let subject = subject.unwrap_or_else(|| {
        serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha256(b"the signed image"), "size": 16})
    });
    let mut desc = l.json_blob(
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/vnd.dev.sigstore.bundle.v0.3+json",
            "config": empty_config, "layers": [bundle], "subject": subject}),
    );
    desc["artifactType"] = "application/vnd.dev.sigstore.bundle.v0.3+json".into();
    desc
}

#[test]
fn a_helm_chart_an_empty_layout_and_a_referrers_only_layout_are_each_named_in_one_line() {
    let env = TestEnv::new();
    let mut helm = Layout::new();
    let config = helm.json_blob(
        "application/vnd.cncf.helm.config.v1+json",
        &serde_json::json!({"name": "chart", "version": "0.1.0", "apiVersion": "v2"}),
    );
    let content = helm.blob(
        "application/vnd.cncf.helm.chart.content.v1.tar+gzip",
        b"\x1f\x8bchart",
    );
    let manifest = helm.json_blob(
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config, "layers": [content]}),
    );
    helm.index(vec![with_annotations(manifest, "0.1.0")]);
    helm.write_dir(&env.join("helm"));

    let mut empty = Layout::new();
    empty.index(vec![]);
    empty.write_dir(&env.join("empty"));

    let mut referrers = Layout::new();
    let sig = signature(&mut referrers, None);
    referrers.index(vec![sig]);
    referrers.write_tar(&env.join("referrers.tar"));

    let before = listing(env.path());
    for (source, needles) in [
        (
            "helm",
            vec![
                "a Helm chart",
                "application/vnd.cncf.helm.config.v1+json",
                "container image",
            ],
        ),
        ("oci:helm:0.1.0", vec!["a Helm chart"]),
        (
            "empty",
            vec!["an empty OCI layout", "index.json lists no image"],
        ),
        (
            "referrers.tar",
            vec![
                "only referrers",
                "application/vnd.dev.sigstore.bundle.v0.3+json",
            ],
        ),
    ] {
        let out = env.run(&["extract", source, "-o", "out"]);
        assert_fails(&out, 1, &needles);
        assert_eq!(
            stderr(&out).lines().count(),
            1,
            "{source}: {}",
            stderr(&out)
        );
    }
    assert_eq!(
        listing(env.path()),
        before,
        "a refused extract left something"
    );
    let listed = json(&env.run(&["extract", "helm", "--list", "--json"]));
    assert!(
        listed["images"][0]["kind"]
            .as_str()
            .unwrap()
            .contains("Helm chart"),
        "{listed}"
    );

    // An image with its signature beside it: the image is the one to extract.
    let mut signed = docker25_save(
        |l, m| {
            let sig = signature(l, Some(m.clone()));
            l.index(vec![with_annotations(m, "1"), sig]);
        },
        false,
    );
    signed.files.retain(|(n, _)| n != "manifest.json");
    signed.write_dir(&env.join("signed"));
    let ours = hydrafy_rootfs(&env, "signed", "signed-out", &[]);
    assert_eq!(
        std::fs::read_to_string(ours.join("etc/version")).unwrap(),
        "v25"
    );
}

#[test]
fn extract_reads_a_one_platform_pull_of_a_two_platform_index() {
    let reg = Registry::start();
    let (index, _, _) = push_two_platforms(&reg.addr, "multi");
    let env = TestEnv::new();
    assert_ok(&env.run(&[
        "pull",
        "--plain-http",
        &index.reference,
        "--platform",
        "linux/arm64",
        "-o",
        "arm",
        "-q",
    ]));
    assert_ok(&env.run(&[
        "pull",
        "--plain-http",
        &index.reference,
        "--all-platforms",
        "-o",
        "all.tar",
        "-q",
    ]));
    let arch = |dir: &Path| std::fs::read_to_string(dir.join("arch")).unwrap();

    // The file holds the index and its arm64 manifest: that is the image.
    let out = env.run(&["extract", "arm", "--rootfs", "-o", "from-arm"]);
    assert_ok(&out);
    assert_eq!(arch(&env.join("from-arm")), "arm64");
    if std::env::consts::ARCH != "aarch64" {
        assert!(
            stderr(&out).contains("holds the image for linux/arm64 only"),
            "{}",
            stderr(&out)
        );
    }
    let out = env.run(&[
        "extract",
        "arm",
        "--rootfs",
        "-o",
        "x",
        "--platform",
        "linux/amd64",
    ]);
    assert_fails(
        &out,
        1,
        &["no manifest for platform linux/amd64", "linux/arm64"],
    );
    assert!(!env.join("x").exists());

    // --all-platforms, named as skopeo names it: by its ref name, whose colons stay in it.
    let ref_name = format!("{}/multi@{}", reg.addr, index.digest);
    for platform in ["linux/amd64", "linux/arm64"] {
        let dir = format!("all-{}", platform.replace('/', "-"));
        let ours = hydrafy_rootfs(
            &env,
            &format!("oci-archive:all.tar:{ref_name}"),
            &dir,
            &["--platform", platform],
        );
        assert_eq!(arch(&ours), platform.trim_start_matches("linux/"));
    }
}

#[test]
fn ctrl_c_while_a_compressed_file_is_decompressed_leaves_nothing_behind() {
    let env = TestEnv::new();
    // A gzip'd tar big enough that one write holds only its start.
    let mut t = Tar::new();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<u8> = (0..4_000_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    t.file("noise", &noise, 0o644);
    let gz = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&t.finish()).unwrap();
        e.finish().unwrap()
    };
    let fifo = env.join("image.tar.gz");
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .unwrap();
    let mut child = env
        .hydrafy()
        .args(["extract", "image.tar.gz", "-o", "out"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut err = child.stderr.take().unwrap();
    let seen = std::sync::Arc::clone(&lines);
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = std::io::Read::read(&mut err, &mut buf) {
            if n == 0 {
                break;
            }
            seen.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let mut writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    writer.write_all(&gz[..64 * 1024]).unwrap();
    wait_until("hydrafy to start decompressing", || {
        lines.lock().unwrap().contains("decompressing")
    });
    let signal = rustix::process::Signal::INT;
    wait_until("hydrafy to catch SIGINT", || catches(child.id(), signal));
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, signal).unwrap();
    wait_until("hydrafy to take the signal", || {
        lines.lock().unwrap().contains("interrupted")
    });
    // Its read of the pipe returns; a later one sees the interruption. Fed
    // to the end, an uncancelled run would fail on a tar that is no image.
    let rest = gz[64 * 1024..].to_vec();
    let feeder = std::thread::spawn(move || {
        for chunk in rest.chunks(16 * 1024) {
            if writer.write_all(chunk).is_err() {
                break;
            }
        }
    });
    let status = child.wait().unwrap();
    feeder.join().unwrap();
    reader.join().unwrap();
    assert_eq!(status.code(), Some(130), "{}", lines.lock().unwrap());
    assert_eq!(
        listing(env.path()),
        ["cache", "docker", "home", "image.tar.gz"],
        "the output or a temporary file was left"
    );
}

#[test]
fn an_xz_gzip_or_zstd_image_file_is_decompressed_in_bounded_memory() {
    // xz's blocks can span the whole file: a decoder that keeps a block's
    // output until it ends holds the whole image in memory.
    require_tool("/usr/bin/time", "time");
    let env = TestEnv::new();
    let zeros = vec![0u8; 1 << 20];
    for tool in ["xz", "gzip", "zstd"] {
        require_tool(tool, if tool == "xz" { "xz-utils" } else { tool });
        let file = env.join(&format!("zeros.tar.{tool}"));
        let mut child = Command::new(tool)
            .args(["-c", "-1"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::fs::File::create(&file).unwrap())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        // 200 MB of zeros: a tar that ends at once, so nothing is an image.
        for _ in 0..200 {
            stdin.write_all(&zeros).unwrap();
        }
        drop(stdin);
        assert!(child.wait().unwrap().success(), "{tool}");

        let out = Command::new("/usr/bin/time")
            .args(["-f", "maxrss=%M"])
            .arg(env!("CARGO_BIN_EXE_hydrafy"))
            .arg("extract")
            .arg(&file)
            .args(["-o", "out"])
            .env("HOME", env.join("home"))
            .env("XDG_CACHE_HOME", env.join("cache"))
            .current_dir(env.path())
            .output()
            .unwrap();
        let err = stderr(&out);
        assert!(
            err.contains("neither an OCI image layout"),
            "{tool}: the whole file was not read: {err}"
        );
        let kib: u64 = err
            .lines()
            .find_map(|l| l.strip_prefix("maxrss="))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no maxrss from /usr/bin/time: {err}"));
        assert!(
            kib < 100 * 1024,
            "{tool}: decompressing 200 MB took {kib} KiB of memory"
        );
    }
    // An xz file that asks for a 1 GiB dictionary is refused before it gets it.
    let greedy = run(
        Command::new("sh")
            .arg("-c")
            .arg("head -c 1000 /dev/zero | xz --lzma2=dict=1GiB -c"),
        "xz",
    );
    std::fs::write(env.join("greedy.tar.xz"), greedy.stdout).unwrap();
    let out = env.run(&["extract", "greedy.tar.xz", "-o", "out"]);
    assert_fails(&out, 1, &["asks for more than the 512 MiB", "xz -dk"]);
}
