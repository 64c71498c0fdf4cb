//! Talking to a registry: manifests and blobs over the distribution API.
//!
//! hydrafy issues every request itself, on one reqwest client, because a
//! general registry client (oci-client 0.18 was used at first) falls short in
//! ways a build host notices:
//!
//! - its errors drop the response headers, so a 429 loses `Retry-After` and
//!   Docker Hub's `ratelimit-limit`/`ratelimit-remaining`;
//! - it reads manifest bodies with no size bound and never compares the bytes
//!   received with a blob's descriptor size while streaming;
//! - it has no retry, and a token that expires mid-pull is not renewed on the
//!   401 that follows (its token handshake also drops `expires_in`: see
//!   [`crate::registry::auth`], which answers the 401 challenges here);
//! - its partial-blob API cannot tell "resumed" from "server ignored Range"
//!   in the way a resumable download into a verified store needs.
//!
//! What a build host meets, and what this module does about it:
//!
//! - Auth: a 401 is answered once per request (a bearer token from the
//!   challenge's realm, or Basic credentials); tokens are kept per endpoint
//!   until shortly before `expires_in` runs out, and a token the registry
//!   rejects early is replaced on the 401 that follows. Credentials are looked
//!   up only when a registry asks for them.
//! - Redirects (Docker Hub sends blob GETs to a CDN) are followed by reqwest,
//!   which drops `Authorization` when the host, port or scheme changes.
//! - Rate limits: a 429 with a short `Retry-After` is waited out and retried;
//!   otherwise the error gives the registry's limit figures and what to do.
//!   A tag is resolved with HEAD where only its digest is needed (Docker Hub
//!   counts manifest GETs, not HEADs).
//! - Flaky networks: connection failures, timeouts and 5xx are retried with
//!   exponential backoff and jitter, a bounded number of times. Every body
//!   (manifest, index, config, layer, token answer) is read by one loop,
//!   `Registry::fetch_body`: a transfer that breaks off is asked for again,
//!   a blob with a Range request from the bytes already received (restarting
//!   from zero when the server ignores Range; across runs too, see
//!   [`crate::blobs::download`]), anything else from the start; the whole
//!   blob is verified at the end. Where a blob's bytes go (the verified
//!   store, its claims and its cache) is the caller's: a [`BlobSink`].
//! - Trickles: a transfer slower than the floor of [`LOW_SPEED`] (its
//!   headers included) counts as a failed attempt, like a broken one, so a
//!   source that sends a byte now and then cannot hold a run forever.
//! - Mirrors are tried in order before the origin; whatever serves the bytes,
//!   they are verified against the pinned digest, and a mirror that fails or
//!   lies is skipped with a warning.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_RANGE, HeaderMap, RANGE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use reqwest::{Method, StatusCode};
use tokio::sync::{Mutex, OnceCell};

use crate::error::{Error, RegistryFailure, Result};
use crate::oci::digest::Digest;
use crate::oci::manifest::{Descriptor, MANIFEST_ACCEPT, MAX_MANIFEST_BYTES};
use crate::oci::reference::{DOCKER_HUB_API_HOST, ImageRef};
use crate::registry::auth::{self, Challenge, Token};
use crate::registry::credentials::{self, Credentials};
use crate::ui::progress::Reporter;

const USER_AGENT: &str = concat!("hydrafy/", env!("CARGO_PKG_VERSION"));
/// The largest token-service answer read (Docker Hub's are a few KB).
const MAX_TOKEN_RESPONSE: u64 = 1 << 20;
/// What to do when a blob's bytes are not the ones the image names.
pub const SERVED_OTHER_BYTES: &str =
    "the registry, a mirror or a proxy served different bytes than the image names";
/// The most of an error answer's body read, to quote it.
const MAX_ERROR_BODY: u64 = 4 << 10;

/// A floor on transfer speed: less than `bytes_per_sec` averaged over
/// `window` (or no response headers within `window`) fails the attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LowSpeed {
    /// 0: no floor.
    pub bytes_per_sec: u64,
    pub window: Duration,
}

/// The floor every transfer must keep: 1000 bytes/s averaged over 30 s.
///
/// The 30 s window is curl's and cargo's (`http.low-speed-limit` is judged
/// over `http.timeout`, 30 s): long enough to ride out a congested link or a
/// few TCP retransmissions, short enough that a stuck source is left within
/// a minute. The rate is higher than cargo's 10 B/s because what hydrafy
/// reads is bigger: a link managing under 1 kB/s would take days over one
/// large layer, so giving up on it for the next source (or a clear error)
/// loses nothing, while 1 kB/s is far below any working link, even a
/// congested one shared by many jobs. A trickle used to keep a run waiting
/// forever: the read timeout only notices silence. [`LOW_SPEED_ENV`]
/// replaces the figures.
pub const LOW_SPEED: LowSpeed = LowSpeed {
    bytes_per_sec: 1000,
    window: Duration::from_secs(30),
};

/// `BYTES/SECONDS` in this variable replaces [`LOW_SPEED`] (`0/1`: no floor):
/// for tests, which stage trickles in seconds, and for operators whose links
/// need other figures.
pub const LOW_SPEED_ENV: &str = "HYDRAFY_LOW_SPEED";

impl FromStr for LowSpeed {
    type Err = Error;

    /// `BYTES/SECONDS`, as [`LOW_SPEED_ENV`] holds it.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: &str| Error::invalid(LOW_SPEED_ENV, s, reason);
        let expected =
            "expected BYTES/SECONDS (bytes per second, averaged over seconds), as 1000/30";
        let (bytes, secs) = s.trim().split_once('/').ok_or_else(|| bad(expected))?;
        let bytes_per_sec = bytes.trim().parse().map_err(|_| bad(expected))?;
        let secs: u64 = secs.trim().parse().map_err(|_| bad(expected))?;
        if secs == 0 {
            return Err(bad("the window must be at least 1 second"));
        }
        Ok(LowSpeed {
            bytes_per_sec,
            window: Duration::from_secs(secs),
        })
    }
}

