//! `hydrafy gc` and `hydrafy status` on real Nix stores, with real `nix-store`
//! as the oracle: after every gc, `nix-store --verify --check-contents`
//! passes, every kept path is valid and on disk, every deleted one invalid
//! and gone, and every reference of a valid path is valid.
//!
//! Ages: paths are made with `nix-instantiate`, then aged by setting their
//! `registrationTime` and atimes. gc also counts the moment a path came into
//! the store (its ctime), which no one can set back, so these tests run gc
//! with "now" 400 days ahead (the hidden `--now`): what the test made today
//! is then 400 days old, and "used N days ago" means `NOW - N days`.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use hydrafy::oci::Digest;
use hydrafy::seed::{ImageRecord, Layout, State};
use rusqlite::Connection;

use crate::support::nix::{instantiate, nix_store};
use crate::support::{
    TestEnv, assert_fails, assert_ok, require_tool, seed_fingerprint, stderr, stdout,
};

const DAY: i64 = 86_400;

fn real_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A seed made by real Nix, and the "now" its gc runs at.
struct Seed {
    env: TestEnv,
    now: i64,
}

/// One store path to make: a text file of `kib` KiB that refers to the
/// earlier paths `refs` (indices), as builds refer to their inputs.
struct Spec<'a> {
    name: &'a str,
    kib: usize,
    refs: &'a [usize],
}

fn spec<'a>(name: &'a str, kib: usize, refs: &'a [usize]) -> Spec<'a> {
    Spec { name, kib, refs }
}

impl Seed {
    fn new() -> Seed {
        Seed {
            env: TestEnv::new(),
            now: real_now() + 400 * DAY,
        }
    }

    fn dir(&self) -> PathBuf {
        self.env.join("seed")
    }

    /// Make the paths of `specs` in one evaluation; their store paths, in order.
    fn make(&self, specs: &[Spec]) -> Vec<String> {
        let mut lets = Vec::new();
        for (i, s) in specs.iter().enumerate() {
            let refs: String = s.refs.iter().map(|r| format!(" ${{p{r}}}")).collect();
            lets.push(format!(
                r#"p{i} = builtins.toFile "{}" ("{}\n{refs}" + builtins.concatStringsSep "" (builtins.genList (x: "0123456789abcdef") {}));"#,
                s.name,
                s.name,
                s.kib * 64
            ));
        }
        let list: Vec<String> = (0..specs.len()).map(|i| format!("p{i}")).collect();
        instantiate(
            &self.dir(),
            &format!("let {} in [ {} ]", lets.join("\n"), list.join(" ")),
        )
    }

