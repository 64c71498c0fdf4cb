//! A directory treated like a chroot: every path resolves inside it.
//!
//! hydrafy runs as root on build hosts and unpacks tar streams from
//! registries that may be compromised, so resolving a layer entry's path is
//! the line between "writes into the output" and "writes anywhere on the
//! host". The rules:
//!
//! - Resolution is done by the kernel, with `openat2(RESOLVE_IN_ROOT)` on a
//!   file descriptor held on the root: `..` clamps at the root and an absolute
//!   symlink target is taken relative to it (`var/run -> /run` then
//!   `var/run/x` lands at `<root>/run/x`), exactly as inside a chroot. No
//!   path string is checked first and acted on later.
//! - Only parent directories are resolved that way. The last component is
//!   never followed: it is created with `O_EXCL|O_NOFOLLOW`, linked with
//!   `linkat` without `AT_SYMLINK_FOLLOW`, stat-ed and removed with `*at`
//!   calls that do not follow symlinks.
//! - Nothing that exists is opened for writing: a node in the way is removed
//!   and a new one created, so a FIFO or device node planted by an earlier
//!   layer can never be written to.
//! - Tree walks (removal, pruning, the final pass over directory modes) are
//!   loops, not recursion, and hold two descriptors whatever the depth: a
//!   layer can nest directories far deeper than a thread's stack or the
//!   descriptor limit (symlinks let each entry add another PATH_MAX of
//!   depth). Climbing back up uses `..`, checked against the device and inode
//!   seen on the way down, so a directory moved meanwhile stops the walk
//!   instead of sending it elsewhere.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

/// How many symlinks `mkdir_all` follows by hand through dangling links, as
/// the kernel's own limit.
const MAX_LINK_HOPS: usize = 40;

/// A directory file descriptor that paths are resolved under.
pub struct FsRoot {
    fd: OwnedFd,
    path: PathBuf,
    /// Refuse (`ELOOP`) to resolve a parent path through any symlink: a
    /// layer applied beside others must touch only the names it spells out
    /// (see `unpack::pipeline`).
    no_symlinks: bool,
}

/// A file's identity: device and inode numbers.
pub type Id = (u64, u64);

