//! A content-addressed blob directory: `blobs/sha256/<hex>`.
//!
//! It serves as the download cache (`~/.cache/hydrafy`) and, because the
//! layout is the OCI image layout's, as the blob half of `pull`'s output.
//!
//! A blob is written to `tmp/<hex>.partial` while it is hashed, and it gets
//! its final name only after digest and size both match its descriptor:
//! nothing unverified ever has a final name, and a reader never sees a torn
//! file. The partial file is named by the digest, not by the process, so a
//! download that a run did not finish (network gone, Ctrl-C, SIGKILL, power
//! loss) is continued by the next run from the bytes already on disk; those
//! bytes are re-hashed from disk before the download resumes, and the whole
//! blob is verified at the end as always. Whoever writes a partial file holds
//! an exclusive `flock` on it, so two hydrafy runs sharing a cache never write
//! one file at once: the second waits, then finds the blob the first one
//! committed.

use std::fs::{self, File};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, flock};

use crate::error::{Error, Result};
use crate::oci::digest::{Digest, Hasher};
use crate::oci::manifest::Descriptor;

/// A directory of blobs named by digest.
#[derive(Clone, Debug)]
pub struct BlobStore {
    root: PathBuf,
}

/// The outcome of [`BlobStore::try_claim`].
pub enum Claim {
    /// The right to write the blob, resuming from [`BlobWriter::len`] bytes.
    Writer(Box<BlobWriter>),
    /// Another process is writing this blob now; try again later.
    Busy,
}

/// What a cache holds, for `hydrafy cache du`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// Verified blobs and their total size.
    pub blobs: u64,
    pub blob_bytes: u64,
    /// Unfinished downloads kept for resuming, and their total size.
    pub partials: u64,
    pub partial_bytes: u64,
}

impl BlobStore {
    /// Open (creating) a store rooted at `root`.
    pub fn open(root: &Path) -> Result<BlobStore> {
        for dir in [root.join("blobs/sha256"), root.join("tmp")] {
            fs::create_dir_all(&dir)
                .map_err(|e| Error::io(&dir, "cannot create blob directory", e))?;
        }
        Ok(BlobStore {
            root: root.to_path_buf(),
        })
    }

