//! What a store holds and when each part was last used, read without locks
//! and without moving a single access time.
//!
//! For every registered path: whether it is on disk, when it came into the
//! store (the ctime of its top entry: moving a path in, or Nix fixing its
//! modes, sets it, and nothing can set it back, unlike a registration time a
//! merge copies from an image's database), the newest atime of its regular
//! files and directories, its size and the inodes it shares through hard
//! links. Then the unregistered entries of `nix/store`, and `.links`.
//!
//! Directories are opened with `O_NOATIME` and files are only `lstat`-ed, so
//! a scan leaves the atimes it reads as they were (symlinks are left out of
//! the atime: `readlink` moves it, by anyone, so it is not a signal).

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use rustix::fs::{AtFlags, FileType, StatVfsMountFlags};

use crate::error::{Error, Result};
use crate::nix::db::{self, STORE_DIR, Snapshot};
use crate::nix::noatime;
use crate::nix::store_path::StorePath;

/// Nix's folder of hard-link targets for deduplicated files (`auto-optimise-store`).
pub const LINKS_DIR: &str = ".links";

/// How far an atime can be trusted on the store's file system.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Atimes {
    /// `strictatime`: every read sets the atime.
    Exact,
    /// `relatime` (the default): a read sets the atime only when it is older
    /// than the mtime or a day old, so a path read at time T shows an atime
    /// between T minus a day and T. gc counts an atime as a use up to a day later.
    Daily,
    /// `noatime`: reads leave no trace; only registration times count.
    Off,
}

impl Atimes {
    /// The latest time a path whose newest atime is `atime` may have been read.
    pub fn latest_read(self, atime: i64) -> Option<i64> {
        match self {
            Atimes::Exact => Some(atime),
            Atimes::Daily => Some(atime.saturating_add(86_400)),
            Atimes::Off => None,
        }
    }
}

/// What one store entry holds.
#[derive(Clone, Debug, Default)]
pub struct Entry {
    /// Found in `nix/store`.
    pub present: bool,
    /// The ctime of the entry itself: when it came into the store.
    pub added: i64,
    /// The newest ctime under it (an unregistered entry still being written is young).
    pub newest_ctime: i64,
    /// The newest atime of its regular files and directories.
    pub newest_atime: Option<i64>,
    /// Apparent size: file lengths and symlink target lengths.
    pub bytes: u64,
    /// Files and directories.
    pub files: u64,
    /// Inodes of its regular files with more than one link (for `.links`).
    pub shared: Vec<u64>,
}

/// A name in `nix/store` that the database does not register.
#[derive(Clone, Debug)]
pub struct Unregistered {
    pub name: String,
    pub entry: Entry,
    /// A `<path>.lock` file whose path is neither on disk nor registered.
    pub lock_file: bool,
}

/// One entry of `nix/store/.links`.
#[derive(Clone, Debug)]
pub struct Link {
    pub name: OsString,
    pub ino: u64,
    pub nlink: u64,
    pub bytes: u64,
}

/// A whole store, read.
pub struct Scan {
    pub snap: Snapshot,
    /// Per `snap.paths` index.
    pub paths: Vec<Entry>,
    pub unregistered: Vec<Unregistered>,
    pub links: Vec<Link>,
    pub atimes: Atimes,
    /// Free bytes on the store's file system (for unprivileged users).
    pub free_bytes: u64,
}

impl Scan {
    /// Registered size of path `i`: its NAR size, or what is on disk when
    /// the database has none.
    pub fn size(&self, i: usize) -> u64 {
        match self.snap.paths[i].nar_size {
            Some(n) if n > 0 => n as u64,
            _ => self.paths[i].bytes,
        }
    }

    /// The store's size as gc counts it: NAR sizes of the valid paths, plus
    /// what lies on disk unregistered.
    pub fn store_bytes(&self) -> u64 {
        (0..self.paths.len()).map(|i| self.size(i)).sum::<u64>()
            + self.unregistered.iter().map(|u| u.entry.bytes).sum::<u64>()
    }
}

/// A stat result, in the units this module needs.
#[derive(Clone, Copy, Debug)]
pub struct Meta {
    pub kind: FileType,
    pub ino: u64,
    pub nlink: u64,
    pub size: u64,
    pub atime: i64,
    pub ctime: i64,
}

