//! `hydrafy verify DIR`: check a shared store against its own database.
//!
//! Every job writes into the store the runners share, so a broken job, a full
//! disk or a hand edit can leave a path whose contents no longer match what
//! the database promises, and every later job then builds on it. Nix's own
//! check (`nix-store --verify --check-contents`) needs a `nix` binary on the
//! runner host, takes the store lock, runs on one core and quietly
//! unregisters paths it finds missing. This command needs nothing but the
//! files, changes nothing (not even access times, which `hydrafy gc` reads as
//! use: files are opened with `O_NOATIME`), uses every core, and reports each
//! bad path on one line:
//!
//! - a registered path whose NAR hash or size differs from the database's
//!   (a modified file, a changed executable bit, an extra or missing file);
//! - a registered path missing from `DIR/nix/store`;
//! - a reference (`Refs` row) to a path that is not registered, or (with
//!   `--path`) to one that is missing from disk.
//!
//! An unregistered path on disk is only a warning: Nix ignores it.
//!
//! Paths are hashed largest first, one per thread, so that the one big path
//! (a CUDA toolkit) starts at once instead of last.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::nix::db::{self, PathInfo, STORE_DIR, Snapshot};
use crate::nix::nar::{self, NarError};
use crate::nix::store_path::StorePath;
use crate::ui::progress::Reporter;

/// What to verify.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// The seed: holds `nix/store` and `nix/var/nix/db`.
    pub dir: PathBuf,
    /// Only these store paths (`/nix/store/<name>`, `<name>`, or
    /// `DIR/nix/store/<name>`); all registered paths when empty.
    pub paths: Vec<String>,
    /// Hashing threads.
    pub jobs: usize,
}

/// What is wrong with one store path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemKind {
    /// The NAR hash differs from the database's.
    Modified,
    /// The NAR hash matches but the size does not (the database is wrong).
    SizeMismatch,
    /// Registered, but absent from `DIR/nix/store`.
    Missing,
    /// A reference names a path id that is not registered.
    DanglingReference,
    /// A reference names a registered path that is absent from disk.
    MissingReference,
    /// The path could not be read or cannot be a store path's contents.
    Unreadable,
    /// The database's entry itself is malformed (path or hash).
    BadRegistration,
}

/// One bad store path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// `/nix/store/<name>`.
    pub path: String,
    pub kind: ProblemKind,
    /// One line, for people.
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.detail)
    }
}

/// The outcome of a verification.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub dir: PathBuf,
    /// Store paths checked.
    pub checked: usize,
    /// NAR bytes hashed.
    pub nar_bytes: u64,
    pub seconds: f64,
    pub ok: bool,
    /// Sorted by path.
    pub problems: Vec<Problem>,
    /// Names in `DIR/nix/store` that are not registered (full runs only).
    pub unregistered: Vec<String>,
}

impl VerifyReport {
    /// The error to exit with when something is bad.
    pub fn failure(&self) -> Option<Error> {
        (!self.ok).then(|| Error::Store {
            dir: self.dir.clone(),
            reason: format!(
                "{} of {} store paths failed verification (listed above); repair them in a job \
                 with `nix-store --repair-path PATH`, or rebuild the seed with `hydrafy fetch --replace`",
                self.problems
                    .iter()
                    .map(|p| p.path.as_str())
                    .collect::<BTreeSet<_>>()
                    .len(),
                self.checked
            ),
        })
    }
}

