//! Making DIR hold an unpacked image: publish, or merge into a seed.
//!
//! After the layers are in a staging root, one of two things happens: the
//! root (or the Nix seed cut from it) replaces DIR in one rename, or, for
//! `--merge`, its new store paths are moved into DIR's store and registered in
//! DIR's database in one transaction. This module also decides what a merge
//! may leave out ([`SkipPlan`]), and answers the no-op question ("does DIR
//! already hold this image?") before any work starts. `fetch` and `extract`
//! share all of it.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::nix::db::{self, Merge, MergeSummary};
use crate::oci::digest::Digest;
use crate::oci::platform::Platform;
use crate::oci::resolve::ResolvedImage;
use crate::seed::layers::StoreLayers;
use crate::seed::output::{self, Existing, Holding, OutputDir, Staging};
use crate::seed::state::{ImageRecord, Layout, State, StoreLayer};
use crate::ui::cancel::Cancel;
use crate::ui::progress::Reporter;
use crate::ui::words::{plural, shell_word};
use crate::unpack::apply::{Applier, ApplyOptions, ApplyStats};

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
    /// The store paths in DIR's store after the run; `None` for `--rootfs`
    /// and for a run that changed nothing. For [`Summary::line`] only: the
    /// `--json` object keeps its fields.
    #[serde(skip)]
    pub store_paths: Option<u64>,
    /// DIR was absent or empty before the run, so the line shows the next step.
    #[serde(skip)]
    pub first: bool,
}

/// What to run after the first fetch into DIR, shown at the end of that run.
const NEXT_STEP: &str =
    "hydrafy runner-config --config /etc/gitlab-runner/config.toml --nix-backup";

impl Summary {
    /// The line a finished run ends with: what DIR holds now (image, store
    /// paths, bytes and files written), how long the run took, and, when DIR
    /// was new and holds a seed, the next step.
    pub fn line(&self) -> String {
        let dir = self.output.display();
        let image = format!("{} ({})", self.image, self.platform);
        if self.unchanged {
            return format!("{dir} already holds {image}; nothing to do");
        }
        let written = format!(
            "{:.1} MB in {} {}",
            self.bytes_written as f64 / 1e6,
            self.files,
            plural(self.files, "file")
        );
        let took = format!("in {:.1} s", self.seconds);
        let Some(paths) = self.store_paths else {
            return format!("{dir} now holds the filesystem of {image}: {written}, {took}");
        };
        let mut line = match &self.merge {
            Some(merge) => format!(
                "{dir} now holds {paths} {}: merged {image}, {} new ({written}), {} already there, {took}",
                plural(paths, "store path"),
                merge.added.len(),
                merge.already_present
            ),
            None => format!(
                "{dir} now holds {image}: {paths} {}, {written}, {took}",
                plural(paths, "store path")
            ),
        };
        if self.first {
            line.push_str(&format!(
                "; next: {NEXT_STEP} {}",
                shell_word(&dir.to_string())
            ));
        }
        line
    }
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
    /// An applier onto `staging`'s root that leaves out what the plan
    /// skips, in `lanes` lanes.
    pub fn applier(
        &self,
        staging: &Staging,
        apply: ApplyOptions,
        lanes: usize,
    ) -> Result<Applier<StoreLayers>> {
        let mut applier = Applier::filtered(
            &staging.rootfs(),
            apply,
            StoreLayers::skipping(self.paths.clone()),
        )?;
        applier.set_lanes(lanes);
        Ok(applier)
    }

    /// Nothing skipped.
    pub fn none(resolved: &ResolvedImage) -> SkipPlan {
        SkipPlan {
            merging: false,
            paths: HashSet::new(),
            layers: vec![false; resolved.manifest.layers.len()],
            known: HashMap::new(),
        }
    }

    /// Does the plan leave out any path or layer?
    pub fn skips_any(&self) -> bool {
        !self.paths.is_empty() || self.layers.contains(&true)
    }

