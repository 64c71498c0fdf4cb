//! `hydrafy fetch`: registry to output directory, every byte verified.
//!
//! The order of work is the order of trust. The output directory is locked
//! and inspected first, so that a no-op (DIR already holds the pinned image)
//! costs no network at all and a refusal comes before any download. Then the
//! manifest chain is fetched and verified (index, platform manifest, config),
//! and only then do blobs move: downloads run concurrently into the
//! content-addressed cache, while the unpack pipeline applies the layers in
//! order into a staging folder as soon as each is there. DIR changes only in
//! the final rename, after every digest and diff_id matched.
//!
//! The steps after resolution ([`already_holds`], [`publish_unpacked`],
//! [`finish_resolve`]) are shared with `extract`, which reads the same
//! manifests from a file instead of a registry.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;

use crate::apply::{Applier, ApplyOptions, ApplyStats};
use crate::blobstore::BlobStore;
use crate::cancel::Cancel;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest::{
    self, Compression, Descriptor, ImageConfig, ImageManifest, MAX_CONFIG_BYTES, Manifest,
};
use crate::nixdb::{self, Merge, MergeSummary};
use crate::output::{self, Existing, Holding, OutputDir, Staging};
use crate::platform::Platform;
use crate::progress::Reporter;
use crate::reference::ImageRef;
use crate::registry::{Registry, RegistryOptions};
use crate::state::{ImageRecord, Layout, State, StoreLayer};
use crate::unpack::{self, LayerInput};

/// Everything `fetch` needs to know.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    pub image: String,
    pub output: PathBuf,
    /// `None`: the host's platform.
    pub platform: Option<Platform>,
    pub rootfs: bool,
    pub existing: Existing,
    pub registry: RegistryOptions,
    /// The blob cache; `None` for `--no-cache`.
    pub cache: Option<PathBuf>,
    /// Concurrent downloads.
    pub jobs: usize,
}

/// What a run did, for `--json` and for tests.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// The image, pinned to the digest that was resolved (or the archive it came from).
    pub image: String,
    /// The digest that pins it (index or manifest; the image ID for a `docker save` archive).
    pub digest: Digest,
    pub manifest_digest: Option<Digest>,
    pub index_digest: Option<Digest>,
    pub platform: String,
    pub layers: usize,
    pub bytes_downloaded: u64,
    pub bytes_written: u64,
    pub files: u64,
    pub seconds: f64,
    pub output: PathBuf,
    /// True when DIR already held the image and nothing was done.
    pub unchanged: bool,
    /// For `--merge` into a seed: the store paths added and how many were there already.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merge: Option<MergeSummary>,
}

/// An image whose manifest chain has been fetched (or read) and verified.
#[derive(Clone, Debug)]
pub struct ResolvedImage {
    /// How the image is named in messages and the state file.
    pub name: String,
    /// What pins it: the index or manifest digest (the config digest for a
    /// `docker save` archive, which keeps no manifest).
    pub top_digest: Digest,
    pub index_digest: Option<Digest>,
    pub manifest_digest: Option<Digest>,
    pub manifest: ImageManifest,
    pub config: ImageConfig,
    pub platform: Platform,
    pub compression: Vec<Compression>,
}

impl ResolvedImage {
    /// The state-file record for this image, with the store-only layers
    /// unpacking found.
    pub fn record(&self, store_layers: Vec<StoreLayer>) -> ImageRecord {
        ImageRecord {
            reference: self.name.clone(),
            index_digest: self.index_digest,
            manifest_digest: self.manifest_digest,
            config_digest: self.manifest.config.digest,
            platform: self.platform.to_string(),
            layers: self.manifest.layers.len(),
            store_layers,
        }
    }

    /// A one-line description for progress output.
    pub fn describe(&self) -> String {
        format!(
            "{} for {}: {} layers, {:.1} MB",
            self.name,
            self.platform,
            self.manifest.layers.len(),
            self.manifest.layers.iter().map(|l| l.size).sum::<u64>() as f64 / 1e6
        )
    }
}

