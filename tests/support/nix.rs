//! Real Nix stores for the tests, made and checked with Debian's `nix-bin`,
//! and Nix-layered images built from them (one store path per layer, absolute
//! names, the database in the last layer, as nixpkgs' layered images are).
//!
//! `nix-instantiate --store local?root=ROOT` writes real store paths and a
//! real database under `ROOT/nix`, the same layout as a seed; `nix-store
//! --verify --check-contents` on that root is the oracle.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::image::Tar;
use super::require_tool;

/// A `nix-*` command working on the chroot store at `root`, with its own HOME.
pub fn nix(tool: &str, root: &Path) -> Command {
    require_tool(tool, "nix-bin");
    let mut cmd = Command::new(tool);
    let home = root.with_extension("nix-home");
    std::fs::create_dir_all(&home).unwrap();
    cmd.arg("--store")
        .arg(format!("local?root={}", root.display()))
        .env("HOME", &home)
        .env("XDG_CACHE_HOME", home.join("cache"));
    cmd
}

/// Evaluate `expr` (a list of store paths) into the store at `root`; returns the paths.
pub fn instantiate(root: &Path, expr: &str) -> Vec<String> {
    let out = nix("nix-instantiate", root)
        .args([
            "--read-write-mode",
            "--eval",
            "--strict",
            "--json",
            "-E",
            expr,
        ])
        .output()
        .expect("run nix-instantiate");
    assert!(
        out.status.success(),
        "nix-instantiate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("nix-instantiate printed a JSON list")
}

/// `nix-store ARGS` on the store at `root`, which must succeed; its stdout.
pub fn nix_store(root: &Path, args: &[&str]) -> String {
    let out = nix("nix-store", root).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "nix-store {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `nix-store --add FILE` into the store at `root` (a "cached build"); returns its path.
pub fn add(root: &Path, file: &Path) -> String {
    nix_store(root, &["--add", file.to_str().unwrap()])
        .trim()
        .to_string()
}

/// `nix-store -q ARGS` on the store at `root`; stdout lines.
pub fn query(root: &Path, args: &[&str]) -> Vec<String> {
    let args: Vec<&str> = ["-q"].into_iter().chain(args.iter().copied()).collect();
    nix_store(root, &args).lines().map(str::to_string).collect()
}

/// Whether Nix holds `path` valid in the store at `root` (a `nix-store`
/// that cannot answer fails the test).
pub fn is_valid(root: &Path, path: &str) -> bool {
    nix_store(root, &["--check-validity", "--print-invalid", path]).is_empty()
}

/// The oracle: `nix-store --verify --check-contents` on the store at `root`.
pub struct NixVerdict {
    pub ok: bool,
    pub output: String,
}

pub fn nix_verify(root: &Path) -> NixVerdict {
    let out: Output = nix("nix-store", root)
        .args(["--verify", "--check-contents"])
        .output()
        .unwrap();
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    NixVerdict {
        ok: out.status.success() && !output.contains("was modified"),
        output,
    }
}

/// Make everything under `path` writable by its owner (store paths are read-only).
pub fn make_writable(path: &Path) {
    let meta = std::fs::symlink_metadata(path).unwrap();
    if meta.file_type().is_symlink() {
        return;
    }
    let mode = meta.permissions().mode();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | 0o200)).unwrap();
    if meta.is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            make_writable(&e.unwrap().path());
        }
    }
}

/// A chroot store under `root` (`root/nix/store`, `root/nix/var/nix/db`).
pub struct NixStore {
    pub root: PathBuf,
    /// Store paths (`/nix/store/...`) in creation order.
    pub paths: Vec<String>,
}

