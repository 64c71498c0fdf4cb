//! Merging an image's store and database into a seed (`hydrafy::nix::Merge`,
//! the engine of `fetch --merge`), checked with the real `nix-store`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use hydrafy::nix::Merge;
use hydrafy::ui::Recorder;
use rustix::fs::FlockOperation;

use crate::support::nix::{add, instantiate, nix_verify, query};
use crate::support::{TestEnv, seed_fingerprint, wait_until};

/// Two stores made by Nix that share one path: a seed (`A`, with a cached
/// build added by `nix-store --add`) and an unpacked image (`B`).
struct Pair {
    env: TestEnv,
    shared: String,
    seed_only: String,
    cached: String,
    image_tree: String,
    image_user: String,
}

impl Pair {
    fn new() -> Pair {
        let env = TestEnv::new();
        let common = env.join("common");
        fs::create_dir_all(common.join("lib")).unwrap();
        fs::write(common.join("lib/libc.so"), "not really libc").unwrap();
        let extra = env.join("extra");
        fs::create_dir_all(extra.join("bin")).unwrap();
        fs::write(extra.join("bin/tool"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(extra.join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
        let common_expr = format!(
            r#"builtins.path {{ path = {}; name = "common"; }}"#,
            common.display()
        );
        let a = instantiate(
            &env.join("A"),
            &format!(
                r#"let c = {common_expr}; in [ c (builtins.toFile "seed-only" "uses ${{c}}") ]"#
            ),
        );
        let b = instantiate(
            &env.join("B"),
            &format!(
                r#"let c = {common_expr}; t = builtins.path {{ path = {}; name = "tool"; }}; in
                   [ c t (builtins.toFile "image-user" "uses ${{c}} and ${{t}}") ]"#,
                extra.display()
            ),
        );
        assert_eq!(a[0], b[0], "both stores hold the common path");
        fs::write(env.join("build-output"), "a cached build result\n").unwrap();
        let cached = add(&env.join("A"), &env.join("build-output"));
        Pair {
            shared: a[0].clone(),
            seed_only: a[1].clone(),
            cached,
            image_tree: b[1].clone(),
            image_user: b[2].clone(),
            env,
        }
    }

    fn seed(&self) -> PathBuf {
        self.env.join("A")
    }

    fn image(&self) -> PathBuf {
        self.env.join("B")
    }
}

#[test]
fn merge_adds_the_image_paths_and_nix_store_accepts_the_result() {
    let p = Pair::new();
    let hash_in_image = query(&p.image(), &["--hash", &p.image_user]);
    let rec = Recorder::default();
    let mut merge = Merge::plan(&p.seed(), &p.image(), &rec).unwrap();
    let mut want = vec![p.image_tree.clone(), p.image_user.clone()];
    want.sort();
    assert_eq!(
        merge.missing(),
        want,
        "(a) lists exactly what the seed lacks"
    );
    assert_eq!(merge.already_present(), 1);
    merge.install().unwrap();
    merge.install().expect("a second install does nothing");
    let summary = merge.commit().unwrap();
    assert_eq!(summary.added.len(), 2);

    let verdict = nix_verify(&p.seed());
    assert!(verdict.ok, "{}", verdict.output);
    assert!(!verdict.output.contains("error"), "{}", verdict.output);
    // The new paths are valid, with the image's hashes and references mapped to the seed's ids.
    assert_eq!(query(&p.seed(), &["--hash", &p.image_user]), hash_in_image);
    let mut refs = query(&p.seed(), &["--references", &p.image_user]);
    refs.sort();
    let mut want_refs = vec![p.shared.clone(), p.image_tree.clone()];
    want_refs.sort();
    assert_eq!(refs, want_refs);
    assert_eq!(
        query(&p.seed(), &["--referrers", &p.shared]).len(),
        2,
        "the shared path is referenced by the seed's and the image's user"
    );
    // What the seed had is still valid: its own path and the cached build.
    for old in [&p.seed_only, &p.cached] {
        assert_eq!(query(&p.seed(), &["--hash", old]).len(), 1, "{old}");
    }
    // Nix keeps working on the merged database (ids continue after ours).
    fs::write(p.env.join("after"), "added after the merge").unwrap();
    add(&p.seed(), &p.env.join("after"));
    assert!(nix_verify(&p.seed()).ok);
    // The image's copies were moved, not copied.
    assert!(
        !p.image()
            .join(p.image_tree.trim_start_matches('/'))
            .exists()
    );
}

#[test]
fn a_path_whose_hash_differs_is_an_error_that_changes_nothing() {
    let p = Pair::new();
    let db = p.image().join("nix/var/nix/db/db.sqlite");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute(
        "update ValidPaths set hash = 'sha256:0000000000000000000000000000000000000000000000000000000000000000' where path = ?",
        [&p.shared],
    )
    .unwrap();
    drop(conn);
    let before = seed_fingerprint(&p.seed());
    let err = Merge::plan(&p.seed(), &p.image(), &Recorder::default())
        .err()
        .expect("a disagreement is refused")
        .to_string();
    assert!(err.contains(&p.shared), "{err}");
    assert!(
        err.contains("disagree") && err.contains("nothing was changed"),
        "{err}"
    );
    assert_eq!(seed_fingerprint(&p.seed()), before);
}

#[test]
fn commit_refuses_to_register_paths_that_were_not_installed() {
    let p = Pair::new();
    let db = p.seed().join("nix/var/nix/db/db.sqlite");
    let before = fs::read(&db).unwrap();
    let rec = Recorder::default();
    let merge = Merge::plan(&p.seed(), &p.image(), &rec).unwrap();
    let err = merge
        .commit()
        .expect_err("commit before install")
        .to_string();
    assert!(err.contains("not in the store yet"), "{err}");
    assert_eq!(fs::read(&db).unwrap(), before, "nothing was registered");
    assert!(nix_verify(&p.seed()).ok);
}

#[test]
fn an_unsupported_schema_is_refused() {
    let p = Pair::new();
    fs::write(p.image().join("nix/var/nix/db/schema"), "7").unwrap();
    let err = Merge::plan(&p.seed(), &p.image(), &Recorder::default())
        .err()
        .expect("schema 7 is refused")
        .to_string();
    assert!(
        err.contains("schema version 7") && err.contains("B/nix/var/nix/db/schema"),
        "{err}"
    );
}

/// Take `how` on `file` (created if need be) through a new open file
/// description; dropping the file releases it. `flock` locks belong to open
/// file descriptions, so the plan's own `open` conflicts with this one even
/// in the same process.
fn hold_lock(file: &Path, how: FlockOperation) -> fs::File {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(file)
        .unwrap();
    rustix::fs::flock(&f, how).unwrap();
    f
}

/// Does the kernel list a `flock` request of this process on `file` as
/// blocked, waiting for another holder? (`/proc/locks` shows each waiter as
/// `N: -> FLOCK  ADVISORY  READ|WRITE PID MAJ:MIN:INODE START END`.)
fn blocked_on_flock(file: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let inode = fs::metadata(file).unwrap().ino().to_string();
    let pid = std::process::id().to_string();
    fs::read_to_string("/proc/locks")
        .expect("read /proc/locks")
        .lines()
        .filter_map(|l| l.split_once("->"))
        .map(|(_, waiter)| waiter.split_whitespace().collect::<Vec<_>>())
        .any(|f| {
            f.first() == Some(&"FLOCK")
                && f.get(3) == Some(&pid.as_str())
                && f.get(4).and_then(|id| id.rsplit(':').next()) == Some(inode.as_str())
        })
}

/// Run `plan` in a thread while a lock is held: it must say it is waiting for
/// that lock, be blocked on it (as the kernel sees it), and return only after
/// the lock goes, with the plan it would have made without the wait.
fn assert_plan_waits_for(p: &Pair, lock_file: &Path, how: FlockOperation) {
    let held = hold_lock(lock_file, how);
    let rec = Recorder::default();
    let released = AtomicBool::new(false);
    let (seed, image) = (p.seed(), p.image());
    let path = lock_file.display().to_string();
    let said_waiting = || {
        let infos = rec.infos.lock().unwrap();
        infos
            .iter()
            .any(|m| m.starts_with("waiting for") && m.contains(&path))
    };
    thread::scope(|s| {
        let planner = s.spawn(|| {
            let m = Merge::plan(&seed, &image, &rec).unwrap();
            (released.load(Ordering::SeqCst), m.missing().len())
        });
        wait_until(&format!("plan to report that it waits for {path}"), || {
            said_waiting() || planner.is_finished()
        });
        assert!(
            said_waiting(),
            "plan did not say it waits for {path}: {:?}",
            rec.infos.lock().unwrap()
        );
        wait_until("plan to block on the lock", || {
            blocked_on_flock(lock_file) || planner.is_finished()
        });
        assert!(!planner.is_finished(), "plan went on while {path} was held");
        released.store(true, Ordering::SeqCst);
        drop(held);
        let (after_release, missing) = planner.join().unwrap();
        assert!(after_release, "plan went on while {path} was held");
        assert_eq!(missing, 2);
    });
}

#[test]
fn plan_waits_while_nix_holds_the_big_lock_exclusively() {
    let p = Pair::new();
    let big = p.seed().join("nix/var/nix/db/big-lock");
    assert_plan_waits_for(&p, &big, FlockOperation::LockExclusive);
}

#[test]
fn plan_waits_while_a_job_holds_the_lock_of_a_path_it_would_add() {
    let p = Pair::new();
    let name = p.image_tree.trim_start_matches("/nix/store/");
    let lock = p.seed().join("nix/store").join(format!("{name}.lock"));
    assert_plan_waits_for(&p, &lock, FlockOperation::LockExclusive);
}

#[test]
fn commit_waits_for_a_running_sqlite_writer_instead_of_failing() {
    let p = Pair::new();
    let rec = Recorder::default();
    let mut merge = Merge::plan(&p.seed(), &p.image(), &rec).unwrap();
    merge.install().unwrap();
    let db = p.seed().join("nix/var/nix/db/db.sqlite");
    let mut conn = rusqlite::Connection::open(&db).unwrap();
    let writer = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .unwrap();
    let said_waiting = || {
        rec.infos
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.starts_with("waiting for the Nix database"))
    };
    thread::scope(|s| {
        let committer = s.spawn(|| merge.commit());
        wait_until("commit to report that it waits for the writer", || {
            said_waiting() || committer.is_finished()
        });
        if committer.is_finished() {
            let early = committer.join().unwrap().map(|_| ());
            panic!("commit ended while another writer held the database: {early:?}");
        }
        // The writer finishes while commit waits: commit then goes through.
        writer.commit().unwrap();
        committer
            .join()
            .unwrap()
            .expect("commit waits out a short writer");
    });
    assert!(said_waiting());
    assert!(nix_verify(&p.seed()).ok);
}
