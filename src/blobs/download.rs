//! Downloading an image's blobs while the unpack pipeline consumes them.
//!
//! Blobs are fetched `--jobs` at a time, in manifest order, into the
//! verified store (the cache, or a private one); each is posted to a board as
//! it lands, where the decoder thread waits for the layer it needs next. A
//! failed download is posted too, so the pipeline stops on the real error.
//!
//! This room owns the store's side of a download: waiting while another
//! process holds a blob's claim, resuming what an earlier run left, and
//! keeping configs in the cache; the registry client only moves bytes into
//! a [`BlobSink`].

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::task::AbortOnDropHandle;

use crate::blobs::store::{BlobStore, BlobWriter, Claim, Growing};
use crate::error::{Error, RegistryFailure, Result};
use crate::oci::digest::Digest;
use crate::oci::manifest::Descriptor;
use crate::oci::resolve::ResolvedImage;
use crate::registry::client::{BlobSink, Registry, SERVED_OTHER_BYTES};
use crate::ui::cancel::Cancel;
use crate::ui::progress::Reporter;
use crate::unpack::apply::{Applier, ApplyStats, EntryFilter};
use crate::unpack::pipeline::{self, LayerInput};

/// Download the image's layers into `store` and unpack them onto `rootfs`,
/// both at once. Returns what was applied and how many bytes came over the wire.
///
/// With `follow`, a layer is decompressed while its blob is still coming in
/// (see [`Following`]). Those bytes are verified only when the blob is
/// whole, so when the unpack fails on a layer it followed, the verdict waits
/// for that blob: a download that failed is the error to report, and a blob
/// that verified only after its source was replaced is
/// [`Error::SourceReplaced`], for the caller to unpack again without
/// following.
#[allow(clippy::too_many_arguments)]
pub async fn unpack_from_registry<F: EntryFilter + Send + 'static>(
    registry: Arc<Registry>,
    resolved: &ResolvedImage,
    store: &BlobStore,
    mut applier: Applier<F>,
    skip_layers: &[bool],
    jobs: usize,
    follow: bool,
    reporter: &Arc<dyn Reporter>,
    cancel: &Cancel,
) -> Result<(ApplyStats, F, u64)> {
    // A failed attempt stops its own decoder, not the run: the caller may retry.
    let run = cancel;
    let (cancel, _link) = cancel.attempt();
    let board = Arc::new(BlobBoard::default());
    let layers = layer_inputs(resolved, skip_layers, |desc| {
        let board = Arc::clone(&board);
        let flag = cancel.flag();
        let digest = desc.digest;
        Box::new(move || match board.wait(&digest, follow, &flag)? {
            Landed::Ready(path) => {
                let file = File::open(&path)
                    .map_err(|e| Error::io(&path, "cannot open downloaded blob", e))?;
                Ok(Box::new(file) as Box<dyn Read + Send>)
            }
            Landed::Growing(growing) => {
                let read_epoch = board.followed(digest, &growing);
                Ok(Box::new(Following {
                    growing,
                    board,
                    digest,
                    cancel: flag,
                    read_epoch,
                    file: None,
                    pos: 0,
                    complete: false,
                }) as Box<dyn Read + Send>)
            }
        })
    });
    let mut seen = HashSet::new();
    let blobs: Vec<Descriptor> = layers
        .iter()
        .map(|l| &l.descriptor)
        .filter(|d| seen.insert(d.digest))
        .cloned()
        .collect();
    reporter.layer_total(layers.len() as u64);
    reporter.download_total(blobs.iter().filter(|d| !store.has(d)).map(|d| d.size).sum());

    applier.set_cancel(cancel.flag());
    let flag = cancel.flag();
    let unpack_reporter = Arc::clone(reporter);
    let mut unpack_task = tokio::task::spawn_blocking(move || {
        let result = pipeline::unpack(&mut applier, layers, &flag, &*unpack_reporter)
            .and_then(|()| applier.finish());
        ((applier.stats().clone(), applier.into_filter()), result)
    });
    let mut downloads = AbortOnDropHandle::new(tokio::spawn(download_all(
        registry,
        store.clone(),
        blobs,
        jobs.max(1),
        Arc::clone(&board),
        Arc::clone(reporter),
        cancel.clone(),
    )));

    let (stats, unpacked, downloaded) = tokio::select! {
        joined = &mut unpack_task => {
            let (stats, result) = joined.expect("unpack thread panicked");
            let downloaded = if result.is_ok() {
                (&mut downloads).await.expect("download task panicked")
            } else {
                board.settle_followed(&downloads, run).await;
                Err(())
            };
            (stats, result, downloaded)
        }
        downloaded = &mut downloads => {
            let downloaded = downloaded.expect("download task panicked");
            if downloaded.is_err() {
                cancel.flag().store(true, Ordering::SeqCst);
            }
            let (stats, result) = unpack_task.await.expect("unpack thread panicked");
            (stats, result, downloaded)
        }
    };
    if let Some(e) = board.take_error() {
        return Err(e);
    }
    if unpacked.is_err()
        && let Some(digest) = board.replaced()
    {
        return Err(Error::SourceReplaced { digest });
    }
    unpacked?;
    let downloaded = downloaded.map_err(|()| Error::Interrupted)?;
    let (stats, log) = stats;
    Ok((stats, log, downloaded))
}