impl LowSpeed {
    /// [`LOW_SPEED_ENV`] when set, else `self`.
    fn or_from_env(self) -> Result<LowSpeed> {
        match std::env::var(LOW_SPEED_ENV) {
            Ok(v) => v.parse(),
            Err(_) => Ok(self),
        }
    }

    fn too_slow(&self, target: &str, rate: Option<u64>) -> Error {
        Error::TooSlow {
            target: target.to_string(),
            rate,
            window: self.window.as_secs(),
            floor: self.bytes_per_sec,
        }
    }
}

/// How to reach registries.
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// Talk plain HTTP to the image's registry.
    pub plain_http: bool,
    /// Extra CA certificates (PEM files) to trust.
    pub ca_certs: Vec<PathBuf>,
    /// Mirrors, tried in order before the origin.
    pub mirrors: Vec<Mirror>,
    /// Attempts per request before giving up on transient failures.
    pub attempts: u32,
    /// The longest `Retry-After` hydrafy waits out on a 429.
    pub max_retry_after: Duration,
    /// First backoff delay; doubled each attempt, with jitter.
    pub backoff: Duration,
    /// Give up on a connection that sends nothing for this long.
    pub read_timeout: Duration,
    /// Give up on a transfer slower than this ([`LOW_SPEED_ENV`] overrides it).
    pub low_speed: LowSpeed,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            plain_http: false,
            ca_certs: Vec::new(),
            mirrors: Vec::new(),
            attempts: 5,
            max_retry_after: Duration::from_secs(60),
            backoff: Duration::from_millis(500),
            read_timeout: Duration::from_secs(60),
            low_speed: LOW_SPEED,
        }
    }
}

/// `--mirror [HOST=]URL`: serve HOST's images (docker.io when omitted) from URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    /// The registry mirrored, as written in references (`docker.io`, `ghcr.io`).
    pub registry: String,
    /// `http` or `https`, from the URL.
    pub scheme: String,
    /// `host[:port]` of the mirror.
    pub host: String,
}

impl FromStr for Mirror {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: &str| Error::invalid("mirror", s, reason);
        let (registry, url) = match s.split_once('=') {
            Some((host, url)) => (host.to_string(), url),
            None => ("docker.io".to_string(), s),
        };
        let registry = if registry == "index.docker.io" {
            "docker.io".to_string()
        } else {
            registry
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected [HOST=]URL with an http:// or https:// URL"))?;
        if scheme != "http" && scheme != "https" {
            return Err(bad("the URL scheme must be http or https"));
        }
        let host = rest.trim_end_matches('/');
        if host.is_empty() || host.contains('/') || registry.is_empty() {
            return Err(bad("a mirror URL is scheme://host[:port], with no path"));
        }
        Ok(Mirror {
            registry,
            scheme: scheme.to_string(),
            host: host.to_string(),
        })
    }
}

enum Auth {
    Anonymous,
    Bearer(Token),
    Basic(String),
}

impl Auth {
    fn header(&self) -> Option<&str> {
        match self {
            Auth::Anonymous => None,
            Auth::Bearer(t) => Some(&t.header),
            Auth::Basic(h) => Some(h),
        }
    }
}

/// One place an image can be pulled from: a mirror or the origin.
struct Endpoint {
    base: String,
    host: String,
    /// The key credentials are stored under (`docker.io`, `host:port`).
    credentials_key: String,
    mirror: bool,
    /// Looked up on the first challenge: a credential helper is run only
    /// when a registry asks for credentials.
    credentials: OnceCell<Option<Credentials>>,
    auth: Mutex<Auth>,
    /// The last bearer challenge, to renew a token before it runs out.
    challenge: Mutex<Option<Challenge>>,
}

impl Endpoint {
    fn label(&self) -> String {
        if self.mirror {
            format!("mirror {}", self.base)
        } else {
            self.host.clone()
        }
    }
}

/// A client for one image's repository, on its mirrors and origin.
pub struct Registry {
    http: reqwest::Client,
    image: ImageRef,
    endpoints: Vec<Endpoint>,
    opts: RegistryOptions,
    reporter: Arc<dyn Reporter>,
}

/// A manifest body and the digest it hashes to.
pub struct FetchedManifest {
    pub bytes: Vec<u8>,
    pub digest: Digest,
}

impl Registry {
    /// A client for `image`, with credentials from docker's config.
    pub fn new(
        image: &ImageRef,
        opts: &RegistryOptions,
        reporter: Arc<dyn Reporter>,
    ) -> Result<Registry> {
        let endpoint = |scheme: &str, host: &str, key: &str, mirror: bool| Endpoint {
            base: format!("{scheme}://{host}"),
            host: host.to_string(),
            credentials_key: key.to_string(),
            mirror,
            credentials: OnceCell::new(),
            auth: Mutex::new(Auth::Anonymous),
            challenge: Mutex::new(None),
        };
        let mut endpoints: Vec<Endpoint> = opts
            .mirrors
            .iter()
            .filter(|m| m.registry == image.registry)
            .map(|m| endpoint(&m.scheme, &m.host, &m.host, true))
            .collect();
        let scheme = if opts.plain_http { "http" } else { "https" };
        endpoints.push(endpoint(scheme, image.api_host(), &image.registry, false));

        let mut builder = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(opts.read_timeout.min(Duration::from_secs(30)))
            .read_timeout(opts.read_timeout);
        for path in &opts.ca_certs {
            let bytes = std::fs::read(path)
                .map_err(|e| Error::io(path, "cannot read CA certificate", e))?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&bytes).map_err(|e| Error::Invalid {
                    what: "CA certificate",
                    input: path.display().to_string(),
                    reason: format!("not a PEM certificate bundle: {e}"),
                })?;
            if certs.is_empty() {
                return Err(Error::invalid(
                    "CA certificate",
                    path.display().to_string(),
                    "the file holds no PEM certificate",
                ));
            }
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder.build().map_err(|e| {
            Error::registry(
                image.to_string(),
                RegistryFailure::Unavailable,
                format!("cannot set up HTTP client: {e}"),
            )
        })?;
        let opts = RegistryOptions {
            low_speed: opts.low_speed.or_from_env()?,
            ..opts.clone()
        };
        Ok(Registry {
            http,
            image: image.clone(),
            endpoints,
            opts,
            reporter,
        })
    }