/// Fetch the manifest chain of `image` for `platform` from `registry`.
/// `explicit` says whether the user chose the platform (a single-platform
/// image for another one is then an error rather than a warning).
pub async fn resolve(
    registry: &Registry,
    image: &ImageRef,
    platform: &Platform,
    explicit: bool,
    reporter: &dyn Reporter,
) -> Result<ResolvedImage> {
    let name = image.to_string();
    let top = registry
        .manifest(&image.manifest_ref(), image.digest.map(|d| (d, None)))
        .await?;
    let (index_digest, manifest_digest, manifest, offered) =
        match Manifest::parse(&name, &top.bytes)? {
            Manifest::Index(index) => {
                let entry = index.select(&name, platform)?;
                let child = registry
                    .manifest(
                        &entry.digest.to_string(),
                        Some((entry.digest, Some(entry.size))),
                    )
                    .await?;
                let Manifest::Image(m) = Manifest::parse(&name, &child.bytes)? else {
                    return Err(Error::unsupported(
                        &name,
                        "an index nested in an index is not supported",
                    ));
                };
                (Some(top.digest), child.digest, m, entry.platform.clone())
            }
            Manifest::Image(m) => (None, top.digest, m, None),
        };
    let config_bytes = registry
        .blob_bytes(&manifest.config, MAX_CONFIG_BYTES)
        .await?;
    finish_resolve(FinishResolve {
        name: image
            .pinned(index_digest.unwrap_or(manifest_digest))
            .to_string(),
        top_digest: index_digest.unwrap_or(manifest_digest),
        index_digest,
        manifest_digest: Some(manifest_digest),
        manifest,
        config_bytes: &config_bytes,
        offered,
        platform,
        explicit,
        reporter,
    })
}

/// The parts of resolution that do not depend on where manifests come from.
pub struct FinishResolve<'a> {
    pub name: String,
    pub top_digest: Digest,
    pub index_digest: Option<Digest>,
    pub manifest_digest: Option<Digest>,
    pub manifest: ImageManifest,
    /// The config blob, already verified against its descriptor.
    pub config_bytes: &'a [u8],
    /// The platform the index entry named, if the image came from an index.
    pub offered: Option<Platform>,
    pub platform: &'a Platform,
    pub explicit: bool,
    pub reporter: &'a dyn Reporter,
}

/// Parse and cross-check config and layers; shared by every image source.
pub fn finish_resolve(f: FinishResolve<'_>) -> Result<ResolvedImage> {
    let name = f.name;
    let config = ImageConfig::parse(&name, f.config_bytes)?;
    let from_config = Platform {
        os: config.os.clone(),
        arch: config.architecture.clone(),
        variant: config.variant.clone(),
    };
    let platform = f.offered.unwrap_or_else(|| from_config.clone());
    if f.index_digest.is_none() && !config.os.is_empty() && !f.platform.matches(&from_config) {
        let msg = format!("the image is built for {from_config}, not {}", f.platform);
        if f.explicit {
            return Err(Error::unsupported(&name, msg));
        }
        f.reporter
            .warn(&format!("{name}: {msg}; unpacking it anyway"));
    }
    if f.manifest.layers.len() != config.rootfs.diff_ids.len() {
        return Err(Error::unsupported(
            &name,
            format!(
                "the manifest lists {} layers but the config's rootfs.diff_ids has {}; the image is inconsistent",
                f.manifest.layers.len(),
                config.rootfs.diff_ids.len()
            ),
        ));
    }
    let compression = f
        .manifest
        .layers
        .iter()
        .map(|l| manifest::layer_compression(&name, &l.media_type))
        .collect::<Result<Vec<_>>>()?;
    Ok(ResolvedImage {
        name,
        top_digest: f.top_digest,
        index_digest: f.index_digest,
        manifest_digest: f.manifest_digest,
        manifest: f.manifest,
        config,
        platform,
        compression,
    })
}

