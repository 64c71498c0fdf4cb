//! `hydrafy pull`: a registry image to a file, for hosts that cannot pull.
//!
//! The output is an OCI image layout, as a directory or (when PATH ends in
//! `.tar`) an `oci-archive` that skopeo and podman read. It holds exactly the
//! pinned image: the index or manifest list when the reference pins one, the
//! manifests of the chosen platforms (all with `--all-platforms`), their
//! configs and layers, each verified before it is written under its digest,
//! and `index.json` naming the reference in `org.opencontainers.image.ref.name`.
//! Manifests are kept byte for byte, so the pinned digest verifies on the far
//! side; media types are never converted.
//!
//! With `--have STATE` (the far side's state file, or an earlier archive it
//! extracted) the archive is partial: it leaves out the layers the far side
//! can do without ([`crate::seed::delta`] says which), and its `index.json`
//! says so, so that only `extract --merge` into that seed takes it.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::blobs::download::{config_blob, download_blobs};
use crate::blobs::store::BlobStore;
use crate::error::{Error, RegistryFailure, Result};
use crate::oci::digest::Digest;
use crate::oci::layout::{BlobData, LayoutContent, Partial};
use crate::oci::manifest::{Descriptor, ImageConfig, MAX_CONFIG_BYTES, Manifest};
use crate::oci::platform::Platform;
use crate::oci::reference::ImageRef;
use crate::registry::client::{Registry, RegistryOptions};
use crate::seed::delta::Have;
use crate::ui::cancel::Cancel;
use crate::ui::progress::Reporter;
use crate::ui::words::plural;
use crate::unpack::fsroot;

/// Everything `pull` needs to know.
#[derive(Clone, Debug)]
pub struct PullOptions {
    pub image: String,
    /// `*.tar`: an oci-archive; anything else: an OCI layout directory.
    pub output: PathBuf,
    pub platform: Option<Platform>,
    pub all_platforms: bool,
    pub registry: RegistryOptions,
    pub cache: Option<PathBuf>,
    pub jobs: usize,
    /// Write a `sha256sum`-style line for the archive here.
    pub checksum: Option<PathBuf>,
    /// What the far side holds (its state file, or an earlier archive):
    /// leave out the layers it can do without.
    pub have: Option<PathBuf>,
}

/// What `pull` wrote.
#[derive(Clone, Debug, Serialize)]
pub struct PullSummary {
    pub image: String,
    pub digest: Digest,
    pub output: PathBuf,
    /// `oci-archive` or `oci-layout`.
    pub format: &'static str,
    pub platforms: Vec<String>,
    pub blobs: usize,
    pub bytes: u64,
    pub bytes_downloaded: u64,
    /// The archive's sha256 (archives only).
    pub sha256: Option<String>,
    pub seconds: f64,
    /// The command to run on the air-gapped host.
    pub extract_command: String,
    /// With `--have`: the layers left out, their bytes, and the sha256 of
    /// the STATE they were left out against.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partial_against: Option<String>,
    pub layers_omitted: usize,
    pub bytes_omitted: u64,
}

impl PullSummary {
    /// The line a finished pull ends with: what it wrote, how long it took,
    /// and what to run on the air-gapped host.
    pub fn line(&self) -> String {
        let omitted = if self.partial_against.is_some() {
            format!(
                " ({} {} of {:.1} MB left out: the far side has them)",
                self.layers_omitted,
                plural(self.layers_omitted as u64, "layer"),
                self.bytes_omitted as f64 / 1e6
            )
        } else {
            String::new()
        };
        format!(
            "wrote {} ({}, {}): {}, {} blobs, {:.1} MB{omitted}, in {:.1} s; on the air-gapped host run: {}",
            self.output.display(),
            self.format,
            self.platforms.join(", "),
            self.image,
            self.blobs,
            self.bytes as f64 / 1e6,
            self.seconds,
            self.extract_command
        )
    }
}

