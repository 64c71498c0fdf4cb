//! Talking to a registry: manifests and blobs over the distribution API.
//!
//! oci-client does the auth handshake: it reads the `WWW-Authenticate`
//! challenge, asks the token realm for `repository:NAME:pull` (anonymously or
//! with Basic credentials) and parses the token. hydrafy issues the manifest
//! and blob requests itself, on the same reqwest stack, because oci-client
//! (0.18) falls short there in ways a build host notices:
//!
//! - its errors drop the response headers, so a 429 loses `Retry-After` and
//!   Docker Hub's `ratelimit-limit`/`ratelimit-remaining`;
//! - it reads manifest bodies with no size bound and never compares the bytes
//!   received with a blob's descriptor size while streaming;
//! - it has no retry, and a token that expires mid-pull is not renewed on the
//!   401 that follows;
//! - its partial-blob API cannot tell "resumed" from "server ignored Range"
//!   in the way a resumable download into a verified store needs.
//!
//! Redirects (Docker Hub sends blob GETs to a CDN) are followed by reqwest,
//! which drops `Authorization` when the host changes. Mirrors are tried in
//! order before the origin; whatever serves the bytes, they are verified
//! against the pinned digest, and a mirror that lies is skipped with a warning.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderMap, RANGE, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use tokio::sync::Mutex;

use crate::blobstore::{BlobStore, BlobWriter};
use crate::credentials::{self, Credentials};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest::{Descriptor, MANIFEST_ACCEPT, MAX_MANIFEST_BYTES};
use crate::progress::Reporter;
use crate::reference::{DOCKER_HUB_API_HOST, ImageRef};

const USER_AGENT: &str = concat!("hydrafy/", env!("CARGO_PKG_VERSION"));
/// A bearer token without an `exp` claim is assumed to last this long (docker's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Renew a token this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(10);

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
    Bearer { header: String, expires: Instant },
    Basic { header: String },
}

/// One place an image can be pulled from: a mirror or the origin.
struct Endpoint {
    base: String,
    host: String,
    mirror: bool,
    credentials: Option<Credentials>,
    auth: Mutex<Auth>,
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
    oci: oci_client::Client,
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
        let mut pem = Vec::new();
        for path in &opts.ca_certs {
            let bytes = std::fs::read(path)
                .map_err(|e| Error::io(path, "cannot read CA certificate", e))?;
            pem.push((path.clone(), bytes));
        }
        let mut endpoints = Vec::new();
        let mut http_hosts = Vec::new();
        for m in opts.mirrors.iter().filter(|m| m.registry == image.registry) {
            if m.scheme == "http" {
                http_hosts.push(m.host.clone());
            }
            endpoints.push(Endpoint {
                base: format!("{}://{}", m.scheme, m.host),
                host: m.host.clone(),
                mirror: true,
                credentials: lookup_credentials(&m.host, &*reporter),
                auth: Mutex::new(Auth::Anonymous),
            });
        }
        let origin = image.api_host().to_string();
        let scheme = if opts.plain_http { "http" } else { "https" };
        if opts.plain_http {
            http_hosts.push(origin.clone());
        }
        endpoints.push(Endpoint {
            base: format!("{scheme}://{origin}"),
            host: origin,
            mirror: false,
            credentials: lookup_credentials(&image.registry, &*reporter),
            auth: Mutex::new(Auth::Anonymous),
        });