/// Run `hydrafy fetch`.
pub async fn fetch(
    opts: &FetchOptions,
    reporter: Arc<dyn Reporter>,
    cancel: &Cancel,
) -> Result<Summary> {
    let start = Instant::now();
    let image = ImageRef::parse(&opts.image)?;
    let layout = if opts.rootfs {
        Layout::Rootfs
    } else {
        Layout::Nix
    };
    let platform = opts.platform.clone().unwrap_or_else(Platform::host);
    check_merge(opts.existing, layout)?;
    let out = OutputDir::open(&opts.output, &*reporter)?;
    if let Some(digest) = image.digest
        && let Some(summary) = already_holds(&out, layout, &digest, &platform, start)?
    {
        reporter.info(&format!(
            "{} already holds {image}; nothing to do",
            out.dir().display()
        ));
        return Ok(summary);
    }
    let mut registry = Registry::new(&image, &opts.registry, Arc::clone(&reporter))?;
    if let Some(dir) = &opts.cache {
        registry = registry.with_cache(BlobStore::open(dir)?);
    }
    // A tag alone, and DIR holds an image: one HEAD says whether it is this
    // one, without a manifest GET (the request Docker Hub's rate limit counts).
    if image.digest.is_none() && matches!(out.holding(), Holding::State(_)) {
        let tag = image.manifest_ref();
        let head = tokio::select! {
            r = registry.head_digest(&tag) => r?,
            () = cancel.cancelled() => return Err(Error::Interrupted),
        };
        if let Some(digest) = head
            && let Some(summary) = already_holds(&out, layout, &digest, &platform, start)?
        {
            reporter.warn(&format!(
                "{image} is not pinned; it points at {digest}; pin it as {} so every runner gets the same store",
                image.pinned(digest)
            ));
            reporter.info(&format!(
                "{} already holds it; nothing to do",
                out.dir().display()
            ));
            return Ok(summary);
        }
    }
    out.check_overwrite(opts.existing, &image.to_string())?;

    let resolved = tokio::select! {
        r = resolve(&registry, &image, &platform, opts.platform.is_some(), &*reporter) => r?,
        () = cancel.cancelled() => return Err(Error::Interrupted),
    };
    if image.digest.is_none() {
        reporter.warn(&format!(
            "{image} is not pinned; it resolved to {}; pin it as {} so every runner gets the same store",
            resolved.top_digest,
            image.pinned(resolved.top_digest)
        ));
        if let Some(summary) = already_holds(&out, layout, &resolved.top_digest, &platform, start)?
        {
            reporter.info(&format!(
                "{} already holds it; nothing to do",
                out.dir().display()
            ));
            return Ok(summary);
        }
    }
    reporter.info(&resolved.describe());

    let staging = out.stage()?;
    let store = match &opts.cache {
        Some(dir) => BlobStore::open(dir)?,
        None => BlobStore::open(&staging.path().join("blobs"))?,
    };
    let plan = SkipPlan::new(&out, opts.existing, &resolved)?;
    let registry = Arc::new(registry);
    let apply = ApplyOptions::for_current_user(opts.rootfs);
    let unpack_into = |plan: SkipPlan| {
        let registry = Arc::clone(&registry);
        let (staging, resolved, store, reporter) = (&staging, &resolved, &store, &reporter);
        async move {
            let mut applier = Applier::new(&staging.rootfs(), apply)?;
            applier.skip_store_paths(plan.paths.clone());
            let (stats, log, downloaded) = unpack_from_registry(
                registry,
                resolved,
                store,
                applier,
                &plan.layers,
                opts.jobs,
                reporter,
                cancel,
            )
            .await?;
            Ok::<_, Error>(Unpacked {
                store_layers: plan.store_layers(resolved, log),
                stats,
                downloaded,
            })
        }
    };
    let unpacked = match unpack_into(plan.clone()).await {
        Err(Error::SkippedLinkTarget { .. }) => {
            reporter.info("a new store path hard-links into one the seed already has; unpacking the whole image");
            staging.reset_rootfs()?;
            unpack_into(SkipPlan::none(&resolved)).await?
        }
        other => other?,
    };
    let merged = finish_output(
        &out,
        staging,
        layout,
        &resolved,
        &unpacked,
        plan.merging,
        &*reporter,
        cancel,
    )?;
    reporter.finish();
    let mut summary = summary_of(&resolved, &out, &unpacked.stats, unpacked.downloaded, start);
    summary.merge = merged;
    Ok(summary)
}

