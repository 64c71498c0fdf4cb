//! `hydrafy extract`: an image file to output directory, offline.
//!
//! The same verification and output rules as `fetch` (every manifest,
//! config, blob and diff_id checked; staging; one atomic publish), with the
//! manifests and blobs read from an OCI layout, an oci-archive or a
//! `docker save` archive instead of a registry. No network client is ever
//! created on this path.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::oci::layout::Archive;
use crate::oci::platform::Platform;
use crate::oci::resolve::ResolvedImage;
use crate::seed::layers::StoreLayers;
use crate::seed::output::{Existing, OutputDir, Staging};
use crate::seed::publish::Summary;
use crate::seed::publish::{SkipPlan, Unpacked, already_holds, finish_output, without_skips};
use crate::seed::state::Layout;
use crate::ui::cancel::Cancel;
use crate::ui::progress::Reporter;
use crate::unpack::apply::{Applier, ApplyOptions};
use crate::unpack::pipeline;

/// Everything `extract` needs to know.
#[derive(Clone, Debug)]
pub struct ExtractOptions {
    /// An OCI layout directory, an oci-archive tar, or a `docker save` tar.
    pub source: PathBuf,
    pub output: PathBuf,
    pub platform: Option<Platform>,
    pub rootfs: bool,
    pub existing: Existing,
}

/// Run `hydrafy extract`.
pub async fn extract(
    opts: &ExtractOptions,
    reporter: Arc<dyn Reporter>,
    cancel: &Cancel,
) -> Result<Summary> {
    let start = Instant::now();
    let layout = Layout::of(opts.rootfs);
    let platform = opts.platform.clone().unwrap_or_else(Platform::host);
    let archive = Archive::open(&opts.source)?;
    let resolved = archive.resolve(&platform, opts.platform.is_some(), &*reporter)?;
    let out = OutputDir::open(&opts.output, opts.existing, layout, &*reporter)?;
    if let Some(summary) = already_holds(&out, &resolved.top_digest, &platform, start)? {
        return Ok(summary);
    }
    out.check_overwrite(&resolved.name)?;
    reporter.info(&resolved.describe());

    let staging = out.stage()?;
    let plan = SkipPlan::new(&out, &resolved)?;
    let apply = ApplyOptions::for_current_user(opts.rootfs);
    let mut attempt = plan.clone();
    let unpacked = loop {
        match unpack_archive(
            &archive, &resolved, &staging, apply, &attempt, &reporter, cancel,
        )
        .await
        {
            Err(Error::SkippedLinkTarget { .. }) if attempt.skips_any() => {
                attempt = without_skips(&resolved, &*reporter);
                staging.reset_rootfs()?;
            }
            other => break other?,
        }
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

/// Unpack the archive's layers into the staging root, as `plan` allows.
async fn unpack_archive(
    archive: &Archive,
    resolved: &ResolvedImage,
    staging: &Staging,
    apply: ApplyOptions,
    plan: &SkipPlan,
    reporter: &Arc<dyn Reporter>,
    cancel: &Cancel,
) -> Result<Unpacked> {
    let layers = archive.layer_inputs(resolved, &plan.layers)?;
    reporter.layer_total(layers.len() as u64);
    let mut applier = Applier::filtered(
        &staging.rootfs(),
        apply,
        StoreLayers::skipping(plan.paths.clone()),
    )?;
    // A failed attempt stops its own decoder, not the run: the caller may retry.
    let (cancel, _link) = cancel.attempt();
    applier.set_cancel(cancel.flag());
    let flag = cancel.flag();
    let unpack_reporter = Arc::clone(reporter);
    let (stats, log, result) = tokio::task::spawn_blocking(move || {
        let result = pipeline::unpack(&mut applier, layers, &flag, &*unpack_reporter)
            .and_then(|()| applier.finish());
        (
            applier.stats().clone(),
            applier.into_filter().take_log(),
            result,
        )
    })
    .await
    .expect("unpack thread panicked");
    result?;
    Ok(Unpacked {
        stats,
        store_layers: plan.store_layers(resolved, log),
        downloaded: 0,
    })
}
