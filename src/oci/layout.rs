//! Image files for air-gapped hosts: OCI image layouts (a directory or an
//! `oci-archive` tar) and `docker save` archives, read and written.
//!
//! Reading never touches the network. An archive is indexed once (entry
//! name to offset and size, seeking past the data), then manifests and
//! configs are read by name, bounded, and verified against the descriptors
//! that name them; layer blobs are streamed straight from the file into the
//! unpack pipeline, which hashes them on the way. Nothing is extracted to a
//! temporary directory and nothing is held in memory whole.
//!
//! Writing keeps the registry's manifest bytes exactly, Docker media types
//! included, so the pinned digests still verify on the far side. An archive
//! is written as a stream into a temporary file beside its final name and
//! renamed when complete.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::oci::digest::{Digest, Hasher};
use crate::oci::manifest::{
    self, Compression, Descriptor, ImageManifest, MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES, Manifest,
};
use crate::oci::platform::Platform;
use crate::oci::resolve::{FinishResolve, ResolvedImage, finish_resolve};
use crate::ui::progress::Reporter;
use crate::unpack::pipeline::LayerInput;

/// The annotation that names an image in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;
/// An archive with more entries than this is not an image archive.
const MAX_ENTRIES: usize = 1_000_000;

#[derive(Clone, Debug)]
enum Entry {
    File { offset: u64, size: u64 },
    Link(String),
}

/// The files of an image archive: a directory, or a tar indexed by name.
enum Files {
    Dir(PathBuf),
    Tar {
        path: PathBuf,
        entries: HashMap<String, Entry>,
    },
}

impl Files {
    fn open(path: &Path) -> Result<Files> {
        let meta =
            fs::metadata(path).map_err(|e| Error::io(path, "cannot open image archive", e))?;
        if meta.is_dir() {
            return Ok(Files::Dir(path.to_path_buf()));
        }
        let file = File::open(path).map_err(|e| Error::io(path, "cannot open image archive", e))?;
        let mut archive = tar::Archive::new(file);
        let mut entries = HashMap::new();
        let not_tar = |e: io::Error| Error::Archive {
            what: "image archive",
            input: path.display().to_string(),
            reason: format!("not a tar archive or an OCI layout directory ({e})"),
        };
        for entry in archive.entries_with_seek().map_err(not_tar)? {
            let entry = entry.map_err(not_tar)?;
            if entries.len() >= MAX_ENTRIES {
                return Err(not_tar(io::Error::other("too many entries")));
            }
            let name = clean(&entry.path_bytes());
            match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    entries.insert(
                        name,
                        Entry::File {
                            offset: entry.raw_file_position(),
                            size: entry.size(),
                        },
                    );
                }
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    let target = entry
                        .link_name_bytes()
                        .map(|t| t.into_owned())
                        .unwrap_or_default();
                    let target = if entry.header().entry_type() == tar::EntryType::Symlink {
                        let base = Path::new(&name).parent().unwrap_or(Path::new(""));
                        clean(
                            base.join(String::from_utf8_lossy(&target).as_ref())
                                .to_string_lossy()
                                .as_bytes(),
                        )
                    } else {
                        clean(&target)
                    };
                    entries.insert(name, Entry::Link(target));
                }
                _ => {}
            }
        }
        Ok(Files::Tar {
            path: path.to_path_buf(),
            entries,
        })
    }

    fn source(&self) -> &Path {
        match self {
            Files::Dir(p) | Files::Tar { path: p, .. } => p,
        }
    }

    /// Offset and size of `name` in a tar, following up to a few links.
    fn locate(&self, name: &str) -> Option<(u64, u64)> {
        let Files::Tar { entries, .. } = self else {
            return None;
        };
        let mut name = name.to_string();
        for _ in 0..8 {
            match entries.get(&name)? {
                Entry::File { offset, size } => return Some((*offset, *size)),
                Entry::Link(target) => name = target.clone(),
            }
        }
        None
    }

    fn size(&self, name: &str) -> Option<u64> {
        match self {
            Files::Dir(dir) => fs::metadata(dir.join(name))
                .ok()
                .filter(|m| m.is_file())
                .map(|m| m.len()),
            Files::Tar { .. } => self.locate(name).map(|(_, size)| size),
        }
    }

    /// A stream over `name` and its size.
    fn stream(&self, name: &str) -> Result<(Box<dyn Read + Send>, u64)> {
        let missing = || Error::Archive {
            what: "image archive",
            input: self.source().display().to_string(),
            reason: format!("{name} is missing; the archive is incomplete, copy it again"),
        };
        match self {
            Files::Dir(dir) => {
                let path = dir.join(name);
                let file = match File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing()),
                    Err(e) => return Err(Error::io(&path, "cannot open", e)),
                };
                let size = file
                    .metadata()
                    .map_err(|e| Error::io(&path, "cannot stat", e))?
                    .len();
                Ok((Box::new(file), size))
            }
            Files::Tar { path, .. } => {
                let (offset, size) = self.locate(name).ok_or_else(missing)?;
                let mut file = File::open(path)
                    .map_err(|e| Error::io(path, "cannot open image archive", e))?;
                file.seek(SeekFrom::Start(offset))
                    .map_err(|e| Error::io(path, "cannot seek in image archive", e))?;
                Ok((Box::new(file.take(size)), size))
            }
        }
    }

    /// Read a small file whole; `max` bounds it.
    fn read(&self, name: &str, max: u64) -> Result<Vec<u8>> {
        let (mut r, size) = self.stream(name)?;
        if size > max {
            return Err(Error::Archive {
                what: "image archive",
                input: self.source().display().to_string(),
                reason: format!("{name} is {size} bytes, more than the {max} allowed for it"),
            });
        }
        let mut out = Vec::with_capacity(size as usize);
        r.read_to_end(&mut out)
            .map_err(|e| Error::io(self.source().join(name), "cannot read", e))?;
        Ok(out)
    }

    /// Read a blob named by `desc` and check digest and size.
    fn blob(&self, desc: &Descriptor, what: &'static str, max: u64) -> Result<Vec<u8>> {
        let bytes = self.read(&blob_name(&desc.digest), max)?;
        desc.check(what, &bytes, "the archive is corrupt; copy it again")?;
        Ok(bytes)
    }
}

