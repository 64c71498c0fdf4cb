//! `hydrafy fetch`: registry to output directory, every byte verified.
//!
//! The order of work is the order of trust. The output directory is locked
//! and inspected first, so that a no-op (DIR already holds the pinned image)
//! costs no network at all and a refusal comes before any download. Then the
//! manifest chain is fetched and verified (index, platform manifest, config,
//! see [`resolve`]), and only then do blobs move: downloads run
//! concurrently into the content-addressed cache while the unpack pipeline
//! applies the layers in order into a staging folder as soon as each is there
//! ([`crate::blobs::download`]). DIR changes only at the end, after every digest and
//! diff_id matched ([`crate::seed::publish`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::blobs::download::{config_blob, unpack_from_registry};
use crate::blobs::store::BlobStore;
use crate::error::{Error, Result};
use crate::oci::manifest::{MAX_CONFIG_BYTES, Manifest};
use crate::oci::platform::Platform;
use crate::oci::reference::ImageRef;
use crate::oci::resolve::{FinishResolve, ResolvedImage, finish_resolve};
use crate::registry::client::{Registry, RegistryOptions};
use crate::seed::output::{Existing, OutputDir};
use crate::seed::publish::{
    SkipPlan, Summary, Unpacked, already_holds, finish_output, without_skips,
};
use crate::seed::state::Layout;
use crate::ui::cancel::Cancel;
use crate::ui::progress::Reporter;
use crate::unpack::apply::ApplyOptions;
use crate::unpack::pipeline::lanes_for;

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

/// Run `hydrafy fetch`.
pub async fn fetch(
    opts: &FetchOptions,
    reporter: Arc<dyn Reporter>,
    cancel: &Cancel,
) -> Result<Summary> {
    let start = Instant::now();
    let image = ImageRef::parse(&opts.image)?;
    let layout = Layout::of(opts.rootfs);
    let platform = opts.platform.clone().unwrap_or_else(Platform::host);
    let out = OutputDir::open(&opts.output, opts.existing, layout, &*reporter)?;
    if let Some(digest) = image.digest
        && let Some(summary) = already_holds(&out, &digest, &platform, start)?
    {
        return Ok(summary);
    }
    let registry = Registry::new(&image, &opts.registry, Arc::clone(&reporter))?;
    let cache = opts.cache.as_deref().map(BlobStore::open).transpose()?;
    // A tag alone, and DIR holds an image: one HEAD says whether it is this
    // one, without a manifest GET (the request Docker Hub's rate limit counts).
    if image.digest.is_none() && out.has_state() {
        let tag = image.manifest_ref();
        let head = tokio::select! {
            r = registry.head_digest(&tag) => r?,
            () = cancel.cancelled() => return Err(Error::Interrupted),
        };
        if let Some(digest) = head
            && let Some(summary) = already_holds(&out, &digest, &platform, start)?
        {
            reporter.warn(&format!(
                "{image} is not pinned; it points at {digest}; pin it as {} so every runner gets the same store",
                image.pinned(digest)
            ));
            return Ok(summary);
        }
    }
    out.check_overwrite(&image.to_string())?;

    let resolved = tokio::select! {
        r = resolve(&registry, cache.as_ref(), &image, &platform, opts.platform.is_some(), &*reporter) => r?,
        () = cancel.cancelled() => return Err(Error::Interrupted),
    };
    if image.digest.is_none() {
        reporter.warn(&format!(
            "{image} is not pinned; it resolved to {}; pin it as {} so every runner gets the same store",
            resolved.top_digest,
            image.pinned(resolved.top_digest)
        ));
        if let Some(summary) = already_holds(&out, &resolved.top_digest, &platform, start)? {
            return Ok(summary);
        }
    }
    reporter.info(&resolved.describe());

    let staging = out.stage()?;
    let store = match cache {
        Some(cache) => cache,
        None => BlobStore::open(&staging.path().join("blobs"))?,
    };
    let plan = SkipPlan::new(&out, &resolved)?;
    let registry = Arc::new(registry);
    let apply = ApplyOptions::for_current_user(opts.rootfs);
    let unpack_into = |plan: SkipPlan, follow: bool, lanes: usize| {
        let registry = Arc::clone(&registry);
        let (staging, resolved, store, reporter) = (&staging, &resolved, &store, &reporter);
        async move {
            let applier = plan.applier(staging, apply, lanes)?;
            let (stats, mut filter, downloaded) = unpack_from_registry(
                registry,
                resolved,
                store,
                applier,
                &plan.layers,
                opts.jobs,
                follow,
                reporter,
                cancel,
            )
            .await?;
            Ok::<_, Error>(Unpacked {
                store_layers: plan.store_layers(resolved, filter.take_log()),
                stats,
                downloaded,
            })
        }
    };
    // Each retry gives up something the first attempt could do, so at most
    // three follow it.
    let (mut attempt, mut follow, mut lanes) = (plan.clone(), true, lanes_for(opts.rootfs));
    let unpacked = loop {
        match unpack_into(attempt.clone(), follow, lanes).await {
            // Applying in one lane is the reference; it can always be done.
            Err(Error::LanesInterfered { reason }) if lanes > 1 => {
                reporter.info(&format!("applying the layers again, in order: {reason}"));
                lanes = 1;
            }
            Err(Error::SkippedLinkTarget { .. }) if attempt.skips_any() => {
                attempt = without_skips(&resolved, &*reporter);
            }
            Err(Error::SourceReplaced { digest }) if follow => {
                reporter.info(&format!(
                    "blob {digest} was unpacked while a source sent bytes that then failed to verify; unpacking again from verified blobs"
                ));
                follow = false;
            }
            other => break other?,
        }
        staging.reset_rootfs()?;
        reporter.layers_restarted();
    };
    finish_output(
        &out,
        staging,
        &resolved,
        &unpacked,
        plan.merging,
        &*reporter,
        cancel,
        start,
    )
}

/// Fetch the manifest chain of `image` for `platform` from `registry` (its
/// config from `cache` when it holds it).
/// `explicit` says whether the user chose the platform (a single-platform
/// image for another one is then an error rather than a warning).
pub async fn resolve(
    registry: &Registry,
    cache: Option<&BlobStore>,
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
    let config_bytes = config_blob(registry, cache, &manifest.config, MAX_CONFIG_BYTES).await?;
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
