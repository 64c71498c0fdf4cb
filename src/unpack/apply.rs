//! Applying layer tar streams onto a root, per the OCI image spec.
//!
//! [`crate::unpack::tar`] reads each entry as Go's `archive/tar` (docker's
//! reader) does, extension headers capped at 1 MiB; this module writes.
//! Entry types it does not write (unknown ones, GNU volume headers, global
//! PAX headers) are refused or, for the last two, which describe no file,
//! skipped.
//!
//! Whiteouts follow the spec's layer semantics in one streaming pass: the
//! paths written by the current layer are tracked, a whiteout removes only
//! what lower layers left (a file and its whiteout in the same layer keep the
//! file, in either order), and an opaque whiteout empties a directory of
//! lower content while keeping what this layer put there.
//!
//! Directory modes and times are applied once, at the end of the last layer
//! and deepest first: writing into a directory changes its mtime, and a Nix
//! store path is 0555, which an unprivileged run could not write into.
//!
//! Both kinds of bookkeeping are keyed by what is on disk, not by entry
//! names: whiteouts by (directory identity, name) and directory metadata by
//! identity. A name reaches a directory through any number of symlinks, so
//! keying by name let metadata land on whichever directory a name pointed to
//! at the end, and it cost memory quadratic in the depth of a path (every
//! ancestor of every entry, each a full path string): a small layer of deep
//! names could take gigabytes. Identities cost a few bytes per directory on
//! disk and per entry in the stream.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};

use crate::error::{Error, Result};
use crate::unpack::fsroot::{self, FsRoot, Id, Node, Step};
use crate::unpack::tar::{self, Fault, Header, Kind};

/// The name prefix of a whiteout entry (the OCI image spec's `.wh.`).
pub const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// How much of a file is written before its writeback is started (see
/// [`fsroot::start_writeback`]); smaller files are left to the final flush.
const WRITEBACK_EVERY: u64 = 8 << 20;

/// How layers are applied.
#[derive(Clone, Copy, Debug)]
pub struct ApplyOptions {
    /// Running as root: keep numeric owners and setuid/setgid bits.
    pub as_root: bool,
    /// Create device nodes and FIFOs (root with `--rootfs` only).
    pub special_files: bool,
}

impl ApplyOptions {
    /// Options for the current process: root keeps owners, the rest take the
    /// invoking user's; device nodes only when asked for and possible.
    pub fn for_current_user(rootfs: bool) -> ApplyOptions {
        let as_root = rustix::process::geteuid().is_root();
        ApplyOptions {
            as_root,
            special_files: as_root && rootfs,
        }
    }
}

/// What applying layers did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ApplyStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub whiteouts: u64,
    pub skipped_special: u64,
    pub bytes: u64,
}

impl std::ops::AddAssign<&ApplyStats> for ApplyStats {
    fn add_assign(&mut self, other: &ApplyStats) {
        self.files += other.files;
        self.dirs += other.dirs;
        self.symlinks += other.symlinks;
        self.hardlinks += other.hardlinks;
        self.whiteouts += other.whiteouts;
        self.skipped_special += other.skipped_special;
        self.bytes += other.bytes;
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Option<Timespec>,
}

/// The entry being applied, for errors that name it (the name is made
/// printable only when an error needs it: this is the hot path).
struct At<'a> {
    layer: &'a str,
    name: &'a [u8],
}

impl At<'_> {
    fn shown(&self) -> String {
        show_name(self.name)
    }

    /// The entry is refused for `reason`.
    fn refuse(&self, reason: impl Into<String>) -> Error {
        Error::Entry {
            layer: self.layer.to_string(),
            entry: self.shown(),
            reason: reason.into(),
        }
    }

    /// `action` on the entry failed with an I/O error.
    fn io(&self, action: &'static str) -> impl FnOnce(io::Error) -> Error + '_ {
        move |source| Error::EntryIo {
            layer: self.layer.to_string(),
            entry: self.shown(),
            action,
            source,
        }
    }
}

/// What the caller keeps out of the root, and learns of each layer's entries.
///
/// The applier knows tar and the root, not what the tree means: a `--merge`
/// into a Nix seed skips the store paths the seed already holds, and records
/// which store paths each layer carried; that knowledge lives with the caller
/// (see `seed::layers`).
pub trait EntryFilter {
    /// A new layer starts.
    fn start_layer(&mut self) {}
    /// Every entry of the current layer, in order, by its root-relative
    /// path (whiteouts included), before it is applied or skipped.
    fn note(&mut self, _rel: &Path) {}
    /// Whether `rel` is not to be written. Its bytes are still read (and
    /// hashed by the pipeline); a hard link into a skipped path fails with
    /// [`Error::SkippedLinkTarget`]. The answer must not depend on what
    /// `note` learned: layers applied side by side ask before the notes of
    /// earlier layers are given, which happens afterwards, in layer order.
    fn skip(&self, _rel: &Path) -> bool {
        false
    }
}

/// Write everything, learn nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Unfiltered;

impl EntryFilter for Unfiltered {}

/// Applies layers, in order, onto one root.
pub struct Applier<F = Unfiltered> {
    root: FsRoot,
    opts: ApplyOptions,
    /// Directory metadata to set at the end, by directory identity.
    dirs: HashMap<Id, Meta>,
    /// The root's identity (where climbing stops).
    root_id: Id,
    /// The parent directory of the last entry, which the next usually shares.
    parent_cache: Option<(PathBuf, Arc<Parent>)>,
    /// The process's umask (from /proc), so a file created with its final
    /// mode needs no chmod; `None` when unknown.
    umask: Option<u32>,
    /// Who new files belong to without a chown.
    owner: (u32, u32),
    cancel: Option<Arc<AtomicBool>>,
    buf: Vec<u8>,
    stats: ApplyStats,
    warnings: Vec<String>,
    filter: F,
    /// How many layers the pipeline may apply at once (see `pipeline`).
    lanes: usize,
    /// Set when this applier is one lane of several.
    lane: Option<Lane>,
}

