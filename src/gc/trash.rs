//! The trash: where victims wait, out of the store, to be deleted.
//!
//! Deleting a big store path takes long, and gc must hold Nix's big lock
//! only for moments. So while it holds the lock it only *renames* each victim
//! into a trash folder, `DIR/.hydrafy-trash-<pid>`, on the store's file
//! system but outside the `nix/store` the jobs mount; after the lock is
//! released it deletes the folder. When `nix/store` is a file system of its
//! own, the folder has to be on it: `nix/store/.hydrafy-trash-<pid>` (Nix
//! ignores names that are not store paths).
//!
//! The folder is `flock`-ed while its run lives, so a later run tells a
//! folder left by a killed run (unlocked) from one in use, and removes it.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{FlockOperation, Mode, OFlags};

use crate::error::{Error, Result};
use crate::nix::db::STORE_DIR;
use crate::unpack::fsroot;

/// Trash folders are named `<PREFIX><pid>`.
pub const PREFIX: &str = ".hydrafy-trash-";

/// This run's trash folder.
pub struct Trash {
    path: PathBuf,
    fd: OwnedFd,
}

/// Where trash folders live for DIR: DIR itself, or the store when it is
/// its own file system.
pub fn home(dir: &Path) -> Result<PathBuf> {
    let store = dir.join(STORE_DIR);
    let dev = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.dev())
            .map_err(|e| Error::io(p, "cannot stat", e))
    };
    Ok(if dev(dir)? == dev(&store)? {
        dir.to_path_buf()
    } else {
        store
    })
}

impl Trash {
    /// Make and lock `home/.hydrafy-trash-<pid>`.
    pub fn create(home: &Path) -> Result<Trash> {
        let path = home.join(format!("{PREFIX}{}", std::process::id()));
        if std::fs::symlink_metadata(&path).is_ok() {
            // A dead run with our pid: its leftovers are ours to clear.
            fsroot::remove_tree(&path)
                .map_err(|e| Error::io(&path, "cannot remove old trash", e))?;
        }
        std::fs::create_dir(&path)
            .map_err(|e| Error::io(&path, "cannot create the trash folder", e))?;
        let fd =
            open_dir(&path).map_err(|e| Error::io(&path, "cannot open the trash folder", e))?;
        rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive)
            .map_err(|e| Error::io(&path, "cannot lock the trash folder", e.into()))?;
        Ok(Trash { path, fd })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Move `name` from the open directory `from` into the trash as `to`. A
    /// read-only directory is given owner-write first (moving a directory
    /// to another parent rewrites its `..`, which needs it unless we are
    /// root); it is on its way to deletion, so its mode is not restored.
    /// Already gone is fine.
    pub fn take(&self, from: impl AsFd, name: &OsStr, to: &OsStr) -> io::Result<()> {
        let from = from.as_fd();
        match rustix::fs::renameat(from, name, &self.fd, to) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => return Ok(()),
            Err(rustix::io::Errno::ACCESS | rustix::io::Errno::PERM) => {}
            Err(e) => return Err(e.into()),
        }
        let st = rustix::fs::statat(from, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)?;
        rustix::fs::chmodat(
            from,
            name,
            Mode::from_raw_mode((st.st_mode & 0o7777) | 0o700),
            rustix::fs::AtFlags::empty(),
        )?;
        Ok(rustix::fs::renameat(from, name, &self.fd, to)?)
    }

    /// Remove the folder if nothing was moved into it (a run that changed nothing).
    pub fn remove_if_empty(self) {
        let _ = std::fs::remove_dir(&self.path);
    }

    /// Delete everything in the trash, then the folder. Stops between
    /// entries when `cancel` is set, leaving the rest for a later run; `Ok(false)` then.
    pub fn empty(self, cancel: &AtomicBool, tick: &dyn Fn(usize, usize)) -> Result<bool> {
        let names = fsroot::list_dir(&self.fd)
            .map_err(|e| Error::io(&self.path, "cannot list the trash", e))?;
        for (n, name) in names.iter().enumerate() {
            if cancel.load(Ordering::Relaxed) {
                return Ok(false);
            }
            fsroot::remove_all_at(&self.fd, name.as_os_str())
                .map_err(|e| Error::io(self.path.join(name), "cannot delete from the trash", e))?;
            tick(n + 1, names.len());
        }
        std::fs::remove_dir(&self.path)
            .map_err(|e| Error::io(&self.path, "cannot remove the trash folder", e))?;
        Ok(true)
    }
}

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// A trash folder a run left behind.
#[derive(Clone, Debug)]
pub struct Leftover {
    pub path: PathBuf,
    /// Still locked: a running gc owns it.
    pub in_use: bool,
}

/// The trash folders in `home`.
pub fn leftovers(home: &Path) -> Result<Vec<Leftover>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(home) {
        Ok(e) => e,
        Err(e) => return Err(Error::io(home, "cannot list", e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(home, "cannot list", e))?;
        if !entry.file_name().to_string_lossy().starts_with(PREFIX) {
            continue;
        }
        let path = entry.path();
        let in_use = match open_dir(&path) {
            Ok(fd) => rustix::fs::flock(&fd, FlockOperation::NonBlockingLockShared).is_err(),
            Err(_) => false,
        };
        out.push(Leftover { path, in_use });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Remove the trash folders killed runs left in `home`; how many.
pub fn remove_leftovers(home: &Path) -> Result<usize> {
    let mut removed = 0;
    for left in leftovers(home)? {
        if left.in_use {
            continue;
        }
        // Hold its lock while removing it, so two runs do not race on it.
        let fd = open_dir(&left.path).map_err(|e| Error::io(&left.path, "cannot open", e))?;
        if rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive).is_err() {
            continue;
        }
        fsroot::remove_tree(&left.path)
            .map_err(|e| Error::io(&left.path, "cannot remove trash left by an earlier run", e))?;
        removed += 1;
    }
    Ok(removed)
}

/// Apparent size of everything under `path` (for `status`).
pub fn size_of(path: &Path) -> u64 {
    let Some(parent) = path.parent() else {
        return 0;
    };
    let Ok(dir) = crate::nix::noatime::open_dir(parent) else {
        return 0;
    };
    path.file_name()
        .and_then(|name| super::scan::walk(&dir, name, &AtomicBool::new(false)).ok())
        .map_or(0, |e| e.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_killed_runs_trash_is_removed_and_a_live_ones_is_not() {
        let tmp = tempfile::tempdir().unwrap();
        let live = Trash::create(tmp.path()).unwrap();
        let dead = tmp.path().join(format!("{PREFIX}999999999"));
        std::fs::create_dir_all(dead.join("x/y")).unwrap();
        std::fs::write(dead.join("x/y/f"), b"f").unwrap();
        let found = leftovers(tmp.path()).unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(remove_leftovers(tmp.path()).unwrap(), 1);
        assert!(!dead.exists());
        assert!(live.path().exists());
        std::fs::create_dir(tmp.path().join("src")).unwrap();
        std::fs::write(tmp.path().join("src/f"), b"f").unwrap();
        let src = open_dir(tmp.path()).unwrap();
        live.take(&src, OsStr::new("src"), OsStr::new("src"))
            .unwrap();
        assert!(live.path().join("src/f").exists());
        let path = live.path().to_path_buf();
        assert!(live.empty(&AtomicBool::new(false), &|_, _| {}).unwrap());
        assert!(!path.exists());
    }
}
