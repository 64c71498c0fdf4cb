//! `hydrafy cache`: see where the blob cache is, how big it is, and clear it.
//!
//! The cache is safe to clear at any time: it holds only verified blobs
//! (named by digest) and unfinished downloads kept for resuming. A partial
//! file a running hydrafy is writing (it holds the file's lock) is left alone.

use std::io::Write;
use std::path::Path;

use crate::blobs::store::{BlobStore, Usage};
use crate::error::{Error, Result};

/// The one thing `hydrafy cache` does on this run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Path,
    Du { json: bool },
    Clear,
}

/// Run `hydrafy cache ACTION` on the cache at `dir`, printing to `out`.
pub fn run(action: Action, dir: &Path, out: &mut dyn Write) -> Result<()> {
    let text = match action {
        Action::Path => dir.display().to_string(),
        Action::Du { json } => {
            let usage = if dir.exists() {
                BlobStore::open(dir)?.usage()?
            } else {
                Usage::default()
            };
            if json {
                let mut v = serde_json::to_value(&usage).expect("usage serialises");
                v["path"] = serde_json::Value::String(dir.display().to_string());
                v.to_string()
            } else {
                format!(
                    "{}: {} blobs, {}; {} unfinished downloads, {}",
                    dir.display(),
                    usage.blobs,
                    megabytes(usage.blob_bytes),
                    usage.partials,
                    megabytes(usage.partial_bytes)
                )
            }
        }
        Action::Clear => {
            if !dir.exists() {
                format!("{}: nothing to clear", dir.display())
            } else {
                let (removed, kept) = BlobStore::open(dir)?.clear()?;
                let mut line = format!(
                    "{}: removed {} blobs ({}) and {} unfinished downloads ({})",
                    dir.display(),
                    removed.blobs,
                    megabytes(removed.blob_bytes),
                    removed.partials,
                    megabytes(removed.partial_bytes)
                );
                if kept.partials > 0 {
                    line.push_str(&format!(
                        "; kept {} that a running hydrafy is writing",
                        kept.partials
                    ));
                }
                line
            }
        }
    };
    writeln!(out, "{text}").map_err(|e| Error::io("<stdout>", "cannot write", e))
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}
