//! Carrying a plan out while jobs use the store.
//!
//! Every Nix process holds `nix/var/nix/db/big-lock` *shared* for as long
//! as its store object lives: `LocalStore::LocalStore` in Nix's
//! `src/libstore/local-store.cc` opens it as `globalLock`, takes it with
//! `lockFile(globalLock.get(), ltRead, ...)` ("waiting for the big Nix store
//! lock...") and, after a schema upgrade, takes it `ltRead` again "to
//! prevent other processes from upgrading the schema while we're using the
//! store"; it is released only when the process closes the store (exits).
//! (A store opened `read-only` takes no lock; jobs do not do that.) So
//! holding big-lock *exclusively* means no job's nix is building,
//! evaluating, substituting or registering, and a new one waits. gc holds it
//! only for the steps that must not interleave with Nix:
//!
//! 1. take it, waiting at most `--wait` (polling: flock has no writer
//!    preference, so a queue of shared holders could starve a blocked call);
//! 2. take each victim's `nix/store/<path>.lock` without waiting (a locked
//!    path is skipped; a path with no lock file has no holder, and gc does
//!    not create thousands of lock files while every job waits) and look
//!    again: still registered under the same id, not used since the plan
//!    (its atimes), not referenced by a path that stays;
//! 3. unregister the victims in one SQLite transaction (`ValidPaths` rows;
//!    the schema's foreign keys drop their `Refs` and `DerivationOutputs`,
//!    and its `on delete restrict` refuses to drop a path that a remaining
//!    path references, which would roll everything back);
//! 4. rename them into the trash, outside the store;
//! 5. release the locks. The trash is deleted after.
//!
//! A crash after 3 leaves unregistered directories in the store, which Nix
//! ignores and the next gc removes; never a registered path that is missing.
//! Ctrl-C is honoured until the transaction commits (nothing changed);
//! after it, the moves finish first.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use rustix::fs::FlockOperation;

use super::plan::{Plan, Policy, last_use};
use super::scan::{self, LINKS_DIR, Scan};
use super::trash::Trash;
use crate::error::{Error, Result};
use crate::nix::db::{self, DB_DIR, PathLock, STORE_DIR, TryLock};
use crate::nix::noatime;
use crate::ui::progress::Reporter;

/// How long gc waits for a job's own SQLite transaction once it holds the
/// big lock (no Nix process should have one then; a `sqlite3` shell might).
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a blocked gc tries the big lock again.
const POLL: Duration = Duration::from_millis(10);

/// A path the plan chose that stayed, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    pub path: String,
    pub reason: &'static str,
}

/// What the locked part did.
#[derive(Debug, Default)]
pub struct Done {
    /// Indices into the scan's paths: unregistered (and moved to the trash when on disk).
    pub paths: Vec<usize>,
    /// Indices into the scan's unregistered entries: moved to the trash (or lock files removed).
    pub unregistered: Vec<usize>,
    /// `.links` entries moved to the trash, and their bytes.
    pub links: usize,
    pub links_bytes: u64,
    pub skipped: Vec<Skipped>,
    /// Moves that failed after the commit (the paths stay unregistered in the store).
    pub stranded: Vec<String>,
    pub waited: Duration,
    pub held: Duration,
}

/// `DIR/nix/var/nix/db/big-lock`, held exclusively.
pub struct BigLockExclusive {
    _file: File,
}

/// Take big-lock exclusively, waiting at most `wait`.
pub fn lock_exclusive(
    dir: &Path,
    wait: Duration,
    reporter: &dyn Reporter,
    cancel: &AtomicBool,
) -> Result<(BigLockExclusive, Duration)> {
    let path = dir.join(DB_DIR).join("big-lock");
    let file = db::open_lock_file(&path)?;
    let start = Instant::now();
    let mut said = false;
    loop {
        if rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive).is_ok() {
            return Ok((BigLockExclusive { _file: file }, start.elapsed()));
        }
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        if start.elapsed() >= wait {
            return Err(Error::Store {
                dir: dir.to_path_buf(),
                reason: format!(
                    "nix was busy: Nix processes held {} for all of --wait {}; nothing changed. \
                     Run gc again when fewer jobs run, or with a longer --wait",
                    path.display(),
                    super::show_duration(wait)
                ),
            });
        }
        if !said {
            reporter.info(&format!(
                "waiting for the Nix store lock {} (Nix processes in jobs are using the store; waiting up to {})",
                path.display(),
                super::show_duration(wait)
            ));
            said = true;
        }
        std::thread::sleep(POLL.min(wait.saturating_sub(start.elapsed())));
    }
}

