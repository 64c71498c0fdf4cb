//! `hydrafy gc DIR`: shrink a shared store while the runners keep running.
//!
//! A seed only grows: jobs add every build, `fetch --merge` every new
//! image. Nix's own collector cannot help: job containers do not share
//! `gcroots` or `temproots`, so a collection from one job cannot see what
//! the others use. This one runs on the host, knows what DIR
//! was built from, and reads use from the store itself:
//!
//! - **kept**: the closure of every image in DIR's state file (unless
//!   `--drop-image`), of every root under `nix/var/nix/gcroots` (and
//!   `profiles`), and of every path used since `--keep-days` (default 14)
//!   or the last hour, whichever is longer. "Used" is registered, added to
//!   the store, or read (see [`plan`] and [`scan`]);
//! - **goes**: everything else, least recently used first, until the store
//!   fits `--max-size` (all of it without one); unregistered leftovers older
//!   than an hour whose lock is free; `.links` entries nothing else links;
//! - **how**: plan without locks, then the short locked part in [`execute`],
//!   then delete the [`trash`] at leisure.
//!
//! `--dry-run` stops after the plan and lists what would go.

pub mod execute;
pub mod plan;
pub mod roots;
pub mod scan;
pub mod trash;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::nix::db;
use crate::nix::store_path::STORE_PREFIX;
use crate::seed::state::State;
use crate::ui::progress::Reporter;

pub use execute::Skipped;
pub use plan::Policy;
pub use scan::Atimes;

/// What to collect.
#[derive(Clone, Debug)]
pub struct GcOptions {
    /// The seed: holds `nix/store` and `nix/var/nix/db`.
    pub dir: PathBuf,
    pub keep_days: u32,
    /// Bytes; `None` deletes everything that may go.
    pub max_size: Option<u64>,
    /// References or digests of recorded images to release.
    pub drop_images: Vec<String>,
    pub dry_run: bool,
    /// How long to wait for the big lock.
    pub wait: Duration,
    /// "Now", in Unix seconds (tests move it; `None` is the clock's).
    pub now: Option<i64>,
    /// Threads that scan the store.
    pub jobs: usize,
}

/// One store entry that went (or, with `--dry-run`, would go).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Deleted {
    pub path: String,
    pub bytes: u64,
    /// A registered path (else an unregistered leftover).
    pub registered: bool,
}

/// What a gc did.
#[derive(Clone, Debug, Serialize)]
pub struct GcReport {
    pub dir: PathBuf,
    pub dry_run: bool,
    pub keep_days: u32,
    pub max_size: Option<u64>,
    /// The store's size (NAR sizes of valid paths plus unregistered entries) before and after.
    pub store_bytes_before: u64,
    pub store_bytes_after: u64,
    /// Largest first.
    pub deleted: Vec<Deleted>,
    pub deleted_paths: usize,
    pub deleted_bytes: u64,
    pub links_removed: usize,
    pub links_bytes: u64,
    /// Paths the plan chose that stayed, and why.
    pub skipped: Vec<Skipped>,
    /// Paths unregistered but not moved out of the store (an I/O error,
    /// reported); the next gc removes them as unregistered entries.
    pub stranded: Vec<String>,
    /// How far the store stays over `--max-size`.
    pub over_budget_by: Option<u64>,
    /// Images the state file no longer records.
    pub dropped_images: Vec<String>,
    /// Trash folders left by killed runs, removed.
    pub old_trash_removed: usize,
    pub atimes: Atimes,
    pub seconds: f64,
    pub lock_wait_seconds: f64,
    /// How long the Nix store lock was held exclusively.
    pub lock_held_seconds: f64,
}