    /// Fetch a manifest by tag or digest. With `expected`, the body must hash
    /// to it (and match its size, when given); a mirror that fails this is
    /// skipped with a warning, the origin failing it is an error.
    pub async fn manifest(
        &self,
        reference: &str,
        expected: Option<(Digest, Option<u64>)>,
    ) -> Result<FetchedManifest> {
        let mut last_err = None;
        for ep in &self.endpoints {
            let result = self.manifest_from(ep, reference).await.and_then(|bytes| {
                let digest = Digest::of(&bytes);
                if let Some((want, size)) = expected {
                    if digest != want {
                        return Err(Error::DigestMismatch {
                            what: "manifest",
                            expected: want,
                            found: digest,
                            hint: "the registry served a different manifest than the one pinned",
                        });
                    }
                    if let Some(size) = size.filter(|s| *s != bytes.len() as u64) {
                        return Err(Error::SizeMismatch {
                            what: "manifest",
                            digest: want,
                            expected: size,
                            found: bytes.len() as u64,
                            truncated: false,
                        });
                    }
                }
                Ok(FetchedManifest { bytes, digest })
            });
            match result {
                Ok(m) => return Ok(m),
                Err(e) => last_err = Some(self.next_source(ep, e)?),
            }
        }
        Err(self.last_error(last_err))
    }

    /// A mirror's failure is a warning and the next source is tried; the
    /// origin's is the error (and so is Ctrl-C, wherever it lands).
    fn next_source(&self, ep: &Endpoint, e: Error) -> Result<Error> {
        if !ep.mirror || matches!(e, Error::Interrupted) {
            return Err(e);
        }
        self.reporter.warn(&format!(
            "{}: {}; trying the next source",
            ep.label(),
            crate::error::report(&e)
        ));
        Ok(e)
    }

    /// What to report once every source failed: the last source's error.
    fn last_error(&self, last: Option<Error>) -> Error {
        last.unwrap_or_else(|| {
            Error::registry(
                self.image.to_string(),
                RegistryFailure::Unavailable,
                "no registry endpoint",
            )
        })
    }

    async fn manifest_from(&self, ep: &Endpoint, reference: &str) -> Result<Vec<u8>> {
        let path = format!("manifests/{reference}");
        let target = format!(
            "{} manifest {reference} ({})",
            self.image.name(),
            ep.label()
        );
        let mut body = Memory::new(MAX_MANIFEST_BYTES, |_| {
            Error::registry(
                &target,
                RegistryFailure::BadAnswer,
                format!("manifest larger than {MAX_MANIFEST_BYTES} bytes"),
            )
        });
        let source = Source::Registry {
            ep,
            path: &path,
            what: "manifest",
        };
        self.fetch_body(&source, &target, &mut body, None).await?;
        Ok(body.bytes)
    }