/// The store's ancestors, whose metadata layers applied side by side share:
/// `""`, `nix` and `nix/store`.
pub(crate) const ANCESTORS: [&str; 3] = ["", "nix", "nix/store"];

/// What the lanes of one parallel unpack share (see `pipeline`).
pub(crate) struct LaneShared {
    /// Store path name -> the layer that writes it; a second layer aborts.
    claims: Mutex<HashMap<OsString, usize>>,
    /// Directory metadata, in the order it was set (a reused inode is set
    /// after its old directory was removed, so the last value is right).
    pub(crate) dirs: Mutex<HashMap<Id, Meta>>,
    /// Per ancestor: the highest layer that names it and its metadata.
    pub(crate) ancestors: Mutex<[Option<(usize, Meta)>; 3]>,
    /// Per ancestor but the root: the lowest layer whose entries create it,
    /// and whether its first such entry is the directory's own.
    pub(crate) made: Mutex<[Option<(usize, bool)>; 2]>,
    /// Layers whose entries are all applied.
    done: Mutex<Vec<bool>>,
    done_changed: Condvar,
    /// Set when a lane failed: every lane stops.
    pub(crate) abort: AtomicBool,
    /// What made the first lane that failed stop.
    pub(crate) reason: Mutex<Option<String>>,
    cancel: Arc<AtomicBool>,
}

impl LaneShared {
    pub(crate) fn new(layers: usize, cancel: Arc<AtomicBool>) -> LaneShared {
        LaneShared {
            claims: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            ancestors: Mutex::new([None; 3]),
            made: Mutex::new([None; 2]),
            done: Mutex::new(vec![false; layers]),
            done_changed: Condvar::new(),
            abort: AtomicBool::new(false),
            reason: Mutex::new(None),
            cancel,
        }
    }

    /// Layer `index` is fully applied.
    /// Whether the run was cancelled (and not by lanes that interfered).
    pub(crate) fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst) && !self.abort.load(Ordering::SeqCst)
    }

    pub(crate) fn mark_done(&self, index: usize) {
        self.done.lock().expect("lane lock")[index] = true;
        self.done_changed.notify_all();
    }

    /// Stop every lane: they interfered, or (`interfered` false) the run
    /// was cancelled.
    pub(crate) fn stop(&self, interfered: bool) {
        if interfered {
            self.abort.store(true, Ordering::SeqCst);
        }
        self.cancel.store(true, Ordering::SeqCst);
        let _held = self.done.lock().expect("lane lock");
        self.done_changed.notify_all();
    }

    /// Wait until every layer below `index` is fully applied.
    fn wait_below(&self, index: usize) -> Result<()> {
        let mut done = self.done.lock().expect("lane lock");
        while !done[..index].iter().all(|d| *d) {
            if self.abort.load(Ordering::SeqCst) || self.cancel.load(Ordering::SeqCst) {
                return Err(Error::Interrupted);
            }
            // Bounded, so a cancel (which does not notify) is seen.
            done = self
                .done_changed
                .wait_timeout(done, std::time::Duration::from_millis(50))
                .expect("lane lock")
                .0;
        }
        Ok(())
    }
}

/// One lane's view of the layer it applies.
struct Lane {
    shared: Arc<LaneShared>,
    layer: usize,
    /// Every earlier layer is known to be fully applied.
    below_done: bool,
    /// The store path this layer last claimed (entries come grouped).
    claimed: Option<OsString>,
    /// Per ancestor but the root: whether this layer's first entry creating
    /// it is the directory's own.
    made: [Option<bool>; 2],
}

/// Why a lane gives up: the caller applies all layers again, in order.
fn interfere(reason: impl Into<String>) -> Error {
    Error::LanesInterfered {
        reason: reason.into(),
    }
}

/// [`interfere`], for entry `at` of its layer.
fn interfere_at(at: &At<'_>, why: &str) -> Error {
    interfere(format!("layer {}: entry {:?} {why}", at.layer, at.shown()))
}

/// Which of [`ANCESTORS`] `rel` is.
fn ancestor_index(rel: &Path) -> Option<usize> {
    let mut parts = rel.components().map(|c| c.as_os_str());
    match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => Some(0),
        (Some(n), None, _) if n == "nix" => Some(1),
        (Some(n), Some(st), None) if n == "nix" && st == "store" => Some(2),
        _ => None,
    }
}

/// The store path name `rel` lies in (`nix/store/NAME/...`), if any.
fn store_name(rel: &Path) -> Option<&OsStr> {
    let mut parts = rel.components().map(|c| c.as_os_str());
    match (parts.next(), parts.next(), parts.next()) {
        (Some(n), Some(st), Some(name)) if n == "nix" && st == "store" => Some(name),
        _ => None,
    }
}

/// An open parent directory and its identity, shared by the entries in it.
struct Parent {
    fd: OwnedFd,
    id: Id,
}

impl AsFd for Parent {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The process umask, read without changing it (umask(2) cannot).
fn process_umask() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Umask:"))?;
    u32::from_str_radix(line.trim_start_matches("Umask:").trim(), 8).ok()
}

