//! The Nix database of a seed: reading it, and merging another image's into it.
//!
//! A seed (`DIR`, which the runners mount) and an unpacked image root have the
//! same layout: store paths in `nix/store`, and in `nix/var/nix/db` the SQLite
//! database that says which of them are valid (`ValidPaths`), what they
//! reference (`Refs`) and which derivation built what (`DerivationOutputs`),
//! plus a `schema` file with the database's version.
//!
//! `hydrafy fetch --merge` adds a new image's store paths to a seed that jobs
//! may be using right now, so [`Merge`] follows the protocol Nix itself uses
//! when it adds a path to a local store:
//!
//! 1. a shared `flock` on `nix/var/nix/db/big-lock`, held throughout (Nix
//!    holds it shared while it uses the store, and exclusively only to migrate
//!    the schema, so this waits out a migration and nothing else);
//! 2. an exclusive `flock` on `nix/store/<path>.lock` for each path to add
//!    (what Nix takes before it builds or substitutes that path), then a second
//!    look at the database in case a job registered the path meanwhile;
//! 3. the store paths are moved into `DIR/nix/store` and flushed to disk;
//! 4. only then, in one `BEGIN IMMEDIATE` transaction with a busy timeout
//!    (saying so when a writer makes it wait), the registrations are
//!    inserted, with ids mapped to the seed's own.
//!
//! A crash between 3 and 4 leaves unregistered directories, which Nix treats
//! as absent (and replaces when it needs the path); it never leaves a
//! registered path that is missing. The API makes that order the natural one:
//! [`Merge::plan`] (locks, checks, lists what is missing), [`Merge::install`]
//! (moves), [`Merge::commit`] (the transaction, which refuses to register a
//! path that is not in `DIR/nix/store`).
//!
//! ```no_run
//! # fn main() -> hydrafy::Result<()> {
//! use hydrafy::nix::Merge;
//! # let reporter = hydrafy::ui::Recorder::default();
//! # let (seed, unpacked) = (std::path::Path::new("nix-backup"), std::path::Path::new("staging/rootfs"));
//! // `unpacked` holds the new image's nix/store and nix/var/nix/db, on the seed's file system.
//! let mut merge = Merge::plan(seed, unpacked, &reporter)?; // locks, checks; Err = nothing changed
//! eprintln!("adding {} store paths ({} bytes)", merge.missing().len(), merge.missing_bytes());
//! merge.install()?; // moves them into seed/nix/store and flushes
//! let summary = merge.commit()?; // one transaction; then the locks are released
//! # let _ = summary; Ok(()) }
//! ```
//!
//! What is not coordinated: Nix's garbage collector. Job containers do not
//! share `nix/var/nix/gcroots` or `temproots`, so a `nix-collect-garbage` in
//! one job is already unsafe for the others, merge or no merge. `hydrafy gc`
//! is: it takes big-lock exclusively (see [`crate::gc::execute`]), so it never
//! runs while a merge holds the lock shared.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{
    Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params,
};
use rustix::fs::FlockOperation;

use crate::error::{Error, Result};
use crate::nix::hash::NixHash;
use crate::nix::store_path::{STORE_PREFIX, StorePath};
use crate::ui::progress::Reporter;
use crate::unpack::fsroot;

/// The database schema version hydrafy reads and writes: the one every Nix
/// 2.x uses (`nix/var/nix/db/schema` holds `10`).
pub const SCHEMA_VERSION: u32 = 10;

/// Where the store is, relative to a seed or image root.
pub const STORE_DIR: &str = "nix/store";

/// Where the database is, relative to a seed or image root.
pub const DB_DIR: &str = "nix/var/nix/db";

/// How long a write waits for jobs' Nix processes to finish their own
/// transactions. Theirs take milliseconds; minutes mean something is stuck.
const BUSY_TIMEOUT: Duration = Duration::from_secs(120);

/// One registered store path: a `ValidPaths` row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathInfo {
    pub id: i64,
    /// `/nix/store/<hash>-<name>`.
    pub path: String,
    /// The NAR hash as the database spells it (usually `sha256:<hex>`).
    pub hash: String,
    pub registration_time: i64,
    pub deriver: Option<String>,
    pub nar_size: Option<i64>,
    pub ultimate: Option<i64>,
    pub sigs: Option<String>,
    pub ca: Option<String>,
}

impl PathInfo {
    /// The `<hash>-<name>` part, the path's directory name in `nix/store`.
    pub fn name(&self) -> &str {
        self.path.strip_prefix(STORE_PREFIX).unwrap_or(&self.path)
    }

