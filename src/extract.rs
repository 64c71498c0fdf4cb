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

use crate::apply::{Applier, ApplyOptions};
use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::fetch::{Summary, already_holds, check_merge, publish_unpacked, summary_of};
use crate::layout::Archive;
use crate::output::{Existing, OutputDir};
use crate::platform::Platform;
use crate::progress::Reporter;
use crate::state::Layout;
use crate::unpack;

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
    let layout = if opts.rootfs {
        Layout::Rootfs
    } else {
        Layout::Nix
    };
    let platform = opts.platform.clone().unwrap_or_else(Platform::host);
    check_merge(opts.existing)?;
    let archive = Archive::open(&opts.source)?;
    let resolved = archive.resolve(&platform, opts.platform.is_some(), &*reporter)?;
    let out = OutputDir::open(&opts.output, &*reporter)?;
    if let Some(summary) = already_holds(&out, layout, &resolved.top_digest, &platform, start)? {
        reporter.info(&format!(
            "{} already holds {}; nothing to do",
            out.dir().display(),
            resolved.name
        ));
        return Ok(summary);
    }
    out.check_overwrite(opts.existing, &resolved.name)?;
    reporter.info(&resolved.describe());

    let staging = out.stage()?;
    let layers = archive.layer_inputs(&resolved)?;
    reporter.layer_total(layers.len() as u64);
    let mut applier = Applier::new(
        &staging.rootfs(),
        ApplyOptions::for_current_user(opts.rootfs),
    )?;
    applier.set_cancel(cancel.flag());
    let flag = cancel.flag();
    let unpack_reporter = Arc::clone(&reporter);
    let (stats, result) = tokio::task::spawn_blocking(move || {
        let result = unpack::unpack(&mut applier, layers, &flag, &*unpack_reporter)
            .and_then(|()| applier.finish());
        (applier.stats().clone(), result)
    })
    .await
    .map_err(|e| {
        Error::registry(
            opts.source.display().to_string(),
            format!("unpack thread failed: {e}"),
        )
    })?;
    result?;
    publish_unpacked(&out, staging, layout, &resolved, cancel)?;
    reporter.finish();
    Ok(summary_of(&resolved, &out, &stats, 0, start))
}