/// Per-layer bookkeeping for whiteouts: what the current layer wrote.
#[derive(Default)]
struct Written {
    /// Directory entries written, as (identity of the directory, name).
    entries: HashSet<(Id, std::ffi::OsString)>,
    /// Directories holding something written, at any depth.
    dirs: HashSet<Id>,
}

impl Written {
    /// Record that `name` in `parent` was written, and that `parent` and the
    /// directories above it, up to the root, hold something written.
    fn mark(&mut self, root: Id, parent: &Parent, name: &OsStr) -> io::Result<()> {
        let mut id = parent.id;
        self.entries.insert((id, name.to_os_string()));
        let mut cur: Option<OwnedFd> = None;
        // Each directory is climbed past once per layer, so this costs the
        // number of directories, not the depth of every entry.
        while self.dirs.insert(id) && id != root {
            let up = rustix::fs::openat(
                cur.as_ref().unwrap_or(&parent.fd),
                "..",
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            id = fsroot::id_of(&up)?;
            cur = Some(up);
        }
        Ok(())
    }

    /// Did this layer write `name` in the directory `parent`?
    fn wrote(&self, parent: Id, name: &OsStr) -> bool {
        self.entries.contains(&(parent, name.to_os_string()))
    }

    /// Does `name` in `parent` (a directory `id`, if it is one) hold or
    /// stand for something this layer wrote?
    fn touched(&self, parent: Id, name: &OsStr, dir: Option<Id>) -> bool {
        self.wrote(parent, name) || dir.is_some_and(|d| self.dirs.contains(&d))
    }
}

impl Applier {
    /// Apply onto the directory at `root` (which must exist), writing everything.
    pub fn new(root: &Path, opts: ApplyOptions) -> Result<Applier> {
        Applier::filtered(root, opts, Unfiltered)
    }
}

impl<F: EntryFilter> Applier<F> {
    /// Apply onto the directory at `root` (which must exist), with `filter`
    /// deciding what is written.
    pub fn filtered(root: &Path, opts: ApplyOptions, filter: F) -> Result<Applier<F>> {
        let root =
            FsRoot::open(root).map_err(|e| Error::io(root, "cannot open the unpack root", e))?;
        let root_id = fsroot::id_of(root.fd())
            .map_err(|e| Error::io(root.path(), "cannot open the unpack root", e))?;
        Ok(Applier {
            root,
            opts,
            dirs: HashMap::new(),
            root_id,
            parent_cache: None,
            umask: process_umask(),
            owner: (
                rustix::process::geteuid().as_raw(),
                rustix::process::getegid().as_raw(),
            ),
            cancel: None,
            buf: vec![0; 256 << 10],
            stats: ApplyStats::default(),
            warnings: Vec::new(),
            filter,
            lanes: 1,
            lane: None,
        })
    }

    /// Let the pipeline apply up to `lanes` layers at once where they
    /// cannot interact (1, the default, applies them strictly in order).
    pub fn set_lanes(&mut self, lanes: usize) {
        self.lanes = lanes.max(1);
    }

    /// How many layers the pipeline may apply at once.
    pub fn lanes(&self) -> usize {
        self.lanes
    }

    /// An applier for one lane of a parallel unpack onto the same root,
    /// resolving no symlink in parent paths.
    pub(crate) fn lane_applier<G: EntryFilter>(
        &self,
        filter: G,
        shared: &Arc<LaneShared>,
    ) -> Result<Applier<G>> {
        let root = self
            .root
            .without_symlinks()
            .map_err(|e| Error::io(self.root.path(), "cannot open the unpack root", e))?;
        Ok(Applier {
            root,
            opts: self.opts,
            dirs: HashMap::new(),
            root_id: self.root_id,
            parent_cache: None,
            umask: self.umask,
            owner: self.owner,
            cancel: self.cancel.clone(),
            buf: vec![0; 256 << 10],
            stats: ApplyStats::default(),
            warnings: Vec::new(),
            filter,
            lanes: 1,
            lane: Some(Lane {
                shared: Arc::clone(shared),
                layer: 0,
                below_done: false,
                claimed: None,
                made: [None; 2],
            }),
        })
    }

    /// The next layer this lane applies is manifest layer `index`.
    pub(crate) fn start_lane_layer(&mut self, index: usize) {
        let lane = self.lane.as_mut().expect("a lane applier");
        lane.layer = index;
        lane.below_done = false;
        lane.claimed = None;
        lane.made = [None; 2];
    }

    /// What the layer just applied did, taken; its ancestors' first
    /// creators go to the shared record.
    pub(crate) fn end_lane_layer(&mut self) -> (ApplyStats, Vec<String>) {
        let lane = self.lane.as_ref().expect("a lane applier");
        let mut made = lane.shared.made.lock().expect("lane lock");
        for (slot, mine) in made.iter_mut().zip(lane.made) {
            if let Some(explicit) = mine
                && slot.is_none_or(|(layer, _)| lane.layer < layer)
            {
                *slot = Some((lane.layer, explicit));
            }
        }
        drop(made);
        (
            std::mem::take(&mut self.stats),
            std::mem::take(&mut self.warnings),
        )
    }

    /// The same applier with another filter.
    pub(crate) fn refilter<G: EntryFilter>(self, filter: G) -> Applier<G> {
        Applier {
            root: self.root,
            opts: self.opts,
            dirs: self.dirs,
            root_id: self.root_id,
            parent_cache: self.parent_cache,
            umask: self.umask,
            owner: self.owner,
            cancel: self.cancel,
            buf: self.buf,
            stats: self.stats,
            warnings: self.warnings,
            filter,
            lanes: self.lanes,
            lane: self.lane,
        }
    }

