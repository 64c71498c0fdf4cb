//! The output directory: stage beside it, then publish in one rename.
//!
//! All work happens in a private (0700) staging folder next to DIR, named
//! `.DIR.hydrafy-staging-*`, so that the final step is a rename on one file
//! system. A run holds an exclusive `flock` on DIR's parent for its whole
//! length: two runs on one DIR take turns, and any staging folder found while
//! holding the lock belongs to a run that was killed (SIGKILL, power loss) and
//! is removed. Publishing is `rename(2)` when DIR is absent or empty and
//! `renameat2(RENAME_EXCHANGE)` for `--replace`, so DIR is at every instant
//! either the old tree or the new one.

use std::ffi::OsString;
use std::fs::{self, File};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, RenameFlags};

use crate::error::{Error, Result};
use crate::oci::digest::Digest;
use crate::oci::platform::Platform;
use crate::seed::state::{ImageRecord, Layout, STATE_FILE, State};
use crate::ui::progress::Reporter;
use crate::unpack::fsroot;

/// What to do when DIR already holds another image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Refuse and say which switch to use.
    Refuse,
    /// `--replace`: DIR becomes exactly the new image.
    Replace,
    /// `--merge`: DIR gains the new image's store paths.
    Merge,
}

/// What DIR holds now.
#[derive(Debug)]
pub enum Holding {
    /// DIR does not exist, or is an empty directory.
    Nothing,
    /// DIR was written by hydrafy.
    State(State),
    /// DIR holds files hydrafy did not write.
    Foreign,
}

/// Refuse what a run cannot do to any DIR: `--merge` with `--rootfs`.
pub fn check_options(existing: Existing, layout: Layout) -> Result<()> {
    if existing == Existing::Merge && layout == Layout::Rootfs {
        return Err(Error::invalid(
            "option",
            "--merge",
            "--merge adds store paths to a Nix seed; it cannot be combined with --rootfs",
        ));
    }
    Ok(())
}

/// A locked output directory, and what this run was asked to do with it:
/// the one owner of "what does DIR hold, and may this run change it".
pub struct OutputDir {
    dir: PathBuf,
    parent: PathBuf,
    name: OsString,
    holding: Holding,
    existing: Existing,
    layout: Layout,
    _lock: File,
}

/// A private staging folder; removed when dropped unless published.
pub struct Staging {
    path: PathBuf,
}

impl Staging {
    /// The staging folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where layers are unpacked.
    pub fn rootfs(&self) -> PathBuf {
        self.path.join("rootfs")
    }

    /// Empty the unpack root, to unpack again from the start.
    pub fn reset_rootfs(&self) -> Result<()> {
        let rootfs = self.rootfs();
        fsroot::remove_tree(&rootfs)
            .map_err(|e| Error::io(&rootfs, "cannot empty the staging root", e))?;
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&rootfs)
            .map_err(|e| Error::io(&rootfs, "cannot create staging folder", e))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fsroot::remove_tree(&self.path);
    }
}