        let mut builder = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(opts.read_timeout);
        let mut oci_certs = Vec::new();
        for (path, bytes) in &pem {
            let certs =
                reqwest::Certificate::from_pem_bundle(bytes).map_err(|e| Error::Invalid {
                    what: "CA certificate",
                    input: path.display().to_string(),
                    reason: format!("not a PEM certificate bundle: {e}"),
                })?;
            builder = builder.tls_certs_merge(certs);
            oci_certs.push(oci_client::client::Certificate {
                encoding: oci_client::client::CertificateEncoding::Pem,
                data: bytes.clone(),
            });
        }
        let http = builder.build().map_err(|e| {
            Error::registry(image.to_string(), format!("cannot set up HTTP client: {e}"))
        })?;
        let oci = oci_client::Client::try_from(oci_client::client::ClientConfig {
            protocol: oci_client::client::ClientProtocol::HttpsExcept(http_hosts),
            extra_root_certificates: oci_certs,
            connect_timeout: Some(Duration::from_secs(30)),
            read_timeout: Some(opts.read_timeout),
            user_agent: USER_AGENT,
            ..Default::default()
        })
        .map_err(|e| {
            Error::registry(
                image.to_string(),
                format!("cannot set up registry client: {e}"),
            )
        })?;
        Ok(Registry {
            http,
            oci,
            image: image.clone(),
            endpoints,
            opts: opts.clone(),
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
                Err(e) if ep.mirror && !matches!(e, Error::Interrupted) => {
                    self.reporter.warn(&format!(
                        "{}: {}; trying the next source",
                        ep.label(),
                        crate::error::report(&e)
                    ));
                    last_err = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err
            .unwrap_or_else(|| Error::registry(self.image.to_string(), "no registry endpoint")))
    }

    async fn manifest_from(&self, ep: &Endpoint, reference: &str) -> Result<Vec<u8>> {
        let path = format!("manifests/{reference}");
        let mut resp = self.send(ep, Method::GET, &path, None, "manifest").await?;
        let target = format!("{} manifest {reference}", self.image.name());
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_MANIFEST_BYTES)
        {
            return Err(Error::registry(
                target,
                format!("manifest larger than {MAX_MANIFEST_BYTES} bytes"),
            ));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| http_error(&target, "download interrupted", e))?
        {
            body.extend_from_slice(&chunk);
            if body.len() as u64 > MAX_MANIFEST_BYTES {
                return Err(Error::registry(
                    target,
                    format!("manifest larger than {MAX_MANIFEST_BYTES} bytes"),
                ));
            }
        }
        Ok(body)
    }

