//! The unpack pipeline: decompress on one thread, apply on another, hash on
//! a third.
//!
//! Layers must be applied strictly in order, but decompressing a layer does
//! not depend on the tree, so a decoder thread runs ahead of the applier:
//! while layer N's files are written, layer N's rest and layer N+1 are
//! inflated on another core. The two meet in a bounded channel of recycled
//! 256 KiB buffers, so memory stays flat whatever the layer size. Each buffer
//! the applier has read goes on to a hasher thread (the diff_id), which
//! hands it back to the decoder: inflating alone is then the decoder's work,
//! which matters for a layer of a few large files, where it is the slowest
//! stage. The applier reads every stream to its end (the tar parser stops at
//! the end marker, the diff_id hash must not); the decoder ends each layer
//! with a verdict (the blob's size and digest), and the applier checks it and
//! the hasher's digest before it starts the next.
//!
//! Applying is the slower half (creating files and copying their bytes into
//! the page cache), so with more than one lane ([`Applier::set_lanes`]) the
//! layers are dealt out round-robin to lanes, each a decoder and an applier
//! of its own, that run at once where layers cannot interact: Nix layered
//! images put whole store paths in each layer. What a lane may do without
//! waiting, and when it waits for earlier layers or gives up, is in
//! `Applier::admit`; a lane that gives up (or fails in any way) stops them
//! all with [`Error::LanesInterfered`], and the caller resets the root and
//! applies everything again in one lane, which is the reference. Stats,
//! warnings, progress and the filter's notes are taken in layer order.

use std::collections::BTreeMap;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::{Scope, ScopedJoinHandle};

use crate::error::{Error, Result};
use crate::oci::digest::{Digest, Hasher};
use crate::oci::manifest::{Compression, Descriptor};
use crate::ui::progress::Reporter;
use crate::unpack::apply::{Applier, ApplyStats, EntryFilter, LaneShared};
use crate::unpack::decompress;

const CHUNK: usize = 256 << 10;
/// Chunks in flight between decoder and applier (4 MiB).
const DEPTH: usize = 16;

/// A compressed layer blob to unpack.
pub struct LayerInput {
    /// Position in the manifest (for messages about `rootfs.diff_ids`).
    pub index: usize,
    pub descriptor: Descriptor,
    pub diff_id: Digest,
    pub compression: Compression,
    /// Opens the blob; may block until a download has finished.
    pub open: Box<dyn FnOnce() -> Result<Box<dyn Read + Send>> + Send>,
    /// Hash the compressed bytes against the descriptor (for blobs that were
    /// not verified on their way in, such as those in an OCI layout).
    pub verify_blob: bool,
}

enum Msg {
    Data(Vec<u8>),
    /// The layer's stream ended: the decoder's verdict, and if it found
    /// nothing wrong, the diff_id the bytes must hash to.
    End(Result<DiffId>),
}

/// The diff_id a layer's uncompressed bytes must hash to.
struct DiffId {
    expected: Digest,
    layer: Digest,
    index: usize,
}

/// What an applier passes on to its hasher: each chunk once applied, and at
/// the end of a layer a request for the digest of all of them.
enum ToHash {
    Data(Vec<u8>),
    Finish(SyncSender<Digest>),
}

/// Applied chunks queued for the hasher (1 MiB); it keeps up with inflating.
const HASH_DEPTH: usize = 4;

/// The most lanes worth running: each is three threads and 5 MiB of buffers.
const MAX_LANES: usize = 4;

/// How many lanes to apply layers in on this machine.
pub fn default_lanes() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_LANES)
}

/// The lanes for a run: [`default_lanes`] for a Nix seed, whose layers hold
/// whole store paths and so run side by side; one for `--rootfs`, where an
/// image's whiteouts would stop the lanes and make every layer be applied
/// twice.
pub fn lanes_for(rootfs: bool) -> usize {
    if rootfs { 1 } else { default_lanes() }
}