impl OutputDir {
    /// Lock DIR's parent, clear stale staging folders and read what DIR
    /// holds, for a run that writes `layout` and treats another image in DIR
    /// as `existing` says.
    pub fn open(
        dir: &Path,
        existing: Existing,
        layout: Layout,
        reporter: &dyn Reporter,
    ) -> Result<OutputDir> {
        check_options(existing, layout)?;
        let name = dir
            .file_name()
            .filter(|n| *n != "." && *n != "..")
            .ok_or_else(|| Error::Output {
                dir: dir.to_path_buf(),
                reason: "the output must name a directory (not /, . or ..)".to_string(),
            })?
            .to_os_string();
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent)
            .map_err(|e| Error::io(&parent, "cannot create the output's parent directory", e))?;
        let lock = File::open(&parent)
            .map_err(|e| Error::io(&parent, "cannot open the output's parent directory", e))?;
        if rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive).is_err() {
            reporter.info(&format!(
                "waiting for another hydrafy run in {}",
                parent.display()
            ));
            rustix::fs::flock(&lock, FlockOperation::LockExclusive).map_err(|e| {
                Error::io(
                    &parent,
                    "cannot lock the output's parent directory",
                    e.into(),
                )
            })?;
        }
        let out = OutputDir {
            dir: dir.to_path_buf(),
            parent,
            name,
            holding: Holding::Nothing,
            existing,
            layout,
            _lock: lock,
        };
        out.remove_stale_staging(reporter)?;
        let holding = out.inspect()?;
        Ok(OutputDir { holding, ..out })
    }

    fn staging_prefix(&self) -> String {
        format!(".{}.hydrafy-staging-", self.name.to_string_lossy())
    }

    fn remove_stale_staging(&self, reporter: &dyn Reporter) -> Result<()> {
        let prefix = self.staging_prefix();
        let entries = fs::read_dir(&self.parent)
            .map_err(|e| Error::io(&self.parent, "cannot list directory", e))?;
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let path = entry.path();
                reporter.info(&format!(
                    "removing {} left by an interrupted run",
                    path.display()
                ));
                fsroot::remove_tree(&path)
                    .map_err(|e| Error::io(&path, "cannot remove stale staging folder", e))?;
            }
        }
        Ok(())
    }

    fn inspect(&self) -> Result<Holding> {
        let meta = match fs::symlink_metadata(&self.dir) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Holding::Nothing),
            Err(e) => {
                return Err(Error::io(
                    &self.dir,
                    "cannot inspect the output directory",
                    e,
                ));
            }
        };
        if !meta.is_dir() {
            return Err(Error::Output {
                dir: self.dir.clone(),
                reason: "exists and is not a directory; choose another -o".to_string(),
            });
        }
        if let Some(state) = State::read(&self.dir)? {
            return Ok(Holding::State(state));
        }
        let mut entries = fs::read_dir(&self.dir)
            .map_err(|e| Error::io(&self.dir, "cannot list the output directory", e))?;
        Ok(if entries.next().is_none() {
            Holding::Nothing
        } else {
            Holding::Foreign
        })
    }

    /// What DIR holds.
    /// Does DIR hold a Nix store and its database (whoever wrote them)?
    pub fn holds_nix_seed(&self) -> bool {
        self.dir.join(crate::nix::db::STORE_DIR).is_dir()
            && crate::nix::db::db_file(&self.dir).is_file()
    }

    pub fn holding(&self) -> &Holding {
        &self.holding
    }

    /// The output directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How this run treats another image in DIR.
    pub fn existing(&self) -> Existing {
        self.existing
    }

    /// What this run writes into DIR.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Was DIR written by hydrafy (it has a state file)?
    pub fn has_state(&self) -> bool {
        matches!(self.holding, Holding::State(_))
    }

    /// The no-op check: does DIR already hold the image `digest` pins, as
    /// this run asks? Holding it among others is enough, except for
    /// `--replace`, which promises DIR becomes exactly the image: that is a
    /// no-op only when DIR holds the image and nothing else
    /// ([`State::find_exact`]). A state file that claims the image over an
    /// incomplete tree is an error, unless the run replaces it anyway.
    pub fn holds(&self, digest: &Digest, platform: &Platform) -> Result<Option<&ImageRecord>> {
        let Holding::State(state) = &self.holding else {
            return Ok(None);
        };
        let held = match self.existing {
            Existing::Replace => state.find_exact(self.layout, digest, platform),
            Existing::Refuse | Existing::Merge => state.find(self.layout, digest, platform),
        };
        let Some(record) = held else {
            return Ok(None);
        };
        if !looks_complete(&self.dir, self.layout) {
            if self.existing == Existing::Replace {
                // What --replace is for: the run rebuilds it.
                return Ok(None);
            }
            return Err(Error::Output {
                dir: self.dir.clone(),
                reason: format!(
                    "its state file says it holds {} but the tree is incomplete; use --replace to rebuild it",
                    record.reference
                ),
            });
        }
        Ok(Some(record))
    }

    /// Check that a run for `what` may go on; a clear error otherwise.
    pub fn check_overwrite(&self, what: &str) -> Result<()> {
        let held = match (&self.holding, self.existing) {
            (Holding::Nothing, _) | (_, Existing::Replace) => return Ok(()),
            (Holding::State(s), Existing::Refuse) => s.describe(),
            (Holding::Foreign, Existing::Refuse) => "files hydrafy did not write".to_string(),
            // A seed made another way (the docker-cp recipe) is a Nix store
            // and database like any other: the merge keeps all of it.
            (Holding::Foreign, Existing::Merge) if self.holds_nix_seed() => return Ok(()),
            (Holding::Foreign, Existing::Merge) => {
                return Err(Error::Output {
                    dir: self.dir.clone(),
                    reason: format!(
                        "holds files hydrafy did not write and no Nix store with its database \
                         ({} and {}/db.sqlite), so there is nothing to merge into; \
                         use --replace to swap in {what}",
                        crate::nix::db::STORE_DIR,
                        crate::nix::db::DB_DIR
                    ),
                });
            }
            (Holding::State(_), Existing::Merge) => return Ok(()),
        };
        Err(Error::Output {
            dir: self.dir.clone(),
            reason: format!(
                "already holds {held}; use --replace to swap in {what} atomically, \
                 or --merge to add its store paths to what is there"
            ),
        })
    }

    /// Make a private staging folder beside DIR.
    pub fn stage(&self) -> Result<Staging> {
        let path = self.parent.join(format!(
            "{}{}-{:08x}",
            self.staging_prefix(),
            std::process::id(),
            fastrand::u32(..)
        ));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| Error::io(&path, "cannot create staging folder", e))?;
        let staging = Staging { path };
        let rootfs = staging.rootfs();
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&rootfs)
            .map_err(|e| Error::io(&rootfs, "cannot create staging folder", e))?;
        Ok(staging)
    }

    /// Publish `tree` (inside `staging`) as DIR in one rename, then drop the staging folder.
    pub fn publish(&self, staging: Staging, tree: &Path) -> Result<()> {
        // Data before names: the new tree is on disk before DIR points at it.
        let fd = File::open(staging.path())
            .map_err(|e| Error::io(staging.path(), "cannot open staging folder", e))?;
        rustix::fs::syncfs(&fd).map_err(|e| {
            Error::io(
                staging.path(),
                "cannot flush staging folder to disk",
                e.into(),
            )
        })?;
        let swap = matches!(self.holding, Holding::State(_) | Holding::Foreign);
        if swap {
            rustix::fs::renameat_with(
                rustix::fs::CWD,
                tree,
                rustix::fs::CWD,
                &self.dir,
                RenameFlags::EXCHANGE,
            )
            .map_err(|e| Error::io(&self.dir, "cannot swap in the new tree", e.into()))?;
        } else {
            fs::rename(tree, &self.dir)
                .map_err(|e| Error::io(&self.dir, "cannot publish the new tree", e))?;
        }
        let parent = File::open(&self.parent)
            .map_err(|e| Error::io(&self.parent, "cannot open directory", e))?;
        rustix::fs::fsync(&parent)
            .map_err(|e| Error::io(&self.parent, "cannot flush directory", e.into()))?;
        drop(staging);
        Ok(())
    }
}