    /// The NAR hash, parsed.
    pub fn nar_hash(&self) -> std::result::Result<NixHash, crate::nix::hash::HashParseError> {
        self.hash.parse()
    }
}

/// A consistent read of a whole Nix database.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Every valid path, by ascending id.
    pub paths: Vec<PathInfo>,
    /// `(referrer id, reference id)` rows of `Refs`.
    pub refs: Vec<(i64, i64)>,
    /// `(derivation id, output name, output path)` rows of `DerivationOutputs`.
    pub drv_outputs: Vec<(i64, String, String)>,
    by_path: HashMap<String, usize>,
    by_id: HashMap<i64, usize>,
}

impl Snapshot {
    /// A snapshot of these rows (`paths` by ascending id), with its indexes.
    pub fn from_rows(
        paths: Vec<PathInfo>,
        refs: Vec<(i64, i64)>,
        drv_outputs: Vec<(i64, String, String)>,
    ) -> Snapshot {
        let mut snap = Snapshot {
            paths,
            refs,
            drv_outputs,
            ..Snapshot::default()
        };
        for (i, p) in snap.paths.iter().enumerate() {
            snap.by_path.insert(p.path.clone(), i);
            snap.by_id.insert(p.id, i);
        }
        snap
    }

    /// The valid path `path` (`/nix/store/...`), if registered.
    pub fn get(&self, path: &str) -> Option<&PathInfo> {
        self.by_path.get(path).map(|&i| &self.paths[i])
    }

    /// The registered path whose directory in `nix/store` is `name`.
    pub fn get_name(&self, name: &str) -> Option<&PathInfo> {
        self.get(&format!("{STORE_PREFIX}{name}"))
    }

    /// The position of `path` in [`Snapshot::paths`], if registered.
    pub fn index_of(&self, path: &str) -> Option<usize> {
        self.by_path.get(path).copied()
    }

    /// The valid path with database id `id`.
    pub fn by_id(&self, id: i64) -> Option<&PathInfo> {
        self.by_id.get(&id).map(|&i| &self.paths[i])
    }

    /// The references of each path id, as paths; a dangling id is `Err(id)`.
    pub fn references(&self) -> HashMap<i64, Vec<std::result::Result<&str, i64>>> {
        let mut out: HashMap<i64, Vec<_>> = HashMap::new();
        for &(referrer, reference) in &self.refs {
            let target = self
                .by_id(reference)
                .map(|p| p.path.as_str())
                .ok_or(reference);
            out.entry(referrer).or_default().push(target);
        }
        out
    }
}

/// `ROOT/nix/var/nix/db/db.sqlite`.
pub fn db_file(root: &Path) -> PathBuf {
    root.join(DB_DIR).join("db.sqlite")
}

/// The schema version in `ROOT/nix/var/nix/db/schema`, checked to be one hydrafy supports.
pub fn check_schema(root: &Path) -> Result<u32> {
    let path = root.join(DB_DIR).join("schema");
    let text = fs::read_to_string(&path)
        .map_err(|e| Error::io(&path, "cannot read the Nix database schema version", e))?;
    let version: u32 = text.trim().parse().map_err(|_| Error::Store {
        dir: path.clone(),
        reason: format!(
            "holds {:?}, not a schema version; the Nix database is damaged",
            text.trim()
        ),
    })?;
    if version != SCHEMA_VERSION {
        return Err(Error::Store {
            dir: path,
            reason: format!(
                "the Nix database has schema version {version}; hydrafy works with version \
                 {SCHEMA_VERSION} (Nix 2.x) only, so it changed nothing"
            ),
        });
    }
    Ok(version)
}

