//! Command-line options, and their conversion into the core's plain option
//! structs. Options are parsed in two stages, raw arguments first, then
//! validated objects (platforms, mirrors), so that a bad value is an exit-2
//! usage error before any work starts.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::blobs::store::BlobStore;
use crate::commands::extract::ExtractOptions;
use crate::commands::fetch::FetchOptions;
use crate::commands::pull::PullOptions;
use crate::commands::runner_config::RunnerConfigOptions;
use crate::commands::status::StatusOptions;
use crate::error::{Error, Result};
use crate::gc::GcOptions;
use crate::nix::verify::VerifyOptions;
use crate::oci::platform::Platform;
use crate::oci::source::SourceName;
use crate::registry::client::{Mirror, RegistryOptions};
use crate::seed::output::Existing;
use crate::ui::progress::{Progress, Style};

const EXIT_CODES: &str = "\
Exit status:
  0    success (including \"DIR already holds this image\")
  1    failure: network, registry, verification, file system, or a damaged image file;
       DIR is left as it was
  2    bad usage: an invalid reference, platform, mirror or option
  130  interrupted (Ctrl-C or SIGTERM); DIR is left as it was";

const VERIFY_EXIT_CODES: &str = "\
Exit status:
  0    every store path matches the database (unregistered paths are only warned about)
  1    a store path is modified, missing or has a dangling reference (one line each),
       or DIR cannot be read
  2    bad usage: DIR holds no Nix database, or a --path is not a registered store path
  130  interrupted (Ctrl-C or SIGTERM)";

const RUNNER_CONFIG_EXIT_CODES: &str = "\
Exit status:
  0    the diff was shown, the file was written, or it was already configured
  1    the file cannot be read, parsed or replaced, has no docker runner, or a runner
       already mounts something else at /nix/store or /nix/var/nix/db; nothing is changed
  2    bad usage";

const GC_EXIT_CODES: &str = "\
Exit status:
  0    done (also when what must be kept is over --max-size: a warning says by how much)
  1    nix was busy for all of --wait, or the store or database cannot be changed; the
       store is left valid (each path either gone or untouched)
  2    bad usage: DIR holds no Nix database, a bad --max-size, --keep-days or --wait,
       or a --drop-image that names no recorded image
  130  interrupted (Ctrl-C or SIGTERM); the store is left valid";

/// Seed a shared Nix store for GitLab docker runners straight from a registry.
#[derive(Debug, Parser)]
#[command(name = "hydrafy", version, about, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Pull a pinned image from its registry, verify it, and unpack its Nix
    /// store and database into DIR (default ./nix-backup).
    #[command(after_help = EXIT_CODES)]
    Fetch(FetchArgs),
    /// Pull a pinned image from its registry into a file for an air-gapped
    /// host: an oci-archive when PATH ends in .tar, else an OCI layout directory.
    #[command(after_help = EXIT_CODES)]
    Pull(PullArgs),
    /// Unpack an image file (OCI layout directory, oci-archive or docker save
    /// tar) into DIR, with the same checks as fetch and no network at all.
    #[command(after_help = EXIT_CODES)]
    Extract(ExtractArgs),
    /// Show or clear the blob cache ($XDG_CACHE_HOME/hydrafy, default ~/.cache/hydrafy).
    Cache(CacheArgs),
    /// Check every registered store path in DIR (nix/store, nix/var/nix/db)
    /// against the Nix database: NAR hash and size, presence, references.
    /// Needs no nix binary and changes nothing.
    #[command(after_help = VERIFY_EXIT_CODES)]
    Verify(VerifyArgs),
    /// Add DIR/nix/store and DIR/nix/var/nix/db to the volumes of every docker
    /// runner in gitlab-runner's config.toml. Shows a diff; --write applies it.
    #[command(after_help = RUNNER_CONFIG_EXIT_CODES)]
    RunnerConfig(RunnerConfigArgs),
    /// Delete what no recorded image, gc root or recent use needs, least
    /// recently used first, within a size budget, while jobs keep running.
    #[command(after_help = GC_EXIT_CODES)]
    Gc(GcArgs),
    /// Show what DIR holds: images, sizes, what is kept and why, recent use,
    /// free space, and what `hydrafy gc` would free. Changes nothing.
    Status(StatusArgs),
    /// Print a completion script for SHELL on stdout, e.g.
    /// `hydrafy completions bash > /etc/bash_completion.d/hydrafy`.
    Completions(CompletionsArgs),
    /// Print the manual page (roff) on stdout, e.g.
    /// `hydrafy man > /usr/local/share/man/man1/hydrafy.1`; with COMMAND, that
    /// command's page (hydrafy-COMMAND.1).
    Man(ManArgs),
}