    /// The digest a tag points at now, from a HEAD request (Docker Hub does
    /// not count HEADs against the pull rate limit). `None` when the registry
    /// does not say.
    pub async fn head_digest(&self, tag: &str) -> Result<Option<Digest>> {
        let ep = self.endpoints.last().expect("origin endpoint");
        let resp = self
            .send(
                ep,
                Method::HEAD,
                &format!("manifests/{tag}"),
                None,
                "manifest",
            )
            .await?;
        Ok(resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()))
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
        for ep in &self.endpoints {
            let result = async {
                let mut resp = self
                    .send(
                        ep,
                        Method::GET,
                        &format!("blobs/{}", desc.digest),
                        None,
                        "blob",
                    )
                    .await?;
                let target = format!("blob {}", desc.digest);
                let mut body = Vec::new();
                while let Some(chunk) = resp
                    .chunk()
                    .await
                    .map_err(|e| http_error(&target, "download interrupted", e))?
                {
                    body.extend_from_slice(&chunk);
                    if body.len() as u64 > desc.size {
                        break;
                    }
                }
                check_bytes(desc, &body)?;
                Ok(body)
            }
            .await;
            match result {
                Ok(b) => return Ok(b),
                Err(e) if ep.mirror && !matches!(e, Error::Interrupted) => {
                    self.reporter.warn(&format!(
                        "{}: {}; trying the next source",
                        ep.label(),
                        crate::error::report(&e)
                    ));
                    last_err = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err
            .unwrap_or_else(|| Error::registry(self.image.to_string(), "no registry endpoint")))
    }

    /// Download a blob into `store`, verified, resuming interrupted transfers
    /// with Range requests. Returns the stored path and the bytes received.
    pub async fn download_blob(
        &self,
        desc: &Descriptor,
        store: &BlobStore,
    ) -> Result<(PathBuf, u64)> {
        let mut last_err = None;
        for ep in &self.endpoints {
            let mut writer = store.writer(desc)?;
            let mut received = 0;
            let result = self
                .download_from(ep, desc, &mut writer, &mut received)
                .await;
            let result = result.and_then(|()| writer.commit());
            match result {
                Ok(path) => return Ok((path, received)),
                Err(e) if ep.mirror && !matches!(e, Error::Interrupted) => {
                    self.reporter.warn(&format!(
                        "{}: {}; trying the next source",
                        ep.label(),
                        crate::error::report(&e)
                    ));
                    last_err = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err
            .unwrap_or_else(|| Error::registry(self.image.to_string(), "no registry endpoint")))
    }

    async fn download_from(
        &self,
        ep: &Endpoint,
        desc: &Descriptor,
        writer: &mut BlobWriter,
        received: &mut u64,
    ) -> Result<()> {
        let target = format!("blob {}", desc.digest);
        let path = format!("blobs/{}", desc.digest);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let offset = writer.len();
            let range = (offset > 0).then_some(offset);
            let mut resp = self.send(ep, Method::GET, &path, range, "blob").await?;
            if range.is_some() && resp.status() != StatusCode::PARTIAL_CONTENT {
                // The server ignored Range and sends everything: start over.
                writer.restart()?;
            }
            let failure = loop {
                match resp.chunk().await {
                    Ok(Some(chunk)) => {
                        writer.write(&chunk)?;
                        *received += chunk.len() as u64;
                        self.reporter.downloaded(chunk.len() as u64);
                    }
                    Ok(None) => break None,
                    Err(e) => break Some(e),
                }
            };
            match failure {
                // The server sent all it has for this blob: that is its size.
                None if writer.len() != desc.size => {
                    return Err(Error::SizeMismatch {
                        what: "blob",
                        digest: desc.digest,
                        expected: desc.size,
                        found: writer.len(),
                        truncated: false,
                    });
                }
                None => return Ok(()),
                // The transfer broke off: resume from what arrived, a bounded number of times.
                Some(e) if attempt >= self.opts.attempts => {
                    return Err(http_error(
                        &target,
                        "download interrupted too many times",
                        e,
                    ));
                }
                Some(_) => tokio::time::sleep(self.backoff(attempt)).await,
            }
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let base = self
            .opts
            .backoff
            .saturating_mul(1 << attempt.min(6).saturating_sub(1));
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
        let mut attempt = 0;
        let mut authenticated = false;
        loop {
            attempt += 1;
            let mut req = self.http.request(method.clone(), &url);
            if what == "manifest" {
                req = req.header(ACCEPT, MANIFEST_ACCEPT.join(", "));
            }
            if let Some(offset) = range {
                req = req.header(RANGE, format!("bytes={offset}-"));
            }
            if let Some(header) = self.auth_header(ep).await? {
                req = req.header(AUTHORIZATION, header);
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) if attempt < self.opts.attempts && transient(&e) => {
                    tokio::time::sleep(self.backoff(attempt)).await;
                    continue;
                }
                Err(e) => return Err(http_error(&target, connect_hint(&e), e)),
            };
            let status = resp.status();
            if status.is_success() {
                return Ok(resp);
            }
            match status {
                StatusCode::UNAUTHORIZED if !authenticated => {
                    authenticated = true;
                    self.authenticate(ep, resp.headers()).await?;
                    attempt -= 1;
                }
                StatusCode::UNAUTHORIZED => {
                    return Err(Error::registry(
                        target,
                        format!(
                            "401 Unauthorized: the repository {} was not found or you are not authorised to pull it; \
                             for docker.io official images the name is library/NAME; credentials come from docker's \
                             config.json (`docker login`)",
                            self.image.repository
                        ),
                    ));
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
                            return Err(Error::registry(
                                target,
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
                        format!(
                            "404 Not Found: no {what} {} in {}; check the tag or digest",
                            path.rsplit('/').next().unwrap_or(path),
                            self.image.repository
                        ),
                    ));
                }
                s => {
                    let body = if method == Method::HEAD {
                        String::new()
                    } else {
                        resp.text().await.unwrap_or_default()
                    };
                    let excerpt: String = body.chars().take(300).collect();
                    return Err(Error::registry(
                        target,
                        format!(
                            "the registry answered {s} for {what} {}{}",
                            path.rsplit('/').next().unwrap_or(path),
                            if excerpt.is_empty() {
                                String::new()
                            } else {
                                format!(": {}", excerpt.trim())
                            }
                        ),
                    ));
                }
            }
        }
    }

    /// The Authorization header for `ep`, renewing an expired bearer token.
    async fn auth_header(&self, ep: &Endpoint) -> Result<Option<String>> {
        let mut auth = ep.auth.lock().await;
        match &*auth {
            Auth::Anonymous => Ok(None),
            Auth::Basic { header } => Ok(Some(header.clone())),
            Auth::Bearer { header, expires } if Instant::now() < *expires => {
                Ok(Some(header.clone()))
            }
            Auth::Bearer { .. } => {
                *auth = self.fetch_token(ep).await?;
                Ok(match &*auth {
                    Auth::Bearer { header, .. } | Auth::Basic { header } => Some(header.clone()),
                    Auth::Anonymous => None,
                })
            }
        }
    }

    /// Answer a 401 challenge: a bearer token from the realm, or Basic credentials.
    async fn authenticate(&self, ep: &Endpoint, headers: &HeaderMap) -> Result<()> {
        let challenge = headers
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let mut auth = ep.auth.lock().await;
        if challenge.starts_with("bearer") {
            *auth = self.fetch_token(ep).await?;
        } else if let Some(c) = &ep.credentials {
            *auth = Auth::Basic {
                header: basic_header(c),
            };
        }
        Ok(())
    }

    async fn fetch_token(&self, ep: &Endpoint) -> Result<Auth> {
        let reference = oci_client::Reference::with_tag(
            ep.host.clone(),
            self.image.repository.clone(),
            "latest".to_string(),
        );
        let creds = match &ep.credentials {
            Some(c) => {
                oci_client::secrets::RegistryAuth::Basic(c.username.clone(), c.password.clone())
            }
            None => oci_client::secrets::RegistryAuth::Anonymous,
        };
        let token = self
            .oci
            .auth(&reference, &creds, oci_client::RegistryOperation::Pull)
            .await
            .map_err(|e| {
                Error::registry(
                    format!("{} ({})", self.image.name(), ep.label()),
                    format!(
                        "the token service refused a pull token{}: {}",
                        if ep.credentials.is_some() {
                            " for the configured credentials"
                        } else {
                            ""
                        },
                        crate::error::sanitize(&e.to_string())
                    ),
                )
            })?;
        Ok(match token {
            Some(token) => Auth::Bearer {
                expires: token_expiry(&token),
                header: format!("Bearer {token}"),
            },
            None => match &ep.credentials {
                Some(c) => Auth::Basic {
                    header: basic_header(c),
                },
                None => Auth::Anonymous,
            },
        })
    }

    /// The endpoints in the order they are tried, for messages.
    pub fn sources(&self) -> Vec<String> {
        self.endpoints.iter().map(Endpoint::label).collect()
    }
}

fn lookup_credentials(registry: &str, reporter: &dyn Reporter) -> Option<Credentials> {
    let key = if registry == DOCKER_HUB_API_HOST {
        "docker.io"
    } else {
        registry
    };
    match credentials::lookup(key) {
        Ok(c) => c,
        Err(warning) => {
            reporter.warn(&format!("{warning}; pulling anonymously"));
            None
        }
    }
}

fn basic_header(c: &Credentials) -> String {
    let raw = format!("{}:{}", c.username, c.password);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// When a bearer token stops being good: its JWT `exp`, less a margin.
fn token_expiry(token: &str) -> Instant {
    let exp = token
        .split('.')
        .nth(1)
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p.trim_end_matches('='))
                .ok()
        })
        .and_then(|json| serde_json::from_slice::<serde_json::Value>(&json).ok())
        .and_then(|claims| claims.get("exp").and_then(|e| e.as_u64()));
    let lifetime = match exp {
        Some(exp) => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            Duration::from_secs(exp.saturating_sub(now))
        }
        None => DEFAULT_TOKEN_LIFETIME,
    };
    Instant::now() + lifetime.saturating_sub(TOKEN_MARGIN)
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// Docker Hub's `ratelimit-limit: 100;w=21600` and `ratelimit-remaining: 0;w=21600`.
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
    e.is_connect() || e.is_timeout() || e.is_request() || e.is_body()
}