/// Open `ROOT`'s database for reading.
///
/// Nix keeps its database in WAL mode, where a reader needs the `-wal` and
/// `-shm` files beside it; a read-only connection creates them and cannot
/// remove them. So the database is opened read-write when we may (only ever
/// to read: the last connection to close then removes those files and leaves
/// the folder's contents as it found them; its mtime moves, as it does when
/// Nix reads), and read-only otherwise.
pub fn open_for_reading(root: &Path) -> Result<Connection> {
    let path = db_file(root);
    if !path.is_file() {
        return Err(Error::Store {
            dir: root.to_path_buf(),
            reason: format!(
                "has no Nix database ({DB_DIR}/db.sqlite); give the folder `hydrafy fetch` wrote (e.g. ./nix-backup)"
            ),
        });
    }
    let flags = OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(&path, flags | OpenFlags::SQLITE_OPEN_READ_WRITE)
        .or_else(|_| Connection::open_with_flags(&path, flags | OpenFlags::SQLITE_OPEN_READ_ONLY))
        .map_err(|e| db_err(&path, "cannot open the Nix database", e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| db_err(&path, "cannot set the busy timeout", e))?;
    conn.execute_batch("pragma query_only = on;")
        .map_err(|e| db_err(&path, "cannot open the Nix database", e))?;
    Ok(conn)
}

fn db_err(path: &Path, action: impl Into<String>, source: rusqlite::Error) -> Error {
    Error::Database {
        path: path.to_path_buf(),
        action: action.into(),
        source,
    }
}

/// Read every registration of `ROOT`'s database in one read transaction.
pub fn snapshot(root: &Path) -> Result<Snapshot> {
    let conn = open_for_reading(root)?;
    read_snapshot(&conn, &db_file(root))
}

fn read_snapshot(conn: &Connection, db: &Path) -> Result<Snapshot> {
    let read = || -> rusqlite::Result<Snapshot> {
        let tx = conn.unchecked_transaction()?;
        let paths = all_rows(
            &tx,
            "select id, path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca \
             from ValidPaths order by id",
            |r| {
                Ok(PathInfo {
                    id: r.get(0)?,
                    path: r.get(1)?,
                    hash: r.get(2)?,
                    registration_time: r.get(3)?,
                    deriver: r.get(4)?,
                    nar_size: r.get(5)?,
                    ultimate: r.get(6)?,
                    sigs: r.get(7)?,
                    ca: r.get(8)?,
                })
            },
        )?;
        let refs = all_rows(&tx, "select referrer, reference from Refs", |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
        let drv_outputs = all_rows(&tx, "select drv, id, path from DerivationOutputs", |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?;
        tx.finish()?;
        Ok(Snapshot::from_rows(paths, refs, drv_outputs))
    };
    read().map_err(|e| db_err(db, "cannot read the Nix database", e))
}

fn all_rows<T>(
    conn: &Connection,
    sql: &str,
    row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Vec<T>> {
    let mut stmt = conn.prepare(sql)?;
    stmt.query_map([], row)?.collect()
}

/// Is `path` a store path hydrafy may turn into a file name under
/// `nix/store` (see [`StorePath`])?
pub fn is_store_path(path: &str) -> bool {
    StorePath::parse(path).is_some()
}

/// A shared `flock` on `DIR/nix/var/nix/db/big-lock`, as every Nix process
/// using the store holds one. Waits while a schema migration holds it exclusively.
pub struct BigLock {
    _file: Option<File>,
}

impl BigLock {
    /// Take the lock on `root`'s database. With no lock file, no Nix process
    /// has opened this store yet (each creates it first), so there is nothing
    /// to wait for, and the file is not created: a merge that is refused then
    /// leaves the seed exactly as it was.
    pub fn shared(root: &Path, reporter: &dyn Reporter) -> Result<BigLock> {
        let path = root.join(DB_DIR).join("big-lock");
        if fs::symlink_metadata(&path).is_err() {
            return Ok(BigLock { _file: None });
        }
        let file = open_lock_file(&path)?;
        if rustix::fs::flock(&file, FlockOperation::NonBlockingLockShared).is_err() {
            reporter.info(&format!(
                "waiting for the Nix store lock {} (a Nix process is migrating the database)",
                path.display()
            ));
            rustix::fs::flock(&file, FlockOperation::LockShared)
                .map_err(|e| Error::io(&path, "cannot lock the Nix database", e.into()))?;
        }
        Ok(BigLock { _file: Some(file) })
    }
}

pub(crate) fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(path, "cannot open lock file", e))
}

/// What [`PathLock::try_existing`] found.
pub(crate) enum TryLock {
    /// No lock file: no one holds the path's lock.
    Free,
    /// Someone holds it.
    Held,
    /// We hold it now.
    Taken(PathLock),
}

/// An exclusive lock on one store path, `nix/store/<name>.lock`, taken as Nix
/// takes it before it creates that path. Released (and the lock file removed
/// the way Nix removes it, so that waiters see it is stale) on drop.
pub(crate) struct PathLock {
    path: PathBuf,
    file: File,
}

impl PathLock {
    /// Without waiting: lock `store/<name>.lock` if it exists ([`TryLock::Taken`]),
    /// or say that someone holds it, or that there is no lock file. No file
    /// means no holder: a holder keeps its lock file until it lets go, and
    /// removes it then. (gc, which holds big-lock exclusively meanwhile, so
    /// avoids creating a lock file per victim while every job waits.)
    pub(crate) fn try_existing(store: &Path, name: &str) -> Result<TryLock> {
        let path = store.join(format!("{name}.lock"));
        // A non-empty lock file was unlinked by its holder as we opened it:
        // look again. A few tries; a named non-empty one is not Nix's.
        for _ in 0..3 {
            let file = match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TryLock::Free),
                Err(e) => return Err(Error::io(&path, "cannot open lock file", e)),
            };
            if rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
                return Ok(TryLock::Held);
            }
            let len = file
                .metadata()
                .map_err(|e| Error::io(&path, "cannot stat lock file", e))?
                .len();
            if len == 0 {
                return Ok(TryLock::Taken(PathLock { path, file }));
            }
        }
        Ok(TryLock::Held)
    }

    fn acquire(store: &Path, name: &str, reporter: &dyn Reporter) -> Result<PathLock> {
        let path = store.join(format!("{name}.lock"));
        loop {
            let file = open_lock_file(&path)?;
            if rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
                reporter.info(&format!(
                    "waiting for {} (a job is building or adding {STORE_PREFIX}{name})",
                    path.display()
                ));
                rustix::fs::flock(&file, FlockOperation::LockExclusive)
                    .map_err(|e| Error::io(&path, "cannot lock store path", e.into()))?;
            }
            // A non-empty lock file was released and unlinked by its holder: retry.
            let len = file
                .metadata()
                .map_err(|e| Error::io(&path, "cannot stat lock file", e))?
                .len();
            if len == 0 {
                return Ok(PathLock { path, file });
            }
        }
    }
}

