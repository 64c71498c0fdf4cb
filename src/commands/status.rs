//! `hydrafy status DIR`: what a shared seed holds, how big it is, and what
//! `hydrafy gc` would free, without changing anything (not even an atime).
//!
//! It reads what gc reads ([`crate::gc::Survey`]) and plans gc's default
//! run (`--keep-days 14`, no `--max-size`). A seed made by the docker-cp
//! recipe has no state file: it gets everything but the image lines.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use serde::Serialize;

use crate::error::Result;
use crate::gc::{self, Atimes, Policy, Survey, roots, show_bytes, trash};
use crate::seed::state::State;
use crate::ui::progress::Reporter;

/// gc's default `--keep-days`.
pub const DEFAULT_KEEP_DAYS: u32 = 14;

/// What to look at.
#[derive(Clone, Debug)]
pub struct StatusOptions {
    pub dir: PathBuf,
    /// "Now", in Unix seconds (tests move it; `None` is the clock's).
    pub now: Option<i64>,
    pub jobs: usize,
}

/// A number of store entries and their bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Count {
    pub paths: usize,
    pub bytes: u64,
}

/// One image of the state file.
#[derive(Clone, Debug, Serialize)]
pub struct ImageStatus {
    pub reference: String,
    /// The manifest digest (the config digest for a `docker save` archive).
    pub digest: String,
    pub platform: String,
    /// When it was fetched or merged (Unix seconds), if recorded.
    pub recorded_at: Option<u64>,
    /// Its closure in the store now.
    pub closure: Count,
    /// The state file says which store paths it needs.
    pub paths_known: bool,
}

/// What `status` found.
#[derive(Clone, Debug, Serialize)]
pub struct StatusReport {
    pub dir: PathBuf,
    /// DIR has a hydrafy state file (a docker-cp seed has none).
    pub state_file: bool,
    pub images: Vec<ImageStatus>,
    /// Registered store paths, and their NAR sizes.
    pub store: Count,
    /// Registered paths missing from disk (`hydrafy verify` names them).
    pub missing: usize,
    pub kept_by_images: Count,
    pub gc_roots: usize,
    pub kept_by_gc_roots: Count,
    pub used_last_day: Count,
    pub used_last_7_days: Count,
    pub used_last_30_days: Count,
    /// Store paths on disk that are not registered.
    pub unregistered: Count,
    /// Trash folders of gc runs (killed runs leave them; the next gc removes them).
    pub trash: Count,
    pub atimes: Atimes,
    /// Free space on the store's file system.
    pub free_bytes: u64,
    /// What `hydrafy gc DIR` (default options) would delete now.
    pub gc_would_free: Count,
    /// Why gc would refuse to run, if it would.
    pub gc_refuses: Option<String>,
}