    /// The digest a tag points at now, from a HEAD request (Docker Hub does
    /// not count HEADs against the pull rate limit), asked of the sources in
    /// order. `None` when no source says: HEAD is only a shortcut, so its
    /// failures are left for the GET that follows to report.
    pub async fn head_digest(&self, tag: &str) -> Result<Option<Digest>> {
        for ep in &self.endpoints {
            let path = format!("manifests/{tag}");
            match self.send(ep, Method::HEAD, &path, None, "manifest").await {
                Ok(resp) => {
                    let digest = resp
                        .headers()
                        .get("docker-content-digest")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok());
                    if digest.is_some() {
                        return Ok(digest);
                    }
                }
                Err(Error::Interrupted) => return Err(Error::Interrupted),
                Err(_) => {}
            }
        }
        Ok(None)
    }

    /// A small blob (an image config) read into memory and verified.
    pub async fn blob_bytes(&self, desc: &Descriptor, max: u64) -> Result<Vec<u8>> {
        if desc.size > max {
            return Err(Error::unsupported(
                self.image.to_string(),
                format!(
                    "blob {} is {} bytes, more than the {max} allowed for it",
                    desc.digest, desc.size
                ),
            ));
        }
        let mut last_err = None;
        let path = format!("blobs/{}", desc.digest);
        for ep in &self.endpoints {
            let result = async {
                let target = format!("blob {} ({})", desc.digest, ep.label());
                let mut body = Memory::new(desc.size, |found| Error::SizeMismatch {
                    what: "blob",
                    digest: desc.digest,
                    expected: desc.size,
                    found,
                    truncated: true,
                });
                let source = Source::Registry {
                    ep,
                    path: &path,
                    what: "blob",
                };
                self.fetch_body(&source, &target, &mut body, Some(desc))
                    .await?;
                desc.check("blob", &body.bytes, SERVED_OTHER_BYTES)?;
                Ok(body.bytes)
            }
            .await;
            match result {
                Ok(b) => return Ok(b),
                Err(e) => last_err = Some(self.next_source(ep, e)?),
            }
        }
        Err(self.last_error(last_err))
    }

    /// Download a blob into `sink`, which already holds `sink.held()` bytes
    /// of it (an unfinished download to resume with Range). The blob is
    /// whole when [`BlobSink::finish`] accepts it. A sink whose bytes fail
    /// that check is emptied; if they were inherited (from an earlier
    /// attempt, source or run) the same source gets one clean try, else the
    /// next source resumes from what this one left. Returns the bytes
    /// received over the wire.
    pub async fn download_blob(&self, desc: &Descriptor, sink: &mut dyn BlobSink) -> Result<u64> {
        let mut received = 0;
        let mut last_err = None;
        for ep in &self.endpoints {
            let mut started_over = false;
            loop {
                let inherited = sink.held();
                let result = self
                    .download_from(ep, desc, sink, &mut received)
                    .await
                    .and_then(|()| sink.finish());
                let e = match result {
                    Ok(()) => return Ok(received),
                    Err(e) => e,
                };
                let content =
                    matches!(e, Error::DigestMismatch { .. } | Error::SizeMismatch { .. });
                if content {
                    sink.restart()?;
                    if inherited > 0 && !started_over {
                        started_over = true;
                        self.reporter.warn(&format!(
                            "blob {}: the resumed download did not verify ({}); downloading it again from the start",
                            desc.digest,
                            crate::error::report(&e)
                        ));
                        continue;
                    }
                }
                last_err = Some(self.next_source(ep, e)?);
                break;
            }
        }
        Err(self.last_error(last_err))
    }

    /// Fill `sink` from one source (see [`Registry::fetch_body`]).
    async fn download_from(
        &self,
        ep: &Endpoint,
        desc: &Descriptor,
        sink: &mut dyn BlobSink,
        received: &mut u64,
    ) -> Result<()> {
        let target = format!("blob {} ({})", desc.digest, ep.label());
        let path = format!("blobs/{}", desc.digest);
        let source = Source::Registry {
            ep,
            path: &path,
            what: "blob",
        };
        let mut sink = Download { sink, received };
        self.fetch_body(&source, &target, &mut sink, Some(desc))
            .await
            .map(drop)
    }

    /// Read one body from `source` into `sink`: the one way every body is
    /// read, so that a manifest, a config or a token answer survives what a
    /// layer does. A transfer that breaks off (cut, reset, silent past the
    /// read timeout, or slower than the floor) is asked for again after a
    /// backoff: a blob (`blob` given) from the bytes received, with Range,
    /// anything else from the start. Tries that bring nothing new (a slow
    /// one never counts as bringing anything) are bounded by `attempts`,
    /// breaks in all by ten times that. Returns the status of the answer
    /// read: a token service's refusal has a body to quote.
    async fn fetch_body(
        &self,
        source: &Source<'_>,
        target: &str,
        sink: &mut (dyn Sink + Send),
        blob: Option<&Descriptor>,
    ) -> Result<StatusCode> {
        let mut stalled = 0;
        let mut breaks = 0;
        loop {
            let offset = sink.len();
            if blob.is_some_and(|d| d.size == offset) {
                // Everything is here (an earlier run stopped just before the
                // end, or before naming the blob): the caller verifies it.
                return Ok(StatusCode::OK);
            }
            let range = (blob.is_some() && offset > 0).then_some(offset);
            if blob.is_none() {
                sink.restart()?;
            }
            let mut resp = self.open(source, range, target).await?;
            if range.is_some() {
                let status = resp.status();
                let start = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(content_range_start);
                if status == StatusCode::PARTIAL_CONTENT && start == Some(offset) {
                    // Resumed where it stopped.
                } else if status == StatusCode::OK {
                    // The server ignored Range and sends the whole blob.
                    sink.restart()?;
                } else {
                    // 416, or a range that is not the one asked for: start over.
                    sink.restart()?;
                    stalled += 1;
                    if stalled >= self.opts.attempts {
                        return Err(Error::registry(
                            target,
                            RegistryFailure::BadAnswer,
                            format!("the server answered {status} to a range request"),
                        ));
                    }
                    continue;
                }
            }
            let before = sink.len();
            let mut pace = Pace::new(self.opts.low_speed);
            let failure = loop {
                match pace.chunk(&mut resp).await {
                    Ok(Some(chunk)) => sink.write(&chunk)?,
                    Ok(None) => break None,
                    Err(b) => break Some(b),
                }
            };
            let Some(failure) = failure else {
                // The server sent all it has for this blob: that is its size.
                if let Some(desc) = blob
                    && sink.len() != desc.size
                {
                    return Err(Error::SizeMismatch {
                        what: "blob",
                        digest: desc.digest,
                        expected: desc.size,
                        found: sink.len(),
                        truncated: false,
                    });
                }
                return Ok(resp.status());
            };
            breaks += 1;
            let kept = blob.is_some() && sink.len() > before;
            if kept && !matches!(failure, Break::TooSlow { .. }) {
                stalled = 0;
            } else {
                stalled += 1;
            }
            if stalled >= self.opts.attempts || breaks > self.opts.attempts * 10 {
                return Err(match failure {
                    Break::Http(e) => http_error(target, "download interrupted too many times", e),
                    Break::TooSlow { rate } => self.opts.low_speed.too_slow(target, Some(rate)),
                });
            }
            tokio::time::sleep(self.backoff(stalled.max(1))).await;
        }
    }

    /// Ask `source` for its body (from byte `range` on), as one request of
    /// [`Registry::fetch_body`].
    async fn open(
        &self,
        source: &Source<'_>,
        range: Option<u64>,
        target: &str,
    ) -> Result<reqwest::Response> {
        match source {
            Source::Registry { ep, path, what } => {
                self.send(ep, Method::GET, path, range, what).await
            }
            Source::Token(build) => {
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    let Some(resp) = self.try_send(build(), attempt, target).await? else {
                        continue;
                    };
                    let status = resp.status();
                    if (status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS)
                        && attempt < self.opts.attempts
                    {
                        let wait =
                            retry_after(resp.headers()).filter(|w| *w <= self.opts.max_retry_after);
                        tokio::time::sleep(wait.unwrap_or_else(|| self.backoff(attempt))).await;
                        continue;
                    }
                    return Ok(resp);
                }
            }
        }
    }

    /// Send `req` as attempt number `attempt`. `Ok(None)`: the connection
    /// failed in a way worth another attempt, or the response headers did
    /// not come within the low-speed window, and the backoff has been slept.
    async fn try_send(
        &self,
        req: reqwest::RequestBuilder,
        attempt: u32,
        target: &str,
    ) -> Result<Option<reqwest::Response>> {
        let floor = self.opts.low_speed;
        let sent = if floor.bytes_per_sec == 0 {
            Ok(req.send().await)
        } else {
            tokio::time::timeout(floor.window, req.send()).await
        };
        let retry = attempt < self.opts.attempts;
        match sent {
            Ok(Ok(r)) => return Ok(Some(r)),
            Ok(Err(e)) if !(retry && transient(&e)) => {
                return Err(http_error(target, connect_hint(&e), e));
            }
            Err(_) if !retry => return Err(floor.too_slow(target, None)),
            Ok(Err(_)) | Err(_) => {}
        }
        tokio::time::sleep(self.backoff(attempt)).await;
        Ok(None)
    }

    /// Exponential backoff with jitter: `backoff * 2^(attempt-1)`, plus up to half again.
    fn backoff(&self, attempt: u32) -> Duration {
        let base = self
            .opts
            .backoff
            .saturating_mul(1 << attempt.clamp(1, 7).saturating_sub(1));
        base + base.mul_f64(fastrand::f64() * 0.5)
    }

    /// Send one request with auth, retrying what is worth retrying.
    async fn send(
        &self,
        ep: &Endpoint,
        method: Method,
        path: &str,
        range: Option<u64>,
        what: &str,
    ) -> Result<reqwest::Response> {
        let url = format!("{}/v2/{}/{}", ep.base, self.image.repository, path);
        let target = format!("{} ({})", self.image.name(), ep.label());
        // What a failure to get any answer names: the object asked for.
        let name = path.rsplit('/').next().unwrap_or(path);
        let object = match what {
            "blob" => format!("blob {name} ({})", ep.label()),
            _ => format!("{} {what} {name} ({})", self.image.name(), ep.label()),
        };
        let mut attempt = 0;
        let mut challenged = false;
        loop {
            attempt += 1;
            let mut req = self.http.request(method.clone(), &url);
            if what == "manifest" {
                req = req.header(ACCEPT, MANIFEST_ACCEPT.join(", "));
            }
            if let Some(offset) = range {
                req = req.header(RANGE, format!("bytes={offset}-"));
            }
            let sent_auth = self.auth_header(ep).await?;
            if let Some(header) = &sent_auth {
                req = req.header(AUTHORIZATION, header);
            }
            let Some(resp) = self.try_send(req, attempt, &object).await? else {
                continue;
            };
            let status = resp.status();
            if status.is_success()
                || (status == StatusCode::RANGE_NOT_SATISFIABLE && range.is_some())
            {
                return Ok(resp);
            }
            match status {
                // One answer to a challenge per request: a token that expired
                // or was revoked early is replaced here.
                StatusCode::UNAUTHORIZED if !challenged => {
                    challenged = true;
                    let challenge = Challenge::parse(
                        resp.headers()
                            .get(WWW_AUTHENTICATE)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or(""),
                    );
                    if !self.authenticate(ep, challenge, sent_auth).await? {
                        return Err(self.unauthorized(ep, &target, RegistryFailure::Unauthorized));
                    }
                    attempt -= 1;
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    let kind = if status == StatusCode::FORBIDDEN {
                        RegistryFailure::Forbidden
                    } else {
                        RegistryFailure::Unauthorized
                    };
                    return Err(self.unauthorized(ep, &target, kind));
                }
                StatusCode::TOO_MANY_REQUESTS => {
                    let wait = retry_after(resp.headers());
                    let limits = rate_limit_figures(resp.headers());
                    match wait {
                        Some(w)
                            if w <= self.opts.max_retry_after && attempt < self.opts.attempts =>
                        {
                            self.reporter.warn(&format!(
                                "{target}: rate limited{limits}; waiting {}s as the registry asks",
                                w.as_secs()
                            ));
                            tokio::time::sleep(w).await;
                        }
                        _ => {
                            let kind = RegistryFailure::RateLimited {
                                limits: (!limits.is_empty()).then(|| limits.trim().to_string()),
                                retry_after: wait,
                            };
                            return Err(Error::registry(
                                target,
                                kind,
                                format!(
                                    "429 Too Many Requests: the registry's pull rate limit is reached{limits}{}; \
                                     log in (`docker login`) for a higher limit, use a mirror (--mirror URL), or wait",
                                    wait.map_or(String::new(), |w| format!(
                                        ", retry after {}s",
                                        w.as_secs()
                                    ))
                                ),
                            ));
                        }
                    }
                }
                s if s.is_server_error() && attempt < self.opts.attempts => {
                    let wait =
                        retry_after(resp.headers()).filter(|w| *w <= self.opts.max_retry_after);
                    tokio::time::sleep(wait.unwrap_or_else(|| self.backoff(attempt))).await;
                }
                StatusCode::NOT_FOUND => {
                    return Err(Error::registry(
                        target,
                        RegistryFailure::NotFound,
                        format!(
                            "404 Not Found: no {what} {} in {}; check the tag or digest",
                            path.rsplit('/').next().unwrap_or(path),
                            self.image.repository
                        ),
                    ));
                }
                s => {
                    let excerpt = if method == Method::HEAD {
                        String::new()
                    } else {
                        self.excerpt(resp).await
                    };
                    let kind = if s.is_server_error() {
                        RegistryFailure::ServerError { status: s.as_u16() }
                    } else {
                        RegistryFailure::Refused { status: s.as_u16() }
                    };
                    return Err(Error::registry(
                        target,
                        kind,
                        format!(
                            "the registry answered {s} for {what} {name}{}",
                            if excerpt.is_empty() {
                                String::new()
                            } else {
                                format!(": {excerpt}")
                            }
                        ),
                    ));
                }
            }
        }
    }

    /// The error for a 401 (or 403) that answering the challenge did not cure.
    fn unauthorized(&self, ep: &Endpoint, target: &str, kind: RegistryFailure) -> Error {
        let creds = ep.credentials.get().cloned().flatten();
        let who = match &creds {
            Some(c) => format!(
                "the credentials for {} ({}) from docker's config.json were refused or do not allow pulling it; \
                 check them with `docker login {}`",
                ep.credentials_key,
                c.who(),
                ep.credentials_key
            ),
            None => format!(
                "no credentials for {} were found in docker's config.json ({}); run `docker login {}` if it needs them",
                ep.credentials_key,
                credentials::config_path().map_or_else(
                    || "$DOCKER_CONFIG/config.json".to_string(),
                    |p| p.display().to_string()
                ),
                ep.credentials_key
            ),
        };
        Error::registry(
            target,
            kind,
            format!(
                "401 Unauthorized: the repository {} was not found or you are not authorised to pull it \
                 (for docker.io official images the name is library/NAME); {who}",
                self.image.repository
            ),
        )
    }

    /// The Authorization header for `ep`, renewing a bearer token about to expire.
    async fn auth_header(&self, ep: &Endpoint) -> Result<Option<String>> {
        let mut auth = ep.auth.lock().await;
        if let Auth::Bearer(token) = &*auth
            && Instant::now() >= token.renew_at
        {
            let challenge = ep.challenge.lock().await.clone();
            if let Some(Challenge::Bearer { realm, service, .. }) = challenge {
                *auth = Auth::Bearer(self.fetch_token(ep, &realm, service.as_deref()).await?);
            }
        }
        Ok(auth.header().map(str::to_string))
    }

    /// Answer a 401 challenge for a request that carried `sent`. Returns
    /// false when there is nothing more to try.
    async fn authenticate(
        &self,
        ep: &Endpoint,
        challenge: Challenge,
        sent: Option<String>,
    ) -> Result<bool> {
        let mut auth = ep.auth.lock().await;
        // Another request answered the same challenge while this one waited.
        if auth.header().is_some() && auth.header().map(str::to_string) != sent {
            return Ok(true);
        }
        match challenge {
            Challenge::Bearer {
                ref realm,
                ref service,
                ..
            } => {
                let token = self.fetch_token(ep, realm, service.as_deref()).await?;
                *auth = Auth::Bearer(token);
                *ep.challenge.lock().await = Some(challenge);
                Ok(true)
            }
            Challenge::Basic | Challenge::Other => {
                match self
                    .credentials(ep)
                    .await
                    .as_ref()
                    .and_then(auth::basic_header)
                {
                    Some(header) if sent.is_none() => {
                        *auth = Auth::Basic(header);
                        Ok(true)
                    }
                    _ => Ok(false),
                }
            }
        }
    }

    /// The credentials docker's config holds for `ep`, looked up once.
    async fn credentials(&self, ep: &Endpoint) -> Option<Credentials> {
        ep.credentials
            .get_or_init(|| async {
                let key = ep.credentials_key.clone();
                let found = tokio::task::spawn_blocking(move || lookup_credentials(&key))
                    .await
                    .expect("credential lookup thread panicked");
                match found {
                    Ok(c) => c,
                    Err(warning) => {
                        let warning = crate::error::report(&warning);
                        self.reporter
                            .warn(&format!("{warning}; pulling anonymously"));
                        None
                    }
                }
            })
            .await
            .clone()
    }

    /// Ask a token realm for a pull token, with the user's credentials when
    /// docker's config has some for this endpoint.
    async fn fetch_token(
        &self,
        ep: &Endpoint,
        realm: &str,
        service: Option<&str>,
    ) -> Result<Token> {
        let creds = self.credentials(ep).await;
        let realm_url = reqwest::Url::parse(realm).map_err(|_| {
            Error::registry(
                format!("{} ({})", self.image.name(), ep.label()),
                RegistryFailure::BadAnswer,
                format!(
                    "the registry names a token service that is not a URL: {}",
                    crate::error::sanitize(realm)
                ),
            )
        })?;
        let target = format!(
            "{} (token service {})",
            self.image.name(),
            realm_url.host_str().unwrap_or("?")
        );
        let scope = auth::pull_scope(&self.image.repository);
        let build = || match &creds {
            Some(Credentials::IdentityToken(refresh)) => self
                .http
                .post(realm_url.clone())
                .form(&auth::refresh_form(refresh, service, &scope)),
            creds => {
                let mut url = realm_url.clone();
                {
                    let mut q = url.query_pairs_mut();
                    q.append_pair("scope", &scope);
                    if let Some(s) = service {
                        q.append_pair("service", s);
                    }
                    if let Some(Credentials::Password { username, .. }) = creds {
                        q.append_pair("account", username);
                    }
                }
                let req = self.http.get(url);
                match creds.as_ref().and_then(auth::basic_header) {
                    Some(basic) => req.header(AUTHORIZATION, basic),
                    None => req,
                }
            }
        };
        // Before the answer, so the token is renewed early rather than late.
        let asked = Instant::now();
        let mut body = Memory::new(MAX_TOKEN_RESPONSE, |_| {
            Error::registry(
                &target,
                RegistryFailure::BadAnswer,
                format!("the token answer is larger than {MAX_TOKEN_RESPONSE} bytes"),
            )
        });
        // Boxed: a body's request can need a token (on a 401), and the
        // token's body is read by the same loop; async recursion needs a box.
        let status =
            Box::pin(self.fetch_body(&Source::Token(&build), &target, &mut body, None)).await?;
        let body = body.bytes;
        if !status.is_success() {
            let excerpt: String = String::from_utf8_lossy(&body).chars().take(300).collect();
            let reason = match (&creds, status) {
                // OAuth2 answers a bad refresh token with 400 invalid_grant.
                (
                    Some(c),
                    StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::BAD_REQUEST,
                ) => format!(
                    "refused the credentials for {} ({}) from docker's config.json ({status}); \
                     check them with `docker login {}`",
                    ep.credentials_key,
                    c.who(),
                    ep.credentials_key
                ),
                _ => format!("refused a pull token ({status})"),
            };
            return Err(Error::registry(
                target,
                token_refusal(status),
                if excerpt.trim().is_empty() {
                    reason
                } else {
                    format!("{reason}: {}", crate::error::sanitize(excerpt.trim()))
                },
            ));
        }
        auth::parse_token(&body, asked)
            .map_err(|e| Error::registry(target, RegistryFailure::BadAnswer, e.to_string()))
    }

    /// The start of an error answer's body, to quote: what arrives of its
    /// first few KB at the floor's pace (a failure to read it is no error).
    async fn excerpt(&self, mut resp: reqwest::Response) -> String {
        let mut body = Vec::new();
        let mut pace = Pace::new(self.opts.low_speed);
        while let Ok(Some(chunk)) = pace.chunk(&mut resp).await {
            body.extend_from_slice(&chunk);
            if body.len() as u64 >= MAX_ERROR_BODY {
                break;
            }
        }
        let text: String = String::from_utf8_lossy(&body).chars().take(300).collect();
        crate::error::sanitize(text.trim())
    }
}