/// Run `hydrafy pull`.
pub async fn pull(
    opts: &PullOptions,
    reporter: Arc<dyn Reporter>,
    cancel: &Cancel,
) -> Result<PullSummary> {
    let start = Instant::now();
    let image = ImageRef::parse(&opts.image)?;
    let archive = opts.output.extension().is_some_and(|e| e == "tar");
    if opts.checksum.is_some() && !archive {
        return Err(Error::invalid(
            "option",
            "--checksum",
            "a checksum is written for an archive only; name the output PATH.tar",
        ));
    }
    if !archive && fs::read_dir(&opts.output).is_ok_and(|mut d| d.next().is_some()) {
        return Err(Error::Output {
            dir: opts.output.clone(),
            reason: "exists and is not empty; choose another -o or remove it".to_string(),
        });
    }
    // Before any network work: a bad STATE is named at once.
    let have = match &opts.have {
        Some(path) => Some(read_have(path, &opts.output, cancel, &reporter).await?),
        None => None,
    };
    let platform = opts.platform.clone().unwrap_or_else(Platform::host);
    let registry = Arc::new(Registry::new(
        &image,
        &opts.registry,
        Arc::clone(&reporter),
    )?);
    let cache = opts.cache.as_deref().map(BlobStore::open).transpose()?;
    let name = image.to_string();

    let top_ref = image.manifest_ref();
    let top = tokio::select! {
        r = registry.manifest(&top_ref, image.digest.map(|d| (d, None))) => r?,
        () = cancel.cancelled() => return Err(Error::Interrupted),
    };
    if image.digest.is_none() {
        reporter.warn(&format!(
            "{image} is not pinned; it resolved to {}; pin it as {}",
            top.digest,
            image.pinned(top.digest)
        ));
    }
    let mut small: Vec<(Digest, Vec<u8>)> = Vec::new();
    let mut images: Vec<(Descriptor, Option<Platform>)> = Vec::new();
    let top_media = match Manifest::parse(&name, &top.bytes)? {
        Manifest::Index(index) => {
            let children: Vec<&Descriptor> = if opts.all_platforms {
                index.manifests.iter().collect()
            } else {
                vec![index.select(&name, &platform)?]
            };
            for child in children {
                images.push((child.clone(), child.platform.clone()));
            }
            index.media_type
        }
        Manifest::Image(m) => {
            images.push((
                Descriptor {
                    media_type: m.media_type.clone(),
                    digest: top.digest,
                    size: top.bytes.len() as u64,
                    platform: None,
                    urls: None,
                    annotations: None,
                },
                None,
            ));
            m.media_type
        }
    };
    let top_desc = Descriptor {
        media_type: top_media,
        digest: top.digest,
        size: top.bytes.len() as u64,
        platform: None,
        urls: None,
        annotations: None,
    };
    small.push((top.digest, top.bytes));

    let mut layers = Vec::new();
    let mut diff_ids: HashMap<Digest, Digest> = HashMap::new();
    let mut seen = HashSet::new();
    let mut platforms = Vec::new();
    for (desc, offered) in &images {
        let body = if desc.digest == top_desc.digest {
            small[0].1.clone()
        } else {
            let child = registry
                .manifest(
                    &desc.digest.to_string(),
                    Some((desc.digest, Some(desc.size))),
                )
                .await?;
            small.push((child.digest, child.bytes.clone()));
            child.bytes
        };
        let Manifest::Image(m) = Manifest::parse(&name, &body)? else {
            return Err(Error::unsupported(
                &name,
                "an index nested in an index is not supported",
            ));
        };
        let config = config_blob(&registry, cache.as_ref(), &m.config, MAX_CONFIG_BYTES).await?;
        if let Some(p) = offered {
            platforms.push(p.to_string());
        } else if let Ok(c) = serde_json::from_slice::<serde_json::Value>(&config) {
            platforms.push(format!(
                "{}/{}",
                c["os"].as_str().unwrap_or("?"),
                c["architecture"].as_str().unwrap_or("?")
            ));
        }
        // The far side's records name layers by diff_id, which the config holds.
        if have.is_some() {
            let rootfs = ImageConfig::parse(&name, &config)?.rootfs;
            for (l, d) in m.layers.iter().zip(&rootfs.diff_ids) {
                diff_ids.insert(l.digest, *d);
            }
        }
        if seen.insert(m.config.digest) {
            small.push((m.config.digest, config));
        }
        for l in m.layers {
            if seen.insert(l.digest) {
                layers.push(l);
            }
        }
    }
    let (layers, omitted) = match have {
        Some(have) => leave_out(have, layers, &diff_ids, cancel).await?,
        None => (layers, None),
    };
    if opts.have.is_some() && omitted.is_none() {
        reporter.info("the far side holds none of the image's layers; writing the whole image");
    }
    if let Some((_, left_out)) = &omitted {
        reporter.info(&format!(
            "leaving out {} {} ({:.1} MB) the far side has",
            left_out.len(),
            plural(left_out.len() as u64, "layer"),
            left_out.iter().map(|l| l.size).sum::<u64>() as f64 / 1e6
        ));
    }
    reporter.info(&format!(
        "{} ({}): {} blobs, {:.1} MB",
        image.pinned(top.digest),
        platforms.join(", "),
        small.len() + layers.len(),
        layers.iter().map(|l| l.size).sum::<u64>() as f64 / 1e6
    ));

    // Layers go through the verified cache (or a private temporary store).
    let temp_store = tempfile_dir_beside(&opts.output)?;
    let store = match cache {
        Some(cache) => cache,
        None => BlobStore::open(temp_store.path())?,
    };
    let (paths, downloaded) = download_blobs(
        Arc::clone(&registry),
        &store,
        layers.clone(),
        opts.jobs,
        &reporter,
        cancel,
    )
    .await?;
    if cancel.is_cancelled() {
        return Err(Error::Interrupted);
    }
    let mut blobs: Vec<(Digest, BlobData)> = small
        .into_iter()
        .map(|(d, b)| (d, BlobData::Bytes(b)))
        .collect();
    let mut seen_small: HashSet<Digest> = HashSet::new();
    blobs.retain(|(d, _)| seen_small.insert(*d));
    for l in &layers {
        blobs.push((l.digest, BlobData::File(paths_get(&paths, &l.digest)?)));
    }
    let ref_name = image.pinned(top.digest).to_string();
    let annotations = match &omitted {
        Some((partial, left_out)) => {
            partial.annotations(&left_out.iter().map(|l| l.digest).collect::<Vec<_>>())
        }
        None => Vec::new(),
    };
    let content = LayoutContent {
        index_json: LayoutContent::index_json(&top_desc, &ref_name, &annotations),
        blobs,
    };
    let blob_count = content.blobs.len();

    let (bytes, sha256) = if archive {
        let (digest, size) = write_archive_atomically(&content, &opts.output)?;
        if let Some(sum) = &opts.checksum {
            let file_name = opts
                .output
                .file_name()
                .unwrap_or_default()
                .to_string_lossy();
            let line = format!("{}  {file_name}\n", digest.hex());
            fs::write(sum, line).map_err(|e| Error::io(sum, "cannot write checksum", e))?;
        }
        (size, Some(digest.hex()))
    } else {
        (write_dir_atomically(&content, &opts.output)?, None)
    };
    drop(temp_store);
    let shown = opts.output.display();
    // A partial archive completes the seed it was made against, only by merging.
    let merge = if omitted.is_some() { " --merge" } else { "" };
    let extract_command = match &opts.checksum {
        Some(sum) => format!(
            "sha256sum -c {} && hydrafy extract {shown}{merge} -o nix-backup",
            sum.display()
        ),
        None => format!("hydrafy extract {shown}{merge} -o nix-backup"),
    };
    reporter.finish();
    Ok(PullSummary {
        image: ref_name,
        digest: top.digest,
        output: opts.output.clone(),
        format: if archive { "oci-archive" } else { "oci-layout" },
        platforms,
        blobs: blob_count,
        bytes,
        bytes_downloaded: downloaded,
        sha256,
        seconds: start.elapsed().as_secs_f64(),
        extract_command,
        partial_against: omitted.as_ref().map(|(p, _)| p.against.clone()),
        layers_omitted: omitted.as_ref().map_or(0, |(_, l)| l.len()),
        bytes_omitted: omitted
            .as_ref()
            .map_or(0, |(_, l)| l.iter().map(|l| l.size).sum()),
    })
}