impl Drop for PathLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        let _ = self.file.write_all(b"d");
    }
}

/// What a finished merge did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MergeSummary {
    /// Store paths the seed gained, registered.
    pub added: Vec<String>,
    /// Store paths of the image the seed already had (with the same NAR hash).
    pub already_present: usize,
}

/// Merging an unpacked image's store and database into a seed; see the
/// module documentation for the order of [`plan`](Merge::plan),
/// [`install`](Merge::install) and [`commit`](Merge::commit).
///
/// Dropping a `Merge` before `commit` releases its locks and registers
/// nothing; store paths already installed stay, unregistered (and invisible to Nix).
/// It keeps the reporter given to `plan`, to say when `commit` must wait.
pub struct Merge<'r> {
    seed: PathBuf,
    image: PathBuf,
    image_snap: Snapshot,
    /// Image paths the seed lacks, by name, sorted.
    missing: Vec<String>,
    already_present: usize,
    locks: Vec<PathLock>,
    installed: bool,
    _big_lock: BigLock,
    reporter: &'r dyn Reporter,
}

impl<'r> Merge<'r> {
    /// Lock the seed, read both databases, check that every store path they
    /// share has the same NAR hash, size and references, and list what the
    /// seed lacks. Changes nothing in the seed (but for lock files).
    ///
    /// `seed` and `image` are roots holding `nix/store` and `nix/var/nix/db`.
    pub fn plan(seed: &Path, image: &Path, reporter: &'r dyn Reporter) -> Result<Merge<'r>> {
        check_schema(seed)?;
        check_schema(image)?;
        let big_lock = BigLock::shared(seed, reporter)?;
        let image_conn = open_for_reading(image)?;
        let image_snap = read_snapshot(&image_conn, &db_file(image))?;
        check_image(image, &image_snap, &image_conn)?;
        drop(image_conn);
        let image_refs = reference_sets(&image_snap);

        let seed_conn = open_for_reading(seed)?;
        let seed_snap = read_snapshot(&seed_conn, &db_file(seed))?;
        drop(seed_conn);
        let seed_refs = reference_sets(&seed_snap);
        let mut disagree = Vec::new();
        let mut candidates = Vec::new();
        for info in &image_snap.paths {
            match seed_snap.get(&info.path) {
                Some(have) => {
                    if let Some(why) = disagreement(
                        have,
                        seed_refs.get(&have.id),
                        info,
                        image_refs.get(&info.id),
                    ) {
                        disagree.push(why);
                    }
                }
                None => candidates.push(info.name().to_string()),
            }
        }
        if !disagree.is_empty() {
            return Err(disagreement_error(seed, &disagree));
        }
        // What the seed lacks must be in the image's store; what it shares
        // need not be (fetch --merge does not write paths the seed has).
        for name in &candidates {
            if fs::symlink_metadata(image.join(STORE_DIR).join(name)).is_err() {
                return Err(Error::Store {
                    dir: image.to_path_buf(),
                    reason: format!(
                        "registers {STORE_PREFIX}{name} but the image's store has no such path; \
                         the image's Nix database is damaged, nothing was changed"
                    ),
                });
            }
        }
        let shared: Vec<&PathInfo> = image_snap
            .paths
            .iter()
            .filter(|p| seed_snap.get(&p.path).is_some())
            .collect();
        let gone = shared
            .iter()
            .filter(|p| fs::symlink_metadata(seed.join(STORE_DIR).join(p.name())).is_err())
            .count();
        if gone > 0 {
            reporter.warn(&format!(
                "{}: {gone} store path(s) the new image shares are registered but missing from disk; run `hydrafy verify {}`",
                seed.display(),
                seed.display()
            ));
        }

        // Lock what we will add (in sorted order, as Nix does, so two mergers
        // cannot deadlock), then look again: a job may have added some meanwhile.
        candidates.sort();
        let store = seed.join(STORE_DIR);
        room_for_locks(seed, candidates.len())?;
        let mut locks = Vec::with_capacity(candidates.len());
        for name in &candidates {
            locks.push(PathLock::acquire(&store, name, reporter)?);
        }
        let seed_conn = open_for_reading(seed)?;
        let mut missing = Vec::with_capacity(candidates.len());
        let mut kept_locks = Vec::with_capacity(candidates.len());
        for (name, lock) in candidates.into_iter().zip(locks) {
            let info = image_snap
                .get_name(&name)
                .ok_or_else(|| internal(seed, "planned path vanished from the image snapshot"))?;
            match query_hash(&seed_conn, seed, &info.path)? {
                None => {
                    missing.push(name);
                    kept_locks.push(lock);
                }
                Some(hash) => {
                    check_same_hash(seed, &info.path, &hash, &info.hash)?;
                }
            }
        }
        let already_present = image_snap.paths.len() - missing.len();
        Ok(Merge {
            seed: seed.to_path_buf(),
            image: image.to_path_buf(),
            image_snap,
            missing,
            already_present,
            locks: kept_locks,
            installed: false,
            _big_lock: big_lock,
            reporter,
        })
    }

    /// The image's store paths the seed lacks (`/nix/store/...`), sorted.
    pub fn missing(&self) -> Vec<String> {
        self.missing
            .iter()
            .map(|n| format!("{STORE_PREFIX}{n}"))
            .collect()
    }

    /// The NAR size of the missing paths together, for messages.
    pub fn missing_bytes(&self) -> u64 {
        self.missing
            .iter()
            .filter_map(|n| self.image_snap.get_name(n))
            .filter_map(|p| p.nar_size)
            .map(|s| s.max(0) as u64)
            .sum()
    }

    /// How many of the image's store paths the seed already has.
    pub fn already_present(&self) -> usize {
        self.already_present
    }

    /// Move each missing store path from the image's `nix/store` into the
    /// seed's (a rename: the image root must be on the seed's file system,
    /// e.g. a staging folder beside it), then flush the file system so the
    /// paths are on disk before [`commit`](Merge::commit) registers them.
    ///
    /// An unregistered directory already in the seed under a missing path's
    /// name (left by a crash, or by a job killed while it built the path) is
    /// replaced, as Nix replaces it.
    ///
    /// A second call does nothing.
    pub fn install(&mut self) -> Result<()> {
        if self.installed {
            return Ok(());
        }
        let from_store = self.image.join(STORE_DIR);
        let to_store = self.seed.join(STORE_DIR);
        for name in &self.missing {
            let from = from_store.join(name);
            let to = to_store.join(name);
            if fs::symlink_metadata(&to).is_ok() {
                fsroot::remove_tree(&to).map_err(|e| {
                    Error::io(&to, "cannot remove an unregistered leftover store path", e)
                })?;
            }
            rename_entry(&from, &to)?;
        }
        let fd =
            File::open(&to_store).map_err(|e| Error::io(&to_store, "cannot open the store", e))?;
        rustix::fs::syncfs(&fd)
            .map_err(|e| Error::io(&to_store, "cannot flush the store to disk", e.into()))?;
        self.installed = true;
        Ok(())
    }

    /// Register the image's paths in the seed's database in one transaction:
    /// the missing paths' `ValidPaths` rows, their `Refs` (ids mapped to the
    /// seed's) and the image's `DerivationOutputs` rows. Every missing path
    /// must already be in the seed's `nix/store` (see [`install`](Merge::install)).
    /// On any error the transaction is rolled back and the database is as it was.
    pub fn commit(self) -> Result<MergeSummary> {
        let store = self.seed.join(STORE_DIR);
        for name in &self.missing {
            let at = store.join(name);
            if fs::symlink_metadata(&at).is_err() {
                return Err(Error::Store {
                    dir: store.clone(),
                    reason: format!(
                        "{STORE_PREFIX}{name} is not in the store yet; move it there (Merge::install) \
                         before registering it, so the database never names a missing path"
                    ),
                });
            }
        }
        let db = db_file(&self.seed);
        let conn = Connection::open_with_flags(
            &db,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| db_err(&db, "cannot open the Nix database for writing", e))?;
        conn.execute_batch("pragma foreign_keys = on;")
            .map_err(|e| db_err(&db, "cannot enable foreign keys", e))?;
        let busy = |e: rusqlite::Error| {
            let what = if is_busy(&e) {
                format!(
                    "another Nix process kept the database busy for over {} s; nothing was registered, retry when the jobs are idle",
                    BUSY_TIMEOUT.as_secs()
                )
            } else {
                "cannot register the merged store paths; nothing was registered".to_string()
            };
            db_err(&db, what, e)
        };
        // Try once without waiting, so that a wait is announced (as the lock
        // waits of `plan` are); then wait for the writer as Nix would.
        let set_timeout = |t| {
            conn.busy_timeout(t)
                .map_err(|e| db_err(&db, "cannot set the busy timeout", e))
        };
        set_timeout(Duration::ZERO)?;
        let tx = match Transaction::new_unchecked(&conn, TransactionBehavior::Immediate) {
            Err(e) if is_busy(&e) => {
                self.reporter.info(&format!(
                    "waiting for the Nix database {} (a Nix process is writing to it)",
                    db.display()
                ));
                set_timeout(BUSY_TIMEOUT)?;
                Transaction::new_unchecked(&conn, TransactionBehavior::Immediate)
            }
            first => first,
        }
        .map_err(busy)?;
        set_timeout(BUSY_TIMEOUT)?;
        let mut ids: HashMap<&str, i64> = HashMap::new();
        let mut added = Vec::with_capacity(self.missing.len());
        {
            let mut insert = tx
                .prepare(
                    "insert into ValidPaths (path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca) \
                     values (?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .map_err(busy)?;
            for name in &self.missing {
                let path = format!("{STORE_PREFIX}{name}");
                let info = self
                    .image_snap
                    .get(&path)
                    .ok_or_else(|| internal(&self.seed, "planned path vanished"))?;
                // We hold its lock, but `nix-store --register-validity` takes none.
                if let Some(hash) = query_hash(&tx, &self.seed, &info.path)? {
                    check_same_hash(&self.seed, &info.path, &hash, &info.hash)?;
                    continue;
                }
                insert
                    .execute(params![
                        info.path,
                        info.hash,
                        info.registration_time,
                        info.deriver,
                        info.nar_size,
                        info.ultimate,
                        info.sigs,
                        info.ca
                    ])
                    .map_err(busy)?;
                ids.insert(info.path.as_str(), tx.last_insert_rowid());
                added.push(info.path.clone());
            }
            let mut lookup = tx
                .prepare("select id from ValidPaths where path = ?")
                .map_err(busy)?;
            let mut seed_id = |path: &str| -> Result<i64> {
                if let Some(&id) = ids.get(path) {
                    return Ok(id);
                }
                let id: Option<i64> = lookup
                    .query_row([path], |r| r.get(0))
                    .optional()
                    .map_err(busy)?;
                id.ok_or_else(|| Error::Store {
                    dir: self.seed.clone(),
                    reason: format!(
                        "{path} is referenced by the new image but registered on neither side; nothing was registered"
                    ),
                })
            };
            let mut add_ref = tx
                .prepare("insert or replace into Refs (referrer, reference) values (?, ?)")
                .map_err(busy)?;
            let new: BTreeSet<&str> = added.iter().map(String::as_str).collect();
            for &(referrer, reference) in &self.image_snap.refs {
                let (Some(from), Some(to)) = (
                    self.image_snap.by_id(referrer),
                    self.image_snap.by_id(reference),
                ) else {
                    continue; // check_image refused dangling ids
                };
                if !new.contains(from.path.as_str()) {
                    continue;
                }
                let (a, b) = (seed_id(&from.path)?, seed_id(&to.path)?);
                add_ref.execute(params![a, b]).map_err(busy)?;
            }
            let mut add_out = tx
                .prepare("insert or ignore into DerivationOutputs (drv, id, path) values (?, ?, ?)")
                .map_err(busy)?;
            for (drv, output, path) in &self.image_snap.drv_outputs {
                let Some(drv) = self.image_snap.by_id(*drv) else {
                    continue;
                };
                let drv_id = seed_id(&drv.path)?;
                add_out
                    .execute(params![drv_id, output, path])
                    .map_err(busy)?;
            }
        }
        tx.commit().map_err(busy)?;
        drop(self.locks);
        Ok(MergeSummary {
            added,
            already_present: self.already_present,
        })
    }
}

/// Another connection holds the lock this statement needed.
fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// Each path lock is an open file until the commit, so an image with
/// thousands of new paths needs more descriptors than the usual soft limit
/// of 1024: raise it towards the hard limit, or say why we cannot.
fn room_for_locks(seed: &Path, locks: usize) -> Result<()> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let want = locks as u64 + 256;
    let have = getrlimit(Resource::Nofile);
    if have.current.is_none_or(|cur| cur >= want) {
        return Ok(());
    }
    let raised = have.maximum.map_or(want, |max| want.min(max));
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(raised),
            maximum: have.maximum,
        },
    );
    if raised < want {
        return Err(Error::Store {
            dir: seed.to_path_buf(),
            reason: format!(
                "merging needs {want} open files (one lock per new store path) but the limit is \
                 {raised}; raise it (ulimit -n) and run again"
            ),
        });
    }
    Ok(())
}