    /// A directory tree as a store path: an executable, a subdirectory, a
    /// symlink and two identical files, all with contents of its own.
    fn make_tree(&self, name: &str) -> String {
        use std::os::unix::fs::PermissionsExt;
        let src = self.env.join(&format!("src-{name}"));
        std::fs::create_dir_all(src.join("bin")).unwrap();
        std::fs::create_dir_all(src.join("share/doc")).unwrap();
        std::fs::write(src.join("bin/run"), format!("#!/bin/sh\necho {name}\n")).unwrap();
        std::fs::set_permissions(src.join("bin/run"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::write(
            src.join("share/doc/README"),
            format!("{name}\n").repeat(500),
        )
        .unwrap();
        for copy in ["a", "b"] {
            std::fs::write(src.join("share").join(copy), format!("{name} twice\n")).unwrap();
        }
        std::os::unix::fs::symlink("../bin/run", src.join("share/run-link")).unwrap();
        instantiate(
            &self.dir(),
            &format!(
                r#"[ (builtins.path {{ path = {}; name = "{name}"; }}) ]"#,
                src.display()
            ),
        )
        .remove(0)
    }

    fn on_disk(&self, path: &str) -> PathBuf {
        self.dir().join(path.trim_start_matches('/'))
    }

    fn db(&self) -> Connection {
        Connection::open(self.dir().join("nix/var/nix/db/db.sqlite")).unwrap()
    }

    /// Registered `days` days before NOW.
    fn registered(&self, path: &str, days: i64) {
        let n = self
            .db()
            .execute(
                "update ValidPaths set registrationTime = ? where path = ?",
                rusqlite::params![self.now - days * DAY, path],
            )
            .unwrap();
        assert_eq!(n, 1, "{path} is not registered");
    }

    /// Last read `days` days before NOW: the atime of every file and directory.
    fn read(&self, path: &str, days: i64) {
        set_atimes(&self.on_disk(path), self.now - days * DAY);
    }

    /// Registered and last read `days` days before NOW.
    fn age(&self, path: &str, days: i64) {
        self.registered(path, days);
        self.read(path, days);
    }

    fn nar_size(&self, path: &str) -> u64 {
        self.db()
            .query_row(
                "select narSize from ValidPaths where path = ?",
                [path],
                |r| r.get::<_, i64>(0),
            )
            .unwrap() as u64
    }

    fn valid_paths(&self) -> Vec<String> {
        let db = self.db();
        let mut stmt = db.prepare("select path from ValidPaths").unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    /// Record images in the state file: (reference, store paths).
    fn record_images(&self, images: &[(&str, &[&str])]) {
        let records: Vec<ImageRecord> = images
            .iter()
            .map(|(reference, paths)| ImageRecord {
                reference: reference.to_string(),
                index_digest: None,
                manifest_digest: Some(Digest::of(reference.as_bytes())),
                config_digest: Digest::of(b"config"),
                platform: "linux/amd64".to_string(),
                layers: paths.len(),
                store_layers: Vec::new(),
                store_paths: paths
                    .iter()
                    .map(|p| p.trim_start_matches("/nix/store/").to_string())
                    .collect(),
                recorded_at: Some(real_now() as u64),
            })
            .collect();
        let mut state = State::new(Layout::Nix, records[0].clone());
        state.images = records;
        state.write(&self.dir()).unwrap();
    }

    fn state_images(&self) -> Vec<String> {
        State::read(&self.dir())
            .unwrap()
            .unwrap()
            .images
            .into_iter()
            .map(|i| i.reference)
            .collect()
    }

    fn gc(&self, args: &[&str]) -> Output {
        self.gc_command(args).output().unwrap()
    }

    fn gc_command(&self, args: &[&str]) -> Command {
        let mut cmd = self.env.hydrafy();
        cmd.arg("gc")
            .arg(self.dir())
            .arg("--now")
            .arg(self.now.to_string())
            .args(args);
        cmd
    }

    /// `hydrafy gc --json ARGS`, which must succeed; its report.
    fn gc_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.gc(&all);
        assert_ok(&out);
        crate::support::json(&out)
    }

    /// The oracle: Nix accepts the store, `kept` are valid and on disk,
    /// `deleted` are neither, and every reference of a valid path is valid.
    fn assert_consistent(&self, kept: &[&String], deleted: &[&String]) {
        let verdict = crate::support::nix::nix_verify(&self.dir());
        assert!(
            verdict.ok && !verdict.output.contains("error"),
            "nix-store --verify --check-contents after gc: {}",
            verdict.output
        );
        for p in kept {
            assert!(self.is_valid(p), "{p} was kept but is not valid");
            assert!(
                self.on_disk(p).symlink_metadata().is_ok(),
                "{p} is valid but gone"
            );
        }
        for p in deleted {
            assert!(!self.is_valid(p), "{p} should be deleted but is valid");
            assert!(
                self.on_disk(p).symlink_metadata().is_err(),
                "{p} is unregistered but still on disk"
            );
        }
        let valid = self.valid_paths();
        if valid.is_empty() {
            return;
        }
        let refs = crate::support::nix::query(
            &self.dir(),
            &[
                &["--references"][..],
                &valid.iter().map(String::as_str).collect::<Vec<_>>(),
            ]
            .concat(),
        );
        let dangling: Vec<&String> = refs.iter().filter(|r| !self.is_valid(r)).collect();
        assert!(
            dangling.is_empty(),
            "valid paths reference invalid ones: {dangling:?}"
        );
    }

    fn is_valid(&self, path: &str) -> bool {
        crate::support::nix::is_valid(&self.dir(), path)
    }
}

/// Set the atime (only) of every file and directory under `path`.
fn set_atimes(path: &Path, secs: i64) {
    for p in walk_tree(path) {
        let meta = p.symlink_metadata().unwrap();
        if meta.file_type().is_symlink() {
            continue;
        }
        utime_atime(&p, secs);
    }
}

fn utime_atime(path: &Path, secs: i64) {
    use rustix::fs::{AtFlags, Timespec, Timestamps, UTIME_OMIT};
    let times = Timestamps {
        last_access: Timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
        last_modification: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
    };
    rustix::fs::utimensat(rustix::fs::CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW).unwrap();
}

/// `path` and everything under it.
fn walk_tree(path: &Path) -> Vec<PathBuf> {
    let mut out = vec![path.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let p = out[i].clone();
        if p.symlink_metadata().unwrap().is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                out.push(e.unwrap().path());
            }
        }
        i += 1;
    }
    out
}

