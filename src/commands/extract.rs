//! `hydrafy extract`: an image file to output directory, offline.
//!
//! The same verification and output rules as `fetch` (every manifest,
//! config, blob and diff_id checked; staging; one atomic publish), with the
//! manifests and blobs read from an OCI layout, an oci-archive or a
//! `docker save` archive (any of them compressed) instead of a registry. No
//! network client is ever created on this path. `--list` shows what a file
//! holds, and the SOURCE that picks each image.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::oci::layout::{Archive, Listing, Partial};
use crate::oci::platform::Platform;
use crate::oci::resolve::ResolvedImage;
use crate::oci::source::SourceName;
use crate::seed::output::{Existing, OutputDir, Staging, check_options};
use crate::seed::publish::Summary;
use crate::seed::publish::{SkipPlan, Unpacked, already_holds, finish_output, without_skips};
use crate::seed::state::{Layout, STATE_FILE};
use crate::ui::cancel::Cancel;
use crate::ui::progress::Reporter;
use crate::ui::words::{plural, shell_word};
use crate::unpack::apply::ApplyOptions;
use crate::unpack::pipeline::{self, lanes_for};

/// Everything `extract` needs to know.
#[derive(Clone, Debug)]
pub struct ExtractOptions {
    /// An OCI layout directory, an oci-archive tar, or a `docker save` tar,
    /// and which image of it.
    pub source: SourceName,
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
    // Before any work: the file may take long to decompress.
    check_options(opts.existing, layout)?;
    // A compressed file is decompressed beside the output, where its room is.
    let archive = open_archive(
        &opts.source,
        &scratch_dir(&opts.output),
        cancel.flag(),
        &reporter,
    )
    .await
    .map_err(|e| with_output(e, opts))?;
    let resolved = archive
        .resolve(&platform, opts.platform.is_some(), &*reporter)
        .map_err(|e| with_output(e, opts))?;
    if let Some(partial) = archive.partial()
        && opts.existing != Existing::Merge
    {
        return Err(partial_refused(opts, partial));
    }
    let out = OutputDir::open(&opts.output, opts.existing, layout, &*reporter)?;
    if let Some(summary) = already_holds(&out, &resolved.top_digest, &platform, start)? {
        return Ok(summary);
    }
    out.check_overwrite(&resolved.name)?;
    reporter.info(&resolved.describe());

