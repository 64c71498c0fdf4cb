//! Reading store files without making them look used.
//!
//! `hydrafy gc` keeps a store path that a job read in the last `--keep-days`
//! days, and it learns that from the access times (atimes) of the path's
//! files and directories. So hydrafy's own reads must not move them: before
//! this module, one `hydrafy verify` hashed every file and made the whole
//! store look freshly used. Every place hydrafy reads inside a
//! store (verify's NAR walk, gc's and status's scans) opens files and
//! directories through here, with `O_NOATIME`.
//!
//! The kernel allows `O_NOATIME` only to the file's owner or a process with
//! `CAP_FOWNER` (root). Anyone else gets `EPERM`; then the file is opened
//! without it, which moves its atime as any reader's would, and
//! [`atimes_moved`] says so, so the command can warn once.
//!
//! What no flag can help: `readlink` always touches a symlink's atime. gc
//! therefore reads use from regular files and directories only.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{Mode, OFlags};

/// Set once an open fell back to moving the atime.
static FELL_BACK: AtomicBool = AtomicBool::new(false);

/// Did any open in this process have to do without `O_NOATIME`?
pub fn atimes_moved() -> bool {
    FELL_BACK.load(Ordering::Relaxed)
}

/// The warning to print when [`atimes_moved`] is true.
pub fn fallback_warning() -> &'static str {
    "some store files could not be opened without updating their access times (O_NOATIME \
     needs root or the files' owner), so they now look used to `hydrafy gc`; run as root"
}

/// Open `name` in `dir` (`rustix::fs::CWD` for a path) for reading with
/// `flags`, never following a symlink, with `O_NOATIME` when the kernel lets us.
fn open_at(dir: impl AsFd, name: &OsStr, flags: OFlags) -> io::Result<OwnedFd> {
    let flags = flags | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rustix::fs::openat(&dir, name, flags | OFlags::NOATIME, Mode::empty()) {
        Err(rustix::io::Errno::PERM) => {
            FELL_BACK.store(true, Ordering::Relaxed);
            Ok(rustix::fs::openat(&dir, name, flags, Mode::empty())?)
        }
        other => Ok(other?),
    }
}

/// Open the regular file at `path` for reading (not following a symlink).
pub fn open_file(path: &Path) -> io::Result<File> {
    open_at(rustix::fs::CWD, path.as_os_str(), OFlags::empty()).map(File::from)
}

/// Open the directory `path` for listing (not following a symlink).
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    open_at(rustix::fs::CWD, path.as_os_str(), OFlags::DIRECTORY)
}

/// Open the directory `name` in the open directory `dir` for listing.
pub fn open_dir_at(dir: impl AsFd, name: &OsStr) -> io::Result<OwnedFd> {
    open_at(dir, name, OFlags::DIRECTORY)
}

/// The names in the open directory `dir` (taken over), without `.` and `..`.
/// The listing reads through `dir` itself, so its `O_NOATIME` holds.
pub fn names(dir: OwnedFd) -> io::Result<Vec<std::ffi::OsString>> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = Vec::new();
    let mut reader = rustix::fs::Dir::new(dir)?;
    while let Some(entry) = reader.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            out.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;

    fn set_atime(path: &Path, secs: i64) {
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

    #[test]
    fn reading_through_here_leaves_atimes_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        std::fs::create_dir(&dir).unwrap();
        let file = dir.join("f");
        std::fs::write(&file, b"contents").unwrap();
        // Older than the mtime and than a day: relatime would update both on a read.
        set_atime(&file, 1_000_000_000);
        set_atime(&dir, 1_000_000_000);
        let mut text = String::new();
        open_file(&file).unwrap().read_to_string(&mut text).unwrap();
        assert_eq!(text, "contents");
        assert_eq!(names(open_dir(&dir).unwrap()).unwrap(), vec!["f"]);
        // We own the files, so the kernel allows O_NOATIME even without root.
        assert_eq!(std::fs::metadata(&file).unwrap().atime(), 1_000_000_000);
        assert_eq!(std::fs::metadata(&dir).unwrap().atime(), 1_000_000_000);
    }

    #[test]
    fn a_symlink_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("f"), b"x").unwrap();
        std::os::unix::fs::symlink("f", tmp.path().join("l")).unwrap();
        assert!(open_file(&tmp.path().join("l")).is_err());
    }
}