/// What unpacking left in the staging root.
pub struct Unpacked {
    pub stats: ApplyStats,
    /// The image's store-only layers, for the state file.
    pub store_layers: Vec<StoreLayer>,
    pub downloaded: u64,
}

/// What a `--merge` need not unpack: the store paths the seed already holds
/// (their entries are read and hashed but not written), and the layers an
/// earlier run recorded as holding nothing but such paths (not even
/// downloaded). Empty when the run does not merge.
#[derive(Clone, Debug)]
pub struct SkipPlan {
    pub merging: bool,
    pub paths: HashSet<OsString>,
    /// One flag per manifest layer.
    pub layers: Vec<bool>,
    known: HashMap<Digest, Vec<String>>,
}

impl SkipPlan {
    /// Nothing skipped.
    pub fn none(resolved: &ResolvedImage) -> SkipPlan {
        SkipPlan {
            merging: false,
            paths: HashSet::new(),
            layers: vec![false; resolved.manifest.layers.len()],
            known: HashMap::new(),
        }
    }

    /// The plan for unpacking `resolved` into `out` under `existing`.
    pub fn new(out: &OutputDir, existing: Existing, resolved: &ResolvedImage) -> Result<SkipPlan> {
        let Holding::State(state) = out.holding() else {
            return Ok(SkipPlan::none(resolved));
        };
        if existing != Existing::Merge {
            return Ok(SkipPlan::none(resolved));
        }
        let paths = present_store_paths(out)?;
        let known = state.store_layers();
        let layers = resolved
            .config
            .rootfs
            .diff_ids
            .iter()
            .map(|d| {
                known
                    .get(d)
                    .is_some_and(|names| names.iter().all(|n| paths.contains(OsStr::new(n))))
            })
            .collect();
        Ok(SkipPlan {
            merging: true,
            paths,
            layers,
            known,
        })
    }

    /// The image's store-only layers: those skipped (as recorded before) and
    /// those the applier logged, in manifest order.
    pub fn store_layers(
        &self,
        resolved: &ResolvedImage,
        mut log: Vec<Option<Vec<String>>>,
    ) -> Vec<StoreLayer> {
        log.reverse();
        let mut out = Vec::new();
        for (diff_id, skipped) in resolved.config.rootfs.diff_ids.iter().zip(&self.layers) {
            let paths = if *skipped {
                self.known.get(diff_id).cloned()
            } else {
                log.pop().flatten()
            };
            if let Some(store_paths) = paths.filter(|p| !p.is_empty()) {
                out.push(StoreLayer {
                    diff_id: *diff_id,
                    store_paths,
                });
            }
        }
        out
    }
}

/// The store paths (`HASH-NAME`) a seed holds, registered and on disk: a
/// `--merge` into it need not write them.
pub fn present_store_paths(out: &OutputDir) -> Result<HashSet<OsString>> {
    let snapshot = nixdb::snapshot(out.dir())?;
    let store = out.dir().join(nixdb::STORE_DIR);
    Ok(snapshot
        .paths
        .iter()
        .map(|p| OsString::from(p.name()))
        .filter(|name| store.join(name).symlink_metadata().is_ok())
        .collect())
}