// Field types of `struct stat` differ between targets.
#[allow(clippy::unnecessary_cast)]
fn meta(st: &rustix::fs::Stat) -> Meta {
    Meta {
        kind: FileType::from_raw_mode(st.st_mode),
        ino: st.st_ino as u64,
        nlink: st.st_nlink as u64,
        size: st.st_size.max(0) as u64,
        atime: st.st_atime as i64,
        ctime: st.st_ctime as i64,
    }
}

/// `lstat` of `name` in `dir`.
pub fn stat_at(dir: impl AsFd, name: &OsStr) -> io::Result<Meta> {
    Ok(meta(&rustix::fs::statat(
        dir,
        name,
        AtFlags::SYMLINK_NOFOLLOW,
    )?))
}

/// Walk the store entry `name` in the open store directory `store`.
/// A missing entry is `present: false`, not an error.
pub fn walk(store: impl AsFd, name: &OsStr, cancel: &AtomicBool) -> io::Result<Entry> {
    let top = match stat_at(&store, name) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Entry::default()),
        Err(e) => return Err(e),
    };
    let mut entry = Entry {
        present: true,
        added: top.ctime,
        ..Entry::default()
    };
    entry.note(&top);
    if top.kind != FileType::Directory {
        return Ok(entry);
    }
    // Depth first, one open directory per level.
    let fd = noatime::open_dir_at(&store, name)?;
    let names = noatime::names(fd.try_clone()?)?;
    let mut stack: Vec<(OwnedFd, Vec<OsString>)> = vec![(fd, names)];
    while let Some((dir, pending)) = stack.last_mut() {
        let Some(child) = pending.pop() else {
            stack.pop();
            continue;
        };
        if cancel.load(Ordering::Relaxed) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "interrupted"));
        }
        let m = match stat_at(&*dir, &child) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        entry.note(&m);
        if m.kind == FileType::Directory {
            let sub = noatime::open_dir_at(&*dir, &child)?;
            let names = noatime::names(sub.try_clone()?)?;
            stack.push((sub, names));
        }
    }
    Ok(entry)
}

impl Entry {
    fn note(&mut self, m: &Meta) {
        self.files += 1;
        self.newest_ctime = self.newest_ctime.max(m.ctime);
        match m.kind {
            FileType::RegularFile => {
                self.bytes += m.size;
                if m.nlink > 1 {
                    self.shared.push(m.ino);
                }
                self.newest_atime = Some(self.newest_atime.map_or(m.atime, |a| a.max(m.atime)));
            }
            FileType::Directory => {
                self.newest_atime = Some(self.newest_atime.map_or(m.atime, |a| a.max(m.atime)));
            }
            FileType::Symlink => self.bytes += m.size,
            _ => {}
        }
    }
}

/// How the file system holding `store` records atimes, and its free space.
pub fn mount_info(store: &Path) -> Result<(Atimes, u64)> {
    let vfs = rustix::fs::statvfs(store)
        .map_err(|e| Error::io(store, "cannot read the file system's mount flags", e.into()))?;
    let atimes = if vfs.f_flag.contains(StatVfsMountFlags::NOATIME) {
        Atimes::Off
    } else if vfs.f_flag.contains(StatVfsMountFlags::RELATIME) {
        Atimes::Daily
    } else {
        Atimes::Exact
    };
    Ok((atimes, vfs.f_bavail.saturating_mul(vfs.f_frsize)))
}