/// Unpack `layers` onto the applier's root, with the result of applying
/// them in order. With more than one lane, [`Error::LanesInterfered`] says
/// to reset the root and unpack again in one lane.
pub fn unpack<F: EntryFilter + Send>(
    applier: &mut Applier<F>,
    layers: Vec<LayerInput>,
    cancel: &Arc<AtomicBool>,
    reporter: &dyn Reporter,
) -> Result<()> {
    let lanes = applier.lanes().min(layers.len());
    if lanes > 1 {
        return unpack_lanes(applier, layers, lanes, cancel, reporter);
    }
    let labels: Vec<String> = layers
        .iter()
        .map(|l| l.descriptor.digest.to_string())
        .collect();
    let (tx, rx) = sync_channel::<Msg>(DEPTH);
    let (free_tx, free_rx) = channel::<Vec<u8>>();
    let (hash_tx, hash_rx) = sync_channel::<ToHash>(HASH_DEPTH);
    std::thread::scope(|scope| {
        let decoder_cancel = Arc::clone(cancel);
        named(scope, "decode".into(), move || {
            decode_all(layers, tx, free_rx, &decoder_cancel)
        });
        named(scope, "hash".into(), move || hash_all(hash_rx, free_tx));
        let result = apply_all(applier, &labels, rx, hash_tx, reporter);
        if result.is_err() {
            // Stop the decoder: it may be waiting for a download that no longer matters.
            cancel.store(true, Ordering::Relaxed);
        }
        result
    })
}

/// Start a thread in `scope` under `name`, which `top -H`, perf and panic
/// messages show. Like `Scope::spawn`, it panics if no thread can be made.
fn named<'scope, T: Send + 'scope>(
    scope: &'scope Scope<'scope, '_>,
    name: String,
    work: impl FnOnce() -> T + Send + 'scope,
) -> ScopedJoinHandle<'scope, T> {
    std::thread::Builder::new()
        .name(name)
        .spawn_scoped(scope, work)
        .expect("cannot start a thread")
}

fn apply_all<F: EntryFilter>(
    applier: &mut Applier<F>,
    labels: &[String],
    rx: Receiver<Msg>,
    hash: SyncSender<ToHash>,
    reporter: &dyn Reporter,
) -> Result<()> {
    for label in labels {
        let mut reader = ChannelReader {
            rx: &rx,
            hash: &hash,
            current: Vec::new(),
            pos: 0,
            end: None,
        };
        let applied = applier.apply_layer(label, &mut reader);
        for w in applier.take_warnings() {
            reporter.warn(&w);
        }
        match (applied, reader.end.take()) {
            (Ok(()), Some(Ok(()))) => reporter.layer_applied(&label[..19.min(label.len())]),
            // The decoder's verdict names the real cause (bad gzip, wrong diff_id).
            (_, Some(Err(e))) => return Err(e),
            (Err(e), _) => return Err(e),
            (Ok(()), None) => {
                return Err(Error::Layer {
                    layer: label.clone(),
                    reason: "the decoder stopped before the end of the layer".to_string(),
                    source: None,
                });
            }
        }
    }
    Ok(())
}

fn decode_all(
    layers: Vec<LayerInput>,
    tx: SyncSender<Msg>,
    free: Receiver<Vec<u8>>,
    cancel: &AtomicBool,
) {
    for layer in layers {
        let verdict = decode_one(layer, &tx, &free, cancel);
        let failed = verdict.is_err();
        if tx.send(Msg::End(verdict)).is_err() || failed {
            return;
        }
    }
}

/// Stream one layer into the channel; `Err(Consumer)` when the applier has gone.
fn decode_one(
    layer: LayerInput,
    tx: &SyncSender<Msg>,
    free: &Receiver<Vec<u8>>,
    cancel: &AtomicBool,
) -> Result<DiffId> {
    // A reader that stopped because the run was cancelled fails with an I/O
    // error; the cause is the cancellation, not the blob.
    decode_stream(layer, tx, free, cancel).map_err(|e| {
        if cancel.load(Ordering::Relaxed) {
            Error::Interrupted
        } else {
            e
        }
    })
}