/// What a body is asked for from, by [`Registry::fetch_body`].
enum Source<'a> {
    /// `path` in the image's repository on `ep`, sent as [`Registry::send`] does.
    Registry {
        ep: &'a Endpoint,
        path: &'a str,
        what: &'static str,
    },
    /// A token service; the request is built afresh for each attempt.
    Token(&'a (dyn Fn() -> reqwest::RequestBuilder + Sync)),
}

/// Where a body goes as it arrives.
/// Where a blob's bytes go: the caller owns storing and verifying them.
pub trait BlobSink: Send {
    /// How many bytes it holds: a download resumes from there.
    fn held(&self) -> u64;
    fn write(&mut self, chunk: &[u8]) -> Result<()>;
    /// Forget what arrived: the blob starts over.
    fn restart(&mut self) -> Result<()>;
    /// The body is complete: accept it (verified) or say why not; a
    /// `DigestMismatch` or `SizeMismatch` makes the download try again.
    fn finish(&mut self) -> Result<()>;
}

/// One body being read (see [`Registry::fetch_body`]).
trait Sink {
    fn len(&self) -> u64;
    fn write(&mut self, chunk: &[u8]) -> Result<()>;
    /// Forget what arrived: the body starts over.
    fn restart(&mut self) -> Result<()>;
}