/// Carry out `plan` on `scan` of `dir`: the steps in the module
/// documentation, with a trash folder made in `trash_home` once the lock is
/// held (so a run that gives up leaves DIR as it was). `commit_hook` runs once
/// the store changed, under the lock (it records dropped images). Returns
/// what was done and the trash, to be emptied.
#[allow(clippy::too_many_arguments)]
pub fn execute(
    dir: &Path,
    scan: &Scan,
    plan: &Plan,
    policy: &Policy,
    wait: Duration,
    trash_home: &Path,
    reporter: &dyn Reporter,
    cancel: &AtomicBool,
    commit_hook: &mut dyn FnMut() -> Result<()>,
) -> Result<(Done, Trash)> {
    // Each existing lock file of a victim is an open file until the end.
    raise_open_file_limit(plan.victims.len() + plan.unregistered.len() + 256);
    let (big_lock, waited) = lock_exclusive(dir, wait, reporter, cancel)?;
    let held_since = Instant::now();
    let trash = Trash::create(trash_home)?;
    let work = Work {
        dir,
        scan,
        policy,
        victims: &plan.victims,
        unregistered: &plan.unregistered,
        trash: &trash,
        reporter,
        cancel,
    };
    match work.locked(commit_hook) {
        Ok(mut done) => {
            drop(big_lock);
            done.waited = waited;
            done.held = held_since.elapsed();
            Ok((done, trash))
        }
        Err(e) => {
            // Nothing was moved before the transaction: DIR is as it was.
            trash.remove_if_empty();
            Err(e)
        }
    }
}

/// The locked part of [`execute`].
struct Work<'a> {
    dir: &'a Path,
    scan: &'a Scan,
    policy: &'a Policy,
    victims: &'a [usize],
    unregistered: &'a [usize],
    trash: &'a Trash,
    reporter: &'a dyn Reporter,
    cancel: &'a AtomicBool,
}

