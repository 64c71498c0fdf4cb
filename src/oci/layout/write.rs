//! Writing an OCI image layout, as a directory or an `oci-archive` tar, from
//! blobs `pull` verified on their way in: the registry's manifest bytes kept
//! exactly, a tar streamed, hashed (for `--checksum`) and flushed as it goes.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::oci::digest::{Digest, Hasher};
use crate::oci::manifest::{self, Descriptor};

use super::{OCI_LAYOUT, REF_NAME, blob_name};

/// One blob of a layout being written: bytes held in memory (manifests,
/// configs) or a verified file (layers, from the cache).
pub enum BlobData {
    Bytes(Vec<u8>),
    File(PathBuf),
}

/// What an OCI image layout will hold.
pub struct LayoutContent {
    pub index_json: Vec<u8>,
    pub blobs: Vec<(Digest, BlobData)>,
}

impl LayoutContent {
    /// An `index.json` naming one image (`top`) by `ref_name`, with
    /// `annotations` of its own (a partial archive says so there).
    pub fn index_json(
        top: &Descriptor,
        ref_name: &str,
        annotations: &[(String, String)],
    ) -> Vec<u8> {
        let mut entry = serde_json::to_value(Descriptor {
            platform: None,
            urls: None,
            annotations: None,
            ..top.clone()
        })
        .expect("descriptor serialises");
        entry["annotations"] = serde_json::json!({ REF_NAME: ref_name });
        let mut index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": manifest::media::OCI_INDEX,
            "manifests": [entry],
        });
        if !annotations.is_empty() {
            let own: serde_json::Map<String, serde_json::Value> = annotations
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            index["annotations"] = serde_json::Value::Object(own);
        }
        let mut bytes = serde_json::to_vec_pretty(&index).expect("index serialises");
        bytes.push(b'\n');
        bytes
    }

    /// Write the layout into the (new, empty) directory `dir`. Files from
    /// the cache are hard-linked when they can be, copied otherwise.
    pub fn write_dir(&self, dir: &Path) -> Result<u64> {
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs)
            .map_err(|e| Error::io(&blobs, "cannot create layout directory", e))?;
        let write = |path: &Path, bytes: &[u8]| {
            fs::write(path, bytes).map_err(|e| Error::io(path, "cannot write", e))
        };
        write(&dir.join("oci-layout"), OCI_LAYOUT)?;
        write(&dir.join("index.json"), &self.index_json)?;
        let mut total = 0;
        for (digest, data) in &self.blobs {
            let dest = blobs.join(digest.hex());
            match data {
                BlobData::Bytes(b) => {
                    write(&dest, b)?;
                    total += b.len() as u64;
                }
                BlobData::File(src) => {
                    if fs::hard_link(src, &dest).is_err() {
                        fs::copy(src, &dest)
                            .map_err(|e| Error::io(&dest, "cannot copy blob", e))?;
                    }
                    total += fs::metadata(&dest)
                        .map_err(|e| Error::io(&dest, "cannot stat", e))?
                        .len();
                }
            }
        }
        Ok(total)
    }

    /// Stream the layout as a tar (an `oci-archive`) into `out`, returning
    /// the archive's sha256 and size.
    pub fn write_tar(&self, out: File, path_for_errors: &Path) -> Result<(Digest, u64)> {
        let io_err = |e: io::Error| Error::io(path_for_errors, "cannot write archive", e);
        let hashing = HashingWriter {
            inner: out,
            hasher: Hasher::default(),
        };
        let mut tar = tar::Builder::new(BufWriter::with_capacity(1 << 20, hashing));
        tar.mode(tar::HeaderMode::Deterministic);
        let header = |size: u64, kind: tar::EntryType| {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(kind);
            h.set_size(size);
            h.set_mode(if kind == tar::EntryType::Directory {
                0o755
            } else {
                0o644
            });
            h.set_mtime(0);
            h
        };
        for dir in ["blobs/", "blobs/sha256/"] {
            tar.append_data(&mut header(0, tar::EntryType::Directory), dir, io::empty())
                .map_err(io_err)?;
        }
        tar.append_data(
            &mut header(OCI_LAYOUT.len() as u64, tar::EntryType::Regular),
            "oci-layout",
            OCI_LAYOUT,
        )
        .map_err(io_err)?;
        tar.append_data(
            &mut header(self.index_json.len() as u64, tar::EntryType::Regular),
            "index.json",
            self.index_json.as_slice(),
        )
        .map_err(io_err)?;
        for (digest, data) in &self.blobs {
            let name = blob_name(digest);
            match data {
                BlobData::Bytes(b) => {
                    tar.append_data(
                        &mut header(b.len() as u64, tar::EntryType::Regular),
                        &name,
                        b.as_slice(),
                    )
                    .map_err(io_err)?;
                }
                BlobData::File(src) => {
                    let file = File::open(src)
                        .map_err(|e| Error::io(src, "cannot open cached blob", e))?;
                    let size = file
                        .metadata()
                        .map_err(|e| Error::io(src, "cannot stat cached blob", e))?
                        .len();
                    tar.append_data(&mut header(size, tar::EntryType::Regular), &name, file)
                        .map_err(io_err)?;
                }
            }
        }
        let buffered = tar.into_inner().map_err(io_err)?;
        let hashing = buffered.into_inner().map_err(|e| io_err(e.into_error()))?;
        hashing.inner.sync_all().map_err(io_err)?;
        let size = hashing.hasher.len();
        Ok((hashing.hasher.finish(), size))
    }
}

struct HashingWriter {
    inner: File,
    hasher: Hasher,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