/// A body read into memory (manifests, configs, token answers), up to `max`
/// bytes; more is the error `overflow` makes of the length reached.
struct Memory<F> {
    bytes: Vec<u8>,
    max: u64,
    overflow: F,
}

impl<F: Fn(u64) -> Error> Memory<F> {
    fn new(max: u64, overflow: F) -> Memory<F> {
        Memory {
            bytes: Vec::new(),
            max,
            overflow,
        }
    }
}

impl<F: Fn(u64) -> Error> Sink for Memory<F> {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn write(&mut self, chunk: &[u8]) -> Result<()> {
        let len = self.len() + chunk.len() as u64;
        if len > self.max {
            return Err((self.overflow)(len));
        }
        self.bytes.extend_from_slice(chunk);
        Ok(())
    }

    fn restart(&mut self) -> Result<()> {
        self.bytes.clear();
        Ok(())
    }
}

/// A layer blob streamed into the store, counted for progress.
struct Download<'a> {
    sink: &'a mut dyn BlobSink,
    received: &'a mut u64,
}

impl Sink for Download<'_> {
    fn len(&self) -> u64 {
        self.sink.held()
    }

    fn write(&mut self, chunk: &[u8]) -> Result<()> {
        self.sink.write(chunk)?;
        *self.received += chunk.len() as u64;
        Ok(())
    }

    fn restart(&mut self) -> Result<()> {
        self.sink.restart()
    }
}