/// Read `--have STATE` off the async threads: an archive may need decompressing.
async fn read_have(
    path: &Path,
    output: &Path,
    cancel: &Cancel,
    reporter: &Arc<dyn Reporter>,
) -> Result<Have> {
    let scratch = match output.parent() {
        Some(p) if p.is_dir() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (path, flag, reporter) = (path.to_path_buf(), cancel.flag(), Arc::clone(reporter));
    tokio::task::spawn_blocking(move || Have::read(&path, &scratch, &flag, &*reporter))
        .await
        .expect("--have thread panicked")
}

/// Split `layers` into those to carry and those the far side has, with
/// what the archive will say of the ones left out.
async fn leave_out(
    have: Have,
    layers: Vec<Descriptor>,
    diff_ids: &HashMap<Digest, Digest>,
    cancel: &Cancel,
) -> Result<(Vec<Descriptor>, Option<(Partial, Vec<Descriptor>)>)> {
    let with_diff: Vec<(Descriptor, Digest)> = layers
        .iter()
        // A layer the config gives no diff_id is named by its blob digest,
        // which no record holds: it is carried.
        .map(|l| {
            (
                l.clone(),
                diff_ids.get(&l.digest).copied().unwrap_or(l.digest),
            )
        })
        .collect();
    let flag = cancel.flag();
    let (have, omits) = tokio::task::spawn_blocking(move || {
        let omits = have.omits(&with_diff, &flag);
        (have, omits)
    })
    .await
    .expect("--have thread panicked");
    let omits = omits?;
    let (mut carried, mut left_out) = (Vec::new(), Vec::new());
    for (l, omit) in layers.into_iter().zip(omits) {
        if omit {
            left_out.push(l);
        } else {
            carried.push(l);
        }
    }
    if left_out.is_empty() {
        // Nothing left out: a whole archive, which any extract takes.
        return Ok((carried, None));
    }
    let partial = Partial {
        against: have.against.to_string(),
        what: have.what,
        omitted: left_out.iter().map(|l| l.digest).collect(),
    };
    Ok((carried, Some((partial, left_out))))
}

fn paths_get(paths: &HashMap<Digest, PathBuf>, digest: &Digest) -> Result<PathBuf> {
    paths.get(digest).cloned().ok_or_else(|| {
        Error::registry(
            format!("blob {digest}"),
            RegistryFailure::Unavailable,
            "was not downloaded",
        )
    })
}

/// A private temporary directory beside `output` (same file system, so
/// blobs can be hard-linked and the final rename is atomic).
fn tempfile_dir_beside(output: &Path) -> Result<TempDir> {
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, "cannot create directory", e))?;
    let name = output.file_name().unwrap_or_default().to_string_lossy();
    let path = parent.join(format!(
        ".{name}.hydrafy-tmp-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    fs::create_dir(&path).map_err(|e| Error::io(&path, "cannot create temporary directory", e))?;
    Ok(TempDir { path })
}

/// A directory removed on drop.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fsroot::remove_tree(&self.path);
    }
}

fn write_archive_atomically(content: &LayoutContent, output: &Path) -> Result<(Digest, u64)> {
    let tmp = tempfile_dir_beside(output)?;
    let part = tmp.path().join("archive.tar");
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(&part)
        .map_err(|e| Error::io(&part, "cannot create archive", e))?;
    let result = content.write_tar(file, output)?;
    fs::rename(&part, output)
        .map_err(|e| Error::io(output, "cannot move the archive into place", e))?;
    Ok(result)
}

fn write_dir_atomically(content: &LayoutContent, output: &Path) -> Result<u64> {
    let tmp = tempfile_dir_beside(output)?;
    let layout = tmp.path().join("layout");
    let bytes = content.write_dir(&layout)?;
    // An empty directory at `output` is replaced by the rename; a non-empty one was refused above.
    fs::rename(&layout, output)
        .map_err(|e| Error::io(output, "cannot move the layout into place", e))?;
    Ok(bytes)
}