    /// The plan for unpacking `resolved` into `out`.
    pub fn new(out: &OutputDir, resolved: &ResolvedImage) -> Result<SkipPlan> {
        if out.existing() != Existing::Merge {
            return Ok(SkipPlan::none(resolved));
        }
        let known = match out.holding() {
            Holding::State(state) => state.store_layers(),
            // A seed hydrafy did not write: no layer is known to be skippable.
            Holding::Foreign if out.holds_nix_seed() => HashMap::new(),
            Holding::Foreign | Holding::Nothing => return Ok(SkipPlan::none(resolved)),
        };
        let paths = present_store_paths(out)?;
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
    let snapshot = db::snapshot(out.dir())?;
    let store = out.dir().join(db::STORE_DIR);
    Ok(snapshot
        .paths
        .iter()
        .map(|p| OsString::from(p.name()))
        .filter(|name| store.join(name).symlink_metadata().is_ok())
        .collect())
}

/// The plan for unpacking again after [`Error::SkippedLinkTarget`]: a new
/// store path hard-links into one the seed has, so nothing is skipped.
pub fn without_skips(resolved: &ResolvedImage, reporter: &dyn Reporter) -> SkipPlan {
    reporter.info(
        "a new store path hard-links into one the seed already has; unpacking the whole image",
    );
    SkipPlan::none(resolved)
}

/// Make DIR hold the unpacked staging root (see [`merge_or_publish`]) and
/// sum up the run that began at `start`.
#[allow(clippy::too_many_arguments)]
pub fn finish_output(
    out: &OutputDir,
    staging: Staging,
    resolved: &ResolvedImage,
    unpacked: &Unpacked,
    merging: bool,
    reporter: &dyn Reporter,
    cancel: &Cancel,
    start: Instant,
) -> Result<Summary> {
    let first = matches!(out.holding(), Holding::Nothing);
    let merged = merge_or_publish(out, staging, resolved, unpacked, merging, reporter, cancel)?;
    reporter.finish();
    let mut summary = summary_of(resolved, out, &unpacked.stats, unpacked.downloaded, start);
    summary.merge = merged;
    summary.first = first;
    summary.store_paths = match out.layout() {
        Layout::Nix => Some(output::store_path_count(out.dir())),
        Layout::Rootfs => None,
    };
    Ok(summary)
}

/// Publish the staging root (a new or replaced tree), or, for `--merge`,
/// move its new store paths into DIR and register them in DIR's database in
/// one transaction.
#[allow(clippy::too_many_arguments)]
fn merge_or_publish(
    out: &OutputDir,
    staging: Staging,
    resolved: &ResolvedImage,
    unpacked: &Unpacked,
    merging: bool,
    reporter: &dyn Reporter,
    cancel: &Cancel,
) -> Result<Option<MergeSummary>> {
    let mut record = ImageRecord::new(resolved, unpacked.store_layers.clone());
    // What gc keeps for this image: its database's paths (a rootfs has one too).
    record.store_paths = db::snapshot(&staging.rootfs())
        .map(|snap| snap.paths.iter().map(|p| p.name().to_string()).collect())
        .unwrap_or_default();
    if !merging {
        publish_unpacked(out, staging, resolved, record, cancel)?;
        return Ok(None);
    }
    if cancel.is_cancelled() {
        return Err(Error::Interrupted);
    }
    if !out.has_state() {
        reporter.info(&format!(
            "{} was not written by hydrafy; merging into its Nix store and database, keeping all of both",
            out.dir().display()
        ));
    }
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
    // Read the state file again rather than use what DIR held when the run
    // began: a `hydrafy gc --drop-image` may have released an image since.
    // From now on DIR is a seed hydrafy knows, holding this image among others.
    let prior = State::read(out.dir())?;
    State::merged(prior.as_ref(), record).write(out.dir())?;
    drop(staging);
    Ok(Some(summary))
}

/// `--merge` adds store paths to a seed: it has no meaning for `--rootfs`.
/// Turn an unpacked staging root into DIR: the runner seed (or the whole
/// root with `--rootfs`), the state file, one rename.
pub fn publish_unpacked(
    out: &OutputDir,
    staging: Staging,
    resolved: &ResolvedImage,
    record: ImageRecord,
    cancel: &Cancel,
) -> Result<()> {
    if cancel.is_cancelled() {
        return Err(Error::Interrupted);
    }
    let layout = out.layout();
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
fn summary_of(
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
        store_paths: None,
        first: false,
    }
}

/// The summary of a run that found DIR already holding the image `digest`
/// pins (see [`OutputDir::holds`]), or `None`.
pub fn already_holds(
    out: &OutputDir,
    digest: &Digest,
    platform: &Platform,
    start: Instant,
) -> Result<Option<Summary>> {
    let Some(record) = out.holds(digest, platform)? else {
        return Ok(None);
    };
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
        store_paths: None,
        first: false,
    }))
}