/// Make a store at `root` holding `builtins.path` copies of `sources` (name,
/// dir) and, for each, a small text file that refers to it (a real reference).
pub fn make_store(root: &Path, sources: &[(&str, &Path)]) -> NixStore {
    let mut lets = Vec::new();
    let mut names = Vec::new();
    for (i, (name, dir)) in sources.iter().enumerate() {
        lets.push(format!(
            "p{i} = builtins.path {{ path = {}; name = \"{name}\"; }};",
            dir.display()
        ));
        lets.push(format!(
            "w{i} = builtins.toFile \"{name}-wrapper\" \"#!/bin/sh\\nexec ${{p{i}}}/bin/run\\n\";"
        ));
        names.push(format!("p{i} w{i}"));
    }
    let expr = format!("let {} in [ {} ]", lets.join("\n"), names.join(" "));
    let paths = instantiate(root, &expr);
    NixStore {
        root: root.to_path_buf(),
        paths,
    }
}

/// A source tree with the shapes a store path has: an executable, a
/// read-only file, a symlink, a subdirectory, an empty file.
pub fn sample_source(dir: &Path, tag: &str, bulk: usize) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("share/doc")).unwrap();
    std::fs::write(dir.join("bin/run"), format!("#!/bin/sh\necho {tag}\n")).unwrap();
    std::fs::set_permissions(dir.join("bin/run"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        dir.join("share/doc/README"),
        format!("{tag}\n").repeat(bulk.max(1)),
    )
    .unwrap();
    std::fs::write(dir.join("share/empty"), b"").unwrap();
    std::os::unix::fs::symlink("../bin/run", dir.join("share/run-link")).unwrap();
}

/// `nix-store --verify --check-contents` on the store under `root`, which
/// must exist (nix-store happily "verifies" a store that is not there).
pub fn verify(root: &Path) -> (bool, String) {
    assert!(
        root.join("nix/var/nix/db/db.sqlite").is_file(),
        "no Nix database under {}",
        root.display()
    );
    assert!(
        std::fs::read_dir(root.join("nix/store")).is_ok_and(|mut d| d.next().is_some()),
        "empty store under {}",
        root.display()
    );
    let verdict = nix_verify(root);
    (
        verdict.ok && !verdict.output.contains("error"),
        verdict.output,
    )
}

/// The tar layers of a Nix-layered image of `store`: one per store path
/// (absolute `/nix/store/...` names), then one with the database.
pub fn layers(store: &NixStore) -> Vec<Vec<u8>> {
    layers_linking(store, None)
}

/// As [`layers`], but with the file `link.0` stored as a hard link to
/// `link.1` (absolute names of two identical files), as the image of a
/// store that `nix-store --optimise` deduplicated has it.
pub fn layers_linking(store: &NixStore, link: Option<(&str, &str)>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for p in &store.paths {
        let mut t = Tar::new();
        t.dir("/nix", 0o755).dir("/nix/store", 0o755);
        add_tree(
            &mut t,
            &store.root,
            Path::new(p.trim_start_matches('/')),
            link,
        );
        out.push(t.finish());
    }
    let mut t = Tar::new();
    for d in ["./nix", "./nix/var", "./nix/var/nix", "./nix/var/nix/db"] {
        t.dir(d, 0o755);
    }
    for f in ["db.sqlite", "schema"] {
        let data = std::fs::read(store.root.join("nix/var/nix/db").join(f)).unwrap();
        t.file(&format!("./nix/var/nix/db/{f}"), &data, 0o644);
    }
    out.push(t.finish());
    out
}

fn add_tree(t: &mut Tar, root: &Path, rel: &Path, link: Option<(&str, &str)>) {
    let path = root.join(rel);
    let meta = std::fs::symlink_metadata(&path).unwrap();
    let name = format!("/{}", rel.display());
    t.mtime = meta.mtime() as u64;
    let mode = meta.mode() & 0o7777;
    if let Some((from, to)) = link
        && from == name
    {
        t.hardlink(&name, to);
    } else if meta.file_type().is_symlink() {
        let target = std::fs::read_link(&path).unwrap();
        t.symlink(&name, &target.to_string_lossy());
    } else if meta.is_dir() {
        t.dir(&name, mode);
        let mut kids: Vec<_> = std::fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        kids.sort();
        for k in kids {
            add_tree(t, root, &rel.join(k), link);
        }
    } else {
        t.file(&name, &std::fs::read(&path).unwrap(), mode);
    }
    t.mtime = 1;
}