/// `hydrafy completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `hydrafy man`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// The command whose page to print (default: hydrafy's own, which lists them all).
    #[arg(value_name = "COMMAND")]
    pub command: Option<String>,
}

/// The completion script for `shell`.
pub fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "hydrafy", &mut script);
    script
}

/// The man page of hydrafy, or of one of its commands (`fetch`, `cache du`).
pub fn man_page(command: Option<&str>) -> Result<Vec<u8>> {
    let mut cmd = Cli::command();
    cmd.build();
    for name in command.iter().flat_map(|c| c.split_whitespace()) {
        let names: Vec<String> = cmd
            .get_subcommands()
            .map(|s| s.get_name().to_string())
            .collect();
        cmd = cmd.find_subcommand(name).cloned().ok_or_else(|| {
            Error::invalid(
                "command",
                name,
                format!(
                    "hydrafy has no such command; choose one of: {}",
                    names.join(", ")
                ),
            )
        })?;
    }
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd)
        .source(format!("hydrafy {}", env!("CARGO_PKG_VERSION")))
        .render(&mut page)
        .map_err(|e| Error::io("<man page>", "cannot render the man page", e))?;
    Ok(page)
}

/// `hydrafy gc`.
#[derive(Debug, Args)]
pub struct GcArgs {
    /// The seed folder (what `hydrafy fetch -o DIR` wrote).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Keep every path registered, added or read in the last N days (the last hour is always kept).
    #[arg(long, value_name = "N", default_value = "14")]
    pub keep_days: String,
    /// Stop deleting once the store is at most SIZE (bytes, or 500M, 200G, 1T).
    #[arg(long, value_name = "SIZE")]
    pub max_size: Option<String>,
    /// Stop keeping this recorded image (reference or digest); repeatable. The
    /// state file forgets it when the gc succeeds.
    #[arg(long, value_name = "REF")]
    pub drop_image: Vec<String>,
    /// List what would be deleted, largest first, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// How long to wait for running jobs' Nix processes to let go of the store.
    #[arg(long, value_name = "DURATION", default_value = "10m")]
    pub wait: String,
    #[command(flatten)]
    pub now: NowArg,
    #[command(flatten)]
    pub report: ReportArgs,
}

/// `hydrafy status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The seed folder (what `hydrafy fetch -o DIR` wrote).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    #[command(flatten)]
    pub now: NowArg,
    #[command(flatten)]
    pub report: ReportArgs,
}

/// Hidden: what "now" is, in Unix seconds. The test suite and gc-bench.sh
/// move it forward to age paths whose ctime they cannot set. An option only,
/// never read from the environment: a wrong clock makes gc delete more.
#[derive(Debug, Args)]
pub struct NowArg {
    #[arg(long = "now", hide = true, value_name = "UNIX_SECONDS")]
    pub now: Option<i64>,
}

impl GcArgs {
    /// Validated gc options.
    pub fn options(&self) -> Result<GcOptions> {
        Ok(GcOptions {
            dir: self.dir.clone(),
            keep_days: crate::gc::parse_keep_days(&self.keep_days)?,
            max_size: self
                .max_size
                .as_deref()
                .map(crate::gc::parse_size)
                .transpose()?,
            drop_images: self.drop_image.clone(),
            dry_run: self.dry_run,
            wait: crate::gc::parse_duration(&self.wait)?,
            now: self.now.now,
            jobs: std::thread::available_parallelism().map_or(1, usize::from),
        })
    }
}

impl StatusArgs {
    /// The core's options.
    pub fn options(&self) -> StatusOptions {
        StatusOptions {
            dir: self.dir.clone(),
            now: self.now.now,
            jobs: std::thread::available_parallelism().map_or(1, usize::from),
        }
    }
}

/// `hydrafy pull`.
#[derive(Debug, Args)]
pub struct PullArgs {
    #[arg(help = "The image: [REGISTRY/]REPO[:TAG][@sha256:HEX]")]
    pub image: String,
    /// Where to write: PATH.tar for an oci-archive, any other PATH for an OCI layout directory.
    #[arg(long, short = 'o', value_name = "PATH")]
    pub output: PathBuf,
    /// The platform to keep from a multi-platform image (default: this machine's).
    #[arg(
        long,
        value_name = "OS/ARCH[/VARIANT]",
        conflicts_with = "all_platforms"
    )]
    pub platform: Option<Platform>,
    /// Keep every platform of a multi-platform image.
    #[arg(long)]
    pub all_platforms: bool,
    /// Also write a sha256sum line for the archive to this file (check it with `sha256sum -c`).
    #[arg(long, value_name = "FILE")]
    pub checksum: Option<PathBuf>,
    /// What the far side holds: its seed's state file (DIR/.hydrafy-state.json,
    /// copied over) or an earlier archive made by `pull`. The archive then
    /// leaves out the layers it can do without; extract it there with --merge.
    #[arg(long, value_name = "STATE")]
    pub have: Option<PathBuf>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(flatten)]
    pub download: DownloadArgs,
    #[command(flatten)]
    pub report: ReportArgs,
}