    /// The filter, mutably (the pipeline shares it between lanes).
    pub(crate) fn filter_mut(&mut self) -> &mut F {
        &mut self.filter
    }

    /// Take in what lanes applied: their stats, directory metadata (the
    /// ancestors' from the highest layer that named them) and the
    /// ancestors each first created. `existed` says which ancestors but
    /// the root were there before any lane ran.
    pub(crate) fn absorb_lanes(
        &mut self,
        shared: &LaneShared,
        stats: &ApplyStats,
        existed: [bool; 2],
    ) -> Result<()> {
        self.stats += stats;
        // In order, an ancestor entry counts as a directory made when it is
        // the first entry to need the directory.
        let made = *shared.made.lock().expect("lane lock");
        for (first, existed) in made.iter().zip(existed) {
            if !existed && matches!(first, Some((_, true))) {
                self.stats.dirs += 1;
            }
        }
        self.dirs
            .extend(shared.dirs.lock().expect("lane lock").drain());
        let ancestors = *shared.ancestors.lock().expect("lane lock");
        for (rel, named) in ANCESTORS.iter().zip(ancestors) {
            if let Some((_, meta)) = named {
                let id = self
                    .root
                    .open_dir(Path::new(rel))
                    .and_then(fsroot::id_of)
                    .map_err(|e| Error::io(self.root.path(), "cannot open a store directory", e))?;
                self.dirs.insert(id, meta);
            }
        }
        Ok(())
    }

    /// Whether the ancestors but the root exist now.
    pub(crate) fn ancestors_exist(&self) -> [bool; 2] {
        [1, 2].map(|i| self.root.open_dir(Path::new(ANCESTORS[i])).is_ok())
    }

    /// Record directory metadata to set in [`Applier::finish`].
    fn set_dir_meta(&mut self, id: Id, meta: Meta) {
        match &self.lane {
            Some(lane) => {
                lane.shared.dirs.lock().expect("lane lock").insert(id, meta);
            }
            None => {
                self.dirs.insert(id, meta);
            }
        }
    }

    /// For a lane: whether entry `rel` may be applied now, waiting for
    /// earlier layers when it must; `Ok(false)` when it was handled here.
    ///
    /// The rules, which make the result that of applying in order:
    /// - a directory entry for `""`, `nix` or `nix/store` only makes sure
    ///   the directory exists; its metadata is kept per layer and the
    ///   highest layer's wins (see [`Applier::absorb_lanes`]);
    /// - an entry under `nix/store/NAME` claims NAME for its layer: a store
    ///   path written by two layers stops the lanes;
    /// - any other entry waits until every earlier layer is fully applied:
    ///   later layers meanwhile touch only the ancestors and store paths
    ///   they alone claim, which no such entry reaches, since a lane's
    ///   parent paths never go through a symlink (`ELOOP` otherwise);
    /// - a hard link is applied once its target's store path is its own
    ///   layer's, or an earlier layer's and every earlier layer is done;
    /// - whiteouts, and anything but a directory at an ancestor, stop the lanes.
    fn admit(&mut self, rel: &Path, header: &Header, at: &At<'_>) -> Result<bool> {
        let kind = header.kind;
        if self
            .lane
            .as_ref()
            .is_some_and(|l| l.shared.abort.load(Ordering::Relaxed))
        {
            return Err(Error::Interrupted);
        }
        if rel
            .file_name()
            .is_some_and(|b| b.as_bytes().starts_with(WHITEOUT_PREFIX))
        {
            return Err(interfere_at(at, "is a whiteout"));
        }
        let ancestor = ancestor_index(rel);
        let lane = self.lane.as_mut().expect("a lane applier");
        // The first entry that needs `nix` or `nix/store` creates it.
        let explicit_at = ancestor.filter(|_| kind == Kind::DIR);
        if rel.starts_with("nix") && lane.made[0].is_none() {
            lane.made[0] = Some(explicit_at == Some(1));
        }
        if rel.starts_with("nix/store") && lane.made[1].is_none() {
            lane.made[1] = Some(explicit_at == Some(2));
        }
        if let Some(i) = ancestor {
            if kind != Kind::DIR {
                return Err(interfere_at(at, "is not a directory"));
            }
            let meta = self.meta(header, at)?;
            let layer = self.lane.as_ref().expect("a lane applier").layer;
            if i > 0 {
                self.parent(rel).map_err(at.io("cannot create directory"))?;
            }
            let lane = self.lane.as_ref().expect("a lane applier");
            let mut named = lane.shared.ancestors.lock().expect("lane lock");
            if named[i].is_none_or(|(l, _)| l <= layer) {
                named[i] = Some((layer, meta));
            }
            return Ok(false);
        }
        if let Some(name) = store_name(rel) {
            self.claim(name)?;
        } else {
            self.wait_below()?;
        }
        if kind == Kind::LINK {
            let target = fsroot::normalize(&header.linkname);
            match store_name(&target) {
                Some(name) => {
                    let lane = self.lane.as_ref().expect("a lane applier");
                    let owner = lane
                        .shared
                        .claims
                        .lock()
                        .expect("lane lock")
                        .get(name)
                        .copied();
                    match owner {
                        Some(l) if l == lane.layer => {}
                        Some(l) if l < lane.layer => self.wait_below()?,
                        _ => {
                            return Err(interfere_at(
                                at,
                                "hard-links into a store path of no earlier layer",
                            ));
                        }
                    }
                }
                None => self.wait_below()?,
            }
        }
        Ok(true)
    }

