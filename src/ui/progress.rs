//! Progress and messages on stderr: bars on a terminal, plain lines elsewhere.
//!
//! stdout is kept for `--json`. The core reports through the [`Reporter`]
//! trait and never knows which of the three renderings (bars, plain lines,
//! quiet) is in use; tests use a reporter that records.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::error::sanitize;

/// What the core tells the user while it works.
pub trait Reporter: Send + Sync {
    /// Something the user should know; the run goes on.
    fn warn(&self, msg: &str);
    /// A step worth a line ("resolved", "published").
    fn info(&self, msg: &str);
    /// Total bytes to download, once known.
    fn download_total(&self, bytes: u64);
    /// More bytes arrived.
    fn downloaded(&self, bytes: u64);
    /// Number of layers to apply, once known.
    fn layer_total(&self, layers: u64);
    /// One more layer was applied.
    fn layer_applied(&self, label: &str);
    /// The layers are being applied again from the first (after a retry).
    fn layers_restarted(&self);
    /// The run is over (success or not): clear bars.
    fn finish(&self);
}

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// indicatif bars (stderr is a terminal).
    Bars,
    /// Occasional plain lines (stderr is a file or pipe).
    Plain,
    /// Warnings only.
    Quiet,
}

impl Style {
    /// Bars on a terminal, plain lines otherwise, nothing but warnings with `quiet`.
    pub fn detect(quiet: bool) -> Style {
        if quiet {
            Style::Quiet
        } else if std::io::stderr().is_terminal() {
            Style::Bars
        } else {
            Style::Plain
        }
    }
}

/// The reporter the binary uses.
pub struct Progress {
    style: Style,
    bars: Option<(MultiProgress, ProgressBar, ProgressBar)>,
    plain: Mutex<PlainState>,
    /// Set by [`Reporter::finish`]: no progress line after it, so the run's
    /// summary ([`Progress::conclude`]) is the last line on stderr.
    finished: AtomicBool,
}

#[derive(Default)]
struct PlainState {
    download_total: u64,
    downloaded: u64,
    layers: u64,
    applied: u64,
    last: Option<Instant>,
}

const PLAIN_EVERY: Duration = Duration::from_secs(2);

impl Progress {
    /// A reporter in the given style.
    pub fn new(style: Style) -> Progress {
        let bars = (style == Style::Bars).then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let download = multi.add(ProgressBar::new(0));
            download.set_style(
                ProgressStyle::with_template(
                    "download {bar:30} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}",
                )
                .expect("valid template"),
            );
            let layers = multi.add(ProgressBar::new(0));
            layers.set_style(
                ProgressStyle::with_template("layers   {bar:30} {pos}/{len} {msg}")
                    .expect("valid template"),
            );
            (multi, download, layers)
        });
        Progress {
            style,
            bars,
            plain: Mutex::new(PlainState::default()),
            finished: AtomicBool::new(false),
        }
    }

    /// The run's last line: what it did, after the bars are gone; nothing with `--quiet`.
    pub fn conclude(&self, summary: &str) {
        self.finish();
        self.info(summary);
    }

    fn line(&self, text: &str) {
        let text = sanitize(text);
        match &self.bars {
            Some((multi, ..)) if !self.finished.load(Ordering::SeqCst) => {
                let _ = multi.println(format!("hydrafy: {text}"));
            }
            _ => {
                let _ = writeln!(std::io::stderr().lock(), "hydrafy: {text}");
            }
        }
    }

    fn plain_tick(&self, force: bool) {
        if self.style != Style::Plain {
            return;
        }
        // The lock is held until the line is out, and `finish` takes it to
        // set the flag: no tick can slip out after the summary.
        let mut s = self.plain.lock().expect("progress lock");
        if self.finished.load(Ordering::SeqCst) {
            return;
        }
        let due = s.last.is_none_or(|t| t.elapsed() >= PLAIN_EVERY);
        if !(force || due) {
            return;
        }
        s.last = Some(Instant::now());
        let line = format!(
            "progress: downloaded {:.1}/{:.1} MB, applied {}/{} layers",
            s.downloaded as f64 / 1e6,
            s.download_total as f64 / 1e6,
            s.applied,
            s.layers
        );
        self.line(&line);
        drop(s);
    }
}

impl Reporter for Progress {
    fn warn(&self, msg: &str) {
        self.line(&format!("warning: {msg}"));
    }

    fn info(&self, msg: &str) {
        if self.style != Style::Quiet {
            self.line(msg);
        }
    }

    fn download_total(&self, bytes: u64) {
        if let Some((_, download, _)) = &self.bars {
            download.set_length(bytes);
        }
        self.plain.lock().expect("progress lock").download_total = bytes;
    }

    fn downloaded(&self, bytes: u64) {
        if let Some((_, download, _)) = &self.bars {
            download.inc(bytes);
        }
        self.plain.lock().expect("progress lock").downloaded += bytes;
        self.plain_tick(false);
    }

    fn layer_total(&self, layers: u64) {
        if let Some((_, _, bar)) = &self.bars {
            bar.set_length(layers);
        }
        self.plain.lock().expect("progress lock").layers = layers;
    }

    fn layer_applied(&self, label: &str) {
        if let Some((_, _, bar)) = &self.bars {
            bar.inc(1);
            bar.set_message(label.to_string());
        }
        let done = {
            let mut s = self.plain.lock().expect("progress lock");
            s.applied += 1;
            s.applied == s.layers
        };
        self.plain_tick(done);
    }

    fn layers_restarted(&self) {
        if let Some((_, _, bar)) = &self.bars {
            bar.set_position(0);
        }
        self.plain.lock().expect("progress lock").applied = 0;
    }

    fn finish(&self) {
        {
            let _ticks = self.plain.lock().expect("progress lock");
            self.finished.store(true, Ordering::SeqCst);
        }
        if let Some((multi, download, layers)) = &self.bars {
            download.finish_and_clear();
            layers.finish_and_clear();
            let _ = multi.clear();
        }
    }
}

/// A reporter that records messages, for tests and library callers.
#[derive(Default)]
pub struct Recorder {
    pub warnings: Mutex<Vec<String>>,
    pub infos: Mutex<Vec<String>>,
    pub downloaded: Mutex<u64>,
    pub layers_applied: Mutex<u64>,
}

impl Reporter for Recorder {
    fn warn(&self, msg: &str) {
        self.warnings.lock().expect("lock").push(msg.to_string());
    }
    fn info(&self, msg: &str) {
        self.infos.lock().expect("lock").push(msg.to_string());
    }
    fn download_total(&self, _: u64) {}
    fn downloaded(&self, bytes: u64) {
        *self.downloaded.lock().expect("lock") += bytes;
    }
    fn layer_total(&self, _: u64) {}
    fn layer_applied(&self, _: &str) {
        *self.layers_applied.lock().expect("lock") += 1;
    }
    fn layers_restarted(&self) {
        *self.layers_applied.lock().expect("lock") = 0;
    }
    fn finish(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_applied_again_are_counted_from_none() {
        let progress = Progress::new(Style::Quiet);
        progress.layer_total(3);
        progress.layer_applied("first");
        progress.layer_applied("second");
        progress.layers_restarted();
        for label in ["first", "second", "third"] {
            progress.layer_applied(label);
        }
        assert_eq!(progress.plain.lock().unwrap().applied, 3);
    }
}