impl GcReport {
    /// The lines for stdout: with `--dry-run` the list, largest first, then the sum.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.dry_run {
            for d in &self.deleted {
                let tag = if d.registered { "" } else { "  (unregistered)" };
                out.push(format!("{:>10}  {}{tag}", show_bytes(d.bytes), d.path));
            }
            out.push(format!(
                "would delete {} store entries, {}; the store would go from {} to {}",
                self.deleted.len(),
                show_bytes(self.deleted_bytes),
                show_bytes(self.store_bytes_before),
                show_bytes(self.store_bytes_after)
            ));
        } else {
            let links = if self.links_removed > 0 {
                format!(" and {} unused .links entries", self.links_removed)
            } else {
                String::new()
            };
            out.push(format!(
                "deleted {} store entries{links}, {}, in {:.2} s; held the Nix store lock for \
                 {:.1} ms; the store went from {} to {}",
                self.deleted.len(),
                show_bytes(self.deleted_bytes),
                self.seconds,
                self.lock_held_seconds * 1e3,
                show_bytes(self.store_bytes_before),
                show_bytes(self.store_bytes_after)
            ));
        }
        out
    }
}

/// The clock, in Unix seconds.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// DIR must hold a Nix database of a schema hydrafy knows.
pub fn check_dir(dir: &Path) -> Result<()> {
    if !db::db_file(dir).is_file() {
        return Err(Error::invalid(
            "directory",
            dir.display().to_string(),
            "holds no nix/var/nix/db/db.sqlite; give the folder `hydrafy fetch` wrote (e.g. ./nix-backup)",
        ));
    }
    db::check_schema(dir)?;
    Ok(())
}

/// Progress lines at most every two seconds.
pub struct Ticker<'a> {
    reporter: &'a dyn Reporter,
    last: Mutex<Instant>,
    what: &'static str,
}

impl<'a> Ticker<'a> {
    pub fn new(reporter: &'a dyn Reporter, what: &'static str) -> Ticker<'a> {
        Ticker {
            reporter,
            last: Mutex::new(Instant::now()),
            what,
        }
    }

    pub fn tick(&self, done: usize, total: usize) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() >= Duration::from_secs(2) {
            *last = Instant::now();
            self.reporter
                .info(&format!("{} {done}/{total} store entries", self.what));
        }
    }
}

/// Everything gc needs to decide, read without locks.
pub struct Survey {
    pub state: Option<State>,
    pub scan: scan::Scan,
    pub gc_roots: Vec<roots::GcRoot>,
    pub trash_home: PathBuf,
}

impl Survey {
    /// Read DIR's roots and store (`state` is its state file, read).
    pub fn take(
        dir: &Path,
        state: Option<State>,
        jobs: usize,
        reporter: &dyn Reporter,
        cancel: &AtomicBool,
    ) -> Result<Survey> {
        let gc_roots = roots::gc_roots(dir)?;
        let trash_home = trash::home(dir)?;
        let ticker = Ticker::new(reporter, "scanned");
        let scan = scan::scan(dir, jobs, &|d, t| ticker.tick(d, t), cancel)?;
        if scan.atimes == Atimes::Off {
            reporter.warn(&format!(
                "{} is on a noatime mount: reads leave no trace, so only registration times count as use",
                dir.join(db::STORE_DIR).display()
            ));
        }
        if crate::nix::noatime::atimes_moved() {
            reporter.warn(crate::nix::noatime::fallback_warning());
        }
        Ok(Survey {
            state,
            scan,
            gc_roots,
            trash_home,
        })
    }

    /// Indices into the scan's paths of `names` (`HASH-NAME`) that are registered.
    pub fn indices<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Vec<usize> {
        names
            .into_iter()
            .filter_map(|n| self.scan.snap.index_of(&format!("{STORE_PREFIX}{n}")))
            .collect()
    }

    /// The plan under `policy`, keeping `images` and the gc roots.
    pub fn plan(&self, images: &roots::Images, policy: &Policy) -> plan::Plan {
        let image_roots = self.indices(
            images
                .kept
                .iter()
                .flat_map(|i| i.names.iter().map(String::as_str)),
        );
        let gc_roots = self.indices(self.gc_roots.iter().map(|r| r.name.as_str()));
        plan::plan(&self.scan, policy, &image_roots, &gc_roots)
    }
}