/// `hydrafy verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The seed folder (what `hydrafy fetch -o DIR` wrote).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Check only this store path (/nix/store/HASH-NAME or HASH-NAME); repeatable.
    #[arg(long, value_name = "P")]
    pub path: Vec<String>,
    /// Hashing threads (default: one per core).
    #[arg(long, short = 'j', value_parser = clap::value_parser!(u16).range(1..=256))]
    pub jobs: Option<u16>,
    #[command(flatten)]
    pub report: ReportArgs,
}

/// `hydrafy runner-config`.
#[derive(Debug, Args)]
pub struct RunnerConfigArgs {
    /// gitlab-runner's config file (usually /etc/gitlab-runner/config.toml).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// The seed folder to mount (what `hydrafy fetch -o DIR` wrote); made absolute.
    #[arg(long, value_name = "DIR")]
    pub nix_backup: PathBuf,
    /// Replace the file (keeping FILE.bak); without it, only print the diff.
    #[arg(long)]
    pub write: bool,
    #[command(flatten)]
    pub report: ReportArgs,
}

/// `hydrafy extract`.
#[derive(Debug, Args)]
pub struct ExtractArgs {
    /// An OCI image layout directory, an oci-archive tar, or a docker save tar
    /// (plain, or gzip, zstd or xz compressed). To pick one image of several,
    /// skopeo's names: oci:DIR:REF, oci-archive:FILE:REF,
    /// docker-archive:FILE:REPO:TAG, docker-archive:FILE:@N (from 0).
    #[arg(value_name = "SOURCE")]
    pub source: String,
    /// Print the images SOURCE holds (reference, digest, platforms, size, and
    /// the SOURCE that picks each) and extract nothing.
    #[arg(long, conflicts_with_all = ["replace", "merge", "rootfs"])]
    pub list: bool,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub report: ReportArgs,
}

/// `hydrafy cache`.
#[derive(Debug, Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub action: CacheAction,
}

/// What to do with the cache.
#[derive(Debug, Subcommand)]
pub enum CacheAction {
    /// Print the cache directory.
    Path,
    /// Print how many verified blobs and unfinished downloads the cache holds, and their size.
    Du {
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Remove every cached blob and unfinished download (those a running
    /// hydrafy is writing are left alone).
    Clear,
}

impl VerifyArgs {
    /// The core's options.
    pub fn options(&self) -> VerifyOptions {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        VerifyOptions {
            dir: self.dir.clone(),
            paths: self.path.clone(),
            jobs: self.jobs.map_or(cores, usize::from),
        }
    }
}

impl RunnerConfigArgs {
    /// The core's options.
    pub fn options(&self) -> RunnerConfigOptions {
        RunnerConfigOptions {
            config: self.config.clone(),
            nix_backup: self.nix_backup.clone(),
            write: self.write,
        }
    }
}

/// `hydrafy fetch`.
#[derive(Debug, Args)]
pub struct FetchArgs {
    #[arg(help = "The image: [REGISTRY/]REPO[:TAG][@sha256:HEX], e.g. nixos/nix@sha256:<digest>")]
    pub image: String,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(flatten)]
    pub download: DownloadArgs,
    #[command(flatten)]
    pub report: ReportArgs,
}

/// Where and how the image is unpacked.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// The output directory. It receives nix/store and nix/var/nix/db.
    #[arg(long, short = 'o', value_name = "DIR", default_value = "nix-backup")]
    pub output: PathBuf,
    /// The platform to pick from a multi-platform image: OS/ARCH[/VARIANT]
    /// (default: this machine's).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: Option<Platform>,
    /// Unpack the whole image filesystem into DIR, not just the Nix store and database.
    #[arg(long)]
    pub rootfs: bool,
    /// If DIR holds another image, replace it (an atomic swap).
    #[arg(long, conflicts_with = "merge")]
    pub replace: bool,
    /// If DIR holds another image, add this image's store paths to it.
    #[arg(long)]
    pub merge: bool,
}