/// Verify `opts.dir`. Problems are in the report, not the error: an `Err` means
/// the check itself could not run (no database, bad `--path`, interrupted).
pub fn verify(
    opts: &VerifyOptions,
    reporter: &dyn Reporter,
    cancel: &AtomicBool,
) -> Result<VerifyReport> {
    let start = Instant::now();
    let dir = &opts.dir;
    if !dir.join(db::DB_DIR).join("db.sqlite").is_file() {
        return Err(Error::invalid(
            "directory",
            dir.display().to_string(),
            "holds no nix/var/nix/db/db.sqlite; give the folder `hydrafy fetch` wrote (e.g. ./nix-backup)",
        ));
    }
    let snap = db::snapshot(dir)?;
    let store = dir.join(STORE_DIR);
    let selected = select(&snap, &opts.paths, dir)?;
    let full = opts.paths.is_empty();

    let mut problems = Vec::new();
    check_references(&snap, &selected, full, &store, &mut problems);

    // Largest first: the longest job starts at once.
    let mut order: Vec<&PathInfo> = selected.iter().map(|&i| &snap.paths[i]).collect();
    order.sort_by_key(|p| std::cmp::Reverse(p.nar_size.unwrap_or(0)));
    let total: i64 = order.iter().filter_map(|p| p.nar_size).sum();
    let jobs = opts.jobs.clamp(1, order.len().max(1));
    reporter.info(&format!(
        "verifying {} store paths ({:.1} MB) in {} with {jobs} thread(s)",
        order.len(),
        total.max(0) as f64 / 1e6,
        store.display()
    ));

    let next = AtomicUsize::new(0);
    let found = Mutex::new(Vec::new());
    let hashed = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(info) = order.get(i) else { break };
                    if cancel.load(Ordering::Relaxed) {
                        break;
                    }
                    let (problem, bytes) = check_path(info, &store, cancel);
                    hashed.fetch_add(bytes, Ordering::Relaxed);
                    if let Some(p) = problem {
                        found.lock().unwrap_or_else(|e| e.into_inner()).push(p);
                    }
                }
            });
        }
    });
    if cancel.load(Ordering::Relaxed) {
        return Err(Error::Interrupted);
    }
    if crate::nix::noatime::atimes_moved() {
        reporter.warn(crate::nix::noatime::fallback_warning());
    }
    problems.extend(found.into_inner().unwrap_or_else(|e| e.into_inner()));
    problems.sort_by(|a, b| a.path.cmp(&b.path).then(a.detail.cmp(&b.detail)));

    let unregistered = if full {
        unregistered(&snap, &store)?
    } else {
        Vec::new()
    };
    for name in &unregistered {
        reporter.warn(&format!(
            "{}: on disk but not registered in the Nix database (Nix ignores it; remove it to reclaim the space)",
            store.join(name).display()
        ));
    }
    let seconds = start.elapsed().as_secs_f64();
    let nar_bytes = hashed.into_inner();
    reporter.info(&format!(
        "checked {} store paths, {:.1} MB in {seconds:.2} s: {}",
        order.len(),
        nar_bytes as f64 / 1e6,
        if problems.is_empty() {
            "all good".to_string()
        } else {
            format!("{} problem(s)", problems.len())
        }
    ));
    Ok(VerifyReport {
        dir: dir.clone(),
        checked: order.len(),
        nar_bytes,
        seconds,
        ok: problems.is_empty(),
        problems,
        unregistered,
    })
}

/// Indices into `snap.paths` of the paths to check.
fn select(snap: &Snapshot, wanted: &[String], dir: &Path) -> Result<Vec<usize>> {
    if wanted.is_empty() {
        return Ok((0..snap.paths.len()).collect());
    }
    let mut out = BTreeSet::new();
    for arg in wanted {
        let name = store_name_of(arg).ok_or_else(|| {
            Error::invalid(
                "--path",
                arg.as_str(),
                "is not a store path; give /nix/store/<hash>-<name> or <hash>-<name>",
            )
        })?;
        let path = StorePath::from_name(name)
            .expect("store_name_of validated it")
            .full();
        let index = snap
            .index_of(&path)
            .ok_or_else(|| {
                Error::invalid(
                    "--path",
                    arg.as_str(),
                    format!(
                        "is not registered in {}; list the registered paths with `sqlite3 {} 'select path from ValidPaths'`",
                        dir.display(),
                        db::db_file(dir).display()
                    ),
                )
            })?;
        out.insert(index);
    }
    Ok(out.into_iter().collect())
}

/// `<hash>-<name>` from `/nix/store/<hash>-<name>`, `<hash>-<name>`, or
/// `anything/nix/store/<hash>-<name>` (a trailing `/` is allowed).
fn store_name_of(arg: &str) -> Option<&str> {
    let arg = arg.trim_end_matches('/');
    let name = match arg.rsplit_once('/') {
        None => arg,
        Some((parent, name)) if parent == "/nix/store" || parent.ends_with("nix/store") => name,
        Some(_) => return None,
    };
    StorePath::from_name(name).is_some().then_some(name)
}