/// One [`LayerInput`] per manifest layer not skipped, opened by `open`.
pub fn layer_inputs(
    resolved: &ResolvedImage,
    skip: &[bool],
    mut open: impl FnMut(&Descriptor) -> Box<dyn FnOnce() -> Result<Box<dyn Read + Send>> + Send>,
) -> Vec<LayerInput> {
    resolved
        .manifest
        .layers
        .iter()
        .enumerate()
        .filter(|(index, _)| !skip.get(*index).copied().unwrap_or(false))
        .map(|(index, desc)| LayerInput {
            index,
            descriptor: desc.clone(),
            diff_id: resolved.config.rootfs.diff_ids[index],
            compression: resolved.compression[index],
            open: open(desc),
            verify_blob: false,
        })
        .collect()
}

/// Download `blobs` into `store` (or find them verified there), `jobs` at a
/// time. Returns where each blob is and how many bytes came over the wire.
pub async fn download_blobs(
    registry: Arc<Registry>,
    store: &BlobStore,
    blobs: Vec<Descriptor>,
    jobs: usize,
    reporter: &Arc<dyn Reporter>,
    cancel: &Cancel,
) -> Result<(HashMap<Digest, PathBuf>, u64)> {
    let board = Arc::new(BlobBoard::default());
    reporter.download_total(blobs.iter().filter(|d| !store.has(d)).map(|d| d.size).sum());
    let downloaded = download_all(
        registry,
        store.clone(),
        blobs,
        jobs.max(1),
        Arc::clone(&board),
        Arc::clone(reporter),
        cancel.clone(),
    )
    .await;
    if let Some(e) = board.take_error() {
        return Err(e);
    }
    let downloaded = downloaded.map_err(|()| Error::Interrupted)?;
    let paths = board
        .slots
        .lock()
        .expect("board lock")
        .iter()
        .filter_map(|(d, s)| match s {
            Slot::Ready(p) => Some((*d, p.clone())),
            Slot::Failed(_) | Slot::Writing(_) => None,
        })
        .collect();
    Ok((paths, downloaded))
}

/// Download every blob (or find it verified in the store), `jobs` at a time,
/// in manifest order, posting each to `board` as it lands. `Err(())` means a
/// download failed (its error is on the board) or the run was cancelled.
async fn download_all(
    registry: Arc<Registry>,
    store: BlobStore,
    blobs: Vec<Descriptor>,
    jobs: usize,
    board: Arc<BlobBoard>,
    reporter: Arc<dyn Reporter>,
    cancel: Cancel,
) -> std::result::Result<u64, ()> {
    let mut results = futures_util::stream::iter(blobs)
        .map(|desc| {
            let registry = Arc::clone(&registry);
            let store = store.clone();
            let reporter = Arc::clone(&reporter);
            let board = Arc::clone(&board);
            async move {
                let growing = Arc::new(Growing::default());
                board.writing(desc.digest, Arc::clone(&growing));
                let result = fetch_blob(&registry, &store, &desc, &*reporter, growing).await;
                (desc.digest, result)
            }
        })
        .buffer_unordered(jobs);
    let mut total = 0;
    loop {
        let next = tokio::select! {
            next = results.next() => next,
            () = cancel.cancelled() => return Err(()),
        };
        let Some((digest, result)) = next else { break };
        match result {
            Ok((path, bytes)) => {
                total += bytes;
                board.post(digest, Ok(path));
            }
            Err(e) => {
                board.post(digest, Err(e));
                return Err(());
            }
        }
    }
    Ok(total)
}