fn connect_hint(e: &reqwest::Error) -> &'static str {
    let chain = crate::error::report(e).to_ascii_lowercase();
    if chain.contains("certificate") || chain.contains("unknownissuer") {
        "the registry's TLS certificate is not trusted; for a private CA pass --ca-cert PEM"
    } else if chain.contains("http2")
        || chain.contains("invalid http version")
        || chain.contains("wrong version number")
    {
        "TLS handshake failed; if the registry speaks plain HTTP, pass --plain-http"
    } else if e.is_timeout() {
        "the registry did not answer in time"
    } else {
        "cannot reach the registry; check the address, or set HTTPS_PROXY/HTTP_PROXY if a proxy is needed"
    }
}

fn http_error(target: &str, action: &str, e: reqwest::Error) -> Error {
    Error::Http {
        target: target.to_string(),
        action: action.to_string(),
        source: e.without_url(),
    }
}

fn check_bytes(desc: &Descriptor, bytes: &[u8]) -> Result<()> {
    if bytes.len() as u64 != desc.size {
        return Err(Error::SizeMismatch {
            what: "blob",
            digest: desc.digest,
            expected: desc.size,
            found: bytes.len() as u64,
            truncated: bytes.len() as u64 > desc.size,
        });
    }
    desc.digest.verify(
        "blob",
        bytes,
        "the registry, a mirror or a proxy served different bytes than the image names",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn token_expiry_comes_from_the_jwt_exp_claim() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{{\"exp\":{}}}", now + 300));
        let left = token_expiry(&format!("h.{claims}.s")) - Instant::now();
        assert!(
            left > Duration::from_secs(280) && left <= Duration::from_secs(290),
            "{left:?}"
        );
        let left = token_expiry("opaque") - Instant::now();
        assert!(left <= DEFAULT_TOKEN_LIFETIME - TOKEN_MARGIN);
    }
}