    /// Claim store path `name` for this lane's layer.
    fn claim(&mut self, name: &OsStr) -> Result<()> {
        let lane = self.lane.as_mut().expect("a lane applier");
        if lane.claimed.as_deref() == Some(name) {
            return Ok(());
        }
        let owner = *lane
            .shared
            .claims
            .lock()
            .expect("lane lock")
            .entry(name.to_os_string())
            .or_insert(lane.layer);
        if owner != lane.layer {
            return Err(interfere(format!(
                "store path {} is in layers {} and {}",
                name.to_string_lossy(),
                owner.min(lane.layer),
                owner.max(lane.layer)
            )));
        }
        lane.claimed = Some(name.to_os_string());
        Ok(())
    }

    /// Wait until every layer below this lane's is fully applied.
    fn wait_below(&mut self) -> Result<()> {
        let lane = self.lane.as_mut().expect("a lane applier");
        if !lane.below_done {
            lane.shared.wait_below(lane.layer)?;
            lane.below_done = true;
        }
        Ok(())
    }

    /// The filter, with what it learned.
    pub fn into_filter(self) -> F {
        self.filter
    }

    /// Stop between entries once `flag` is set.
    pub fn set_cancel(&mut self, flag: Arc<AtomicBool>) {
        self.cancel = Some(flag);
    }

    /// Totals over all layers so far.
    pub fn stats(&self) -> &ApplyStats {
        &self.stats
    }

    /// Warnings gathered so far (skipped device nodes, ...), emptied.
    pub fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