/// Have the kernel start writing `len` bytes of `fd` from `offset` to disk,
/// and return without waiting for them. A head start only: the flush before
/// publishing (`syncfs`) still waits for every byte, so a failure here
/// changes when bytes reach the disk, never whether.
pub fn start_writeback(fd: impl AsFd, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range takes a descriptor, which `fd` keeps open for
    // the call, and integers; it touches no memory of ours.
    unsafe {
        libc::sync_file_range(
            fd.as_fd().as_raw_fd(),
            offset,
            len,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// The identity of the file `fd` refers to.
pub fn id_of(fd: impl AsFd) -> io::Result<Id> {
    Ok(stat_id(&rustix::fs::fstat(fd)?))
}

// `st_dev` and `st_ino` are not u64 on every target.
#[allow(clippy::unnecessary_cast)]
fn stat_id(st: &rustix::fs::Stat) -> Id {
    (st.st_dev as u64, st.st_ino as u64)
}

/// What `stat_at` found at a name, without following it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    Missing,
    Dir,
    Other,
}

impl FsRoot {
    /// Open `path` (a directory) as a root.
    pub fn open(path: &Path) -> io::Result<FsRoot> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        )?;
        Ok(FsRoot {
            fd,
            path: path.to_path_buf(),
            no_symlinks: false,
        })
    }

    /// The same root on a descriptor of its own, resolving no symlink in
    /// parent paths.
    pub(crate) fn without_symlinks(&self) -> io::Result<FsRoot> {
        Ok(FsRoot {
            fd: rustix::io::fcntl_dupfd_cloexec(&self.fd, 0)?,
            path: self.path.clone(),
            no_symlinks: true,
        })
    }

    /// The host path of the root (for messages only; never used to resolve).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The root's own descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Open the directory at `rel` (normalised, relative) as the kernel would
    /// inside a chroot at the root. Symlinks along the way, including the last
    /// component, are followed but never leave the root.
    pub fn open_dir(&self, rel: &Path) -> io::Result<OwnedFd> {
        let target: &Path = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        Ok(rustix::fs::openat2(
            &self.fd,
            target,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            if self.no_symlinks {
                ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_SYMLINKS
            } else {
                ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS
            },
        )?)
    }

    /// Like [`FsRoot::open_dir`], creating missing directories (mode 0700, so
    /// that an unprivileged run can still write into them; the caller fixes
    /// modes later). `created` is told each directory made, by the path it was
    /// made under (through a dangling link: the link's target) and an `O_PATH`
    /// descriptor on it. A dangling symlink on the way is followed to where it
    /// points, inside the root, and that directory is created.
    pub fn mkdir_all(
        &self,
        rel: &Path,
        created: &mut dyn FnMut(&Path, &OwnedFd),
    ) -> io::Result<OwnedFd> {
        self.mkdir_all_hops(rel, created, 0)
    }

    fn mkdir_all_hops(
        &self,
        rel: &Path,
        created: &mut dyn FnMut(&Path, &OwnedFd),
        hops: usize,
    ) -> io::Result<OwnedFd> {
        match self.open_dir(rel) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            other => return other,
        }
        let mut prefix = PathBuf::new();
        let mut parent = self.open_dir(&prefix)?;
        for component in rel.components() {
            let name = component.as_os_str();
            prefix.push(name);
            // A real directory is stepped into from its parent. Resolving the
            // whole prefix again for each component (as the kernel must when
            // it holds symlinks) made a deep path cost its depth squared.
            match open_child_path(&parent, name) {
                Ok(fd) => {
                    parent = fd;
                    continue;
                }
                Err(rustix::io::Errno::NOENT) => {}
                Err(rustix::io::Errno::NOTDIR) | Err(rustix::io::Errno::LOOP) => {
                    // A symlink (or a file): the kernel resolves it inside the root.
                    match self.open_dir(&prefix) {
                        Ok(fd) => {
                            parent = fd;
                            continue;
                        }
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(e.into()),
            }
            match rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o700)) {
                Ok(()) => {
                    let made = open_child_path(&parent, name)?;
                    created(&prefix, &made);
                    parent = made;
                    continue;
                }
                Err(rustix::io::Errno::EXIST) => {
                    // Something is there yet does not resolve: a dangling
                    // symlink, or a directory another lane made meanwhile.
                    let stat = rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW)?;
                    if FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
                        parent = open_child_path(&parent, name)?;
                        continue;
                    }
                    if FileType::from_raw_mode(stat.st_mode) != FileType::Symlink {
                        return Err(io::Error::from(io::ErrorKind::NotADirectory));
                    }
                    if hops >= MAX_LINK_HOPS || self.no_symlinks {
                        return Err(io::Error::from_raw_os_error(libc_eloop()));
                    }
                    let target = rustix::fs::readlinkat(&parent, name, Vec::new())?;
                    let target = Path::new(OsStr::from_bytes(target.as_bytes()));
                    let base = prefix.parent().unwrap_or(Path::new(""));
                    let mut resolved = if target.is_absolute() {
                        normalize(target.as_os_str().as_bytes())
                    } else {
                        normalize(base.join(target).as_os_str().as_bytes())
                    };
                    // Continue with the rest of `rel` below the link's target.
                    let rest: PathBuf =
                        rel.components().skip(prefix.components().count()).collect();
                    resolved.push(rest);
                    return self.mkdir_all_hops(
                        &normalize(resolved.as_os_str().as_bytes()),
                        created,
                        hops + 1,
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(parent)
    }
}

/// An `O_PATH` descriptor on the directory `name` in `dir`, not following a
/// symlink (`ENOTDIR` for one).
fn open_child_path(dir: &OwnedFd, name: &OsStr) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

fn libc_eloop() -> i32 {
    rustix::io::Errno::LOOP.raw_os_error()
}

/// What is at `name` in `dir`, without following a symlink.
pub fn stat_at(dir: impl AsFd, name: &OsStr) -> io::Result<Node> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => Ok(Node::Dir),
        Ok(_) => Ok(Node::Other),
        Err(rustix::io::Errno::NOENT) => Ok(Node::Missing),
        Err(e) => Err(e.into()),
    }
}

/// Open the directory `name` in `dir` for reading, refusing to follow a symlink.
pub fn open_child_dir(dir: impl AsFd, name: &OsStr) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Remove `name` in `dir` and, if it is a directory, everything below it.
///
/// Nothing is followed: symlinks are unlinked, directories are opened with
/// `O_NOFOLLOW` and walked by descriptor. A read-only directory we own (a Nix
/// store path is 0555) is made writable first, which is the only way an
/// unprivileged user can empty it.
pub fn remove_all_at(dir: impl AsFd, name: &OsStr) -> io::Result<()> {
    let dir = dir.as_fd();
    let Some(child) = unlink_or_open_dir(dir, name)? else {
        return Ok(());
    };
    empty_dir(&child)?;
    match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Unlink `name` unless it is a directory; a directory is opened (not
/// following a symlink), made writable and returned.
fn unlink_or_open_dir(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<OwnedFd>> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(rustix::io::Errno::ISDIR) | Err(rustix::io::Errno::PERM) => {}
        Err(e) => return Err(e.into()),
    }
    match stat_at(dir, name)? {
        Node::Missing => return Ok(None),
        Node::Other => {
            rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
            return Ok(None);
        }
        Node::Dir => {}
    }
    let child = open_child_dir(dir, name)?;
    make_writable(&child)?;
    Ok(Some(child))
}

/// Remove everything inside the open directory `dir`.
pub fn empty_dir(dir: &OwnedFd) -> io::Result<()> {
    make_writable(dir)?;
    walk(dir, &mut |_, _, _, _| Ok(Step::Remove), &mut |_| Ok(()))
}

/// What [`walk`] does with one entry of a directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Leave it (and, for a directory, what is inside) alone.
    Keep,
    /// Visit the entries of this directory too (nothing for a non-directory).
    Descend,
    /// Remove it, and for a directory everything below it.
    Remove,
}