fn decode_stream(
    layer: LayerInput,
    tx: &SyncSender<Msg>,
    free: &Receiver<Vec<u8>>,
    cancel: &AtomicBool,
) -> Result<DiffId> {
    let label = layer.descriptor.digest.to_string();
    let blob = (layer.open)()?;
    let blob_hash = Arc::new(Mutex::new(Hasher::default()));
    let counted = SharedHashReader {
        inner: blob,
        hasher: Arc::clone(&blob_hash),
        hash: layer.verify_blob,
    };
    let buffered = BufReader::with_capacity(CHUNK, counted);
    let mut decoded = decompress::decoder(&label, buffered, layer.compression)?;
    let stream_error = |e: io::Error| {
        Error::Layer {
        layer: label.clone(),
        reason: "cannot decompress the layer; the blob is corrupt (fetch it again, or copy the archive again)".to_string(),
        source: Some(e),
    }
    };
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        let mut buf = free.try_recv().unwrap_or_default();
        buf.resize(CHUNK, 0);
        let n = decompress::read_full(&mut decoded, &mut buf).map_err(stream_error)?;
        if n == 0 {
            break;
        }
        buf.truncate(n);
        if tx.send(Msg::Data(buf)).is_err() {
            return Err(Error::Interrupted);
        }
    }
    let blob_hash = std::mem::take(&mut *blob_hash.lock().expect("hash lock"));
    if blob_hash.len() != layer.descriptor.size {
        return Err(Error::SizeMismatch {
            what: "layer blob",
            digest: layer.descriptor.digest,
            expected: layer.descriptor.size,
            found: blob_hash.len(),
            truncated: false,
        });
    }
    if layer.verify_blob {
        let found = blob_hash.finish();
        if found != layer.descriptor.digest {
            return Err(Error::DigestMismatch {
                what: "layer blob",
                expected: layer.descriptor.digest,
                found,
                hint: "the blob is corrupt; fetch or pull the image again",
            });
        }
    }
    Ok(DiffId {
        expected: layer.diff_id,
        layer: layer.descriptor.digest,
        index: layer.index,
    })
}

/// Hash what the applier has applied, on a core of its own, and hand the
/// buffers back to the decoder; at the end of each layer, say the digest.
fn hash_all(rx: Receiver<ToHash>, free: Sender<Vec<u8>>) {
    let mut hasher = Hasher::default();
    for msg in rx {
        match msg {
            ToHash::Data(buf) => {
                hasher.update(&buf);
                let _ = free.send(buf);
            }
            ToHash::Finish(reply) => {
                let _ = reply.send(std::mem::take(&mut hasher).finish());
            }
        }
    }
}

/// Counts (and, when asked, hashes) the compressed bytes; the hasher is
/// shared because the decoder owns this reader until the stream ends.
struct SharedHashReader {
    inner: Box<dyn Read + Send>,
    hasher: Arc<Mutex<Hasher>>,
    hash: bool,
}

impl Read for SharedHashReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut h = self.hasher.lock().expect("hash lock");
        if self.hash {
            h.update(&buf[..n]);
        } else {
            h.count(n as u64);
        }
        Ok(n)
    }
}

/// The applier's side of the channel: one layer's bytes, then end of file.
/// Each chunk goes on to the hasher once read, and at the end of the stream
/// the hasher's digest is checked against the layer's diff_id.
struct ChannelReader<'a> {
    rx: &'a Receiver<Msg>,
    hash: &'a SyncSender<ToHash>,
    current: Vec<u8>,
    pos: usize,
    end: Option<Result<()>>,
}

impl ChannelReader<'_> {
    /// Whether everything read hashes to the layer's diff_id.
    fn check(&self, diff: DiffId) -> Result<()> {
        let (reply, answer) = sync_channel(1);
        let found = self
            .hash
            .send(ToHash::Finish(reply))
            .ok()
            .and_then(|()| answer.recv().ok())
            .ok_or_else(|| Error::Layer {
                layer: diff.layer.to_string(),
                reason: "the hasher stopped before the end of the layer".to_string(),
                source: None,
            })?;
        if found != diff.expected {
            return Err(Error::DiffIdMismatch {
                layer: diff.layer,
                index: diff.index,
                expected: diff.expected,
                found,
            });
        }
        Ok(())
    }
}