/// Why a body stopped before its end.
enum Break {
    /// Cut, reset, or silent past the read timeout.
    Http(reqwest::Error),
    /// Slower than the floor: `rate` bytes/s over its window.
    TooSlow { rate: u64 },
}

/// The low-speed floor kept on one body: bytes are counted in windows of
/// the floor's length, and a window that ends short of `bytes_per_sec`
/// times its length ends the transfer.
struct Pace {
    floor: LowSpeed,
    start: Instant,
    bytes: u64,
}

impl Pace {
    fn new(floor: LowSpeed) -> Pace {
        Pace {
            floor,
            start: Instant::now(),
            bytes: 0,
        }
    }

    /// The next chunk of `resp`'s body; `None` at its end.
    async fn chunk(
        &mut self,
        resp: &mut reqwest::Response,
    ) -> std::result::Result<Option<impl std::ops::Deref<Target = [u8]> + use<>>, Break> {
        if self.floor.bytes_per_sec == 0 {
            return resp.chunk().await.map_err(Break::Http);
        }
        loop {
            let end = self.start + self.floor.window;
            // Dropping a pending `chunk()` loses nothing: the body keeps its place.
            match tokio::time::timeout_at(end.into(), resp.chunk()).await {
                Ok(Ok(Some(chunk))) => {
                    self.bytes += chunk.len() as u64;
                    self.settle()?;
                    return Ok(Some(chunk));
                }
                Ok(Ok(None)) => return Ok(None),
                Ok(Err(e)) => return Err(Break::Http(e)),
                Err(_) => self.settle()?,
            }
        }
    }

    /// At the end of a window: too slow, or on to the next window.
    fn settle(&mut self) -> std::result::Result<(), Break> {
        let elapsed = self.start.elapsed();
        if elapsed < self.floor.window {
            return Ok(());
        }
        let rate = (self.bytes as f64 / elapsed.as_secs_f64()) as u64;
        if rate < self.floor.bytes_per_sec {
            return Err(Break::TooSlow { rate });
        }
        self.start = Instant::now();
        self.bytes = 0;
        Ok(())
    }
}

/// The first byte of `Content-Range: bytes FIRST-LAST/SIZE`.
fn content_range_start(v: &str) -> Option<u64> {
    v.trim()
        .strip_prefix("bytes ")?
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// docker's config.json entry for `key`; `Err` is a warning to show.
fn lookup_credentials(key: &str) -> Result<Option<Credentials>> {
    let key = if key == DOCKER_HUB_API_HOST {
        "docker.io"
    } else {
        key
    };
    credentials::lookup(key)
}

/// `Retry-After` in either of its forms: seconds, or an HTTP date (a date
/// already past means now).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// Docker Hub's `ratelimit-limit: 100;w=21600` and `ratelimit-remaining: 0;w=21600`.
/// The kind of a token service's refusal.
fn token_refusal(status: StatusCode) -> RegistryFailure {
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::BAD_REQUEST => RegistryFailure::Unauthorized,
        StatusCode::FORBIDDEN => RegistryFailure::Forbidden,
        StatusCode::TOO_MANY_REQUESTS => RegistryFailure::RateLimited {
            limits: None,
            retry_after: None,
        },
        s if s.is_server_error() => RegistryFailure::ServerError { status: s.as_u16() },
        s => RegistryFailure::Refused { status: s.as_u16() },
    }
}

fn rate_limit_figures(headers: &HeaderMap) -> String {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| crate::error::sanitize(v.trim()))
    };
    match (get("ratelimit-limit"), get("ratelimit-remaining")) {
        (Some(limit), Some(remaining)) => format!(" (limit {limit}, remaining {remaining})"),
        (Some(limit), None) => format!(" (limit {limit})"),
        (None, Some(remaining)) => format!(" (remaining {remaining})"),
        (None, None) => String::new(),
    }
}