    /// The default cache: `$XDG_CACHE_HOME/hydrafy`, else `~/.cache/hydrafy`.
    pub fn default_cache_dir() -> Option<PathBuf> {
        let xdg = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty());
        match xdg {
            Some(dir) => Some(PathBuf::from(dir).join("hydrafy")),
            None => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/hydrafy")),
        }
    }

    /// Where the blob named `digest` lives (whether or not it is there).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    /// Where an unfinished download of `digest` is kept.
    pub fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("tmp")
            .join(format!("{}.partial", digest.hex()))
    }

    /// Is a blob of the descriptor's size present? (Content is checked by [`BlobStore::verify`].)
    pub fn has(&self, desc: &Descriptor) -> bool {
        fs::symlink_metadata(self.path(&desc.digest))
            .is_ok_and(|m| m.is_file() && m.len() == desc.size)
    }

    /// Re-hash a stored blob. A blob that fails is removed, so the next
    /// download replaces it, and `false` is returned.
    pub fn verify(&self, desc: &Descriptor) -> Result<bool> {
        let path = self.path(&desc.digest);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::io(&path, "cannot open cached blob", e)),
        };
        let hasher = hash_file(file, &path, "cannot read cached blob")?;
        let ok = hasher.len() == desc.size && hasher.finish() == desc.digest;
        if !ok {
            let _ = fs::remove_file(&path);
        }
        Ok(ok)
    }

    /// Take the right to write the blob `desc` describes, without waiting.
    ///
    /// The writer continues the partial file an earlier run left, after
    /// re-hashing it (a partial longer than the blob is discarded). `Busy`
    /// means another process holds the partial now.
    pub fn try_claim(&self, desc: &Descriptor) -> Result<Claim> {
        let partial = self.partial_path(&desc.digest);
        loop {
            let mut file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&partial)
                .map_err(|e| Error::io(&partial, "cannot create temporary blob", e))?;
            match flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {}
                Err(rustix::io::Errno::WOULDBLOCK) => return Ok(Claim::Busy),
                Err(e) => {
                    return Err(Error::io(&partial, "cannot lock temporary blob", e.into()));
                }
            }
            // While this process waited, the holder may have committed the
            // file (renamed it to its final name) or removed it: the lock is
            // then on an inode that is no longer the partial. Start over.
            let held = file
                .metadata()
                .map_err(|e| Error::io(&partial, "cannot inspect temporary blob", e))?;
            let current = fs::symlink_metadata(&partial).ok();
            if current.is_none_or(|m| m.ino() != held.ino() || m.dev() != held.dev()) {
                continue;
            }
            let mut hasher = hash_file(&mut file, &partial, "cannot read temporary blob")?;
            if hasher.len() > desc.size {
                rewind_to_zero(&mut file, &partial)?;
                hasher = Hasher::default();
            }
            file.seek(io::SeekFrom::End(0))
                .map_err(|e| Error::io(&partial, "cannot seek temporary blob", e))?;
            let resumed = hasher.len();
            return Ok(Claim::Writer(Box::new(BlobWriter {
                file,
                partial,
                growing: None,
                dest: self.path(&desc.digest),
                desc: desc.clone(),
                hasher,
                resumed,
                committed: false,
            })));
        }
    }

    /// Start writing the blob `desc` describes from its first byte, waiting
    /// for another process that writes it now.
    pub fn writer(&self, desc: &Descriptor) -> Result<BlobWriter> {
        loop {
            match self.try_claim(desc)? {
                Claim::Writer(mut w) => {
                    w.restart()?;
                    return Ok(*w);
                }
                Claim::Busy => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        }
    }

    /// Write a blob held in memory (manifests, configs, `index.json` peers).
    pub fn put(&self, desc: &Descriptor, bytes: &[u8]) -> Result<PathBuf> {
        let mut w = self.writer(desc)?;
        w.write(bytes)?;
        w.commit()
    }

    /// How many blobs and unfinished downloads the store holds, and their size.
    pub fn usage(&self) -> Result<Usage> {
        let mut usage = Usage::default();
        for (dir, partial) in [
            (self.root.join("blobs/sha256"), false),
            (self.root.join("tmp"), true),
        ] {
            for (_, meta) in files_in(&dir)? {
                if partial {
                    usage.partials += 1;
                    usage.partial_bytes += meta.len();
                } else {
                    usage.blobs += 1;
                    usage.blob_bytes += meta.len();
                }
            }
        }
        Ok(usage)
    }

    /// Remove every blob and every unfinished download no process is
    /// writing now. Returns what was removed and what was left (in use).
    pub fn clear(&self) -> Result<(Usage, Usage)> {
        let mut removed = Usage::default();
        let mut kept = Usage::default();
        for (path, meta) in files_in(&self.root.join("blobs/sha256"))? {
            fs::remove_file(&path).map_err(|e| Error::io(&path, "cannot remove cached blob", e))?;
            removed.blobs += 1;
            removed.blob_bytes += meta.len();
        }
        for (path, meta) in files_in(&self.root.join("tmp"))? {
            // A partial some run is writing stays: removing it under that run
            // would fail its download.
            let in_use = File::open(&path)
                .map(|f| flock(&f, FlockOperation::NonBlockingLockExclusive).is_err())
                .unwrap_or(false);
            if in_use {
                kept.partials += 1;
                kept.partial_bytes += meta.len();
                continue;
            }
            fs::remove_file(&path)
                .map_err(|e| Error::io(&path, "cannot remove unfinished download", e))?;
            removed.partials += 1;
            removed.partial_bytes += meta.len();
        }
        Ok((removed, kept))
    }
}

/// The regular files directly in `dir` (none if it does not exist).
fn files_in(dir: &Path) -> Result<Vec<(PathBuf, fs::Metadata)>> {
    let entries = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, "cannot list blob directory", e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, "cannot list blob directory", e))?;
        if let Ok(meta) = fs::symlink_metadata(entry.path())
            && meta.is_file()
        {
            out.push((entry.path(), meta));
        }
    }
    Ok(out)
}

fn hash_file(mut file: impl Read, path: &Path, action: &'static str) -> Result<Hasher> {
    let mut hasher = Hasher::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| Error::io(path, action, e))?;
        if n == 0 {
            return Ok(hasher);
        }
        hasher.update(&buf[..n]);
    }
}

fn rewind_to_zero(file: &mut File, path: &Path) -> Result<()> {
    file.set_len(0)
        .and_then(|()| file.rewind())
        .map_err(|e| Error::io(path, "cannot truncate temporary blob", e))
}

/// A blob on its way into a [`BlobStore`]: hashed as written, named on commit.
///
/// It holds the partial file's lock until it is dropped. Dropped without a
/// commit, it leaves what it wrote for the next run to resume (an empty
/// partial is removed).
/// A blob being written, as seen by a reader that follows it: where its
/// bytes are, how many of them are there, and how many times the writer
/// threw its bytes away and started over. The bytes are not verified yet; a
/// reader must not finish before the blob gets its final name, and bytes it
/// read before a restart may not be the bytes that finally verify.
#[derive(Debug, Default)]
pub struct Growing {
    path: std::sync::OnceLock<PathBuf>,
    len: std::sync::atomic::AtomicU64,
    epoch: std::sync::atomic::AtomicU64,
}