impl Read for ChannelReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.pos < self.current.len() {
                let n = out.len().min(self.current.len() - self.pos);
                out[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            if !self.current.is_empty() {
                let chunk = std::mem::take(&mut self.current);
                if self.hash.send(ToHash::Data(chunk)).is_err() {
                    return Err(io::Error::other("the hasher stopped"));
                }
                self.pos = 0;
            }
            match &self.end {
                Some(Ok(())) => return Ok(0),
                Some(Err(_)) => return Err(io::Error::other("the layer stream failed")),
                None => {}
            }
            match self.rx.recv() {
                Ok(Msg::Data(buf)) => {
                    self.current = buf;
                    self.pos = 0;
                }
                Ok(Msg::End(verdict)) => self.end = Some(verdict.and_then(|d| self.check(d))),
                Err(_) => return Err(io::Error::other("the decoder stopped")),
            }
        }
    }
}

/// A lane's filter: asks the shared filter what to skip, keeps the notes of
/// the layer it applies for the collector to give in layer order.
struct LaneFilter<'a, 'f, F> {
    shared: &'a Mutex<&'f mut F>,
    notes: Vec<PathBuf>,
}

impl<F: EntryFilter> EntryFilter for LaneFilter<'_, '_, F> {
    fn note(&mut self, rel: &Path) {
        self.notes.push(rel.to_path_buf());
    }

    fn skip(&self, rel: &Path) -> bool {
        self.shared.lock().expect("filter lock").skip(rel)
    }
}

/// What a lane reports of one layer.
struct LayerDone {
    /// Position in `layers`.
    pos: usize,
    applied: Result<()>,
    verdict: Option<Result<()>>,
    stats: ApplyStats,
    warnings: Vec<String>,
    notes: Vec<PathBuf>,
}

fn unpack_lanes<F: EntryFilter + Send>(
    applier: &mut Applier<F>,
    layers: Vec<LayerInput>,
    lanes: usize,
    cancel: &Arc<AtomicBool>,
    reporter: &dyn Reporter,
) -> Result<()> {
    let count = layers.len();
    let labels: Vec<String> = layers
        .iter()
        .map(|l| l.descriptor.digest.to_string())
        .collect();
    let shared = Arc::new(LaneShared::new(count, Arc::clone(cancel)));
    let existed = applier.ancestors_exist();
    // Lane appliers first: they copy what they need of the main applier,
    // whose filter the lanes then share.
    let mut bases = Vec::new();
    for _ in 0..lanes {
        bases.push(applier.lane_applier(crate::unpack::apply::Unfiltered, &shared)?);
    }
    let mut dealt: Vec<Vec<(usize, LayerInput)>> = (0..lanes).map(|_| Vec::new()).collect();
    for (pos, layer) in layers.into_iter().enumerate() {
        dealt[pos % lanes].push((pos, layer));
    }
    let mut totals = ApplyStats::default();
    let filter = Mutex::new(applier.filter_mut());
    let result = std::thread::scope(|scope| {
        let (done_tx, done_rx) = channel::<LayerDone>();
        for (lane, (mine, base)) in dealt.into_iter().zip(bases).enumerate() {
            let lane_applier = base.refilter(LaneFilter {
                shared: &filter,
                notes: Vec::new(),
            });
            let (tx, rx) = sync_channel::<Msg>(DEPTH);
            let (free_tx, free_rx) = channel::<Vec<u8>>();
            let (hash_tx, hash_rx) = sync_channel::<ToHash>(HASH_DEPTH);
            let order: Vec<usize> = mine.iter().map(|(pos, _)| *pos).collect();
            let inputs: Vec<LayerInput> = mine.into_iter().map(|(_, l)| l).collect();
            let decoder_cancel = Arc::clone(cancel);
            named(scope, format!("decode-{lane}"), move || {
                decode_all(inputs, tx, free_rx, &decoder_cancel)
            });
            named(scope, format!("hash-{lane}"), move || {
                hash_all(hash_rx, free_tx)
            });
            let done_tx = done_tx.clone();
            let labels = &labels;
            let shared = &shared;
            named(scope, format!("apply-{lane}"), move || {
                lane_run(lane_applier, &order, labels, rx, hash_tx, shared, done_tx)
            });
        }
        drop(done_tx);
        let result = collect(
            &done_rx,
            count,
            &labels,
            &shared,
            &filter,
            &mut totals,
            reporter,
        );
        if result.is_err() {
            shared.stop(!shared.cancelled());
        }
        result
    });
    result?;
    applier.absorb_lanes(&shared, &totals, existed)
}