async fn fetch_blob(
    registry: &Registry,
    store: &BlobStore,
    desc: &Descriptor,
    reporter: &dyn Reporter,
    growing: Arc<Growing>,
) -> Result<(PathBuf, u64)> {
    if store.has(desc) {
        let (s, d) = (store.clone(), desc.clone());
        let intact = tokio::task::spawn_blocking(move || s.verify(&d))
            .await
            .expect("verify thread panicked")?;
        if intact {
            return Ok((store.path(&desc.digest), 0));
        }
        reporter.warn(&format!(
            "cached blob {} was corrupt; downloading it again",
            desc.digest
        ));
    }
    download_blob(registry, store, desc, reporter, Some(growing)).await
}

/// Download a blob into `store`, verified. An unfinished download left in
/// the store (by this run or an earlier one) is resumed; a blob another
/// process is downloading into the same store is waited for. Returns the
/// stored path and the bytes received.
///
/// With `growing`, a reader can follow the bytes as they arrive (the
/// unpack pipeline starts on a large layer before it is all here); it
/// learns that the blob verified when this returns.
pub async fn download_blob(
    registry: &Registry,
    store: &BlobStore,
    desc: &Descriptor,
    reporter: &dyn Reporter,
    growing: Option<Arc<Growing>>,
) -> Result<(PathBuf, u64)> {
    let path = store.path(&desc.digest);
    let Some(mut writer) = claim(store, desc, reporter).await? else {
        return Ok((path, 0));
    };
    if let Some(g) = growing {
        writer.watch(g);
    }
    if writer.resumed() > 0 {
        reporter.info(&format!(
            "blob {}: resuming at byte {} of {}, where an earlier run stopped",
            desc.digest,
            writer.resumed(),
            desc.size
        ));
        reporter.downloaded(writer.resumed());
    }
    let mut sink = StoreSink {
        writer: &mut writer,
        reporter,
    };
    let received = registry.download_blob(desc, &mut sink).await?;
    Ok((path, received))
}