/// The two folders the runners mount, relative to the image root.
pub const SEED_DIRS: [&str; 2] = ["nix/store", "nix/var/nix/db"];

/// Build the runner seed (`nix/store`, `nix/var/nix/db`) from an unpacked
/// root by moving those two trees into `out`, keeping the modes of their
/// parent directories. `image` names the image in errors.
pub fn build_seed(rootfs: &Path, out: &Path, image: &str) -> Result<()> {
    fs::DirBuilder::new()
        .mode(0o755)
        .create(out)
        .map_err(|e| Error::io(out, "cannot create seed folder", e))?;
    let mut parents = Vec::new();
    for sub in SEED_DIRS {
        let src = rootfs.join(sub);
        // Every component must be a real directory: a symlink here would move the wrong tree.
        let mut cur = rootfs.to_path_buf();
        for part in Path::new(sub).components() {
            cur.push(part);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(Error::unsupported(
                        image,
                        format!(
                            "/{} in the image is not a directory; unpack it with --rootfs instead",
                            cur.strip_prefix(rootfs).unwrap_or(&cur).display()
                        ),
                    ));
                }
                Err(_) => {
                    return Err(Error::unsupported(
                        image,
                        format!(
                            "the image has no /{sub}, so it is not a Nix image the runners can share; use --rootfs to unpack the whole filesystem"
                        ),
                    ));
                }
            }
        }
        let dest = out.join(sub);
        let mut made = out.to_path_buf();
        let mut from = rootfs.to_path_buf();
        let parts: Vec<_> = Path::new(sub).components().collect();
        for part in &parts[..parts.len() - 1] {
            made.push(part);
            from.push(part);
            if !made.exists() {
                // Read before anything is moved out of `from`, which changes its mtime.
                let meta = fs::metadata(&from)
                    .map_err(|e| Error::io(&from, "cannot read directory metadata", e))?;
                fs::create_dir(&made)
                    .map_err(|e| Error::io(&made, "cannot create seed folder", e))?;
                parents.push((made.clone(), meta));
            }
        }
        fs::rename(&src, &dest)
            .map_err(|e| Error::io(&dest, "cannot move into the seed folder", e))?;
    }
    // The parents (nix, nix/var, nix/var/nix) take the image's owner, mode
    // and mtime, deepest first and after the moves that changed their mtimes.
    for (made, meta) in parents.iter().rev() {
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::lchown(made, Some(meta.uid()), Some(meta.gid()))
                .map_err(|e| Error::io(made, "cannot set owner", e))?;
        }
        fs::set_permissions(made, fs::Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(|e| Error::io(made, "cannot set mode", e))?;
        let mtime = rustix::fs::Timespec {
            tv_sec: meta.mtime(),
            tv_nsec: meta.mtime_nsec(),
        };
        let times = rustix::fs::Timestamps {
            last_access: mtime,
            last_modification: mtime,
        };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            made.as_path(),
            &times,
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| Error::io(made, "cannot set mtime", e.into()))?;
    }
    Ok(())
}

/// How many store paths the seed in `dir` holds on disk: the entries of its
/// `nix/store`, less Nix's own hidden ones (`.links`); 0 when it cannot be read.
pub fn store_path_count(dir: &Path) -> u64 {
    fs::read_dir(dir.join(SEED_DIRS[0])).map_or(0, |entries| {
        entries
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .count() as u64
    })
}

/// What a published DIR holds for `layout`: `nix/store` for the seed.
pub fn looks_complete(dir: &Path, layout: Layout) -> bool {
    match layout {
        Layout::Nix => SEED_DIRS.iter().all(|s| dir.join(s).is_dir()),
        Layout::Rootfs => dir.join(STATE_FILE).is_file(),
    }
}