/// Run a collection.
pub fn gc(opts: &GcOptions, reporter: &dyn Reporter, cancel: &AtomicBool) -> Result<GcReport> {
    let start = Instant::now();
    let dir = &opts.dir;
    let now = opts.now.unwrap_or_else(unix_now);
    let policy = Policy {
        keep_days: opts.keep_days,
        max_size: opts.max_size,
        now,
    };
    check_dir(dir)?;
    let state = State::read(dir)?;
    let images = roots::images(dir, state.as_ref(), &opts.drop_images)?;
    if state.is_none() {
        reporter.warn(&format!(
            "{} has no hydrafy state file (a seed made by the docker-cp recipe?), so no image \
             is protected, only gc roots and recent use; record the image the jobs use with \
             `hydrafy fetch IMAGE -o {} --merge` first",
            dir.display(),
            dir.display()
        ));
    }
    let survey = Survey::take(dir, state, opts.jobs, reporter, cancel)?;
    let plan = survey.plan(&images, &policy);
    let scan = &survey.scan;
    let dropped: Vec<String> = match &survey.state {
        Some(state) => images
            .dropped
            .iter()
            .map(|&i| state.images[i].reference.clone())
            .collect(),
        None => Vec::new(),
    };
    let mut report = GcReport {
        dir: dir.clone(),
        dry_run: opts.dry_run,
        keep_days: opts.keep_days,
        max_size: opts.max_size,
        store_bytes_before: plan.before,
        store_bytes_after: plan.before,
        deleted: Vec::new(),
        deleted_paths: 0,
        deleted_bytes: 0,
        links_removed: 0,
        links_bytes: 0,
        skipped: Vec::new(),
        stranded: Vec::new(),
        over_budget_by: None,
        dropped_images: dropped,
        old_trash_removed: 0,
        atimes: scan.atimes,
        seconds: 0.0,
        lock_wait_seconds: 0.0,
        lock_held_seconds: 0.0,
    };

    let listed = |paths: &[usize], entries: &[usize]| -> Vec<Deleted> {
        let mut out: Vec<Deleted> = paths
            .iter()
            .map(|&i| Deleted {
                path: scan.snap.paths[i].path.clone(),
                bytes: scan.size(i),
                registered: true,
            })
            .chain(
                entries
                    .iter()
                    .filter(|&&u| !scan.unregistered[u].lock_file)
                    .map(|&u| Deleted {
                        path: format!("{STORE_PREFIX}{}", scan.unregistered[u].name),
                        bytes: scan.unregistered[u].entry.bytes,
                        registered: false,
                    }),
            )
            .collect();
        out.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.path.cmp(&b.path)));
        out
    };

    if opts.dry_run {
        report.deleted = listed(&plan.victims, &plan.unregistered);
        report.links_removed = plan.links.len();
        report.links_bytes = plan.links.iter().map(|&l| scan.links[l].bytes).sum();
    } else {
        report.old_trash_removed = trash::remove_leftovers(&survey.trash_home)?;
        // The state file forgets dropped images once the store changed.
        let mut forget = || -> Result<()> {
            let Some(state) = survey.state.as_ref().filter(|_| !images.dropped.is_empty()) else {
                return Ok(());
            };
            let mut state = state.clone();
            state.images = std::mem::take(&mut state.images)
                .into_iter()
                .enumerate()
                .filter(|(i, _)| !images.dropped.contains(i))
                .map(|(_, r)| r)
                .collect();
            state.write(dir)
        };
        if plan.victims.is_empty() && plan.unregistered.is_empty() && plan.links.is_empty() {
            forget()?;
        } else {
            let (done, bin) = execute::execute(
                dir,
                scan,
                &plan,
                &policy,
                opts.wait,
                &survey.trash_home,
                reporter,
                cancel,
                &mut forget,
            )?;
            report.deleted = listed(&done.paths, &done.unregistered);
            report.links_removed = done.links;
            report.links_bytes = done.links_bytes;
            report.skipped = done.skipped;
            report.stranded = done.stranded;
            report.lock_wait_seconds = done.waited.as_secs_f64();
            report.lock_held_seconds = done.held.as_secs_f64();
            let at = bin.path().to_path_buf();
            let ticker = Ticker::new(reporter, "deleted");
            if !bin.empty(cancel, &|d, t| ticker.tick(d, t))? {
                return Err(Error::InterruptedAfter {
                    what: format!(
                        "the store was changed ({} entries unregistered and moved out); the rest of \
                         {} is deleted by the next gc",
                        report.deleted.len(),
                        at.display()
                    ),
                });
            }
        }
    }
    report.deleted_paths = report.deleted.iter().filter(|d| d.registered).count();
    report.deleted_bytes = report.deleted.iter().map(|d| d.bytes).sum();
    report.store_bytes_after = report
        .store_bytes_before
        .saturating_sub(report.deleted_bytes);
    report.over_budget_by = opts
        .max_size
        .filter(|&max| report.store_bytes_after > max)
        .map(|max| report.store_bytes_after - max);
    if let (Some(max), Some(over)) = (opts.max_size, report.over_budget_by) {
        reporter.warn(&format!(
            "the store {} {} after all that may go, {} over --max-size {}: what is kept \
             (images, gc roots, paths used in the last {} days) is larger than the budget",
            if opts.dry_run { "would be" } else { "is" },
            show_bytes(report.store_bytes_after),
            show_bytes(over),
            show_bytes(max),
            opts.keep_days
        ));
    }
    for s in &report.skipped {
        reporter.info(&format!("kept {}: {}", s.path, s.reason));
    }
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// Parse `--max-size`: bytes, or a number with K, M, G or T (powers of
/// 1024; `200G`, `1.5T`, `500MiB`).
pub fn parse_size(text: &str) -> Result<u64> {
    let bad = || {
        Error::invalid(
            "--max-size",
            text,
            "is not a size; give bytes or a number with K, M, G or T (e.g. 200G, 500M)",
        )
    };
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    let unit_start = lower
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(lower.len());
    let (number, unit) = lower.split_at(unit_start);
    let factor: u64 = match unit.trim() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    let value: f64 = number.parse().map_err(|_| bad())?;
    if !value.is_finite() || value < 0.0 || value * factor as f64 > u64::MAX as f64 {
        return Err(bad());
    }
    Ok((value * factor as f64) as u64)
}

