//! Shared test helpers: temp dirs, the hydrafy binary, required tools, and
//! (in submodules) a real registry and an image builder.

#![allow(dead_code)]

pub mod image;
pub mod jobs;
pub mod nix;
pub mod proxy;
pub mod registry;
pub mod tls;
pub mod token;
pub mod upgrade;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest as _, Sha256};

/// A per-test temporary tree with its own HOME, cache and docker config, so
/// no test reads the developer's ~/.docker or fills their cache.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
}

impl TestEnv {
    pub fn new() -> TestEnv {
        let dir = tempfile::Builder::new()
            .prefix("hydrafy-test-")
            .tempdir()
            .expect("temp dir");
        for sub in ["home", "cache", "docker"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        TestEnv { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A `hydrafy` command with this environment.
    pub fn hydrafy(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hydrafy"));
        cmd.env("HOME", self.join("home"))
            .env("XDG_CACHE_HOME", self.join("cache"))
            .env("DOCKER_CONFIG", self.join("docker"))
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .current_dir(self.path());
        cmd
    }

    /// Run `hydrafy ARGS`, returning the output.
    pub fn run(&self, args: &[&str]) -> Output {
        self.hydrafy().args(args).output().expect("run hydrafy")
    }
}

/// Panic with an install hint when a tool a test needs is missing.
pub fn require_tool(tool: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "this test needs `{tool}`; install it with `apt-get install {package}` (.ci/run does this)"
    );
}

/// Wait until `event` holds, looking every 10 ms; panic naming `what` after
/// 60 s. For waiting on something a test can observe (a message, a file, a
/// request), never for time to pass.
pub fn wait_until(what: &str, mut event: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !event() {
        assert!(
            std::time::Instant::now() < deadline,
            "gave up after 60 s waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Has process `pid` a handler for `signal` (its bit in `SigCgt` of /proc/PID/status)?
pub fn catches(pid: u32, signal: rustix::process::Signal) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (signal.as_raw() - 1)) != 0)
}

/// A `--json` run that succeeded and changed nothing.
pub fn assert_no_op(out: &Output) {
    assert_ok(out);
    assert!(
        stdout(out).contains("\"unchanged\":true"),
        "{}",
        stdout(out)
    );
}

/// stdout parsed as the one JSON object `--json` prints.
pub fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(stdout(out).trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(out)))
}

/// stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// stdout as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Assert success, showing stderr when not.
pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "hydrafy failed ({}): {}",
        out.status,
        stderr(out)
    );
}

/// Assert failure with exit `code`, an stderr of one line that contains each of `needles`.
pub fn assert_fails(out: &Output, code: i32, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "unexpected exit status; stderr: {err}"
    );
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.starts_with("hydrafy: error: "),
        "the last stderr line is not the error: {err}"
    );
    for n in needles {
        assert!(last.contains(n), "error line lacks {n:?}: {last}");
    }
}

/// A fingerprint of everything under `root`: path -> (type, mode, size, mtime, content hash or link target).
/// Two equal fingerprints mean nothing under `root` changed.
pub fn fingerprint(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    if std::fs::symlink_metadata(root).is_err() {
        out.insert(PathBuf::from("<absent>"), String::new());
        return out;
    }
    walk(root, root, &mut out);
    out
}

/// [`fingerprint`] of a Nix root, but for the mtime of its database folder:
/// reading a WAL-mode database (as Nix and hydrafy do) creates and removes
/// its `-wal`/`-shm` files, which moves that one time. Every file, mode and
/// content must still be as it was.
pub fn seed_fingerprint(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = fingerprint(root);
    if let Some(db) = out.get_mut(Path::new("nix/var/nix/db")) {
        let mode = db.rsplit_once(' ').map(|(kept, _)| kept.to_string());
        *db = mode.unwrap_or_default();
    }
    out
}

fn walk(root: &Path, path: &Path, out: &mut BTreeMap<PathBuf, String>) {
    let meta = std::fs::symlink_metadata(path).expect("stat");
    let rel = path.strip_prefix(root).unwrap().to_path_buf();
    let ft = meta.file_type();
    let desc = if ft.is_symlink() {
        format!("link -> {}", std::fs::read_link(path).unwrap().display())
    } else if ft.is_dir() {
        format!("dir {:o} {}", meta.mode() & 0o7777, meta.mtime())
    } else if ft.is_file() {
        let data = std::fs::read(path).unwrap_or_default();
        format!(
            "file {:o} {} {} {}",
            meta.mode() & 0o7777,
            meta.len(),
            meta.mtime(),
            hex::encode(Sha256::digest(&data))
        )
    } else {
        format!("special {:o}", meta.mode())
    };
    out.insert(rel, desc);
    if ft.is_dir() {
        let mut names: Vec<_> = std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for p in names {
            walk(root, &p, out);
        }
    }
}

/// Names in `dir` (sorted), for "nothing left beside DIR" checks.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}