/// Make DIR hold the unpacked staging root: publish it (a new or replaced
/// tree), or, for `--merge`, move its new store paths into DIR and register
/// them in DIR's database in one transaction.
#[allow(clippy::too_many_arguments)]
pub fn finish_output(
    out: &OutputDir,
    staging: Staging,
    layout: Layout,
    resolved: &ResolvedImage,
    unpacked: &Unpacked,
    merging: bool,
    reporter: &dyn Reporter,
    cancel: &Cancel,
) -> Result<Option<MergeSummary>> {
    let record = resolved.record(unpacked.store_layers.clone());
    if !merging {
        publish_unpacked(out, staging, layout, resolved, record, cancel)?;
        return Ok(None);
    }
    if cancel.is_cancelled() {
        return Err(Error::Interrupted);
    }
    let Holding::State(state) = out.holding() else {
        unreachable!("SkipPlan::new() merges only into a DIR that holds a state");
    };
    let mut merge = Merge::plan(out.dir(), &staging.rootfs(), reporter)?;
    reporter.info(&format!(
        "merging {}: {} new store paths ({:.1} MB), {} already in {}",
        resolved.name,
        merge.missing().len(),
        merge.missing_bytes() as f64 / 1e6,
        merge.already_present(),
        out.dir().display()
    ));
    if cancel.is_cancelled() {
        return Err(Error::Interrupted);
    }
    // New paths go into the store first; a crash after this leaves them
    // unregistered, which Nix ignores. Then one transaction registers them.
    merge.install()?;
    let summary = merge.commit()?;
    let mut state = state.clone();
    state.images.push(record);
    state.write(out.dir())?;
    drop(staging);
    Ok(Some(summary))
}

/// `--merge` adds store paths to a seed: it has no meaning for `--rootfs`.
pub fn check_merge(existing: Existing, layout: Layout) -> Result<()> {
    if existing == Existing::Merge && layout == Layout::Rootfs {
        return Err(Error::invalid(
            "option",
            "--merge",
            "--merge adds store paths to a Nix seed; it cannot be combined with --rootfs",
        ));
    }
    Ok(())
}

/// Turn an unpacked staging root into DIR: the runner seed (or the whole
/// root with `--rootfs`), the state file, one rename.
pub fn publish_unpacked(
    out: &OutputDir,
    staging: Staging,
    layout: Layout,
    resolved: &ResolvedImage,
    record: ImageRecord,
    cancel: &Cancel,
) -> Result<()> {
    if cancel.is_cancelled() {
        return Err(Error::Interrupted);
    }
    let tree = match layout {
        Layout::Nix => {
            let seed = staging.path().join("out");
            output::build_seed(&staging.rootfs(), &seed, &resolved.name)?;
            seed
        }
        Layout::Rootfs => staging.rootfs(),
    };
    State::new(layout, record).write(&tree)?;
    out.publish(staging, &tree)
}

/// The `--json` summary of a run that unpacked `resolved` into `out`.
pub fn summary_of(
    resolved: &ResolvedImage,
    out: &OutputDir,
    stats: &ApplyStats,
    downloaded: u64,
    start: Instant,
) -> Summary {
    Summary {
        image: resolved.name.clone(),
        digest: resolved.top_digest,
        manifest_digest: resolved.manifest_digest,
        index_digest: resolved.index_digest,
        platform: resolved.platform.to_string(),
        layers: resolved.manifest.layers.len(),
        bytes_downloaded: downloaded,
        bytes_written: stats.bytes,
        files: stats.files,
        seconds: start.elapsed().as_secs_f64(),
        output: out.dir().to_path_buf(),
        unchanged: false,
        merge: None,
    }
}

/// The no-op check: does DIR already hold the image `digest` pins?
pub fn already_holds(
    out: &OutputDir,
    layout: Layout,
    digest: &Digest,
    platform: &Platform,
    start: Instant,
) -> Result<Option<Summary>> {
    let Holding::State(state) = out.holding() else {
        return Ok(None);
    };
    let Some(record) = state.find(layout, digest, platform) else {
        return Ok(None);
    };
    if !output::looks_complete(out.dir(), layout) {
        return Err(Error::Output {
            dir: out.dir().to_path_buf(),
            reason: format!(
                "its state file says it holds {} but the tree is incomplete; use --replace to rebuild it",
                record.reference
            ),
        });
    }
    Ok(Some(Summary {
        image: record.reference.clone(),
        digest: *digest,
        manifest_digest: record.manifest_digest,
        index_digest: record.index_digest,
        platform: record.platform.clone(),
        layers: record.layers,
        bytes_downloaded: 0,
        bytes_written: 0,
        files: 0,
        seconds: start.elapsed().as_secs_f64(),
        output: out.dir().to_path_buf(),
        unchanged: true,
        merge: None,
    }))
}

