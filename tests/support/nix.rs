//! Real Nix stores for the tests, made and checked with Debian's `nix-bin`.
//!
//! `nix-instantiate --store local?root=ROOT` writes real store paths and a
//! real database under `ROOT/nix`, the same layout as a seed; `nix-store
//! --verify --check-contents` on that root is the oracle.

use std::path::Path;
use std::process::{Command, Output};

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

/// `nix-store --add FILE` into the store at `root` (a "cached build"); returns its path.
pub fn add(root: &Path, file: &Path) -> String {
    let out = nix("nix-store", root)
        .arg("--add")
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `nix-store -q ARGS` on the store at `root`; stdout lines.
pub fn query(root: &Path, args: &[&str]) -> Vec<String> {
    let out = nix("nix-store", root)
        .arg("-q")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nix-store -q {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
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
    use std::os::unix::fs::PermissionsExt;
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