/// How to reach the registry.
#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// Talk plain HTTP (no TLS) to the image's registry.
    #[arg(long)]
    pub plain_http: bool,
    /// Trust this CA certificate (PEM) in addition to the system's; repeatable.
    #[arg(long, value_name = "PEM")]
    pub ca_cert: Vec<PathBuf>,
    /// Pull through a mirror first: URL mirrors docker.io, HOST=URL mirrors
    /// HOST. Repeatable; mirrors are tried in order, then the origin.
    #[arg(long, value_name = "[HOST=]URL")]
    pub mirror: Vec<Mirror>,
    /// Hidden: the first retry delay in milliseconds (doubled per attempt).
    /// The test suite shortens it so that retries do not slow it down.
    #[arg(long, hide = true, env = "HYDRAFY_RETRY_BACKOFF_MS", value_name = "MS")]
    pub retry_backoff_ms: Option<u64>,
    /// Hidden: give up on a connection silent for this many milliseconds
    /// (default 60000). The test suite shortens it to stage stalled transfers.
    #[arg(long, hide = true, env = "HYDRAFY_READ_TIMEOUT_MS", value_name = "MS")]
    pub read_timeout_ms: Option<u64>,
}

/// How blobs are downloaded.
#[derive(Debug, Args)]
pub struct DownloadArgs {
    /// Do not use or fill the blob cache ($XDG_CACHE_HOME/hydrafy).
    #[arg(long)]
    pub no_cache: bool,
    /// How many blobs to download at once.
    #[arg(long, short = 'j', default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: u16,
}

/// What is printed.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Print only warnings and errors.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Print one JSON summary object on stdout when done.
    #[arg(long)]
    pub json: bool,
}

impl ReportArgs {
    /// Progress on stderr in the style these options and the terminal call for.
    pub fn progress(&self) -> Progress {
        Progress::new(Style::detect(self.quiet))
    }
}

impl OutputArgs {
    /// `--replace` / `--merge` as one value.
    pub fn existing(&self) -> Existing {
        match (self.replace, self.merge) {
            (true, _) => Existing::Replace,
            (_, true) => Existing::Merge,
            _ => Existing::Refuse,
        }
    }
}

impl RegistryArgs {
    /// Validated registry options.
    pub fn options(&self) -> Result<RegistryOptions> {
        let mirrors = self.mirror.clone();
        let defaults = RegistryOptions::default();
        Ok(RegistryOptions {
            plain_http: self.plain_http,
            ca_certs: self.ca_cert.clone(),
            mirrors,
            backoff: self
                .retry_backoff_ms
                .map_or(defaults.backoff, Duration::from_millis),
            read_timeout: self
                .read_timeout_ms
                .filter(|ms| *ms > 0)
                .map_or(defaults.read_timeout, Duration::from_millis),
            ..defaults
        })
    }
}

/// The cache directory, or why there is none.
pub fn cache_dir() -> Result<PathBuf> {
    BlobStore::default_cache_dir().ok_or_else(|| {
        Error::invalid(
            "environment",
            "HOME",
            "neither XDG_CACHE_HOME nor HOME is set; pass --no-cache",
        )
    })
}

/// The blob cache directory, or `None` with `--no-cache`.
fn cache_option(no_cache: bool) -> Result<Option<PathBuf>> {
    if no_cache {
        Ok(None)
    } else {
        cache_dir().map(Some)
    }
}

impl PullArgs {
    /// Validated pull options.
    pub fn options(&self) -> Result<PullOptions> {
        Ok(PullOptions {
            image: self.image.clone(),
            output: self.output.clone(),
            platform: self.platform.clone(),
            all_platforms: self.all_platforms,
            registry: self.registry.options()?,
            cache: cache_option(self.download.no_cache)?,
            jobs: usize::from(self.download.jobs),
            checksum: self.checksum.clone(),
            have: self.have.clone(),
        })
    }
}

impl ExtractArgs {
    /// Validated extract options.
    pub fn options(&self) -> Result<ExtractOptions> {
        Ok(ExtractOptions {
            source: SourceName::parse(&self.source)?,
            output: self.output.output.clone(),
            platform: self.output.platform.clone(),
            rootfs: self.output.rootfs,
            existing: self.output.existing(),
        })
    }
}

impl FetchArgs {
    /// Validated fetch options.
    pub fn options(&self) -> Result<FetchOptions> {
        let cache = cache_option(self.download.no_cache)?;
        Ok(FetchOptions {
            image: self.image.clone(),
            output: self.output.output.clone(),
            platform: self.output.platform.clone(),
            rootfs: self.output.rootfs,
            existing: self.output.existing(),
            registry: self.registry.options()?,
            cache,
            jobs: usize::from(self.download.jobs),
        })
    }
}