/// The image's own database must be sane before any of it is copied.
fn check_image(image: &Path, snap: &Snapshot, conn: &Connection) -> Result<()> {
    let bad = |reason: String| Error::Store {
        dir: image.to_path_buf(),
        reason: format!("{reason}; the image's Nix database is damaged, nothing was changed"),
    };
    for p in &snap.paths {
        if !is_store_path(&p.path) {
            return Err(bad(format!(
                "registers {:?}, which is not a store path",
                p.path
            )));
        }
        if let Err(e) = p.nar_hash() {
            return Err(bad(format!("{}: hash {:?}: {e}", p.path, p.hash)));
        }
    }
    for &(referrer, reference) in &snap.refs {
        if snap.by_id(referrer).is_none() || snap.by_id(reference).is_none() {
            return Err(bad(format!(
                "a reference row ({referrer} -> {reference}) names an unregistered path id"
            )));
        }
    }
    for (drv, _, path) in &snap.drv_outputs {
        if snap.by_id(*drv).is_none() || !is_store_path(path) {
            return Err(bad(format!(
                "a derivation output row ({drv}, {path:?}) is malformed"
            )));
        }
    }
    let realisations: i64 = conn
        .query_row(
            "select count(*) from sqlite_master where type = 'table' and name = 'Realisations'",
            [],
            |r| r.get(0),
        )
        .map_err(|e| db_err(&db_file(image), "cannot read the Nix database", e))?;
    if realisations > 0 {
        let rows: i64 = conn
            .query_row("select count(*) from Realisations", [], |r| r.get(0))
            .map_err(|e| db_err(&db_file(image), "cannot read the Nix database", e))?;
        if rows > 0 {
            return Err(Error::Store {
                dir: image.to_path_buf(),
                reason: "the image's database holds content-addressed derivation realisations \
                         (experimental ca-derivations), which hydrafy cannot merge; use --replace"
                    .to_string(),
            });
        }
    }
    Ok(())
}