/// Download the image's layers into `store` and unpack them onto `rootfs`,
/// both at once. Returns what was applied and how many bytes came over the wire.
#[allow(clippy::too_many_arguments)]
pub async fn unpack_from_registry(
    registry: Arc<Registry>,
    resolved: &ResolvedImage,
    store: &BlobStore,
    mut applier: Applier,
    skip_layers: &[bool],
    jobs: usize,
    reporter: &Arc<dyn Reporter>,
    cancel: &Cancel,
) -> Result<(ApplyStats, Vec<Option<Vec<String>>>, u64)> {
    let board = Arc::new(BlobBoard::default());
    let layers = layer_inputs(resolved, skip_layers, |desc| {
        let board = Arc::clone(&board);
        let flag = cancel.flag();
        let digest = desc.digest;
        Box::new(move || {
            let path = board.wait(&digest, &flag)?;
            let file = File::open(&path)
                .map_err(|e| Error::io(&path, "cannot open downloaded blob", e))?;
            Ok(Box::new(file) as Box<dyn Read + Send>)
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
        let result = unpack::unpack(&mut applier, layers, &flag, &*unpack_reporter)
            .and_then(|()| applier.finish());
        ((applier.stats().clone(), applier.take_layer_log()), result)
    });
    let downloads = download_all(
        registry,
        store.clone(),
        blobs,
        jobs.max(1),
        Arc::clone(&board),
        Arc::clone(reporter),
        cancel.clone(),
    );
    tokio::pin!(downloads);

    let (stats, unpacked, downloaded) = tokio::select! {
        joined = &mut unpack_task => {
            let (stats, result) = joined.expect("unpack thread panicked");
            let downloaded = if result.is_ok() { downloads.await } else { Err(()) };
            (stats, result, downloaded)
        }
        downloaded = &mut downloads => {
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
            Slot::Failed(_) => None,
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
            async move {
                let result = fetch_blob(&registry, &store, &desc, &*reporter).await;
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
    registry.download_blob(desc, store).await
}

/// Where the decoder thread waits for downloads to land.
#[derive(Default)]
struct BlobBoard {
    slots: Mutex<HashMap<Digest, Slot>>,
    landed: Condvar,
}

enum Slot {
    Ready(PathBuf),
    Failed(Option<Error>),
}

impl BlobBoard {
    fn post(&self, digest: Digest, result: Result<PathBuf>) {
        let slot = match result {
            Ok(path) => Slot::Ready(path),
            Err(e) => Slot::Failed(Some(e)),
        };
        self.slots.lock().expect("board lock").insert(digest, slot);
        self.landed.notify_all();
    }

    fn wait(&self, digest: &Digest, cancel: &AtomicBool) -> Result<PathBuf> {
        let mut slots = self.slots.lock().expect("board lock");
        loop {
            match slots.get(digest) {
                Some(Slot::Ready(path)) => return Ok(path.clone()),
                Some(Slot::Failed(_)) => {
                    return Err(Error::registry(
                        format!("blob {digest}"),
                        "the download failed",
                    ));
                }
                None if cancel.load(Ordering::Relaxed) => return Err(Error::Interrupted),
                None => {}
            }
            slots = self
                .landed
                .wait_timeout(slots, Duration::from_millis(100))
                .expect("board lock")
                .0;
        }
    }

    /// The first download error, if any (given out once).
    fn take_error(&self) -> Option<Error> {
        let mut slots = self.slots.lock().expect("board lock");
        slots.values_mut().find_map(|s| match s {
            Slot::Failed(e) => e.take(),
            Slot::Ready(_) => None,
        })
    }
}