/// One directory on the walk's path down from the top.
struct Frame {
    id: Id,
    /// Its name in its parent.
    name: std::ffi::OsString,
    /// Entries not visited yet.
    pending: Vec<PathBuf>,
    /// Inside a directory being removed: everything goes.
    removing: bool,
}

/// Walk the tree below the open directory `top`, depth first, without
/// following symlinks, in a loop that holds two descriptors at most.
///
/// `visit(dir, name, node, id)` decides for each entry of each directory
/// visited (`dir` is the identity of the directory holding it, `id` the
/// entry's own); the entries of a directory being removed are not shown.
/// `leave(fd)` is called for each directory descended into once its entries
/// are done, after the walk holds its parent again (so it may take away the
/// directory's search permission).
pub fn walk(
    top: &OwnedFd,
    visit: &mut dyn FnMut(Id, &OsStr, Node, Id) -> io::Result<Step>,
    leave: &mut dyn FnMut(&OwnedFd) -> io::Result<()>,
) -> io::Result<()> {
    let mut frames = Vec::new();
    walk_frames(top, &mut frames, visit, leave).map_err(|e| {
        // Say where, below the top: the tail of the path is what tells.
        let path: PathBuf = frames.iter().skip(1).map(|f| f.name.as_os_str()).collect();
        let path = path.as_os_str().as_bytes();
        if path.is_empty() {
            return e;
        }
        let tail = &path[path.len().saturating_sub(200)..];
        let cut = if tail.len() < path.len() { ".../" } else { "" };
        io::Error::new(
            e.kind(),
            format!("{cut}{}: {e}", String::from_utf8_lossy(tail)),
        )
    })
}

fn walk_frames(
    top: &OwnedFd,
    frames: &mut Vec<Frame>,
    visit: &mut dyn FnMut(Id, &OsStr, Node, Id) -> io::Result<Step>,
    leave: &mut dyn FnMut(&OwnedFd) -> io::Result<()>,
) -> io::Result<()> {
    let mut cur = rustix::fs::openat(
        top,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    frames.push(Frame {
        id: id_of(&cur)?,
        name: std::ffi::OsString::new(),
        pending: list_dir(&cur)?,
        removing: false,
    });
    while let Some(frame) = frames.last_mut() {
        if let Some(name) = frame.pending.pop() {
            let name = name.into_os_string();
            let child = if frame.removing {
                unlink_or_open_dir(cur.as_fd(), &name)?.map(|fd| (fd, true))
            } else {
                let (node, id) = match rustix::fs::statat(&cur, &name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => (
                        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                            Node::Dir
                        } else {
                            Node::Other
                        },
                        stat_id(&st),
                    ),
                    Err(rustix::io::Errno::NOENT) => continue,
                    Err(e) => return Err(e.into()),
                };
                match (visit(frame.id, &name, node, id)?, node) {
                    (_, Node::Missing) | (Step::Keep, _) | (Step::Descend, Node::Other) => None,
                    (Step::Remove, _) => {
                        unlink_or_open_dir(cur.as_fd(), &name)?.map(|fd| (fd, true))
                    }
                    (Step::Descend, Node::Dir) => Some((open_child_dir(&cur, &name)?, false)),
                }
            };
            if let Some((fd, removing)) = child {
                frames.push(Frame {
                    id: id_of(&fd)?,
                    name,
                    pending: list_dir(&fd)?,
                    removing,
                });
                cur = fd;
            }
            continue;
        }
        // This directory is done: climb back to its parent.
        if frames.len() == 1 {
            frames.clear();
            break; // the top
        }
        let parent = rustix::fs::openat(
            &cur,
            "..",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        if Some(id_of(&parent)?) != frames.len().checked_sub(2).map(|i| frames[i].id) {
            return Err(io::Error::other(
                "the directory was moved while its tree was walked",
            ));
        }
        match frames.last() {
            Some(done) if done.removing => {
                match rustix::fs::unlinkat(&parent, &done.name, AtFlags::REMOVEDIR) {
                    Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            _ => leave(&cur)?,
        }
        frames.pop();
        cur = parent;
    }
    Ok(())
}

/// Give the owner write and search permission on `dir` if it lacks them.
pub fn make_writable(dir: &OwnedFd) -> io::Result<()> {
    let st = rustix::fs::fstat(dir)?;
    let mode = st.st_mode & 0o7777;
    if mode & 0o300 != 0o300 {
        rustix::fs::fchmod(dir, Mode::from_raw_mode(mode | 0o700))?;
    }
    Ok(())
}

/// The names in an open directory, without `.` and `..`.
pub fn list_dir(dir: &OwnedFd) -> io::Result<Vec<PathBuf>> {
    let mut names = Vec::new();
    let mut reader = rustix::fs::Dir::read_from(dir)?;
    while let Some(entry) = reader.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(PathBuf::from(OsStr::from_bytes(name)));
        }
    }
    Ok(names)
}

/// Remove a host directory tree given by path, without following symlinks
/// inside it. Used for staging folders and replaced outputs.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "refusing to remove a root directory",
        ));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let dir = rustix::fs::open(
        parent,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    remove_all_at(&dir, name)
}