impl Growing {
    /// The file the bytes go to, once a writer holds it.
    pub fn path(&self) -> Option<&Path> {
        self.path.get().map(PathBuf::as_path)
    }

    /// How many bytes from the start of that file are written. It drops to
    /// zero when a download starts over.
    pub fn len(&self) -> u64 {
        self.len.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many times the writer started over. It moves before the length
    /// drops and before any byte is rewritten, so a reader that sees the
    /// same epoch before and after a read read bytes of that epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn set_len(&self, len: u64) {
        self.len.store(len, std::sync::atomic::Ordering::SeqCst);
    }

    fn start_over(&self) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.set_len(0);
    }
}

pub struct BlobWriter {
    file: File,
    partial: PathBuf,
    growing: Option<std::sync::Arc<Growing>>,
    dest: PathBuf,
    desc: Descriptor,
    hasher: Hasher,
    resumed: u64,
    committed: bool,
}

impl BlobWriter {
    /// Append bytes. Fails as soon as more arrive than the descriptor allows.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        if self.hasher.len() + bytes.len() as u64 > self.desc.size {
            return Err(Error::SizeMismatch {
                what: "blob",
                digest: self.desc.digest,
                expected: self.desc.size,
                found: self.hasher.len() + bytes.len() as u64,
                truncated: true,
            });
        }
        self.hasher.update(bytes);
        self.file
            .write_all(bytes)
            .map_err(|e| Error::io(&self.partial, "cannot write temporary blob", e))?;
        if let Some(g) = &self.growing {
            g.set_len(self.hasher.len());
        }
        Ok(())
    }

    /// Let a reader follow the bytes as they are written (see [`Growing`]).
    pub fn watch(&mut self, growing: std::sync::Arc<Growing>) {
        let _ = growing.path.set(self.partial.clone());
        growing.set_len(self.hasher.len());
        self.growing = Some(growing);
    }

    /// Bytes held so far (including those found on disk when claimed).
    pub fn len(&self) -> u64 {
        self.hasher.len()
    }

    /// How many bytes an earlier run had left when this writer was claimed.
    pub fn resumed(&self) -> u64 {
        self.resumed
    }

    /// Drop what was written and start again from zero (a server ignored a
    /// range request and sent the whole blob, or the bytes did not verify).
    pub fn restart(&mut self) -> Result<()> {
        if let Some(g) = &self.growing {
            g.start_over();
        }
        rewind_to_zero(&mut self.file, &self.partial)?;
        self.hasher = Hasher::default();
        self.resumed = 0;
        Ok(())
    }

    /// Check size and digest; on success give the blob its final name. On a
    /// mismatch the bytes are discarded (the writer is back at zero, still
    /// held) and the error says what was wrong.
    pub fn commit(&mut self) -> Result<PathBuf> {
        assert!(!self.committed, "blob writer committed twice");
        let len = self.hasher.len();
        let check = if len != self.desc.size {
            Err(Error::SizeMismatch {
                what: "blob",
                digest: self.desc.digest,
                expected: self.desc.size,
                found: len,
                truncated: false,
            })
        } else {
            let found = self.hasher.clone().finish();
            if found == self.desc.digest {
                Ok(())
            } else {
                Err(Error::DigestMismatch {
                    what: "blob",
                    expected: self.desc.digest,
                    found,
                    hint: "the registry, a mirror or a proxy served different bytes than the image names",
                })
            }
        };
        if let Err(e) = check {
            self.restart()?;
            return Err(e);
        }
        // Data before name: a crash must never leave a named blob with holes.
        self.file
            .sync_data()
            .map_err(|e| Error::io(&self.partial, "cannot flush temporary blob", e))?;
        fs::rename(&self.partial, &self.dest)
            .map_err(|e| Error::io(&self.dest, "cannot store verified blob", e))?;
        self.committed = true;
        Ok(self.dest.clone())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // Still locked here: an empty partial is noise, anything else is kept
        // for the next run to resume. The lock goes with the file.
        if !self.committed && self.hasher.is_empty() {
            let _ = fs::remove_file(&self.partial);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(bytes: &[u8]) -> Descriptor {
        Descriptor {
            media_type: "application/octet-stream".into(),
            digest: Digest::of(bytes),
            size: bytes.len() as u64,
            platform: None,
            urls: None,
            annotations: None,
        }
    }

    #[test]
    fn a_verified_blob_gets_its_name_and_nothing_else_does() {
        let tmp = tempfile::tempdir().unwrap();
        let store = BlobStore::open(tmp.path()).unwrap();
        let good = desc(b"hello");
        store.put(&good, b"hello").unwrap();
        assert!(store.has(&good));
        assert!(store.verify(&good).unwrap());

        let mut lie = desc(b"hello");
        lie.digest = Digest::of(b"other");
        let err = store.put(&lie, b"hello").unwrap_err();
        assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
        assert!(!store.path(&lie.digest).exists());
        assert_eq!(fs::read_dir(tmp.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn more_bytes_than_the_descriptor_allows_fail_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let store = BlobStore::open(tmp.path()).unwrap();
        let d = desc(b"four");
        let mut w = store.writer(&d).unwrap();
        w.write(b"fo").unwrap();
        let err = w.write(b"urx").unwrap_err();
        assert!(
            matches!(
                err,
                Error::SizeMismatch {
                    truncated: true,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_corrupt_cached_blob_is_evicted_on_verify() {
        let tmp = tempfile::tempdir().unwrap();
        let store = BlobStore::open(tmp.path()).unwrap();
        let d = desc(b"content");
        store.put(&d, b"content").unwrap();
        fs::write(store.path(&d.digest), b"CONTENT").unwrap();
        assert!(!store.verify(&d).unwrap());
        assert!(!store.path(&d.digest).exists());
    }

    fn claim(store: &BlobStore, d: &Descriptor) -> BlobWriter {
        match store.try_claim(d).unwrap() {
            Claim::Writer(w) => *w,
            Claim::Busy => panic!("claim is busy"),
        }
    }

    #[test]
    fn an_unfinished_download_is_kept_and_resumed_after_rehashing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = BlobStore::open(tmp.path()).unwrap();
        let d = desc(b"0123456789");
        let mut w = claim(&store, &d);
        w.write(b"01234").unwrap();
        drop(w);
        assert_eq!(fs::read(store.partial_path(&d.digest)).unwrap(), b"01234");
        let mut w = claim(&store, &d);
        assert_eq!((w.len(), w.resumed()), (5, 5));
        w.write(b"56789").unwrap();
        w.commit().unwrap();
        assert_eq!(fs::read(store.path(&d.digest)).unwrap(), b"0123456789");
        assert!(!store.partial_path(&d.digest).exists());
    }

    #[test]
    fn a_corrupt_partial_fails_the_commit_and_is_discarded() {
        let tmp = tempfile::tempdir().unwrap();
        let store = BlobStore::open(tmp.path()).unwrap();
        let d = desc(b"0123456789");
        fs::write(store.partial_path(&d.digest), b"XXXXX").unwrap();
        let mut w = claim(&store, &d);
        assert_eq!(w.resumed(), 5);
        w.write(b"56789").unwrap();
        assert!(matches!(w.commit(), Err(Error::DigestMismatch { .. })));
        assert_eq!(w.len(), 0, "the bad bytes are gone");
        drop(w);
        assert!(!store.partial_path(&d.digest).exists());
        assert!(!store.path(&d.digest).exists());

        // Longer than the blob: not a prefix of it, start from zero.
        fs::write(store.partial_path(&d.digest), b"0123456789AB").unwrap();
        assert_eq!(claim(&store, &d).len(), 0);
    }

    #[test]
    fn a_partial_being_written_is_busy_for_everyone_else() {
        let tmp = tempfile::tempdir().unwrap();
        let store = BlobStore::open(tmp.path()).unwrap();
        let d = desc(b"content");
        let mut w = claim(&store, &d);
        w.write(b"con").unwrap();
        // flock locks are per open file description: a second open is another owner.
        assert!(matches!(store.try_claim(&d).unwrap(), Claim::Busy));
        let (removed, kept) = store.clear().unwrap();
        assert_eq!((removed.partials, kept.partials), (0, 1));
        w.write(b"tent").unwrap();
        w.commit().unwrap();
        drop(w);
        // Committed: a waiter that claims now finds a fresh, empty partial.
        let again = claim(&store, &d);
        assert_eq!(again.len(), 0);
        drop(again);
        let usage = store.usage().unwrap();
        assert_eq!((usage.blobs, usage.blob_bytes, usage.partials), (1, 7, 0));
        let (removed, _) = store.clear().unwrap();
        assert_eq!(removed.blobs, 1);
        assert_eq!(store.usage().unwrap(), Usage::default());
    }
}