/// One lane: apply its layers in turn, reporting each.
fn lane_run<F: EntryFilter>(
    mut applier: Applier<LaneFilter<'_, '_, F>>,
    order: &[usize],
    labels: &[String],
    rx: Receiver<Msg>,
    hash: SyncSender<ToHash>,
    shared: &LaneShared,
    done: Sender<LayerDone>,
) {
    for &pos in order {
        let label = &labels[pos];
        let mut reader = ChannelReader {
            rx: &rx,
            hash: &hash,
            current: Vec::new(),
            pos: 0,
            end: None,
        };
        applier.start_lane_layer(pos);
        applier.filter_mut().notes.clear();
        let applied = applier.apply_layer(label, &mut reader);
        let verdict = reader.end.take();
        let (stats, warnings) = applier.end_lane_layer();
        let ok = applied.is_ok() && matches!(verdict, Some(Ok(())));
        if ok {
            shared.mark_done(pos);
        } else {
            let why = match &applied {
                Err(Error::LanesInterfered { reason }) => Some(reason.clone()),
                Ok(()) | Err(Error::Interrupted) => None,
                Err(other) => Some(crate::error::report(other)),
            };
            if let Some(why) = why {
                shared.reason.lock().expect("lane lock").get_or_insert(why);
            }
            shared.stop(!shared.cancelled());
        }
        let notes = std::mem::take(&mut applier.filter_mut().notes);
        let sent = done.send(LayerDone {
            pos,
            applied,
            verdict,
            stats,
            warnings,
            notes,
        });
        if !ok || sent.is_err() {
            return;
        }
    }
}

/// Take the lanes' reports in layer order: progress, warnings, the
/// filter's notes and the stats, as applying in order gives them. The
/// first layer that did not apply cleanly decides the result: its
/// decoder's verdict when that failed (as in order), else
/// [`Error::LanesInterfered`], since a lane's failure may come from
/// running beside another.
fn collect<F: EntryFilter>(
    rx: &Receiver<LayerDone>,
    count: usize,
    labels: &[String],
    shared: &LaneShared,
    filter: &Mutex<&mut F>,
    totals: &mut ApplyStats,
    reporter: &dyn Reporter,
) -> Result<()> {
    let mut waiting: BTreeMap<usize, LayerDone> = BTreeMap::new();
    let mut next = 0;
    while next < count {
        let Some(done) = waiting.remove(&next) else {
            match rx.recv() {
                Ok(done) => {
                    waiting.insert(done.pos, done);
                    continue;
                }
                // Every lane ended before layer `next` was reported.
                Err(_) => return Err(stopped(shared)),
            }
        };
        let label = &labels[next];
        match (done.applied, done.verdict) {
            (Ok(()), Some(Ok(()))) => {}
            (_, Some(Err(e))) if !matches!(e, Error::Interrupted) => return Err(e),
            _ => return Err(stopped(shared)),
        }
        for w in done.warnings {
            reporter.warn(&w);
        }
        {
            let mut f = filter.lock().expect("filter lock");
            f.start_layer();
            for rel in &done.notes {
                f.note(rel);
            }
        }
        *totals += &done.stats;
        reporter.layer_applied(&label[..19.min(label.len())]);
        next += 1;
    }
    Ok(())
}

/// Why the lanes stopped: the run was cancelled, or they interfered.
fn stopped(shared: &LaneShared) -> Error {
    if shared.abort.load(Ordering::SeqCst) {
        let reason = shared.reason.lock().expect("lane lock").clone();
        Error::LanesInterfered {
            reason: reason
                .unwrap_or_else(|| "a layer could not be applied beside the others".to_string()),
        }
    } else {
        Error::Interrupted
    }
}