/// Normalise a tar entry name into a relative path inside the root.
///
/// Leading `/` and `./` are dropped, `.` components vanish and `..` clamps at
/// the root, so `../../etc/passwd` becomes `etc/passwd`. The empty path is the
/// root itself.
pub fn normalize(name: &[u8]) -> PathBuf {
    let mut out = PathBuf::new();
    for component in Path::new(OsStr::from_bytes(name)).components() {
        match component {
            Component::Normal(c) => out.push(c),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_clamps_dot_dot_and_drops_leading_slashes() {
        let n = |s: &str| normalize(s.as_bytes()).to_string_lossy().into_owned();
        assert_eq!(n("/nix/store/abc"), "nix/store/abc");
        assert_eq!(n("./etc/passwd"), "etc/passwd");
        assert_eq!(n("../../etc/passwd"), "etc/passwd");
        assert_eq!(n("a/b/../../../c"), "c");
        assert_eq!(n("a//b/./c/"), "a/b/c");
        assert_eq!(n("/"), "");
        assert_eq!(n("."), "");
        assert_eq!(n(".."), "");
    }

    #[test]
    fn absolute_symlinks_resolve_inside_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root_path = tmp.path().join("root");
        std::fs::create_dir_all(root_path.join("run")).unwrap();
        std::fs::create_dir_all(root_path.join("var")).unwrap();
        std::os::unix::fs::symlink("/run", root_path.join("var/run")).unwrap();
        let root = FsRoot::open(&root_path).unwrap();
        let fd = root.open_dir(Path::new("var/run")).unwrap();
        rustix::fs::mkdirat(&fd, "x", Mode::from_raw_mode(0o755)).unwrap();
        assert!(root_path.join("run/x").is_dir());
    }

    #[test]
    fn mkdir_all_follows_a_dangling_link_into_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root_path = tmp.path().join("root");
        std::fs::create_dir_all(root_path.join("var")).unwrap();
        std::os::unix::fs::symlink("/run", root_path.join("var/run")).unwrap();
        std::os::unix::fs::symlink("../../..", root_path.join("up")).unwrap();
        let root = FsRoot::open(&root_path).unwrap();
        let mut made = Vec::new();
        root.mkdir_all(Path::new("var/run/a/b"), &mut |p, _| {
            made.push(p.to_path_buf())
        })
        .unwrap();
        assert!(root_path.join("run/a/b").is_dir());
        assert_eq!(
            made,
            [
                PathBuf::from("run"),
                PathBuf::from("run/a"),
                PathBuf::from("run/a/b")
            ]
        );
        root.mkdir_all(Path::new("up/escaped"), &mut |_, _| {})
            .unwrap();
        assert!(root_path.join("escaped").is_dir());
        assert!(!tmp.path().join("escaped").exists());
    }

    #[test]
    fn remove_all_empties_read_only_directories_without_following_links() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), "x").unwrap();
        let victim = tmp.path().join("victim");
        std::fs::create_dir_all(victim.join("sub")).unwrap();
        std::fs::write(victim.join("sub/f"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, victim.join("link")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(victim.join("sub"), std::fs::Permissions::from_mode(0o555))
            .unwrap();
        remove_tree(&victim).unwrap();
        assert!(!victim.exists());
        assert!(outside.join("keep").exists());
    }
}