/// The right to write `desc` into `store`, waiting while another process
/// writes it. `None`: the blob is already there, verified.
async fn claim(
    store: &BlobStore,
    desc: &Descriptor,
    reporter: &dyn Reporter,
) -> Result<Option<BlobWriter>> {
    let mut told = false;
    loop {
        let (s, d) = (store.clone(), desc.clone());
        let claim = tokio::task::spawn_blocking(move || -> Result<Option<Claim>> {
            if s.has(&d) && s.verify(&d)? {
                return Ok(None);
            }
            let claim = s.try_claim(&d)?;
            // Committed by another process between the check and the claim.
            if matches!(claim, Claim::Writer(_)) && s.has(&d) && s.verify(&d)? {
                return Ok(None);
            }
            Ok(Some(claim))
        })
        .await
        .expect("blob claim thread panicked")?;
        match claim {
            None => return Ok(None),
            Some(Claim::Writer(w)) => return Ok(Some(*w)),
            Some(Claim::Busy) => {
                if !told {
                    told = true;
                    reporter.info(&format!(
                        "blob {}: another hydrafy run is downloading it into the cache; waiting for it",
                        desc.digest
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A download into the store: progress is counted as bytes are written,
/// and the blob is verified and committed when its body is complete.
struct StoreSink<'a> {
    writer: &'a mut BlobWriter,
    reporter: &'a dyn Reporter,
}

impl BlobSink for StoreSink<'_> {
    fn held(&self) -> u64 {
        self.writer.len()
    }

    fn write(&mut self, chunk: &[u8]) -> Result<()> {
        self.writer.write(chunk)?;
        self.reporter.downloaded(chunk.len() as u64);
        Ok(())
    }

    fn restart(&mut self) -> Result<()> {
        self.writer.restart()
    }

    fn finish(&mut self) -> Result<()> {
        self.writer.commit().map(drop)
    }
}

/// An image config (a small blob read into memory), verified; from `cache`
/// when it holds it, and kept there after a download, so that a re-fetch
/// costs no blob request at all.
pub async fn config_blob(
    registry: &Registry,
    cache: Option<&BlobStore>,
    desc: &Descriptor,
    max: u64,
) -> Result<Vec<u8>> {
    if let Some(store) = cache
        && store.has(desc)
        && let Ok(bytes) = std::fs::read(store.path(&desc.digest))
        && desc.check("blob", &bytes, SERVED_OTHER_BYTES).is_ok()
    {
        return Ok(bytes);
    }
    let bytes = registry.blob_bytes(desc, max).await?;
    if let Some(store) = cache {
        let (s, d, b) = (store.clone(), desc.clone(), bytes.clone());
        // A cache that cannot be written is no reason to fail the pull.
        let _ = tokio::task::spawn_blocking(move || s.put(&d, &b)).await;
    }
    Ok(bytes)
}

/// Where the decoder thread waits for downloads to land.
#[derive(Default)]
struct BlobBoard {
    slots: Mutex<HashMap<Digest, Slot>>,
    landed: Condvar,
    /// Blobs a reader followed while they were written, with the writer's
    /// epoch its bytes came from (`NOT_READ` before the first byte).
    followed: Mutex<Vec<Followed>>,
}

/// A blob a reader followed while it was written.
struct Followed {
    digest: Digest,
    growing: Arc<Growing>,
    /// The writer's epoch the reader's bytes came from, or `NOT_READ`.
    read_epoch: Arc<AtomicU64>,
}

/// A follower that has not read a byte yet.
const NOT_READ: u64 = u64::MAX;

enum Slot {
    /// Being downloaded: a reader may follow it.
    Writing(Arc<Growing>),
    /// Downloaded and verified (or found verified in the store).
    Ready(PathBuf),
    Failed(Option<Error>),
}

/// What a reader of a blob gets from the board.
enum Landed {
    Ready(PathBuf),
    Growing(Arc<Growing>),
}

impl BlobBoard {
    fn writing(&self, digest: Digest, growing: Arc<Growing>) {
        self.slots
            .lock()
            .expect("board lock")
            .insert(digest, Slot::Writing(growing));
        self.landed.notify_all();
    }

    fn post(&self, digest: Digest, result: Result<PathBuf>) {
        let slot = match result {
            Ok(path) => Slot::Ready(path),
            Err(e) => Slot::Failed(Some(e)),
        };
        self.slots.lock().expect("board lock").insert(digest, slot);
        self.landed.notify_all();
    }

    /// Wait until the blob is there, or (with `follow`) being written.
    fn wait(&self, digest: &Digest, follow: bool, cancel: &AtomicBool) -> Result<Landed> {
        let mut slots = self.slots.lock().expect("board lock");
        loop {
            match slots.get(digest) {
                Some(Slot::Ready(path)) => return Ok(Landed::Ready(path.clone())),
                Some(Slot::Writing(g)) if follow => return Ok(Landed::Growing(Arc::clone(g))),
                Some(Slot::Failed(_)) => return Err(download_failed(digest)),
                Some(Slot::Writing(_)) | None if cancel.load(Ordering::Relaxed) => {
                    return Err(Error::Interrupted);
                }
                Some(Slot::Writing(_)) | None => {}
            }
            slots = self
                .landed
                .wait_timeout(slots, Duration::from_millis(100))
                .expect("board lock")
                .0;
        }
    }

    /// Where the blob landed (`Some(Ok)`), that it failed (`Some(Err)`), or
    /// that it is still coming (`None`, after waiting up to `patience`).
    fn landed(
        &self,
        digest: &Digest,
        patience: Duration,
    ) -> Option<std::result::Result<PathBuf, ()>> {
        let state = |slots: &HashMap<Digest, Slot>| match slots.get(digest) {
            Some(Slot::Ready(path)) => Some(Ok(path.clone())),
            Some(Slot::Failed(_)) => Some(Err(())),
            _ => None,
        };
        let slots = self.slots.lock().expect("board lock");
        if let Some(s) = state(&slots) {
            return Some(s);
        }
        let slots = self
            .landed
            .wait_timeout(slots, patience)
            .expect("board lock")
            .0;
        state(&slots)
    }

    /// Note that a reader follows `digest` as it is written; the reader
    /// records in the returned cell the epoch its bytes come from.
    fn followed(&self, digest: Digest, growing: &Arc<Growing>) -> Arc<AtomicU64> {
        let read_epoch = Arc::new(AtomicU64::new(NOT_READ));
        self.followed.lock().expect("board lock").push(Followed {
            digest,
            growing: Arc::clone(growing),
            read_epoch: Arc::clone(&read_epoch),
        });
        read_epoch
    }

    /// Wait until every blob a reader took bytes of before it was verified
    /// has landed or failed (or the downloads stopped, or `run` was
    /// cancelled), so that [`BlobBoard::take_error`] and
    /// [`BlobBoard::replaced`] can judge what the reader was given.
    async fn settle_followed<T>(&self, downloads: &AbortOnDropHandle<T>, run: &Cancel) {
        let pending = || {
            let followed = self.followed.lock().expect("board lock");
            let slots = self.slots.lock().expect("board lock");
            followed.iter().any(|f| {
                f.read_epoch.load(Ordering::SeqCst) != NOT_READ
                    && matches!(slots.get(&f.digest), Some(Slot::Writing(_)))
            })
        };
        while pending() && !downloads.is_finished() && !run.is_cancelled() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A blob that landed verified although a reader took bytes of it from
    /// a source whose bytes were then thrown away.
    fn replaced(&self) -> Option<Digest> {
        let followed = self.followed.lock().expect("board lock");
        let slots = self.slots.lock().expect("board lock");
        followed.iter().find_map(|f| {
            let read = f.read_epoch.load(Ordering::SeqCst);
            let landed = matches!(slots.get(&f.digest), Some(Slot::Ready(_)));
            (landed && read != NOT_READ && read != f.growing.epoch()).then_some(f.digest)
        })
    }

    /// The first download error, if any (given out once).
    fn take_error(&self) -> Option<Error> {
        let mut slots = self.slots.lock().expect("board lock");
        slots.values_mut().find_map(|s| match s {
            Slot::Failed(e) => e.take(),
            Slot::Ready(_) | Slot::Writing(_) => None,
        })
    }
}

fn download_failed(digest: &Digest) -> Error {
    Error::registry(
        format!("blob {digest}"),
        RegistryFailure::Unavailable,
        "the download failed",
    )
}

/// Reads a blob while it is downloaded, so that decompressing a large layer
/// overlaps with fetching it. It never gets ahead of the bytes written, and
/// it reports the end of the blob only once the download has verified it
/// and given it its name; a failed download is an error here. If the writer
/// starts over after this reader took bytes (the source's bytes did not
/// verify, or a server ignored a range request), those bytes may not be the
/// blob's: the reader fails, and [`BlobBoard::replaced`] tells the caller
/// why once the blob has landed.
struct Following {
    growing: Arc<Growing>,
    board: Arc<BlobBoard>,
    digest: Digest,
    cancel: Arc<AtomicBool>,
    /// The writer's epoch the bytes read so far came from.
    read_epoch: Arc<AtomicU64>,
    file: Option<File>,
    pos: u64,
    /// The blob verified: read the file to its end.
    complete: bool,
}

impl Read for Following {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(std::io::Error::other("interrupted"));
            }
            if self.file.is_none()
                && let Some(path) = self.growing.path()
            {
                match File::open(path) {
                    Ok(file) => self.file = Some(file),
                    // Renamed to its final name a moment ago: the board says where.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            // The epoch moves before the writer rewrites a byte, so the same
            // epoch before and after a read means the bytes are of that epoch.
            let epoch = self.growing.epoch();
            let read_epoch = self.read_epoch.load(Ordering::SeqCst);
            if read_epoch != NOT_READ && read_epoch != epoch {
                return Err(std::io::Error::other(format!(
                    "blob {}: the download started over after part of it was read",
                    self.digest
                )));
            }
            let written = self.growing.len();
            if let Some(file) = &self.file
                && (self.complete || self.pos < written)
            {
                let want = if self.complete {
                    buf.len()
                } else {
                    buf.len().min((written - self.pos) as usize)
                };
                let n = file.read_at(&mut buf[..want], self.pos)?;
                if self.growing.epoch() != epoch {
                    continue;
                }
                if n > 0 && read_epoch == NOT_READ {
                    self.read_epoch.store(epoch, Ordering::SeqCst);
                }
                self.pos += n as u64;
                if n > 0 || self.complete {
                    return Ok(n);
                }
            }
            match self.board.landed(&self.digest, Duration::from_millis(5)) {
                Some(Ok(path)) => {
                    // A file already open is the partial, renamed to this
                    // name since: the same file. Else the blob was found
                    // whole (in the cache, or written by another run).
                    if self.file.is_none() {
                        self.file = Some(File::open(path)?);
                    }
                    self.complete = true;
                }
                Some(Err(())) => {
                    return Err(std::io::Error::other(
                        download_failed(&self.digest).to_string(),
                    ));
                }
                None => {}
            }
        }
    }
}