fn clean(name: &[u8]) -> String {
    crate::unpack::fsroot::normalize(name)
        .to_string_lossy()
        .into_owned()
}

/// `blobs/sha256/<hex>`.
pub fn blob_name(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerSaveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// An image file to extract from.
pub struct Archive {
    files: std::sync::Arc<Files>,
    docker: Option<Vec<DockerSaveEntry>>,
}

impl Archive {
    /// Open an OCI layout directory, an oci-archive tar, or a `docker save` tar.
    pub fn open(path: &Path) -> Result<Archive> {
        let files = Files::open(path)?;
        if files.size("index.json").is_some() && files.size("oci-layout").is_some() {
            return Ok(Archive {
                files: std::sync::Arc::new(files),
                docker: None,
            });
        }
        if files.size("manifest.json").is_some() {
            let bytes = files.read("manifest.json", MAX_MANIFEST_BYTES)?;
            let entries: Vec<DockerSaveEntry> =
                serde_json::from_slice(&bytes).map_err(|e| Error::Archive {
                    what: "docker archive",
                    input: path.display().to_string(),
                    reason: format!("manifest.json is not a docker save manifest: {e}"),
                })?;
            return Ok(Archive {
                files: std::sync::Arc::new(files),
                docker: Some(entries),
            });
        }
        Err(Error::Archive {
            what: "image archive",
            input: path.display().to_string(),
            reason: "neither an OCI image layout (oci-layout, index.json) nor a docker save archive (manifest.json)"
                .to_string(),
        })
    }

    /// Read and verify the image's manifest chain for `platform`.
    pub fn resolve(
        &self,
        platform: &Platform,
        explicit: bool,
        reporter: &dyn Reporter,
    ) -> Result<ResolvedImage> {
        match &self.docker {
            Some(entries) => self.resolve_docker(entries, platform, explicit, reporter),
            None => self.resolve_oci(platform, explicit, reporter),
        }
    }

    fn source_name(&self) -> String {
        self.files.source().display().to_string()
    }

    fn resolve_oci(
        &self,
        platform: &Platform,
        explicit: bool,
        reporter: &dyn Reporter,
    ) -> Result<ResolvedImage> {
        let source = self.source_name();
        let index_json = self.files.read("index.json", MAX_MANIFEST_BYTES)?;
        let Manifest::Index(top) = Manifest::parse(&source, &index_json)? else {
            return Err(Error::unsupported(
                &source,
                "index.json is not an image index",
            ));
        };
        let entry = match top.manifests.as_slice() {
            [] => return Err(Error::unsupported(&source, "index.json lists no image")),
            [only] => only,
            many if many.iter().any(|d| d.platform.is_some()) => top.select(&source, platform)?,
            many => {
                let names: Vec<&str> = many
                    .iter()
                    .filter_map(|d| d.annotations.as_ref()?.get(REF_NAME).map(String::as_str))
                    .collect();
                return Err(Error::unsupported(
                    &source,
                    format!(
                        "holds {} images ({}); hydrafy extract takes a layout with one",
                        many.len(),
                        names.join(", ")
                    ),
                ));
            }
        };
        let ref_name = entry
            .annotations
            .as_ref()
            .and_then(|a| a.get(REF_NAME))
            .cloned();
        let body = self.files.blob(entry, "manifest", MAX_MANIFEST_BYTES)?;
        let (index_digest, manifest_digest, manifest, offered) =
            match Manifest::parse(&source, &body)? {
                Manifest::Index(index) => {
                    let child = index.select(&source, platform)?;
                    let child_body = self.files.blob(child, "manifest", MAX_MANIFEST_BYTES)?;
                    let Manifest::Image(m) = Manifest::parse(&source, &child_body)? else {
                        return Err(Error::unsupported(
                            &source,
                            "an index nested in an index is not supported",
                        ));
                    };
                    (Some(entry.digest), child.digest, m, child.platform.clone())
                }
                Manifest::Image(m) => (None, entry.digest, m, entry.platform.clone()),
            };
        let config_bytes = self
            .files
            .blob(&manifest.config, "config", MAX_CONFIG_BYTES)?;
        let top_digest = index_digest.unwrap_or(manifest_digest);
        let name = match ref_name {
            Some(r) if r.contains('@') => r,
            Some(r) => format!("{r}@{top_digest}"),
            None => format!("{source}@{top_digest}"),
        };
        let resolved = finish_resolve(FinishResolve {
            name,
            top_digest,
            index_digest,
            manifest_digest: Some(manifest_digest),
            manifest,
            config_bytes: &config_bytes,
            offered,
            platform,
            explicit,
            reporter,
        })?;
        for layer in &resolved.manifest.layers {
            if self.files.size(&blob_name(&layer.digest)).is_none() {
                return Err(Error::Archive {
                    what: "image archive",
                    input: source,
                    reason: format!(
                        "layer blob {} is missing; the archive is incomplete, copy it again",
                        layer.digest
                    ),
                });
            }
        }
        Ok(resolved)
    }

    fn resolve_docker(
        &self,
        entries: &[DockerSaveEntry],
        platform: &Platform,
        explicit: bool,
        reporter: &dyn Reporter,
    ) -> Result<ResolvedImage> {
        let source = self.source_name();
        let entry = match entries {
            [only] => only,
            many => {
                return Err(Error::unsupported(
                    &source,
                    format!(
                        "holds {} images; hydrafy extract takes an archive with one",
                        many.len()
                    ),
                ));
            }
        };
        let config_bytes = self.files.read(&entry.config, MAX_CONFIG_BYTES)?;
        let config_digest = Digest::of(&config_bytes);
        // docker save names the config by its digest (the image ID): hold it to that name.
        let stem = Path::new(&entry.config)
            .file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".json").to_string())
            .unwrap_or_default();
        if let Ok(named) = format!("sha256:{stem}").parse::<Digest>()
            && named != config_digest
        {
            return Err(Error::DigestMismatch {
                what: "config",
                expected: named,
                found: config_digest,
                hint: "the archive is corrupt; copy it again",
            });
        }
        let config = manifest::ImageConfig::parse(&source, &config_bytes)?;
        let mut layers = Vec::new();
        for (i, path) in entry.layers.iter().enumerate() {
            let size = self.files.size(path).ok_or_else(|| Error::Archive {
                what: "docker archive",
                input: source.clone(),
                reason: format!(
                    "layer {path} is missing; the archive is incomplete, copy it again"
                ),
            })?;
            let diff_id = config
                .rootfs
                .diff_ids
                .get(i)
                .copied()
                .unwrap_or(config_digest);
            layers.push(Descriptor {
                media_type: "application/vnd.docker.image.rootfs.diff.tar".to_string(),
                digest: diff_id,
                size,
                platform: None,
                urls: None,
                annotations: Some(
                    HashMap::from([("path".to_string(), path.clone())])
                        .into_iter()
                        .collect(),
                ),
            });
        }
        let name = match entry.repo_tags.as_ref().and_then(|t| t.first()) {
            Some(tag) => format!("{tag} (image ID {config_digest})"),
            None => format!("{source} (image ID {config_digest})"),
        };
        finish_resolve(FinishResolve {
            name,
            top_digest: config_digest,
            index_digest: None,
            manifest_digest: None,
            manifest: ImageManifest {
                media_type: "docker-archive".to_string(),
                config: Descriptor {
                    media_type: manifest::media::DOCKER_CONFIG.to_string(),
                    digest: config_digest,
                    size: config_bytes.len() as u64,
                    platform: None,
                    urls: None,
                    annotations: None,
                },
                layers,
            },
            config_bytes: &config_bytes,
            offered: None,
            platform,
            explicit,
            reporter,
        })
    }

    /// Readers for the image's layers, in order. OCI blobs are hashed while
    /// they are unpacked; `docker save` layers are uncompressed tars whose
    /// digest is their diff_id, which the pipeline checks anyway.
    /// Layers flagged in `skip` are left out.
    pub fn layer_inputs(&self, resolved: &ResolvedImage, skip: &[bool]) -> Result<Vec<LayerInput>> {
        let mut inputs = Vec::new();
        for (index, desc) in resolved.manifest.layers.iter().enumerate() {
            if skip.get(index).copied().unwrap_or(false) {
                continue;
            }
            let name = match (&self.docker, &desc.annotations) {
                (Some(_), Some(a)) => a.get("path").cloned().unwrap_or_default(),
                _ => blob_name(&desc.digest),
            };
            let files = std::sync::Arc::clone(&self.files);
            let docker = self.docker.is_some();
            inputs.push(LayerInput {
                index,
                descriptor: desc.clone(),
                diff_id: resolved.config.rootfs.diff_ids[index],
                compression: if docker {
                    Compression::None
                } else {
                    resolved.compression[index]
                },
                open: Box::new(move || files.stream(&name).map(|(reader, _)| reader)),
                verify_blob: !docker,
            });
        }
        Ok(inputs)
    }
}

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
    /// An `index.json` naming one image (`top`) by `ref_name`.
    pub fn index_json(top: &Descriptor, ref_name: &str) -> Vec<u8> {
        let mut entry = serde_json::to_value(Descriptor {
            platform: None,
            urls: None,
            annotations: None,
            ..top.clone()
        })
        .expect("descriptor serialises");
        entry["annotations"] = serde_json::json!({ REF_NAME: ref_name });
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": manifest::media::OCI_INDEX,
            "manifests": [entry],
        });
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