/// Parse `--wait`: `10m`, `30s`, `500ms`, `2h`, `1d`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let bad = || {
        Error::invalid(
            "--wait",
            text,
            "is not a duration; give a number with ms, s, m, h or d (e.g. 10m, 30s)",
        )
    };
    let t = text.trim().to_ascii_lowercase();
    let unit_start = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(unit_start);
    let secs: f64 = match unit {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        _ => return Err(bad()),
    };
    let value: f64 = number.parse().map_err(|_| bad())?;
    Duration::try_from_secs_f64(value * secs).map_err(|_| bad())
}

/// Parse `--keep-days`: a whole number of days.
pub fn parse_keep_days(text: &str) -> Result<u32> {
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|&d| d <= 100_000)
        .ok_or_else(|| {
            Error::invalid(
                "--keep-days",
                text,
                "is not a number of days; give a whole number, e.g. 14 (0 keeps only the last hour)",
            )
        })
}

/// A duration as the user would write it.
pub fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 3_600_000 == 0 && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Bytes for people: `1.5 GiB`.
pub fn show_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_durations_and_days_parse_or_say_what_is_wrong() {
        assert_eq!(parse_size("200G").unwrap(), 200 << 30);
        assert_eq!(parse_size("500M").unwrap(), 500 << 20);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert_eq!(parse_size("12345").unwrap(), 12345);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        for bad in ["", "G", "-1G", "10X", "1e3", "200 G B"] {
            let err = parse_size(bad).unwrap_err();
            assert_eq!(err.exit(), crate::error::Exit::Usage, "{bad}");
        }
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
        assert_eq!(parse_keep_days("14").unwrap(), 14);
        assert!(parse_keep_days("-1").is_err());
        assert!(parse_keep_days("two").is_err());
        assert_eq!(show_duration(Duration::from_secs(600)), "10m");
        assert_eq!(show_bytes(1536), "1.5 KiB");
    }
}