/// Each path's references as a set of paths (dangling ids left out:
/// `check_image` refuses them in the image, and verify reports them in the seed).
fn reference_sets(snap: &Snapshot) -> HashMap<i64, BTreeSet<&str>> {
    snap.references()
        .into_iter()
        .map(|(id, targets)| (id, targets.into_iter().filter_map(|t| t.ok()).collect()))
        .collect()
}

/// Why the seed's and the image's registrations of one path differ, if they do.
fn disagreement(
    seed: &PathInfo,
    seed_refs: Option<&BTreeSet<&str>>,
    image: &PathInfo,
    image_refs: Option<&BTreeSet<&str>>,
) -> Option<String> {
    let (a, b) = (seed.nar_hash(), image.nar_hash());
    match (&a, &b) {
        (Ok(a), Ok(b)) if a != b => {
            return Some(format!(
                "{} (NAR hash {a} in the seed, {b} in the image)",
                seed.path
            ));
        }
        (Err(_), _) => {
            return Some(format!(
                "{} (unreadable hash {:?} in the seed)",
                seed.path, seed.hash
            ));
        }
        _ => {}
    }
    if let (Some(x), Some(y)) = (seed.nar_size, image.nar_size)
        && x != 0
        && y != 0
        && x != y
    {
        return Some(format!(
            "{} (NAR size {x} in the seed, {y} in the image)",
            seed.path
        ));
    }
    let empty = BTreeSet::new();
    let (x, y) = (seed_refs.unwrap_or(&empty), image_refs.unwrap_or(&empty));
    if x != y {
        return Some(format!(
            "{} (references differ: {} in the seed, {} in the image)",
            seed.path,
            x.len(),
            y.len()
        ));
    }
    None
}