/// Read the database and walk the whole store, `jobs` entries at a time.
/// `progress(done, total)` is called now and then.
pub fn scan(
    dir: &Path,
    jobs: usize,
    progress: &(dyn Fn(usize, usize) + Sync),
    cancel: &AtomicBool,
) -> Result<Scan> {
    let snap = db::snapshot(dir)?;
    let store = dir.join(STORE_DIR);
    let (atimes, free_bytes) = mount_info(&store)?;
    let store_fd =
        noatime::open_dir(&store).map_err(|e| Error::io(&store, "cannot open the store", e))?;
    let mut names: Vec<String> = noatime::names(
        store_fd
            .try_clone()
            .map_err(|e| Error::io(&store, "cannot open the store", e))?,
    )
    .map_err(|e| Error::io(&store, "cannot list the store", e))?
    .into_iter()
    .map(|n| n.to_string_lossy().into_owned())
    .collect();
    names.sort();
    let on_disk: HashSet<&str> = names.iter().map(String::as_str).collect();

    // What to walk: every registered path, then every unregistered store path.
    let mut todo: Vec<(String, Option<usize>, bool)> = snap
        .paths
        .iter()
        .enumerate()
        .map(|(i, p)| (p.name().to_string(), Some(i), false))
        .collect();
    let mut has_links = false;
    for name in &names {
        if name == LINKS_DIR {
            has_links = true;
        } else if let Some(base) = name.strip_suffix(".lock") {
            if StorePath::from_name(base).is_some()
                && !on_disk.contains(base)
                && snap.get_name(base).is_none()
            {
                todo.push((name.clone(), None, true));
            }
        } else if StorePath::from_name(name).is_some() && snap.get_name(name).is_none() {
            // Names that are neither store paths nor Nix's own are left alone.
            todo.push((name.clone(), None, false));
        }
    }

    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Entry>>> = Mutex::new(vec![None; todo.len()]);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let jobs = jobs.clamp(1, todo.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((name, _, _)) = todo.get(i) else {
                        break;
                    };
                    if cancel.load(Ordering::Relaxed) {
                        break;
                    }
                    match walk(&store_fd, OsStr::new(name), cancel) {
                        Ok(entry) => {
                            results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(entry)
                        }
                        Err(e) => {
                            let at = store.join(name);
                            failure
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get_or_insert(Error::io(at, "cannot read store entry", e));
                            cancel_local(&next, todo.len());
                        }
                    }
                    let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                    progress(n, todo.len());
                }
            });
        }
    });
    if cancel.load(Ordering::Relaxed) {
        return Err(Error::Interrupted);
    }
    if let Some(e) = failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut paths = vec![Entry::default(); snap.paths.len()];
    let mut unregistered = Vec::new();
    for ((name, index, lock_file), entry) in todo.into_iter().zip(results.iter_mut()) {
        let entry = entry.take().unwrap_or_default();
        match index {
            Some(i) => paths[i] = entry,
            None => unregistered.push(Unregistered {
                name,
                entry,
                lock_file,
            }),
        }
    }
    let links = if has_links {
        scan_links(&store)?
    } else {
        Vec::new()
    };
    Ok(Scan {
        snap,
        paths,
        unregistered,
        links,
        atimes,
        free_bytes,
    })
}

/// Stop handing out work after a failure.
fn cancel_local(next: &AtomicUsize, len: usize) {
    next.store(len, Ordering::Relaxed);
}

fn scan_links(store: &Path) -> Result<Vec<Link>> {
    let at = store.join(LINKS_DIR);
    let dir = noatime::open_dir(&at).map_err(|e| Error::io(&at, "cannot open", e))?;
    let names = noatime::names(
        dir.try_clone()
            .map_err(|e| Error::io(&at, "cannot open", e))?,
    )
    .map_err(|e| Error::io(&at, "cannot list", e))?;
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        match stat_at(&dir, &name) {
            Ok(m) if m.kind == FileType::RegularFile || m.kind == FileType::Symlink => {
                out.push(Link {
                    name,
                    ino: m.ino,
                    nlink: m.nlink,
                    bytes: m.size,
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(at.join(&name), "cannot stat", e)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walk_sums_files_and_finds_the_newest_atime() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("p");
        std::fs::create_dir_all(p.join("sub")).unwrap();
        std::fs::write(p.join("a"), b"12345").unwrap();
        std::fs::write(p.join("sub/b"), b"678").unwrap();
        std::os::unix::fs::symlink("a", p.join("l")).unwrap();
        std::fs::hard_link(p.join("a"), tmp.path().join("other")).unwrap();
        let store = noatime::open_dir(tmp.path()).unwrap();
        let e = walk(&store, OsStr::new("p"), &AtomicBool::new(false)).unwrap();
        assert!(e.present);
        assert_eq!(e.bytes, 5 + 3 + 1);
        assert_eq!(e.files, 5);
        assert_eq!(e.shared.len(), 1);
        assert!(e.newest_atime.is_some());
        let none = walk(&store, OsStr::new("gone"), &AtomicBool::new(false)).unwrap();
        assert!(!none.present);
    }

    #[test]
    fn relatime_atimes_count_a_day_later_and_noatime_not_at_all() {
        assert_eq!(Atimes::Exact.latest_read(100), Some(100));
        assert_eq!(Atimes::Daily.latest_read(100), Some(86_500));
        assert_eq!(Atimes::Off.latest_read(100), None);
    }
}