fn check_references(
    snap: &Snapshot,
    selected: &[usize],
    full: bool,
    store: &Path,
    problems: &mut Vec<Problem>,
) {
    let refs = snap.references();
    let chosen: HashSet<i64> = selected.iter().map(|&i| snap.paths[i].id).collect();
    for &i in selected {
        let info = &snap.paths[i];
        let Some(targets) = refs.get(&info.id) else {
            continue;
        };
        for target in targets {
            match target {
                Err(id) => problems.push(Problem {
                    path: info.path.clone(),
                    kind: ProblemKind::DanglingReference,
                    detail: format!(
                        "references path id {id}, which is not registered (the database is damaged)"
                    ),
                }),
                Ok(path) if !full => {
                    // A full run reports a missing reference as that path's own problem.
                    let Some(t) = snap.get(path) else { continue };
                    if !chosen.contains(&t.id)
                        && db::is_store_path(path)
                        && fs::symlink_metadata(store.join(t.name())).is_err()
                    {
                        problems.push(Problem {
                            path: info.path.clone(),
                            kind: ProblemKind::MissingReference,
                            detail: format!(
                                "references {path}, which is registered but missing from disk"
                            ),
                        });
                    }
                }
                Ok(_) => {}
            }
        }
    }
}

/// Check one path; returns the problem, if any, and the NAR bytes hashed.
fn check_path(info: &PathInfo, store: &Path, cancel: &AtomicBool) -> (Option<Problem>, u64) {
    let problem = |kind, detail: String| Problem {
        path: info.path.clone(),
        kind,
        detail,
    };
    if !db::is_store_path(&info.path) {
        return (
            Some(problem(
                ProblemKind::BadRegistration,
                "is registered but is not a /nix/store path hydrafy can check".to_string(),
            )),
            0,
        );
    }
    let expected = match info.nar_hash() {
        Ok(h) => h,
        Err(e) => {
            return (
                Some(problem(
                    ProblemKind::BadRegistration,
                    format!("the database's NAR hash {:?} is unusable: {e}", info.hash),
                )),
                0,
            );
        }
    };
    let on_disk = store.join(info.name());
    match fs::symlink_metadata(&on_disk) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return (
                Some(problem(
                    ProblemKind::Missing,
                    format!("is registered but missing from {}", store.display()),
                )),
                0,
            );
        }
        Err(e) => {
            return (
                Some(problem(
                    ProblemKind::Unreadable,
                    format!("cannot be read: {e}"),
                )),
                0,
            );
        }
    }
    match nar::hash_path(&on_disk, cancel) {
        Ok(got) if got.hash != expected => (
            Some(problem(
                ProblemKind::Modified,
                format!(
                    "was modified: expected NAR hash {expected}, got {}",
                    got.hash
                ),
            )),
            got.size,
        ),
        Ok(got) => match info.nar_size {
            Some(want) if want != 0 && want as u64 != got.size => (
                Some(problem(
                    ProblemKind::SizeMismatch,
                    format!(
                        "NAR size is {}, the database says {want} (the hash matches: the database is wrong)",
                        got.size
                    ),
                )),
                got.size,
            ),
            _ => (None, got.size),
        },
        Err(NarError::Cancelled) => (None, 0),
        Err(e) => (
            Some(problem(
                ProblemKind::Unreadable,
                format!("cannot be hashed: {}", crate::error::report(&e)),
            )),
            0,
        ),
    }
}

/// Names in the store directory that are not registered paths. The
/// `.links` folder (`nix-store --optimise`) and `*.lock` files are Nix's own.
fn unregistered(snap: &Snapshot, store: &Path) -> Result<Vec<String>> {
    let names = crate::nix::noatime::open_dir(store)
        .and_then(crate::nix::noatime::names)
        .map_err(|e| Error::io(store, "cannot list the store", e))?;
    let mut out = Vec::new();
    for name in names {
        let name = name.to_string_lossy().into_owned();
        if name == ".links" || name.ends_with(".lock") {
            continue;
        }
        if snap.get_name(&name).is_none() {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_arguments_name_store_paths_only() {
        let name = "3ykzfjksfn40zgrnv6rp4cj8wcvmyyic-tree";
        for arg in [
            name.to_string(),
            format!("/nix/store/{name}"),
            format!("nix-backup/nix/store/{name}/"),
            format!("/srv/nix-backup/nix/store/{name}"),
        ] {
            assert_eq!(store_name_of(&arg), Some(name), "{arg}");
        }
        for arg in [
            format!("/nix/store/{name}/bin/sh"),
            "tree".to_string(),
            "/etc/passwd".to_string(),
        ] {
            assert_eq!(store_name_of(&arg), None, "{arg}");
        }
    }
}