fn disagreement_error(seed: &Path, list: &[String]) -> Error {
    let shown: Vec<&str> = list.iter().take(3).map(String::as_str).collect();
    let more = if list.len() > shown.len() {
        format!(" and {} more", list.len() - shown.len())
    } else {
        String::new()
    };
    Error::Store {
        dir: seed.to_path_buf(),
        reason: format!(
            "the seed and the new image disagree on {} store path(s): {}{more}; nothing was changed \
             (run `hydrafy verify` on the seed, or use --replace)",
            list.len(),
            shown.join(", ")
        ),
    }
}

fn check_same_hash(seed: &Path, path: &str, seed_hash: &str, image_hash: &str) -> Result<()> {
    let same = match (seed_hash.parse::<NixHash>(), image_hash.parse::<NixHash>()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        Ok(())
    } else {
        Err(disagreement_error(
            seed,
            &[format!(
                "{path} (registered meanwhile with NAR hash {seed_hash}, the image has {image_hash})"
            )],
        ))
    }
}

fn query_hash(conn: &Connection, seed: &Path, path: &str) -> Result<Option<String>> {
    conn.query_row("select hash from ValidPaths where path = ?", [path], |r| {
        r.get(0)
    })
    .optional()
    .map_err(|e| db_err(&db_file(seed), "cannot read the Nix database", e))
}