    let staging = out.stage()?;
    let plan = SkipPlan::new(&out, &resolved)?;
    let apply = ApplyOptions::for_current_user(opts.rootfs);
    let (mut attempt, mut lanes) = (plan.clone(), lanes_for(opts.rootfs));
    let lacks = format!("{} does not hold all its store paths", out.dir().display());
    needed_omitted(&archive, &resolved, &plan.layers, &lacks)?;
    let unpacked = loop {
        match unpack_archive(
            &archive, &resolved, &staging, apply, &attempt, lanes, &reporter, cancel,
        )
        .await
        {
            // Applying in one lane is the reference; it can always be done.
            Err(Error::LanesInterfered { reason }) if lanes > 1 => {
                reporter.info(&format!("applying the layers again, in order: {reason}"));
                lanes = 1;
                staging.reset_rootfs()?;
            }
            Err(Error::SkippedLinkTarget { layer, entry }) if attempt.skips_any() => {
                // Unpacking it all again needs every layer, the omitted ones too.
                let none = vec![false; resolved.manifest.layers.len()];
                let why = format!(
                    "layer {layer}'s entry {entry:?} hard-links into one of its files, so the whole image must be unpacked"
                );
                needed_omitted(&archive, &resolved, &none, &why)?;
                attempt = without_skips(&resolved, &*reporter);
                staging.reset_rootfs()?;
            }
            other => break other?,
        }
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

/// A partial archive (`pull --have`) is refused without `--merge`: it holds
/// only what the seed it was made against lacks.
fn partial_refused(opts: &ExtractOptions, partial: &Partial) -> Error {
    let mut command = format!(
        "hydrafy extract {} --merge -o DIR",
        shell_word(&opts.source.to_string())
    );
    if let Some(p) = &opts.platform {
        command.push_str(&format!(" --platform {p}"));
    }
    Error::Archive {
        what: "partial archive",
        input: opts.source.path.display().to_string(),
        reason: format!(
            "leaves out {} {} (made by `pull --have` against {}, {}); merge it into that seed: `{command}`",
            partial.omitted.len(),
            plural(partial.omitted.len() as u64, "layer"),
            partial.what,
            partial.against
        ),
    }
}

/// Fail when a layer the partial archive left out is one that must be
/// unpacked (`skip` does not skip it), `why` in words: the seed lacks some
/// store path it holds (it is not the seed the archive was made against, or
/// lost paths since), or a new path hard-links into it.
fn needed_omitted(
    archive: &Archive,
    resolved: &ResolvedImage,
    skip: &[bool],
    why: &str,
) -> Result<()> {
    let Some(partial) = archive.partial() else {
        return Ok(());
    };
    let needed = resolved
        .manifest
        .layers
        .iter()
        .zip(skip)
        .find(|(l, skip)| !**skip && partial.omitted.contains(&l.digest));
    let Some((layer, _)) = needed else {
        return Ok(());
    };
    Err(Error::Archive {
        what: "partial archive",
        input: archive_path(archive),
        reason: format!(
            "layer {} was left out (the archive was made against {}), but it is needed: {why}; pull the image again without --have, or with --have the state file of this seed ({STATE_FILE})",
            layer.digest, partial.what,
        ),
    })
}

fn archive_path(archive: &Archive) -> String {
    archive.source().display().to_string()
}

/// Unpack the archive's layers into the staging root, as `plan` allows.
#[allow(clippy::too_many_arguments)]
async fn unpack_archive(
    archive: &Archive,
    resolved: &ResolvedImage,
    staging: &Staging,
    apply: ApplyOptions,
    plan: &SkipPlan,
    lanes: usize,
    reporter: &Arc<dyn Reporter>,
    cancel: &Cancel,
) -> Result<Unpacked> {
    let layers = archive.layer_inputs(resolved, &plan.layers)?;
    reporter.layer_total(layers.len() as u64);
    let mut applier = plan.applier(staging, apply, lanes)?;
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

/// `hydrafy extract SOURCE --list`: what the file holds. A compressed file
/// is decompressed where `extract` with these options would do it.
pub async fn list(
    opts: &ExtractOptions,
    reporter: Arc<dyn Reporter>,
    cancel: &Cancel,
) -> Result<Listing> {
    let scratch = scratch_dir(&opts.output);
    let archive = open_archive(&opts.source, &scratch, cancel.flag(), &reporter).await?;
    archive.list()
}

/// Where a compressed image file is decompressed: the output's parent, or
/// the nearest directory above it that exists (a failed run creates nothing).
fn scratch_dir(output: &Path) -> PathBuf {
    let mut dir = output.to_path_buf();
    loop {
        dir = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => return PathBuf::from("."),
        };
        if dir.is_dir() {
            return dir;
        }
    }
}

/// Open the image file off the async threads: decompressing takes a while.
async fn open_archive(
    source: &SourceName,
    scratch: &Path,
    cancel: Arc<AtomicBool>,
    reporter: &Arc<dyn Reporter>,
) -> Result<Archive> {
    let (source, scratch) = (source.clone(), scratch.to_path_buf());
    let reporter = Arc::clone(reporter);
    tokio::task::spawn_blocking(move || Archive::open(&source, &scratch, &cancel, &*reporter))
        .await
        .expect("archive thread panicked")
}

/// Complete the command a "several images" error suggests with this run's options.
fn with_output(err: Error, opts: &ExtractOptions) -> Error {
    match err {
        Error::SeveralImages {
            file,
            images,
            command,
        } => {
            let mut command = format!(
                "{command} -o {}",
                shell_word(&opts.output.display().to_string())
            );
            if let Some(p) = &opts.platform {
                command.push_str(&format!(" --platform {p}"));
            }
            if opts.rootfs {
                command.push_str(" --rootfs");
            }
            match opts.existing {
                Existing::Replace => command.push_str(" --replace"),
                Existing::Merge => command.push_str(" --merge"),
                Existing::Refuse => {}
            }
            Error::SeveralImages {
                file,
                images,
                command,
            }
        }
        other => other,
    }
}
