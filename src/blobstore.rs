//! A content-addressed blob directory: `blobs/sha256/<hex>`.
//!
//! It serves as the download cache (`~/.cache/hydrafy`) and, because the
//! layout is the OCI image layout's, as the blob half of `pull`'s output.
//! A blob is written to a private temporary file while it is hashed, and it
//! gets its final name only after digest and size both match its descriptor:
//! nothing unverified ever has a final name, and a reader never sees a torn
//! file. Two processes filling one store at once both succeed: the rename is
//! atomic and the content under a name is fixed by the name.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::digest::{Digest, Hasher};
use crate::error::{Error, Result};
use crate::manifest::Descriptor;

/// A directory of blobs named by digest.
#[derive(Clone, Debug)]
pub struct BlobStore {
    root: PathBuf,
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

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob named `digest` lives (whether or not it is there).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
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
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::io(&path, "cannot open cached blob", e)),
        };
        let mut hasher = Hasher::default();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| Error::io(&path, "cannot read cached blob", e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let ok = hasher.len() == desc.size && hasher.finish() == desc.digest;
        if !ok {
            let _ = fs::remove_file(&path);
        }
        Ok(ok)
    }

    /// Start writing the blob `desc` describes.
    pub fn writer(&self, desc: &Descriptor) -> Result<BlobWriter> {
        let tmp = self.root.join("tmp").join(format!(
            "{}.{}.{}.partial",
            desc.digest.hex(),
            std::process::id(),
            fastrand::u64(..)
        ));
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, "cannot create temporary blob", e))?;
        Ok(BlobWriter {
            file: Some(file),
            tmp,
            dest: self.path(&desc.digest),
            desc: desc.clone(),
            hasher: Hasher::default(),
        })
    }

    /// Write a blob held in memory (manifests, configs, `index.json` peers).
    pub fn put(&self, desc: &Descriptor, bytes: &[u8]) -> Result<PathBuf> {
        let mut w = self.writer(desc)?;
        w.write(bytes)?;
        w.commit()
    }
}

/// A blob on its way into a [`BlobStore`]: hashed as written, named on commit.
pub struct BlobWriter {
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
    desc: Descriptor,
    hasher: Hasher,
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
        let file = self.file.as_mut().expect("writer used after commit");
        file.write_all(bytes)
            .map_err(|e| Error::io(&self.tmp, "cannot write temporary blob", e))
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.hasher.len()
    }

    /// True before any byte was written.
    pub fn is_empty(&self) -> bool {
        self.hasher.is_empty()
    }

    /// Drop what was written and start again from zero (a server ignored a
    /// range request and sent the whole blob).
    pub fn restart(&mut self) -> Result<()> {
        let file = self.file.as_mut().expect("writer used after commit");
        file.set_len(0)
            .and_then(|()| io::Seek::rewind(file))
            .map_err(|e| Error::io(&self.tmp, "cannot truncate temporary blob", e))?;
        self.hasher = Hasher::default();
        Ok(())
    }

    /// Check size and digest; on success give the blob its final name.
    pub fn commit(mut self) -> Result<PathBuf> {
        let file = self.file.take().expect("writer committed twice");
        drop(file);
        let hasher = std::mem::take(&mut self.hasher);
        let len = hasher.len();
        if len != self.desc.size {
            return Err(Error::SizeMismatch {
                what: "blob",
                digest: self.desc.digest,
                expected: self.desc.size,
                found: len,
                truncated: false,
            });
        }
        let found = hasher.finish();
        if found != self.desc.digest {
            return Err(Error::DigestMismatch {
                what: "blob",
                expected: self.desc.digest,
                found,
                hint: "the registry, a mirror or a proxy served different bytes than the image names",
            });
        }
        fs::rename(&self.tmp, &self.dest)
            .map_err(|e| Error::io(&self.dest, "cannot store verified blob", e))?;
        Ok(self.dest.clone())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // Not committed (or commit failed): the temporary file must not linger.
        if self.tmp.exists() {
            let _ = fs::remove_file(&self.tmp);
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
}