/// The atimes of the files and directories in `paths` (a list made
/// beforehand: listing a directory would move its atime).
fn atimes(paths: &[PathBuf]) -> Vec<(PathBuf, i64)> {
    paths
        .iter()
        .filter(|p| !p.symlink_metadata().unwrap().file_type().is_symlink())
        .map(|p| (p.clone(), p.symlink_metadata().unwrap().atime()))
        .collect()
}

/// A `flock` held by a child process (util-linux's `flock`) until dropped.
struct Held {
    child: Child,
}

impl Held {
    fn new(file: &Path, shared: bool) -> Held {
        require_tool("flock", "util-linux");
        let mut child = Command::new("flock")
            .arg(if shared { "--shared" } else { "--exclusive" })
            .arg(file)
            .args(["sh", "-c", "echo held; exec cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "held");
        Held { child }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// A running `hydrafy gc` that has said it waits for the big lock.
struct Waiting {
    child: Child,
    stderr: BufReader<std::process::ChildStderr>,
    seen: String,
}

impl Waiting {
    fn start(seed: &Seed, args: &[&str]) -> Waiting {
        let mut child = seed
            .gc_command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            let n = stderr.read_line(&mut line).unwrap();
            assert!(n > 0, "gc ended without waiting for the lock: {seen}");
            seen.push_str(&line);
            if line.contains("waiting for the Nix store lock") {
                break;
            }
        }
        Waiting {
            child,
            stderr,
            seen,
        }
    }

    fn finish(mut self) -> (std::process::ExitStatus, String, String) {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.stderr, &mut rest).unwrap();
        let out = self.child.wait_with_output().unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            self.seen + &rest,
        )
    }
}

fn deleted_paths(report: &serde_json::Value) -> Vec<String> {
    report["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["path"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn gc_keeps_images_roots_and_recent_use_and_deletes_the_rest() {
    let seed = Seed::new();
    let p = seed.make(&[
        spec("image-dep", 4, &[]),           // 0
        spec("image", 4, &[0]),              // 1: recorded image
        spec("root-dep", 4, &[]),            // 2
        spec("root", 4, &[2]),               // 3: under gcroots
        spec("registered-recently", 4, &[]), // 4: registered 2 days ago
        spec("read-dep", 4, &[]),            // 5
        spec("read-recently", 4, &[5]),      // 6: read 3 days ago
        spec("old", 8, &[]),                 // 7
        spec("old-user-of-recent", 4, &[4]), // 8: old, references a kept path
        spec("old-user-of-old", 4, &[7]),    // 9
    ]);
    for path in &p {
        seed.age(path, 60);
    }
    seed.registered(&p[4], 2);
    seed.read(&p[6], 3);
    seed.record_images(&[("docker.io/nixos/nix:2.24", &[p[1].as_str()])]);
    let roots = seed.dir().join("nix/var/nix/gcroots");
    std::fs::create_dir_all(&roots).unwrap();
    std::os::unix::fs::symlink(&p[3], roots.join("pinned")).unwrap();

    let report = seed.gc_json(&["--keep-days", "14"]);
    let mut deleted = deleted_paths(&report);
    deleted.sort();
    let mut want = vec![p[7].clone(), p[8].clone(), p[9].clone()];
    want.sort();
    assert_eq!(deleted, want, "{report}");
    assert_eq!(report["deleted_paths"], 3);
    assert!(report["lock_held_seconds"].as_f64().unwrap() > 0.0);
    let kept: Vec<&String> = p[..7].iter().collect();
    seed.assert_consistent(&kept, &[&p[7], &p[8], &p[9]]);
    // The locks of deleted paths go with them, and the trash too.
    assert!(
        !seed
            .dir()
            .join(format!("{}.lock", p[7].trim_start_matches('/')))
            .exists()
    );
    assert!(
        !crate::support::listing(&seed.dir())
            .iter()
            .any(|n| n.starts_with(".hydrafy-trash"))
    );
    // Once more: nothing left to do.
    let again = seed.gc_json(&["--keep-days", "14"]);
    assert_eq!(again["deleted_paths"], 0);
}

#[test]
fn the_budget_deletes_the_least_recently_used_first_and_stops_under_it() {
    let seed = Seed::new();
    let p = seed.make(&[
        spec("image", 4, &[]),
        spec("used-100-days-ago", 64, &[]),
        spec("used-80-days-ago", 64, &[]),
        spec("used-60-days-ago", 64, &[]),
    ]);
    seed.record_images(&[("docker.io/nixos/nix:2.24", &[p[0].as_str()])]);
    for (path, days) in p.iter().zip([200, 100, 80, 60]) {
        seed.age(path, days);
    }
    let total: u64 = p.iter().map(|x| seed.nar_size(x)).sum();
    // Between "the two oldest gone" and "only the oldest gone".
    let budget = total - seed.nar_size(&p[1]) - seed.nar_size(&p[2]) / 2;
    let report = seed.gc_json(&["--keep-days", "14", "--max-size", &budget.to_string()]);
    let deleted = deleted_paths(&report);
    assert_eq!(deleted.len(), 2, "{report}");
    assert_eq!(
        {
            let mut d = deleted.clone();
            d.sort();
            d
        },
        {
            let mut w = vec![p[1].clone(), p[2].clone()];
            w.sort();
            w
        }
    );
    assert!(report["store_bytes_after"].as_u64().unwrap() <= budget);
    assert!(report["over_budget_by"].is_null());
    seed.assert_consistent(&[&p[0], &p[3]], &[&p[1], &p[2]]);

    // A budget the kept set alone exceeds: all that may go goes, a warning, exit 0.
    let out = seed.gc(&["--keep-days", "14", "--max-size", "1"]);
    assert_ok(&out);
    assert!(stderr(&out).contains("over --max-size"), "{}", stderr(&out));
    seed.assert_consistent(&[&p[0]], &[&p[3]]);
}

#[test]
fn a_shared_big_lock_makes_gc_wait_and_wait_1s_gives_up_with_nothing_changed() {
    let seed = Seed::new();
    let p = seed.make(&[spec("old", 4, &[]), spec("recent", 4, &[])]);
    seed.age(&p[0], 60);
    seed.age(&p[1], 1);
    let big_lock = seed.dir().join("nix/var/nix/db/big-lock");
    let job = Held::new(&big_lock, true);
    let before = seed_fingerprint(&seed.dir());
    let out = seed.gc(&["--wait", "1s"]);
    assert_fails(&out, 1, &["nix was busy", "nothing changed"]);
    assert_eq!(seed_fingerprint(&seed.dir()), before);
    assert!(seed.is_valid(&p[0]));

    let gc = Waiting::start(&seed, &[]);
    drop(job);
    let (status, out, err) = gc.finish();
    assert!(status.success(), "{err}");
    assert!(out.contains("deleted 1 store entries"), "{out}");
    seed.assert_consistent(&[&p[1]], &[&p[0]]);
}

#[test]
fn ctrl_c_while_gc_waits_for_the_lock_changes_nothing() {
    let seed = Seed::new();
    let p = seed.make(&[spec("old", 4, &[])]);
    seed.age(&p[0], 60);
    let job = Held::new(&seed.dir().join("nix/var/nix/db/big-lock"), true);
    let before = seed_fingerprint(&seed.dir());
    let gc = Waiting::start(&seed, &[]);
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(gc.child.id() as i32).unwrap(),
        rustix::process::Signal::INT,
    )
    .unwrap();
    let (status, _, err) = gc.finish();
    assert_eq!(status.code(), Some(130), "{err}");
    drop(job);
    assert_eq!(seed_fingerprint(&seed.dir()), before);
    seed.assert_consistent(&[&p[0]], &[]);
}

#[test]
fn gc_looks_again_under_the_lock_at_what_jobs_did_while_it_waited() {
    let seed = Seed::new();
    let p = seed.make(&[
        spec("old-then-referenced", 4, &[]),
        spec("old-then-read", 4, &[]),
        spec("old", 4, &[]),
    ]);
    for path in &p {
        seed.age(path, 60);
    }
    let job = Held::new(&seed.dir().join("nix/var/nix/db/big-lock"), true);
    let gc = Waiting::start(&seed, &["--json"]);
    // While gc waits, a job registers a build that references one victim...
    let new = instantiate(
        &seed.dir(),
        &format!(
            r#"[ (builtins.toFile "new-build" "uses ${{builtins.storePath "{}"}}") ]"#,
            p[0]
        ),
    );
    let new = &new[0];
    // ...and reads another (its atime, in gc's clock, says "now").
    seed.read(&p[1], 0);
    drop(job);
    let (status, out, err) = gc.finish();
    assert!(status.success(), "{err}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(deleted_paths(&report), vec![p[2].clone()], "{report}");
    let skipped = report["skipped"].to_string();
    assert!(
        skipped.contains("a path that stays references it"),
        "{skipped}"
    );
    assert!(skipped.contains("used since gc looked"), "{skipped}");
    seed.assert_consistent(&[&p[0], &p[1], new], &[&p[2]]);
}

#[test]
fn a_held_path_lock_keeps_that_path() {
    let seed = Seed::new();
    let p = seed.make(&[spec("locked", 4, &[]), spec("free", 4, &[])]);
    for path in &p {
        seed.age(path, 60);
    }
    let lock = seed
        .dir()
        .join(format!("{}.lock", p[0].trim_start_matches('/')));
    let job = Held::new(&lock, false);
    let report = seed.gc_json(&[]);
    drop(job);
    assert_eq!(deleted_paths(&report), vec![p[1].clone()]);
    assert!(
        report["skipped"].to_string().contains("lock is held"),
        "{report}"
    );
    seed.assert_consistent(&[&p[0]], &[&p[1]]);
}

#[test]
fn dry_run_lists_largest_first_and_changes_nothing_not_even_atimes() {
    let seed = Seed::new();
    let p = seed.make(&[
        spec("small", 4, &[]),
        spec("large", 64, &[]),
        spec("middle", 16, &[]),
    ]);
    let tree = seed.make_tree("tree");
    for path in p.iter().chain([&tree]) {
        seed.registered(path, 60);
    }
    let before = seed_fingerprint(&seed.dir());
    // Atimes in the real past (a read would move them), set after the
    // fingerprint, which reads every file.
    let files = walk_tree(&seed.dir().join("nix/store"));
    set_atimes(&seed.dir().join("nix/store"), 1_000_000_000);
    let times = atimes(&files);
    let out = seed.gc(&["--dry-run"]);
    assert_ok(&out);
    assert_eq!(atimes(&files), times);
    assert_eq!(seed_fingerprint(&seed.dir()), before);
    let text = stdout(&out);
    let order: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter(|w| w.starts_with("/nix/store/"))
        .collect();
    assert_eq!(order.len(), 4, "{text}");
    let sizes: Vec<u64> = order.iter().map(|x| seed.nar_size(x)).collect();
    assert!(
        sizes.windows(2).all(|w| w[0] >= w[1]),
        "not largest first: {text}"
    );
    assert!(text.contains("would delete 4 store entries"), "{text}");
    seed.assert_consistent(&[&p[0], &p[1], &p[2], &tree], &[]);
}

#[test]
fn drop_image_releases_it_and_the_state_forgets_it_only_when_gc_succeeds() {
    let seed = Seed::new();
    let p = seed.make(&[
        spec("shared", 4, &[]),
        spec("old-image", 4, &[0]),
        spec("new-image", 4, &[0]),
    ]);
    for path in &p {
        seed.age(path, 60);
    }
    seed.record_images(&[
        ("docker.io/nixos/nix:old", &[p[1].as_str()]),
        ("docker.io/nixos/nix:new", &[p[2].as_str()]),
    ]);
    let out = seed.gc(&["--drop-image", "nixos/nix:nope"]);
    assert_fails(&out, 2, &["--drop-image", "records no such image"]);

    // gc fails (nix busy): the image stays recorded and its paths stay.
    let job = Held::new(&seed.dir().join("nix/var/nix/db/big-lock"), true);
    let out = seed.gc(&["--drop-image", "nixos/nix:old", "--wait", "1s"]);
    assert_fails(&out, 1, &["nix was busy"]);
    drop(job);
    assert_eq!(seed.state_images().len(), 2);
    seed.assert_consistent(&[&p[1]], &[]);

    let report = seed.gc_json(&["--drop-image", "nixos/nix:old"]);
    assert_eq!(deleted_paths(&report), vec![p[1].clone()]);
    assert_eq!(report["dropped_images"][0], "docker.io/nixos/nix:old");
    assert_eq!(seed.state_images(), vec!["docker.io/nixos/nix:new"]);
    seed.assert_consistent(&[&p[0], &p[2]], &[&p[1]]);
}

#[test]
fn a_verify_made_the_whole_store_look_freshly_used() {
    let seed = Seed::new();
    let tree = seed.make_tree("tree");
    let p = seed.make(&[spec("file", 16, &[])]);
    let long_ago = 1_000_000_000; // 2001: older than any mtime and than a day
    let files = walk_tree(&seed.dir().join("nix/store"));
    set_atimes(&seed.dir().join("nix/store"), long_ago);
    let before = atimes(&files);
    assert!(before.iter().all(|(_, a)| *a == long_ago));
    assert!(before.len() > 8, "{before:?}");
    assert_ok(&seed.env.run(&["verify", "seed"]));
    assert_eq!(atimes(&files), before);
    // status and a dry run read the store the same way.
    assert_ok(&seed.env.run(&["status", "seed"]));
    assert_ok(&seed.gc(&["--dry-run"]));
    assert_eq!(atimes(&files), before);
    let _ = (tree, p);
}

#[test]
fn paths_just_added_with_old_registration_times_are_kept() {
    // `fetch --merge` registers an image's paths with the image's own
    // registration times, and its files carry atime 1; the state file records
    // the image only after the transaction. The hour after a path came into
    // the store protects it meanwhile.
    let seed = Seed::new();
    let p = seed.make(&[spec("merged", 4, &[])]);
    seed.db()
        .execute("update ValidPaths set registrationTime = 1", [])
        .unwrap();
    set_atimes(&seed.on_disk(&p[0]), 1);
    let out = seed.env.run(&["gc", "seed", "--keep-days", "0", "--json"]);
    assert_ok(&out);
    let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(report["deleted_paths"], 0, "{report}");
    seed.assert_consistent(&[&p[0]], &[]);
}

#[test]
fn unregistered_leftovers_go_once_an_hour_old_and_unlocked() {
    let seed = Seed::new();
    let p = seed.make(&[spec("kept", 4, &[])]);
    seed.age(&p[0], 1);
    let store = seed.dir().join("nix/store");
    let leftover = store.join("0c5ab7jfyc4i3ykjr7h3sdk51kkxzs8w-interrupted-build");
    let locked = store.join("1c5ab7jfyc4i3ykjr7h3sdk51kkxzs8w-building-now");
    for d in [&leftover, &locked] {
        std::fs::create_dir_all(d.join("bin")).unwrap();
        std::fs::write(d.join("bin/x"), "half written").unwrap();
    }
    // Made just now: too young to go (without --now, gc's clock is the real one).
    let out = seed.env.run(&["gc", "seed", "--json"]);
    assert_ok(&out);
    assert!(leftover.exists() && locked.exists());
    // Two hours later, the unlocked one goes.
    let job = Held::new(&locked.with_extension("lock"), false);
    let later = (real_now() + 7200).to_string();
    let report = {
        let out = seed.env.run(&["gc", "seed", "--json", "--now", &later]);
        assert_ok(&out);
        serde_json::from_str::<serde_json::Value>(stdout(&out).trim()).unwrap()
    };
    drop(job);
    assert_eq!(
        deleted_paths(&report),
        vec!["/nix/store/0c5ab7jfyc4i3ykjr7h3sdk51kkxzs8w-interrupted-build"]
    );
    assert_eq!(report["deleted"][0]["registered"], false);
    assert!(!leftover.exists());
    assert!(locked.exists());
    seed.assert_consistent(&[&p[0]], &[]);
}

#[test]
fn links_left_with_one_link_are_removed() {
    let seed = Seed::new();
    let doomed = seed.make_tree("doomed");
    let kept = seed.make_tree("kept");
    nix_store(&seed.dir(), &["--optimise"]);
    let links = seed.dir().join("nix/store/.links");
    let count = || std::fs::read_dir(&links).unwrap().count();
    let before = count();
    assert!(before > 0, "nix-store --optimise made no .links");
    seed.age(&doomed, 60);
    seed.age(&kept, 1);
    let report = seed.gc_json(&[]);
    assert_eq!(deleted_paths(&report), vec![doomed.clone()]);
    let removed = report["links_removed"].as_u64().unwrap() as usize;
    assert!(removed > 0, "{report}");
    assert_eq!(count(), before - removed);
    for e in std::fs::read_dir(&links).unwrap() {
        let e = e.unwrap();
        assert!(
            e.metadata().unwrap().nlink() > 1,
            "{:?} was left with one link",
            e.path()
        );
    }
    seed.assert_consistent(&[&kept], &[&doomed]);
}

#[test]
fn bad_options_and_a_folder_without_a_database_exit_2_with_one_line() {
    let seed = Seed::new();
    let p = seed.make(&[spec("x", 4, &[])]);
    let before = seed_fingerprint(&seed.dir());
    for (args, needle) in [
        (&["--max-size", "10X"][..], "--max-size"),
        (&["--keep-days", "two"][..], "--keep-days"),
        (&["--wait", "soon"][..], "--wait"),
    ] {
        let out = seed.gc(args);
        assert_fails(&out, 2, &[needle]);
        assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    }
    assert_eq!(seed_fingerprint(&seed.dir()), before);
    std::fs::create_dir_all(seed.env.join("empty")).unwrap();
    for cmd in ["gc", "status"] {
        let out = seed.env.run(&[cmd, "empty"]);
        assert_fails(&out, 2, &["holds no nix/var/nix/db/db.sqlite"]);
    }
    let _ = p;
}

#[test]
fn status_tells_what_the_seed_holds_and_what_gc_would_free() {
    let seed = Seed::new();
    let p = seed.make(&[
        spec("image", 4, &[]),
        spec("used-yesterday", 4, &[]),
        spec("used-10-days-ago", 4, &[]),
        spec("old", 16, &[]),
    ]);
    for (path, days) in p.iter().zip([100, 0, 10, 100]) {
        seed.age(path, days);
    }
    seed.registered(&p[1], 1);
    let status = |seed: &Seed| -> serde_json::Value {
        let out = seed
            .env
            .run(&["status", "seed", "--json", "--now", &seed.now.to_string()]);
        assert_ok(&out);
        serde_json::from_str(stdout(&out).trim()).unwrap()
    };
    // A docker-cp seed: no state file, everything but the images.
    let cp = status(&seed);
    assert_eq!(cp["state_file"], false);
    assert_eq!(cp["images"].as_array().unwrap().len(), 0);
    assert_eq!(cp["store"]["paths"], 4);

    seed.record_images(&[("docker.io/nixos/nix:2.24", &[p[0].as_str()])]);
    let s = status(&seed);
    assert_eq!(s["images"][0]["reference"], "docker.io/nixos/nix:2.24");
    assert_eq!(s["images"][0]["closure"]["paths"], 1);
    let total: u64 = p.iter().map(|x| seed.nar_size(x)).sum();
    assert_eq!(s["store"]["bytes"], total);
    assert_eq!(s["kept_by_images"]["paths"], 1);
    // relatime: a read shows within a day, so "yesterday" may be today.
    assert_eq!(s["used_last_7_days"]["paths"], 1);
    assert_eq!(s["used_last_30_days"]["paths"], 2);
    assert_eq!(s["gc_would_free"]["paths"], 1);
    assert_eq!(s["gc_would_free"]["bytes"], seed.nar_size(&p[3]));
    assert!(s["free_bytes"].as_u64().unwrap() > 0);
    let text = stdout(
        &seed
            .env
            .run(&["status", "seed", "--now", &seed.now.to_string()]),
    );
    for line in [
        "image:",
        "store:",
        "kept by images:",
        "used, last 30 days:",
        "gc would free:",
    ] {
        assert!(text.contains(line), "{text}");
    }
    // What status says gc would free is what gc frees.
    let report = seed.gc_json(&[]);
    assert_eq!(deleted_paths(&report), vec![p[3].clone()]);
}

#[test]
fn gc_after_fetch_and_merge_keeps_both_images_and_drops_only_what_jobs_left() {
    use crate::support::image::{Comp, Image, Media, layer, push};
    use crate::support::nix::{add, make_store, sample_source};
    let work = tempfile::tempdir().unwrap();
    let src = |name: &str| {
        let dir = work.path().join(format!("src-{name}"));
        sample_source(&dir, name, 100);
        dir
    };
    let (base, old_only, new_only) = (src("base"), src("old-only"), src("new-only"));
    let old = make_store(
        &work.path().join("old"),
        &[("base", base.as_path()), ("old-only", old_only.as_path())],
    );
    let new = make_store(
        &work.path().join("new"),
        &[("base", base.as_path()), ("new-only", new_only.as_path())],
    );
    let reg = crate::support::registry::Registry::start();
    let image = |store: &crate::support::nix::NixStore| {
        let layers = crate::support::nix::layers(store)
            .iter()
            .map(|t| layer(t, Comp::Gzip, Media::Docker))
            .collect();
        push(
            &reg.addr,
            "nixos/nix",
            None,
            &Image::new(Media::Docker, layers),
        )
    };
    let (old_image, new_image) = (image(&old), image(&new));

    let seed = Seed::new();
    let dir = seed.dir();
    let fetch = |reference: &str, merge: bool| {
        let mut args = vec!["fetch", "--plain-http", "-q", reference, "-o", "seed"];
        if merge {
            args.push("--merge");
        }
        assert_ok(&seed.env.run(&args));
    };
    fetch(&old_image.reference, false);
    std::fs::write(seed.env.join("artifact"), "a build no job needs any more\n").unwrap();
    let cached = add(&dir, &seed.env.join("artifact"));
    fetch(&new_image.reference, true);
    let state = State::read(&dir).unwrap().unwrap();
    assert_eq!(state.images.len(), 2);
    for record in &state.images {
        assert!(!record.store_paths.is_empty(), "{record:?}");
        assert!(record.recorded_at.is_some());
    }
    // Everything was last used long ago (in gc's clock).
    for path in seed.valid_paths() {
        seed.age(&path, 100);
    }
    let report = seed.gc_json(&[]);
    assert_eq!(deleted_paths(&report), vec![cached.clone()], "{report}");
    let all: Vec<&String> = old.paths.iter().chain(&new.paths).collect();
    seed.assert_consistent(&all, &[&cached]);

    // The old image released: its own paths go, the shared ones stay.
    let report = seed.gc_json(&["--drop-image", &old_image.reference]);
    let mut gone = deleted_paths(&report);
    gone.sort();
    let mut want: Vec<String> = old
        .paths
        .iter()
        .filter(|p| !new.paths.contains(p))
        .cloned()
        .collect();
    want.sort();
    assert_eq!(gone, want);
    let kept: Vec<&String> = new.paths.iter().collect();
    seed.assert_consistent(&kept, &want.iter().collect::<Vec<_>>());
    assert_eq!(State::read(&dir).unwrap().unwrap().images.len(), 1);
}

#[test]
fn on_a_noatime_mount_gc_says_so_once_and_counts_only_registration() {
    require_tool("unshare", "util-linux");
    let seed = Seed::new();
    let p = seed.make(&[
        spec("read-yesterday", 4, &[]),
        spec("registered-yesterday", 4, &[]),
    ]);
    seed.registered(&p[0], 60);
    seed.read(&p[0], 1);
    seed.age(&p[1], 60);
    seed.registered(&p[1], 1);
    // A private mount namespace with a noatime tmpfs holding a copy of the seed.
    let mnt = seed.env.join("noatime");
    std::fs::create_dir_all(&mnt).unwrap();
    let script = format!(
        "mount -t tmpfs -o noatime tmpfs {mnt} && cp -a {seed} {mnt}/seed && \
         {hydrafy} gc {mnt}/seed --dry-run --json --now {now}",
        mnt = mnt.display(),
        seed = seed.dir().display(),
        hydrafy = env!("CARGO_BIN_EXE_hydrafy"),
        now = seed.now
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "needs root for a mount namespace: {}",
        stderr(&out)
    );
    let err = stderr(&out);
    assert_eq!(err.matches("noatime mount").count(), 1, "{err}");
    let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(report["atimes"], "off");
    // The read does not count there; the registration does.
    assert_eq!(deleted_paths(&report), vec![p[0].clone()], "{report}");
}