    /// Apply one uncompressed layer tar stream. `layer` names it in errors.
    ///
    /// The stream is read to its end, past the tar end marker, so that a
    /// caller hashing it sees every byte.
    pub fn apply_layer<R: Read>(&mut self, layer: &str, reader: R) -> Result<()> {
        let mut archive = tar::Reader::new(reader);
        let mut written = Written::default();
        self.filter.start_layer();
        let skipped_before = self.stats.skipped_special;
        self.parent_cache = None;
        // The last entry read, for a stream that breaks after it.
        let mut last: Vec<u8> = Vec::new();
        let mut any = false;
        loop {
            if self
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Relaxed))
            {
                return Err(Error::Interrupted);
            }
            let mut entry = match archive.next_entry() {
                Ok(Some(entry)) => entry,
                Ok(None) => break,
                Err(fault) => {
                    let after = any.then(|| show_name(&last));
                    return Err(match archive.fault_entry() {
                        Some(name) => Error::Entry {
                            layer: layer.to_string(),
                            entry: show_name(name),
                            reason: fault.to_string(),
                        },
                        None => stream_error(layer, after.as_deref(), fault_io(fault)),
                    });
                }
            };
            last.clear();
            last.extend_from_slice(&entry.header.name);
            any = true;
            // Neither describes a file: a global header's records are for
            // the archive, a volume header names the tape.
            if matches!(entry.header.kind, Kind::GLOBAL | Kind::GNU_VOLUME) {
                continue;
            }
            self.apply_entry(layer, &mut written, entry.header, &mut entry.body)?;
        }
        let mut rest = archive.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(|e| stream_error(layer, None, e))?;
        let skipped = self.stats.skipped_special - skipped_before;
        if skipped > 0 {
            self.warnings.push(format!(
                "layer {layer}: skipped {skipped} device node(s) or FIFO(s); only root with --rootfs creates them"
            ));
        }
        Ok(())
    }

    fn apply_entry(
        &mut self,
        layer: &str,
        written: &mut Written,
        header: &Header,
        body: &mut impl Read,
    ) -> Result<()> {
        let name = &header.name[..];
        let at = At { layer, name };
        let refuse = |reason: &str| at.refuse(reason);
        let io_err = |action: &'static str| at.io(action);
        let kind = header.kind;
        // Go's reader cuts names at a NUL and refuses a PAX path holding
        // one; this stays as a guard for whatever reads names differently.
        if name.contains(&0) {
            return Err(refuse("the name holds a NUL byte"));
        }
        let rel = fsroot::normalize(name);
        self.filter.note(&rel);
        if self.filter.skip(&rel) {
            return Ok(());
        }
        if self.lane.is_some() && !self.admit(&rel, header, &at)? {
            return Ok(());
        }

        if let Some(base) = rel.file_name().map(OsStr::as_bytes)
            && base.starts_with(WHITEOUT_PREFIX)
        {
            let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
            if base == OPAQUE_MARKER {
                self.stats.whiteouts += 1;
                return self
                    .opaque(written, &parent)
                    .map_err(io_err("cannot apply opaque whiteout"));
            }
            if base.starts_with(b".wh..wh.") {
                return Ok(()); // aufs bookkeeping (.wh..wh.plnk and the like): not content
            }
            let target = &base[WHITEOUT_PREFIX.len()..];
            if target.is_empty() || target == b"." || target == b".." {
                return Err(refuse("malformed whiteout: it names no file"));
            }
            self.stats.whiteouts += 1;
            return self
                .whiteout(written, &parent, OsStr::from_bytes(target))
                .map_err(io_err("cannot apply whiteout"));
        }

        let meta = self.meta(header, &at)?;
        let Some(base) = rel.file_name().map(OsStr::to_os_string) else {
            if kind == Kind::DIR {
                self.set_dir_meta(self.root_id, meta);
                return Ok(());
            }
            return Err(refuse("the entry would replace the root directory"));
        };
        let parent_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();

        match kind {
            Kind::DIR => {
                let parent = self
                    .parent(&parent_rel)
                    .map_err(io_err("cannot create parent directory"))?;
                match fsroot::stat_at(&parent, &base).map_err(io_err("cannot inspect"))? {
                    Node::Dir => {}
                    found => {
                        if found == Node::Other {
                            self.remove(&parent, &base)
                                .map_err(io_err("cannot replace"))?;
                        }
                        rustix::fs::mkdirat(&parent, &base, Mode::from_raw_mode(0o700))
                            .map_err(|e| io_err("cannot create directory")(e.into()))?;
                        self.stats.dirs += 1;
                    }
                }
                let dir = fsroot::open_child_dir(&parent, &base)
                    .and_then(fsroot::id_of)
                    .map_err(io_err("cannot open directory"))?;
                self.set_dir_meta(dir, meta);
            }
            Kind::REGULAR | Kind::CONTIGUOUS => {
                let parent = self
                    .parent(&parent_rel)
                    .map_err(io_err("cannot create parent directory"))?;
                // Create first: the common case is a new name, one syscall.
                // Something in the way is removed (never opened), then retried.
                let create = || {
                    rustix::fs::openat(
                        &parent,
                        &base,
                        OFlags::WRONLY
                            | OFlags::CREATE
                            | OFlags::EXCL
                            | OFlags::NOFOLLOW
                            | OFlags::CLOEXEC,
                        Mode::from_raw_mode(meta.mode & 0o777),
                    )
                };
                let fd = match create() {
                    Err(rustix::io::Errno::EXIST) => {
                        self.remove(&parent, &base)
                            .map_err(io_err("cannot make room"))?;
                        create()
                    }
                    other => other,
                }
                .map_err(|e| io_err("cannot create file")(e.into()))?;
                let mut file = File::from(fd);
                let (mut copied, mut written_back) = (0u64, 0u64);
                loop {
                    let n = body
                        .read(&mut self.buf)
                        .map_err(|e| stream_error(layer, Some(&at.shown()), e))?;
                    if n == 0 {
                        break;
                    }
                    file.write_all(&self.buf[..n])
                        .map_err(io_err("cannot write"))?;
                    copied += n as u64;
                    // A large file goes to disk while the rest is unpacked,
                    // rather than all at once in the flush before publishing.
                    if copied - written_back >= WRITEBACK_EVERY {
                        fsroot::start_writeback(&file, written_back, copied - written_back);
                        written_back = copied;
                    }
                }
                if written_back > 0 && copied > written_back {
                    fsroot::start_writeback(&file, written_back, copied - written_back);
                }
                self.set_fd_meta(&file, &meta, true)
                    .map_err(io_err("cannot set owner, mode or mtime"))?;
                self.stats.files += 1;
                self.stats.bytes += copied;
            }
            Kind::SYMLINK => {
                let target = &header.linkname[..];
                if target.is_empty() {
                    return Err(refuse("a symlink with no target"));
                }
                if target.contains(&0) {
                    return Err(refuse("the symlink target holds a NUL byte"));
                }
                let parent = self
                    .parent(&parent_rel)
                    .map_err(io_err("cannot create parent directory"))?;
                let link = || rustix::fs::symlinkat(OsStr::from_bytes(target), &parent, &base);
                match link() {
                    Err(rustix::io::Errno::EXIST) => {
                        self.remove(&parent, &base)
                            .map_err(io_err("cannot make room"))?;
                        link()
                    }
                    other => other,
                }
                .map_err(|e| io_err("cannot create symlink")(e.into()))?;
                if self.opts.as_root && (meta.uid, meta.gid) != self.owner {
                    rustix::fs::chownat(
                        &parent,
                        &base,
                        Some(rustix::fs::Uid::from_raw(meta.uid)),
                        Some(rustix::fs::Gid::from_raw(meta.gid)),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(|e| io_err("cannot set symlink owner")(e.into()))?;
                }
                if let Some(t) = meta.mtime {
                    rustix::fs::utimensat(&parent, &base, &times(t), AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(|e| io_err("cannot set symlink mtime")(e.into()))?;
                }
                self.stats.symlinks += 1;
            }
            Kind::LINK => {
                let target = &header.linkname[..];
                if target.is_empty() {
                    return Err(refuse("a hard link with no target"));
                }
                if self.filter.skip(&fsroot::normalize(target)) {
                    return Err(Error::SkippedLinkTarget {
                        layer: layer.to_string(),
                        entry: at.shown(),
                    });
                }
                self.hardlink(&at, &rel, &parent_rel, &base, target)?;
            }
            Kind::CHAR | Kind::BLOCK | Kind::FIFO => {
                let parent = self
                    .clear_slot(&parent_rel, &base)
                    .map_err(io_err("cannot make room"))?;
                if !self.opts.special_files {
                    self.stats.skipped_special += 1;
                } else {
                    let file_type = match kind {
                        Kind::CHAR => FileType::CharacterDevice,
                        Kind::BLOCK => FileType::BlockDevice,
                        _ => FileType::Fifo,
                    };
                    // Truncated to 32 bits, as docker does.
                    let major = header.devmajor as u32;
                    let minor = header.devminor as u32;
                    let dev = rustix::fs::makedev(major, minor);
                    rustix::fs::mknodat(&parent, &base, file_type, Mode::from_raw_mode(0o600), dev)
                        .map_err(|e| io_err("cannot create device node or FIFO")(e.into()))?;
                    rustix::fs::chownat(
                        &parent,
                        &base,
                        Some(rustix::fs::Uid::from_raw(meta.uid)),
                        Some(rustix::fs::Gid::from_raw(meta.gid)),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(|e| io_err("cannot set owner")(e.into()))?;
                    // We created this node a moment ago in a private root: no link can be here.
                    rustix::fs::chmodat(
                        &parent,
                        &base,
                        Mode::from_raw_mode(meta.mode),
                        AtFlags::empty(),
                    )
                    .map_err(|e| io_err("cannot set mode")(e.into()))?;
                    if let Some(t) = meta.mtime {
                        rustix::fs::utimensat(&parent, &base, &times(t), AtFlags::SYMLINK_NOFOLLOW)
                            .map_err(|e| io_err("cannot set mtime")(e.into()))?;
                    }
                }
            }
            Kind(other) => {
                return Err(refuse(&format!(
                    "unsupported tar entry type {:?}",
                    other as char
                )));
            }
        }
        // Lanes apply no whiteouts, so they need no record of what was written.
        if self.lane.is_none() {
            let parent = self
                .parent(&parent_rel)
                .map_err(io_err("cannot open parent directory"))?;
            written
                .mark(self.root_id, &parent, &base)
                .map_err(io_err("cannot record what the layer wrote"))?;
        }
        Ok(())
    }

    /// Owner, mode and mtime for an entry, from its header.
    fn meta(&self, header: &Header, at: &At<'_>) -> Result<Meta> {
        // Go keeps owners as 64-bit signed numbers; a file's are 32-bit, and
        // u32::MAX is "no change" to chown.
        let id = |v: i64, what: &str| -> Result<u32> {
            match u32::try_from(v) {
                Ok(v) if v != u32::MAX => Ok(v),
                _ => Err(at.refuse(format!("{what} {v} is out of range"))),
            }
        };
        let uid = id(header.uid, "uid")?;
        let gid = id(header.gid, "gid")?;
        let mut mode = (header.mode & 0o7777) as u32;
        if !self.opts.as_root {
            mode &= !0o6000;
        }
        Ok(Meta {
            mode,
            uid,
            gid,
            mtime: Some(Timespec {
                tv_sec: header.mtime.secs,
                tv_nsec: header.mtime.nanos.into(),
            }),
        })
    }

    /// Owner, mode and mtime on an open node. `created` says the node was
    /// just made with `meta.mode & 0o777` in a directory without setgid (all
    /// of the staging root is, until [`Applier::finish`]): its owner is then
    /// this process's, and its mode whatever the umask left, so only what
    /// differs costs a syscall.
    fn set_fd_meta(&self, fd: &impl AsFd, meta: &Meta, created: bool) -> io::Result<()> {
        let chown = self.opts.as_root && !(created && (meta.uid, meta.gid) == self.owner);
        if chown {
            rustix::fs::fchown(
                fd,
                Some(rustix::fs::Uid::from_raw(meta.uid)),
                Some(rustix::fs::Gid::from_raw(meta.gid)),
            )?;
        }
        // After chown, which clears setuid/setgid.
        let as_created = self.umask.map(|m| meta.mode & 0o777 & !m);
        if chown || !created || as_created != Some(meta.mode) {
            rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode))?;
        }
        if let Some(t) = meta.mtime {
            rustix::fs::futimens(fd, &times(t))?;
        }
        Ok(())
    }

    /// The parent directory `rel`, created if missing, from the one-entry cache when possible.
    fn parent(&mut self, rel: &Path) -> io::Result<Arc<Parent>> {
        if let Some((cached, parent)) = &self.parent_cache
            && cached == rel
        {
            return Ok(Arc::clone(parent));
        }
        // Parents the layer never named get what containerd gives them: 0755, root-owned.
        let implicit = Meta {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: None,
        };
        let mut made = Vec::new();
        let mut failed = None;
        let fd = self
            .root
            .mkdir_all(rel, &mut |_, dir| match fsroot::id_of(dir) {
                Ok(id) => made.push(id),
                Err(e) => failed = Some(e),
            });
        // A new directory may reuse a removed one's inode: overwrite.
        for id in made {
            self.set_dir_meta(id, implicit);
        }
        let fd = fd?;
        if let Some(e) = failed {
            return Err(e);
        }
        let parent = Arc::new(Parent {
            id: fsroot::id_of(&fd)?,
            fd,
        });
        self.parent_cache = Some((rel.to_path_buf(), Arc::clone(&parent)));
        Ok(parent)
    }

    /// Make sure nothing is at `parent_rel/base`, returning the parent.
    fn clear_slot(&mut self, parent_rel: &Path, base: &OsStr) -> io::Result<Arc<Parent>> {
        let parent = self.parent(parent_rel)?;
        if fsroot::stat_at(&parent, base)? != Node::Missing {
            self.remove(&parent, base)?;
        }
        Ok(parent)
    }

    /// Remove `base` in `parent` (whole tree). The metadata of directories
    /// removed stays behind, harmlessly: it is keyed by identity, and a new
    /// directory that reuses an inode overwrites it.
    fn remove(&mut self, parent: &impl AsFd, base: &OsStr) -> io::Result<()> {
        self.parent_cache = None;
        fsroot::remove_all_at(parent, base)
    }

    fn hardlink(
        &mut self,
        at: &At<'_>,
        rel: &Path,
        parent_rel: &Path,
        base: &OsStr,
        target: &[u8],
    ) -> Result<()> {
        let target_rel = fsroot::normalize(target);
        let shown = show_name(target);
        let Some(target_base) = target_rel.file_name().map(OsStr::to_os_string) else {
            return Err(at.refuse("a hard link to the root directory"));
        };
        let missing = || {
            at.refuse(format!(
                "hard link target {shown:?} does not exist in this or a lower layer"
            ))
        };
        if target_rel == rel {
            let dir = self.root.open_dir(parent_rel);
            return match dir.and_then(|d| fsroot::stat_at(&d, base)) {
                Ok(Node::Other) => Ok(()),
                _ => Err(at.refuse("a hard link to itself")),
            };
        }
        let parent = self
            .parent(parent_rel)
            .map_err(at.io("cannot create parent directory"))?;
        let target_parent_rel = target_rel.parent().unwrap_or(Path::new(""));
        let target_parent = match self.root.open_dir(target_parent_rel) {
            Ok(dir) => dir,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                return Err(missing());
            }
            Err(e) => return Err(at.io("cannot reach the hard link target")(e)),
        };
        match fsroot::stat_at(&target_parent, &target_base)
            .map_err(at.io("cannot inspect the hard link target"))?
        {
            Node::Other => {}
            Node::Missing => return Err(missing()),
            Node::Dir => {
                return Err(at.refuse(format!("hard link target {shown:?} is a directory")));
            }
        }
        if fsroot::stat_at(&parent, base).map_err(at.io("cannot inspect"))? != Node::Missing {
            self.remove(&parent, base)
                .map_err(at.io("cannot replace"))?;
        }
        rustix::fs::linkat(
            &target_parent,
            &target_base,
            &parent,
            base,
            AtFlags::empty(),
        )
        .map_err(|e| at.io("cannot link to the hard link target")(e.into()))?;
        self.stats.hardlinks += 1;
        Ok(())
    }

    /// `.wh.NAME` in `parent_rel`: remove what lower layers put at NAME.
    fn whiteout(&mut self, written: &Written, parent_rel: &Path, name: &OsStr) -> io::Result<()> {
        let parent = match self.root.open_dir(parent_rel) {
            Ok(fd) => fd,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let parent_id = fsroot::id_of(&parent)?;
        match fsroot::stat_at(&parent, name)? {
            Node::Missing => Ok(()),
            Node::Dir => {
                let dir = fsroot::open_child_dir(&parent, name)?;
                let id = fsroot::id_of(&dir)?;
                if written.touched(parent_id, name, Some(id)) {
                    self.prune(written, &dir)
                } else {
                    self.remove(&parent, name)
                }
            }
            Node::Other if written.wrote(parent_id, name) => Ok(()),
            Node::Other => self.remove(&parent, name),
        }
    }

    /// `DIR/.wh..wh..opq`: DIR keeps only what this layer put in it.
    fn opaque(&mut self, written: &Written, dir_rel: &Path) -> io::Result<()> {
        let path_fd = self.parent(dir_rel)?;
        let dir = rustix::fs::openat(
            &path_fd,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        self.prune(written, &dir)
    }

    /// Remove everything below `dir` that the current layer did not write.
    fn prune(&mut self, written: &Written, dir: &OwnedFd) -> io::Result<()> {
        self.parent_cache = None;
        fsroot::make_writable(dir)?;
        fsroot::walk(
            dir,
            &mut |parent, name, node, id| {
                let dir = (node == Node::Dir).then_some(id);
                Ok(if written.touched(parent, name, dir) {
                    Step::Descend
                } else {
                    Step::Remove
                })
            },
            &mut |_| Ok(()),
        )
    }

    /// Set the deferred directory owners, modes and times, deepest first.
    /// Call once, after the last layer.
    pub fn finish(&mut self) -> Result<()> {
        self.parent_cache = None;
        let dirs = std::mem::take(&mut self.dirs);
        let root = rustix::fs::openat(
            self.root.fd(),
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io(self.root.path(), "cannot open the unpack root", e.into()))?;
        let mut set = |fd: &OwnedFd| -> io::Result<()> {
            match dirs.get(&fsroot::id_of(fd)?) {
                Some(meta) => self.set_fd_meta(fd, meta, false),
                None => Ok(()),
            }
        };
        fsroot::walk(
            &root,
            &mut |_, _, node, _| {
                Ok(if node == Node::Dir {
                    Step::Descend
                } else {
                    Step::Keep
                })
            },
            &mut set,
        )
        .and_then(|()| set(&root))
        .map_err(|e| {
            Error::io(
                self.root.path(),
                "cannot set directory owners, modes and times",
                e,
            )
        })
    }
}

fn times(t: Timespec) -> Timestamps {
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// The longest entry name or link target quoted whole in an error.
const SHOWN_NAME_MAX: usize = 200;

/// An entry name or link target for an error message: a name may be up to
/// 1 MiB long, and an error is one readable line, so a long one is cut.
fn show_name(name: &[u8]) -> String {
    if name.len() <= SHOWN_NAME_MAX {
        return String::from_utf8_lossy(name).into_owned();
    }
    format!(
        "{}... ({} bytes)",
        String::from_utf8_lossy(&name[..SHOWN_NAME_MAX]),
        name.len()
    )
}

/// The stream broke: not tar, truncated, or a decoder error underneath.
fn stream_error(layer: &str, after: Option<&str>, e: io::Error) -> Error {
    Error::Layer {
        layer: layer.to_string(),
        reason: match after {
            Some(entry) => format!("the layer is not a valid tar stream after entry {entry:?}"),
            None => "the layer is not a valid tar stream".to_string(),
        },
        source: Some(e),
    }
}

/// A broken stream's fault as the I/O error `Error::Layer` carries.
fn fault_io(fault: Fault) -> io::Error {
    match fault {
        Fault::Io(e) => e,
        Fault::Truncated => io::Error::new(io::ErrorKind::UnexpectedEof, fault),
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}
