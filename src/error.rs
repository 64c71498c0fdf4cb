//! One error type for the whole crate.
//!
//! Every variant names the object that failed (image, blob digest, path,
//! layer entry) and, where there is one, what the user can do about it. The
//! binary prints the error and its `source()` chain once, on one line, so a
//! variant that wraps a cause never repeats the cause in its own message.

use std::path::PathBuf;

use crate::oci::digest::Digest;

/// How a registry refused, or what was wrong with its answer.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistryFailure {
    /// 404: no such repository, tag or blob.
    NotFound,
    /// 401 after the credentials (if any) were tried.
    Unauthorized,
    /// 403.
    Forbidden,
    /// 429, with the figures the registry gave.
    RateLimited {
        /// `ratelimit-limit` and `ratelimit-remaining`, as sent.
        limits: Option<String>,
        /// What `Retry-After` asked for, when it was longer than hydrafy waits.
        retry_after: Option<std::time::Duration>,
    },
    /// A 5xx that retries did not get past.
    ServerError { status: u16 },
    /// Any other status hydrafy cannot go on from.
    Refused { status: u16 },
    /// An answer hydrafy cannot use: too large, malformed, a bad range, a
    /// token service that is not a URL.
    BadAnswer,
    /// No source could supply the object (the download that should have
    /// brought it failed), or the HTTP client could not be set up.
    Unavailable,
}

/// How the process ends: part of the interface (the README's table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// 0: done, including "DIR already holds this image".
    Success,
    /// 1: the work failed (network, registry, verification, file system, a
    /// damaged image file); the output is as it was.
    Failure,
    /// 2: bad usage or input, found before any work.
    Usage,
    /// 130: Ctrl-C or SIGTERM, the shell's 128 + SIGINT.
    Interrupted,
}

impl Exit {
    /// The status number.
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failure => 1,
            Exit::Usage => 2,
            Exit::Interrupted => 130,
        }
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(exit: Exit) -> Self {
        std::process::ExitCode::from(exit.code())
    }
}

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

    /// An image file (OCI layout, oci-archive, docker save) that is damaged,
    /// incomplete or not an image: a failure of the input, not of usage.
    #[error("{what} {input:?}: {reason}")]
    Archive {
        what: &'static str,
        input: String,
        reason: String,
    },

    /// An image file holds several images and SOURCE named none of them.
    /// `command` is the command line that picks the first one.
    #[error(
        "{file}: holds {count} images ({list}); name one, e.g. `{command}` (`hydrafy extract {file} --list` shows them all)",
        count = .images.len(),
        list = .images.join(", ")
    )]
    SeveralImages {
        file: String,
        images: Vec<String>,
        command: String,
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

    /// A registry answered with an error, or with something hydrafy cannot
    /// use. `kind` says which, for callers that branch (retries, mirror
    /// fallback, exit codes); `reason` is the sentence for the user.
    #[error("{target}: {reason}")]
    Registry {
        target: String,
        kind: RegistryFailure,
        reason: String,
    },

    /// A network-level failure talking to a registry; the cause says which.
    #[error("{target}: {action}")]
    Http {
        target: String,
        action: String,
        #[source]
        source: reqwest::Error,
    },

    /// A source sent less than the low-speed floor asks (a trickle, or no
    /// answer at all) on every attempt; `rate` is what it managed (`None`:
    /// not even the response headers came).
    #[error(
        "{target}: transfer too slow: {managed} (floor {floor} B/s); the source is overloaded or the link is failing: try again later, or pull through another source (--mirror URL)",
        managed = match .rate {
            Some(rate) => format!("{rate} B/s over {} s", .window),
            None => format!("no answer in {} s", .window),
        }
    )]
    TooSlow {
        target: String,
        rate: Option<u64>,
        window: u64,
        floor: u64,
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

    /// Layers applied side by side (see `unpack::pipeline`) could have
    /// interacted, or one failed: the caller resets the root and applies
    /// them again in order, which gives the authoritative result or error.
    #[error("layers could not be applied side by side ({reason}); apply them in order")]
    LanesInterfered { reason: String },

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

    /// docker's credentials for a registry cannot be read (a failing helper,
    /// an unreadable config); the pull goes on anonymously, with this as a
    /// warning.
    #[error("docker credentials for {registry}: {reason}")]
    Credentials { registry: String, reason: String },

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
    pub fn registry(
        target: impl Into<String>,
        kind: RegistryFailure,
        reason: impl Into<String>,
    ) -> Self {
        Error::Registry {
            target: target.into(),
            kind,
            reason: reason.into(),
        }
    }

    /// The registry failure this is, if it is one.
    pub fn registry_failure(&self) -> Option<&RegistryFailure> {
        match self {
            Error::Registry { kind, .. } => Some(kind),
            _ => None,
        }
    }

    /// Shorthand for [`Error::Unsupported`].
    pub fn unsupported(image: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Unsupported {
            image: image.into(),
            reason: reason.into(),
        }
    }

    /// The exit status this error ends the process with (see the README).
    pub fn exit(&self) -> Exit {
        match self {
            Error::Interrupted | Error::InterruptedAfter { .. } => Exit::Interrupted,
            Error::Invalid { .. } => Exit::Usage,
            _ => Exit::Failure,
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