fn transient(e: &reqwest::Error) -> bool {
    (e.is_connect() || e.is_timeout() || e.is_request() || e.is_body()) && !proxy_refused(e)
}

/// The causes of `e`, outermost first. An `io::Error` that wraps another
/// error hands on that error's own source, skipping the error itself (where
/// rustls puts its verdict, often two `io::Error`s deep), so it is opened
/// with `get_ref` instead.
fn causes<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |c| match c.downcast_ref::<std::io::Error>() {
        Some(io) => io
            .get_ref()
            .map(|inner| inner as &(dyn std::error::Error + 'static)),
        None => c.source(),
    })
}

/// The proxy answered the tunnel request with 407: asking again will not help.
///
/// hyper-util keeps its tunnel error type private, so this one cause is
/// known only by its words; every other cause is found by its type.
fn proxy_refused(e: &reqwest::Error) -> bool {
    causes(e).any(|c| {
        c.source().is_none() && c.to_string() == "tunnel error: proxy authorization required"
    })
}

/// What rustls said, if the failure was in the TLS handshake.
fn tls_cause(e: &reqwest::Error) -> Option<&rustls::Error> {
    causes(e).find_map(|c| c.downcast_ref::<rustls::Error>())
}

fn connect_hint(e: &reqwest::Error) -> &'static str {
    let plain_http_answer =
        "TLS handshake failed; if the registry speaks plain HTTP, pass --plain-http";
    if proxy_refused(e) {
        return "the proxy wants credentials; put them in its URL: HTTPS_PROXY=http://USER:PASSWORD@HOST:PORT";
    }
    match tls_cause(e) {
        Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented) => {
            "the registry's TLS certificate is not trusted; for a private CA pass --ca-cert PEM"
        }
        // What rustls reads when the server answers a ClientHello in plain HTTP.
        Some(rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. }) => {
            plain_http_answer
        }
        Some(_) => plain_http_answer,
        None if e.is_timeout() => "the registry did not answer in time",
        None => {
            "cannot reach the registry; check the address, or set HTTPS_PROXY/HTTP_PROXY if a proxy is needed"
        }
    }
}

fn http_error(target: &str, action: &str, e: reqwest::Error) -> Error {
    Error::Http {
        target: target.to_string(),
        action: action.to_string(),
        source: e.without_url(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The endpoints in the order they are tried.
    fn sources(reg: &Registry) -> Vec<String> {
        reg.endpoints.iter().map(Endpoint::label).collect()
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(RETRY_AFTER, v.parse().unwrap());
            retry_after(&h)
        };
        assert_eq!(with("7"), Some(Duration::from_secs(7)));
        let soon = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(30));
        let wait = with(&soon).unwrap();
        assert!(
            wait > Duration::from_secs(27) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        assert_eq!(
            with("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO),
            "a date already past means now"
        );
        assert_eq!(with("soon"), None);
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    #[test]
    fn mirrors_parse_with_and_without_a_host() {
        let m: Mirror = "https://mirror.example:5000/".parse().unwrap();
        assert_eq!(
            (m.registry.as_str(), m.scheme.as_str(), m.host.as_str()),
            ("docker.io", "https", "mirror.example:5000")
        );
        let m: Mirror = "ghcr.io=http://127.0.0.1:5001".parse().unwrap();
        assert_eq!(
            (m.registry.as_str(), m.scheme.as_str(), m.host.as_str()),
            ("ghcr.io", "http", "127.0.0.1:5001")
        );
        for bad in ["mirror.example", "ftp://x", "https://x/path", "=https://x"] {
            assert!(bad.parse::<Mirror>().is_err(), "{bad}");
        }
    }

    #[test]
    fn mirrors_of_the_images_registry_come_first_in_order_then_the_origin() {
        let image = ImageRef::parse("nixos/nix:2.24").unwrap();
        let opts = RegistryOptions {
            mirrors: [
                "https://m1.example",
                "ghcr.io=https://ghcr-mirror.example",
                "http://m2.example:5000",
            ]
            .iter()
            .map(|m| m.parse().unwrap())
            .collect(),
            ..RegistryOptions::default()
        };
        let reg = Registry::new(
            &image,
            &opts,
            Arc::new(crate::ui::progress::Recorder::default()),
        )
        .unwrap();
        assert_eq!(
            sources(&reg),
            [
                "mirror https://m1.example",
                "mirror http://m2.example:5000",
                "registry-1.docker.io"
            ]
        );
        let image = ImageRef::parse("ghcr.io/org/img:1").unwrap();
        let reg = Registry::new(
            &image,
            &opts,
            Arc::new(crate::ui::progress::Recorder::default()),
        )
        .unwrap();
        assert_eq!(
            sources(&reg),
            ["mirror https://ghcr-mirror.example", "ghcr.io"]
        );
    }

    #[test]
    fn a_low_speed_floor_is_bytes_per_second_over_seconds() {
        assert_eq!(
            "1000/30".parse::<LowSpeed>().unwrap(),
            LowSpeed {
                bytes_per_sec: 1000,
                window: Duration::from_secs(30)
            }
        );
        assert_eq!(" 0 / 1 ".parse::<LowSpeed>().unwrap().bytes_per_sec, 0);
        for bad in ["1000", "1000/0", "fast/30", "1000/1.5", "-1/30"] {
            assert!(bad.parse::<LowSpeed>().is_err(), "{bad}");
        }
        assert_eq!(RegistryOptions::default().low_speed, LOW_SPEED);
    }

    #[test]
    fn content_range_gives_where_a_resumed_body_starts() {
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start("bytes */200"), None);
        assert_eq!(content_range_start("items 1-2/3"), None);
    }

    #[test]
    fn rate_limit_headers_are_reported() {
        let mut h = HeaderMap::new();
        h.insert("ratelimit-limit", "100;w=21600".parse().unwrap());
        h.insert("ratelimit-remaining", "0;w=21600".parse().unwrap());
        assert_eq!(
            rate_limit_figures(&h),
            " (limit 100;w=21600, remaining 0;w=21600)"
        );
        h.insert(RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
    }
}