/// Look at `opts.dir`.
pub fn status(
    opts: &StatusOptions,
    reporter: &dyn Reporter,
    cancel: &AtomicBool,
) -> Result<StatusReport> {
    let dir = &opts.dir;
    gc::check_dir(dir)?;
    let now = opts.now.unwrap_or_else(gc::unix_now);
    let state = State::read(dir)?;
    let images = roots::images(dir, state.as_ref(), &[]);
    let survey = Survey::take(dir, state, opts.jobs, reporter, cancel)?;
    let scan = &survey.scan;
    let count = |set: &mut dyn Iterator<Item = usize>| {
        set.fold(Count::default(), |c, i| Count {
            paths: c.paths + 1,
            bytes: c.bytes + scan.size(i),
        })
    };

    let mut image_lines = Vec::new();
    for record in survey.state.iter().flat_map(|s| &s.images) {
        let names = roots::image_names(record);
        let closure = gc::plan::closure(scan, &survey.indices(names.iter().map(String::as_str)));
        image_lines.push(ImageStatus {
            reference: record.reference.clone(),
            digest: record
                .manifest_digest
                .unwrap_or(record.config_digest)
                .to_string(),
            platform: record.platform.clone(),
            recorded_at: record.recorded_at,
            closure: count(&mut closure.into_iter()),
            paths_known: !names.is_empty(),
        });
    }

    let policy = Policy {
        keep_days: DEFAULT_KEEP_DAYS,
        max_size: None,
        now,
    };
    let no_images = roots::Images {
        kept: Vec::new(),
        dropped: Vec::new(),
    };
    let (plan, gc_refuses) = match &images {
        Ok(images) => (survey.plan(images, &policy), None),
        Err(e) => (
            survey.plan(&no_images, &policy),
            Some(crate::error::report(e)),
        ),
    };
    let n = scan.paths.len();
    let used_since = |days: i64| {
        let since = now - days * 86_400;
        count(&mut (0..n).filter(|&i| plan.last_used[i] >= since))
    };
    let would_free = if gc_refuses.is_some() {
        Count::default()
    } else {
        let entries = plan
            .unregistered
            .iter()
            .filter(|&&u| !scan.unregistered[u].lock_file);
        let mut c = count(&mut plan.victims.iter().copied());
        for &u in entries {
            c.paths += 1;
            c.bytes += scan.unregistered[u].entry.bytes;
        }
        c
    };
    let unregistered =
        scan.unregistered
            .iter()
            .filter(|u| !u.lock_file)
            .fold(Count::default(), |c, u| Count {
                paths: c.paths + 1,
                bytes: c.bytes + u.entry.bytes,
            });
    let trash = trash::leftovers(&survey.trash_home)?
        .iter()
        .fold(Count::default(), |c, t| Count {
            paths: c.paths + 1,
            bytes: c.bytes + trash::size_of(&t.path),
        });
    Ok(StatusReport {
        dir: dir.clone(),
        state_file: survey.state.is_some(),
        images: image_lines,
        store: count(&mut (0..n)),
        missing: scan.paths.iter().filter(|e| !e.present).count(),
        kept_by_images: count(&mut (0..n).filter(|&i| plan.kept[i].image)),
        gc_roots: survey.gc_roots.len(),
        kept_by_gc_roots: count(&mut (0..n).filter(|&i| plan.kept[i].root)),
        used_last_day: used_since(1),
        used_last_7_days: used_since(7),
        used_last_30_days: used_since(30),
        unregistered,
        trash,
        atimes: scan.atimes,
        free_bytes: scan.free_bytes,
        gc_would_free: would_free,
        gc_refuses,
    })
}

impl StatusReport {
    /// The report for people, one fact a line.
    pub fn render(&self) -> String {
        let c = |c: &Count| format!("{} paths, {}", c.paths, show_bytes(c.bytes));
        let mut out = Vec::new();
        out.push(format!("seed:               {}", self.dir.display()));
        if !self.state_file {
            out.push(
                "images:             none recorded (no hydrafy state file; a docker-cp seed)"
                    .to_string(),
            );
        }
        for img in &self.images {
            let when = img.recorded_at.map_or("when unknown".to_string(), |t| {
                format!(
                    "recorded {}",
                    httpdate::fmt_http_date(
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(t)
                    )
                )
            });
            let known = if img.paths_known {
                String::new()
            } else {
                " (store paths not recorded)".to_string()
            };
            out.push(format!(
                "image:              {} ({}, {}), {when}; closure {}{known}",
                img.reference,
                img.platform,
                img.digest,
                c(&img.closure)
            ));
        }
        out.push(format!("store:              {}", c(&self.store)));
        if self.missing > 0 {
            out.push(format!(
                "missing:            {} registered paths are not on disk (run `hydrafy verify`)",
                self.missing
            ));
        }
        out.push(format!("kept by images:     {}", c(&self.kept_by_images)));
        out.push(format!(
            "kept by gc roots:   {} (from {} roots)",
            c(&self.kept_by_gc_roots),
            self.gc_roots
        ));
        out.push(format!("used, last day:     {}", c(&self.used_last_day)));
        out.push(format!("used, last 7 days:  {}", c(&self.used_last_7_days)));
        out.push(format!(
            "used, last 30 days: {}",
            c(&self.used_last_30_days)
        ));
        out.push(format!("unregistered:       {}", c(&self.unregistered)));
        out.push(format!(
            "trash:              {} folders, {}",
            self.trash.paths,
            show_bytes(self.trash.bytes)
        ));
        let atimes = match self.atimes {
            Atimes::Exact => "atimes: exact",
            Atimes::Daily => "atimes: relatime (a read shows within a day)",
            Atimes::Off => "noatime: only registration times count as use",
        };
        out.push(format!(
            "free space:         {} ({atimes})",
            show_bytes(self.free_bytes)
        ));
        match &self.gc_refuses {
            None => out.push(format!(
                "gc would free:      {} (default options: --keep-days {DEFAULT_KEEP_DAYS})",
                c(&self.gc_would_free)
            )),
            Some(why) => out.push(format!("gc would refuse:    {why}")),
        }
        out.join("\n")
    }
}