impl Work<'_> {
    fn locked(&self, commit_hook: &mut dyn FnMut() -> Result<()>) -> Result<Done> {
        let Work {
            dir,
            scan,
            policy,
            victims,
            unregistered,
            trash,
            reporter,
            cancel,
        } = *self;
        let store = dir.join(STORE_DIR);
        let store_fd =
            noatime::open_dir(&store).map_err(|e| Error::io(&store, "cannot open the store", e))?;
        let mut done = Done::default();
        let cutoff = policy.cutoff();
        let old_enough = policy.now - super::plan::RECENT_SECS;

        // 2. Path locks, and a second look at the disk.
        let mut locks: Vec<PathLock> = Vec::with_capacity(victims.len() + unregistered.len());
        let mut chosen = Vec::with_capacity(victims.len());
        for &i in victims {
            let info = &scan.snap.paths[i];
            let skip = |reason| Skipped {
                path: info.path.clone(),
                reason,
            };
            let lock = match PathLock::try_existing(&store, info.name())? {
                TryLock::Free => None,
                TryLock::Taken(lock) => Some(lock),
                TryLock::Held => {
                    done.skipped
                        .push(skip("its lock is held (a job is adding or building it)"));
                    continue;
                }
            };
            let now = scan::walk(&store_fd, OsStr::new(info.name()), &AtomicBool::new(false))
                .map_err(|e| Error::io(store.join(info.name()), "cannot read store path", e))?;
            if last_use(info.registration_time, &now, scan.atimes) >= cutoff {
                done.skipped.push(skip("used since gc looked"));
                continue;
            }
            locks.extend(lock);
            chosen.push(i);
        }
        let mut entries = Vec::with_capacity(unregistered.len());
        for &u in unregistered {
            let entry = &scan.unregistered[u];
            let base = if entry.lock_file {
                entry.name.trim_end_matches(".lock")
            } else {
                entry.name.as_str()
            };
            let lock = match PathLock::try_existing(&store, base)? {
                TryLock::Free if entry.lock_file => continue, // gone meanwhile
                TryLock::Free => None,
                TryLock::Taken(lock) => Some(lock),
                TryLock::Held => continue,
            };
            let fresh = match scan::stat_at(&store_fd, OsStr::new(base)) {
                Ok(m) => entry.lock_file || m.ctime >= old_enough,
                Err(_) => !entry.lock_file,
            };
            if fresh {
                continue;
            }
            locks.extend(lock);
            entries.push(u);
        }

        // 3. One transaction: check against the database, then unregister.
        let db = db::db_file(dir);
        let db_err = |action: &str| {
            let action = action.to_string();
            let db = db.clone();
            move |source| Error::Database {
                path: db.clone(),
                action: action.clone(),
                source,
            }
        };
        let mut conn = Connection::open_with_flags(
            &db,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(db_err("cannot open the Nix database for writing"))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(db_err("cannot set the busy timeout"))?;
        conn.execute_batch("pragma foreign_keys = on;")
            .map_err(db_err("cannot enable foreign keys"))?;
        let unchanged = db_err("cannot unregister the store paths; nothing was changed");
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_err("cannot start a transaction; nothing was changed"))?;
        let final_paths = {
            let mut id_of = tx
                .prepare("select id from ValidPaths where path = ?")
                .map_err(&unchanged)?;
            let mut by_id: HashMap<i64, usize> = HashMap::new();
            for &i in &chosen {
                let info = &scan.snap.paths[i];
                let id: Option<i64> = id_of
                    .query_row([&info.path], |r| r.get(0))
                    .optional()
                    .map_err(&unchanged)?;
                match id {
                    Some(id) if id == info.id => {
                        by_id.insert(id, i);
                    }
                    Some(_) => done.skipped.push(Skipped {
                        path: info.path.clone(),
                        reason: "registered again since gc looked",
                    }),
                    None => {} // unregistered meanwhile (another gc, nix-store --delete)
                }
            }
            // Paths that stay and reference a victim keep it, and what it references.
            tx.execute_batch("create temp table hydrafy_gc (id integer primary key);")
                .map_err(&unchanged)?;
            {
                let mut add = tx
                    .prepare("insert into hydrafy_gc (id) values (?)")
                    .map_err(&unchanged)?;
                for id in by_id.keys() {
                    add.execute([id]).map_err(&unchanged)?;
                }
            }
            let rows = |sql: &str| -> Result<Vec<(i64, i64)>> {
                let mut stmt = tx.prepare(sql).map_err(&unchanged)?;
                let out = stmt
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(&unchanged)?
                    .collect::<rusqlite::Result<Vec<_>>>()
                    .map_err(&unchanged)?;
                Ok(out)
            };
            let outside = rows(
                "select r.referrer, r.reference from Refs r join hydrafy_gc v on r.reference = v.id \
             where r.referrer not in (select id from hydrafy_gc)",
            )?;
            let inside = rows(
                "select r.referrer, r.reference from Refs r join hydrafy_gc v on r.referrer = v.id",
            )?;
            let mut references: HashMap<i64, Vec<i64>> = HashMap::new();
            for (from, to) in inside {
                references.entry(from).or_default().push(to);
            }
            let mut stays: HashSet<i64> = HashSet::new();
            let mut stack: Vec<i64> = outside.into_iter().map(|(_, to)| to).collect();
            while let Some(id) = stack.pop() {
                if by_id.contains_key(&id) && stays.insert(id) {
                    stack.extend(references.get(&id).into_iter().flatten().copied());
                }
            }
            {
                let mut unpick = tx
                    .prepare("delete from hydrafy_gc where id = ?")
                    .map_err(&unchanged)?;
                for id in &stays {
                    unpick.execute([id]).map_err(&unchanged)?;
                    done.skipped.push(Skipped {
                        path: scan.snap.paths[by_id[id]].path.clone(),
                        reason: "a path that stays references it",
                    });
                }
            }
            for id in &stays {
                by_id.remove(id);
            }
            // Unregistered entries must still be unregistered.
            let mut registered = tx
                .prepare("select 1 from ValidPaths where path = ?")
                .map_err(&unchanged)?;
            let mut still = Vec::with_capacity(entries.len());
            for &u in &entries {
                let entry = &scan.unregistered[u];
                let name = entry.name.trim_end_matches(".lock");
                let path = format!("{}{name}", crate::nix::store_path::STORE_PREFIX);
                let is: Option<i64> = registered
                    .query_row([&path], |r| r.get(0))
                    .optional()
                    .map_err(&unchanged)?;
                if is.is_none() {
                    still.push(u);
                }
            }
            drop(registered);
            entries = still;
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Interrupted); // the transaction rolls back
            }
            tx.execute_batch(
                "delete from Refs where referrer in (select id from hydrafy_gc);
             delete from DerivationOutputs where drv in (select id from hydrafy_gc);
             delete from ValidPaths where id in (select id from hydrafy_gc);
             drop table hydrafy_gc;",
            )
            .map_err(&unchanged)?;
            let position: HashMap<usize, usize> =
                victims.iter().enumerate().map(|(p, &i)| (i, p)).collect();
            let mut out: Vec<usize> = by_id.into_values().collect();
            out.sort_by_key(|i| position[i]);
            out
        };
        tx.commit().map_err(&unchanged)?;

        // 4. Out of the store, whatever happens now (Ctrl-C included).
        for &i in &final_paths {
            let name = OsStr::new(scan.snap.paths[i].name());
            if let Err(e) = trash.take(&store_fd, name, name) {
                reporter.warn(&format!(
                    "{}: unregistered but not moved out of the store ({e}); the next gc removes it",
                    store.join(name).display()
                ));
                done.stranded.push(scan.snap.paths[i].path.clone());
            }
        }
        entries.retain(|&u| {
            let entry = &scan.unregistered[u];
            if entry.lock_file {
                return true; // its PathLock removes it when dropped
            }
            let name = OsStr::new(&entry.name);
            let moved = trash.take(&store_fd, name, name);
            if let Err(e) = &moved {
                reporter.warn(&format!(
                    "{}: cannot move it out of the store: {e}",
                    store.join(name).display()
                ));
            }
            moved.is_ok()
        });
        done.paths = final_paths;
        done.unregistered = entries;
        // `.links` entries whose last other link just went, unless a job linked
        // a new file to one since the plan (its link count grew).
        let links = super::plan::orphaned_links(scan, &done.paths);
        let links_dir = store.join(LINKS_DIR);
        if !links.is_empty()
            && let Ok(links_fd) = noatime::open_dir(&links_dir)
        {
            for l in links {
                let link = &scan.links[l];
                let Ok(now) = scan::stat_at(&links_fd, &link.name) else {
                    continue;
                };
                if now.ino != link.ino || now.nlink > link.nlink {
                    continue;
                }
                let mut to = std::ffi::OsString::from(".links-");
                to.push(&link.name);
                if trash.take(&links_fd, &link.name, &to).is_ok() {
                    done.links += 1;
                    done.links_bytes += link.bytes;
                }
            }
        }
        commit_hook()?;
        drop(locks);
        Ok(done)
    }
}

/// Raise the soft limit on open files towards `want` (as far as the hard
/// limit allows; past it, opening a lock file fails with a clear error
/// before anything changed).
fn raise_open_file_limit(want: usize) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let want = want as u64;
    let have = getrlimit(Resource::Nofile);
    if have.current.is_none_or(|cur| cur >= want) {
        return;
    }
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(have.maximum.map_or(want, |max| want.min(max))),
            maximum: have.maximum,
        },
    );
}
