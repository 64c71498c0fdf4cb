//! The unpack pipeline: decompress and hash on one thread, apply on another.
//!
//! Layers must be applied strictly in order, but decompressing and hashing a
//! layer does not depend on the tree, so a decoder thread runs ahead of the
//! applier: while layer N's files are written, layer N's rest and layer N+1
//! are inflated and hashed on the other core. The two meet in a bounded
//! channel of recycled 256 KiB buffers, so memory stays flat whatever the
//! layer size. The decoder reads every stream to its end (the tar parser
//! stops at the end marker, the diff_id hash must not) and ends each layer
//! with a verdict that the applier checks before it starts the next.

use std::io::{self, BufReader, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::oci::digest::{Digest, Hasher, HashingReader};
use crate::oci::manifest::{Compression, Descriptor};
use crate::ui::progress::Reporter;
use crate::unpack::apply::{Applier, EntryFilter};
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
    End(Result<()>),
}

/// Unpack `layers` in order onto the applier's root.
pub fn unpack<F: EntryFilter>(
    applier: &mut Applier<F>,
    layers: Vec<LayerInput>,
    cancel: &Arc<AtomicBool>,
    reporter: &dyn Reporter,
) -> Result<()> {
    let labels: Vec<String> = layers
        .iter()
        .map(|l| l.descriptor.digest.to_string())
        .collect();
    let (tx, rx) = sync_channel::<Msg>(DEPTH);
    let (free_tx, free_rx) = channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        let decoder_cancel = Arc::clone(cancel);
        scope.spawn(move || decode_all(layers, tx, free_rx, &decoder_cancel));
        let result = apply_all(applier, &labels, rx, free_tx, reporter);
        if result.is_err() {
            // Stop the decoder: it may be waiting for a download that no longer matters.
            cancel.store(true, Ordering::Relaxed);
        }
        result
    })
}

fn apply_all<F: EntryFilter>(
    applier: &mut Applier<F>,
    labels: &[String],
    rx: Receiver<Msg>,
    free: Sender<Vec<u8>>,
    reporter: &dyn Reporter,
) -> Result<()> {
    for label in labels {
        let mut reader = ChannelReader {
            rx: &rx,
            free: &free,
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
) -> Result<()> {
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
) -> Result<()> {
    let label = layer.descriptor.digest.to_string();
    let blob = (layer.open)()?;
    let blob_hash = Arc::new(Mutex::new(Hasher::default()));
    let counted = SharedHashReader {
        inner: blob,
        hasher: Arc::clone(&blob_hash),
        hash: layer.verify_blob,
    };
    let buffered = BufReader::with_capacity(CHUNK, counted);
    let decoded = decompress::decoder(&label, buffered, layer.compression)?;
    let mut hashed = HashingReader::new(decoded);
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
        let n = decompress::read_full(&mut hashed, &mut buf).map_err(stream_error)?;
        if n == 0 {
            break;
        }
        buf.truncate(n);
        if tx.send(Msg::Data(buf)).is_err() {
            return Err(Error::Interrupted);
        }
    }
    let (diff, _) = hashed.finish();
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
    if diff != layer.diff_id {
        return Err(Error::DiffIdMismatch {
            layer: layer.descriptor.digest,
            index: layer.index,
            expected: layer.diff_id,
            found: diff,
        });
    }
    Ok(())
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
struct ChannelReader<'a> {
    rx: &'a Receiver<Msg>,
    free: &'a Sender<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
    end: Option<Result<()>>,
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
                let _ = self.free.send(std::mem::take(&mut self.current));
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
                Ok(Msg::End(verdict)) => self.end = Some(verdict),
                Err(_) => return Err(io::Error::other("the decoder stopped")),
            }
        }
    }
}