fn internal(seed: &Path, what: &str) -> Error {
    Error::Store {
        dir: seed.to_path_buf(),
        reason: format!("internal error: {what}"),
    }
}

/// Rename a store path (often a read-only 0555 directory) into the seed's store.
///
/// Moving a directory to another parent rewrites its `..` entry, which needs
/// write permission on the directory itself unless we are root; give it
/// owner-write for the move and put the mode back after.
fn rename_entry(from: &Path, to: &Path) -> Result<()> {
    match fs::rename(from, to) {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error()) => {
            return Err(Error::io(
                to,
                "cannot move a store path in: the image root must be on the seed's file system",
                e,
            ));
        }
        Err(e) if e.kind() != std::io::ErrorKind::PermissionDenied => {
            return Err(Error::io(to, "cannot move a store path into the seed", e));
        }
        Err(_) => {}
    }
    let meta =
        fs::symlink_metadata(from).map_err(|e| Error::io(from, "cannot stat store path", e))?;
    let mode = meta.permissions().mode() & 0o7777;
    if !meta.is_dir() || mode & 0o200 != 0 {
        return fs::rename(from, to)
            .map_err(|e| Error::io(to, "cannot move a store path into the seed", e));
    }
    fs::set_permissions(from, fs::Permissions::from_mode(mode | 0o200))
        .map_err(|e| Error::io(from, "cannot make store path writable to move it", e))?;
    let moved = fs::rename(from, to);
    let at = if moved.is_ok() { to } else { from };
    let restored = fs::set_permissions(at, fs::Permissions::from_mode(mode));
    moved.map_err(|e| Error::io(to, "cannot move a store path into the seed", e))?;
    restored.map_err(|e| Error::io(to, "cannot restore the store path's mode", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_paths_are_checked_before_they_become_file_names() {
        assert!(is_store_path(
            "/nix/store/3ykzfjksfn40zgrnv6rp4cj8wcvmyyic-tree"
        ));
        assert!(is_store_path(
            "/nix/store/20b3qxnjjhvzc6dm9n58hif2dl86b445-x.drv"
        ));
        for bad in [
            "/nix/store/../../etc/passwd-xxxxxxxxxxxxxxxxxxxxxxxxxx",
            "/nix/store/3ykzfjksfn40zgrnv6rp4cj8wcvmyyic-a/b",
            "/nix/store/3ykzfjksfn40zgrnv6rp4cj8wcvmyyic-",
            "/nix/store/3ykzfjksfn40zgrnv6rp4cj8wcvmyyie-tree",
            "/gnu/store/3ykzfjksfn40zgrnv6rp4cj8wcvmyyic-tree",
            "/nix/store/short-tree",
        ] {
            assert!(!is_store_path(bad), "{bad}");
        }
    }
}
