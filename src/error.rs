//! One error type for the whole crate.
//!
//! Every variant names the object that failed (image, blob digest, path,
//! layer entry) and, where there is one, what the user can do about it. The
//! binary prints the error and its `source()` chain once, on one line, so a
//! variant that wraps a cause never repeats the cause in its own message.

use std::path::PathBuf;

use crate::digest::Digest;

/// Result alias used throughout hydrafy.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in hydrafy.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The user gave something hydrafy cannot parse (reference, platform, option).
    #[error("{what} {input:?}: {reason}")]
    Invalid {
        what: &'static str,
        input: String,
        reason: String,
    },

    /// Downloaded or read bytes do not hash to the digest that named them.
    #[error("{what} {expected}: content hashes to {found}; {hint}")]
    DigestMismatch {
        what: &'static str,
        expected: Digest,
        found: Digest,
        hint: &'static str,
    },

    /// A blob or manifest is not the size its descriptor promised.
    #[error("{what} {digest}: expected {expected} bytes, got {found}{more}", more = if *.truncated { " or more" } else { "" })]
    SizeMismatch {
        what: &'static str,
        digest: Digest,
        expected: u64,
        found: u64,
        truncated: bool,
    },

    /// A layer decompressed to something other than its `rootfs.diff_ids` entry.
    #[error(
        "layer {layer}: uncompressed content hashes to {found}, but the image config lists {expected} (rootfs.diff_ids[{index}]); the layer blob or the config is corrupt"
    )]
    DiffIdMismatch {
        layer: Digest,
        index: usize,
        expected: Digest,
        found: Digest,
    },

    /// The image is well-formed but not something hydrafy can unpack.
    #[error("{image}: {reason}")]
    Unsupported { image: String, reason: String },

    /// A registry answered with an error, or could not be reached.
    #[error("{target}: {reason}")]
    Registry { target: String, reason: String },

    /// A network-level failure talking to a registry; the cause says which.
    #[error("{target}: {action}")]
    Http {
        target: String,
        action: String,
        #[source]
        source: reqwest::Error,
    },

    /// A layer holds an entry hydrafy refuses to apply.
    #[error("layer {layer}: entry {entry:?}: {reason}")]
    Entry {
        layer: String,
        entry: String,
        reason: String,
    },

    /// A layer entry failed with an I/O error; the cause says which.
    #[error("layer {layer}: entry {entry:?}: {action}")]
    EntryIo {
        layer: String,
        entry: String,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// A layer stream is not a valid (compressed) tar.
    #[error("layer {layer}: {reason}")]
    Layer {
        layer: String,
        reason: String,
        #[source]
        source: Option<std::io::Error>,
    },

    /// A file-system operation on a named path failed; the cause says why.
    #[error("{path}: {action}", path = .path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// The output directory holds something the run must not overwrite silently.
    #[error("{dir}: {reason}", dir = .dir.display())]
    Output { dir: PathBuf, reason: String },

    /// A merge skipped writing a store path the seed has, and a new path
    /// hard-links into it; the caller unpacks again without skipping.
    #[error("layer {layer}: entry {entry:?} hard-links into a store path the seed already holds")]
    SkippedLinkTarget { layer: String, entry: String },

    /// Part of a layer was unpacked while its blob downloaded, and then the
    /// source's bytes failed to verify and another source (or a fresh
    /// start) supplied the blob: what was unpacked may not be the image's.
    /// The caller unpacks again from verified blobs only.
    #[error(
        "blob {digest}: part of the layer was unpacked from bytes that then failed to verify; run the command again"
    )]
    SourceReplaced { digest: Digest },

    /// Ctrl-C or SIGTERM.
    #[error("interrupted; the output directory was left as it was")]
    Interrupted,

    /// Ctrl-C or SIGTERM once the run had changed DIR (consistently); `what` says how.
    #[error("interrupted after {what}")]
    InterruptedAfter { what: String },

    /// A Nix database could not be read or written; the cause says why.
    #[error("{path}: {action}", path = .path.display())]
    Database {
        path: PathBuf,
        action: String,
        #[source]
        source: rusqlite::Error,
    },

    /// A Nix store or its database is inconsistent, or not one hydrafy can work on.
    #[error("{dir}: {reason}", dir = .dir.display())]
    Store { dir: PathBuf, reason: String },

    /// A gitlab-runner `config.toml` hydrafy cannot (or must not) change.
    #[error("{path}: {reason}", path = .path.display())]
    RunnerConfig { path: PathBuf, reason: String },
}

impl Error {
    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, action: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            action,
            source,
        }
    }

    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(
        what: &'static str,
        input: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Error::Invalid {
            what,
            input: input.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Registry`].
    pub fn registry(target: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Registry {
            target: target.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Unsupported`].
    pub fn unsupported(image: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Unsupported {
            image: image.into(),
            reason: reason.into(),
        }
    }

    /// The process exit code this error maps to (see the README).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Interrupted | Error::InterruptedAfter { .. } => 130,
            Error::Invalid { .. } => 2,
            _ => 1,
        }
    }
}

/// Render an error and its causes as one line: `outer: cause: root cause`.
///
/// Text that came from a stranger (a registry's error body, a tar entry name)
/// may hold terminal escape sequences; they are replaced so that printing an
/// error can never drive the user's terminal.
pub fn report(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    sanitize(&out)
}

/// Replace control characters (escape sequences, newlines) with visible text.
pub fn sanitize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\r' | '\t' => out.push(' '),
            c if c.is_control() => out.push_str(&c.escape_unicode().to_string()),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_joins_the_cause_chain_once() {
        let err = Error::io(
            "/x/y",
            "cannot create",
            std::io::Error::from_raw_os_error(13),
        );
        let line = report(&err);
        assert!(
            line.starts_with("/x/y: cannot create: Permission denied"),
            "{line}"
        );
    }

    #[test]
    fn sanitize_neutralises_terminal_escapes() {
        let text = sanitize("bad\x1b[2Jname\nnext");
        assert!(!text.contains('\x1b'));
        assert!(!text.contains('\n'));
        assert!(text.contains("bad\\u{1b}[2Jname next"), "{text}");
    }
}
