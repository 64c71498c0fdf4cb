//! Real job containers on a seed, as a GitLab docker runner starts them:
//! podman with the seed's `nix/store` and `nix/var/nix/db` mounted into a job
//! image that has Debian's Nix, and nothing else shared.
//!
//! The job image is a root file system made once per test run by
//! `mmdebstrap --variant=apt --include=nix-bin bookworm` (about a minute) and
//! kept under the target dir, keyed by a stamp of its recipe; a lock file lets
//! parallel tests (and test binaries) share one build. Each job mounts it as
//! an overlay (`--rootfs ROOTFS:O`), so no job changes it.
//!
//! The defaults of podman on this kind of host (crun, systemd cgroups) do not
//! work, hence `--runtime runc --cgroup-manager cgroupfs`. Inside, root builds
//! with `sandbox = false` and an empty `build-users-group`, and no substituter
//! (the job has no network).
//!
//! Builds are ordered by events, never by sleeps: a job's builder can be
//! *gated*: it writes `SHARE/NAME.started` and then blocks reading the FIFO
//! `SHARE/NAME.gate` until the test [`Jobs::release`]s it. Every run of a
//! builder appends its name to `SHARE/built`, so a test can tell a build that
//! ran from one that Nix found in the store.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustix::fs::FlockOperation;
use sha2::{Digest as _, Sha256};

use super::image::{Comp, Image, Media, Pushed, layer, push};
use super::nix;
use super::registry::Registry;
use super::require_tool;

/// How long a test waits for an event in a job before it gives up (a hang
/// guard, not a timing assertion: every wait ends on the event itself).
const PATIENCE: Duration = Duration::from_secs(180);

/// Where the job's share folder is mounted.
const SHARE: &str = "/share";

/// The Nix settings that let root build in a job container with no network.
const NIX_CONFIG: &str = "sandbox = false\nbuild-users-group =\nsubstituters =\n";

/// The job image's root file system, built on first use.
pub fn rootfs() -> &'static Path {
    static ROOTFS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    require_tool("podman", "podman");
    require_tool("runc", "runc");
    require_tool("mmdebstrap", "mmdebstrap");
    assert!(
        rustix::process::geteuid().is_root(),
        "the job-container tests run mmdebstrap and podman as root; run them as root"
    );
    match ROOTFS.get_or_init(build_rootfs) {
        Ok(path) => path,
        Err(e) => panic!("{e}"),
    }
}

/// The host's apt sources when they are bookworm's (a host behind a local
/// mirror then builds from that mirror); otherwise mmdebstrap's default.
fn host_sources() -> Option<PathBuf> {
    [
        "/etc/apt/sources.list.d/debian.sources",
        "/etc/apt/sources.list",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| fs::read_to_string(p).is_ok_and(|s| s.contains("bookworm")))
}

fn build_rootfs() -> Result<PathBuf, String> {
    let sources = host_sources();
    let mut args: Vec<String> = ["--variant=apt", "--include=nix-bin", "bookworm"]
        .map(String::from)
        .to_vec();
    let mut recipe = args.join(" ");
    if let Some(s) = &sources {
        recipe.push_str(&fs::read_to_string(s).unwrap_or_default());
    }
    let stamp = &hex::encode(Sha256::digest(recipe.as_bytes()))[..16];
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("job-image");
    fs::create_dir_all(&base).map_err(|e| format!("create {}: {e}", base.display()))?;
    let lock_path = base.join(format!("{stamp}.lock"));
    let lock = File::create(&lock_path).map_err(|e| format!("{}: {e}", lock_path.display()))?;
    rustix::fs::flock(&lock, FlockOperation::LockExclusive)
        .map_err(|e| format!("lock {}: {e}", lock_path.display()))?;
    let done = base.join(stamp);
    let rootfs = done.join("rootfs");
    if rootfs.join("usr/bin/nix-build").is_file() {
        return Ok(rootfs);
    }
    // A build killed half-way left its folder: start over.
    let partial = base.join(format!("{stamp}.partial"));
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(|e| format!("remove {}: {e}", partial.display()))?;
    }
    fs::create_dir_all(&partial).map_err(|e| format!("create {}: {e}", partial.display()))?;
    args.push(partial.join("rootfs").display().to_string());
    if let Some(s) = &sources {
        args.push(s.display().to_string());
    }
    let log_path = partial.join("mmdebstrap.log");
    let log = File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let started = Instant::now();
    let status = Command::new("mmdebstrap")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .map_err(|e| format!("run mmdebstrap: {e}"))?;
    if !status.success() {
        let text = fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        return Err(format!(
            "mmdebstrap {} failed ({status}); the end of its log:\n{}",
            args.join(" "),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    fs::rename(&partial, &done).map_err(|e| format!("rename {}: {e}", partial.display()))?;
    eprintln!(
        "built the job image {} in {:.1}s",
        rootfs.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(rootfs)
}

/// Whether a derivation's builder waits for [`Jobs::release`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    Open,
    Gated,
}

/// Job containers on one seed, with a share folder on the host mounted at
/// `/share` in every job (derivations, gates, the builders' log).
pub struct Jobs {
    seed: PathBuf,
    share: PathBuf,
}

impl Jobs {
    /// Jobs on the seed at `seed` (a folder with `nix/store` and
    /// `nix/var/nix/db`), sharing the host folder `share`.
    pub fn new(seed: &Path, share: &Path) -> Jobs {
        assert!(
            seed.join("nix/var/nix/db/db.sqlite").is_file(),
            "no Nix database under {}",
            seed.display()
        );
        fs::create_dir_all(share).unwrap();
        Jobs {
            seed: seed.to_path_buf(),
            share: share.to_path_buf(),
        }
    }

    /// Write a derivation `NAME` whose builder (the job image's `/bin/sh`)
    /// logs its run, waits at its gate if `gate` says so, and writes
    /// `NAME\n` to `$out`. Returns the `.nix` file as the job sees it.
    pub fn derivation(&self, name: &str, gate: Gate) -> String {
        let wait = match gate {
            Gate::Open => String::new(),
            Gate::Gated => {
                let fifo = self.share.join(format!("{name}.gate"));
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &fifo,
                    rustix::fs::FileType::Fifo,
                    rustix::fs::Mode::from_raw_mode(0o600),
                    0,
                )
                .unwrap_or_else(|e| panic!("mkfifo {}: {e}", fifo.display()));
                // A gate opens once: a second run fails at once rather than
                // wait for a release that never comes. The FIFO is opened
                // read-write first (which does not block), so the test's
                // write finds a reader as soon as `started` exists.
                format!(
                    "if [ -e {SHARE}/$name.started ]; then echo $name was built twice >&2; exit 1; fi; \
                     exec 3<> {SHARE}/$name.gate; : > {SHARE}/$name.started; read go <&3; "
                )
            }
        };
        let script = format!("echo $name >> {SHARE}/built; {wait}echo $name > $out");
        let expr = format!(
            "derivation {{ name = \"{name}\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; \
             PATH = \"/bin:/usr/bin\"; args = [ \"-c\" \"{script}\" ]; }}\n"
        );
        fs::write(self.share.join(format!("{name}.nix")), expr).unwrap();
        format!("{SHARE}/{name}.nix")
    }

    /// The job script that builds derivation `NAME` and prints its output path.
    pub fn nix_build(name: &str) -> String {
        format!("nix-build {SHARE}/{name}.nix --no-out-link")
    }

    /// The podman command of a job that runs `script` with `sh -c`.
    pub fn command(&self, script: &str) -> Command {
        let rootfs = rootfs();
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "hydrafy-job-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mount = |host: &Path, inner: &str| format!("{}:{inner}:rw", host.display());
        let mut cmd = Command::new("podman");
        cmd.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs", "run"])
            .args(["--rm", "--name", &name, "--network", "none"])
            .args([
                "--ulimit",
                "nofile=4096:4096",
                "--ulimit",
                "nproc=4096:4096",
            ])
            .arg("-v")
            .arg(mount(&self.seed.join("nix/store"), "/nix/store"))
            .arg("-v")
            .arg(mount(&self.seed.join("nix/var/nix/db"), "/nix/var/nix/db"))
            .arg("-v")
            .arg(mount(&self.share, SHARE))
            .arg("-e")
            .arg(format!("NIX_CONFIG={NIX_CONFIG}"))
            .arg("--rootfs")
            .arg(format!("{}:O", rootfs.display()))
            .args(["sh", "-c", script])
            .stdin(Stdio::null());
        cmd
    }

    /// Run a job to completion.
    pub fn run(&self, script: &str) -> JobOutput {
        let out = self.command(script).output().expect("run podman");
        JobOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Start a job in the background.
    pub fn spawn(&self, script: &str) -> RunningJob {
        let mut cmd = self.command(script);
        let container = cmd
            .get_args()
            .skip_while(|a| *a != "--name")
            .nth(1)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        RunningJob::start(&mut cmd, container, true)
    }

    /// Wait until the gated builder of `name` has started in `job`.
    pub fn wait_started(&self, name: &str, job: &mut RunningJob) {
        let marker = self.share.join(format!("{name}.started"));
        let deadline = Instant::now() + PATIENCE;
        while !marker.exists() {
            if let Some(status) = job.exited() {
                panic!(
                    "job {} ended ({status}) before the builder of {name} started: {}",
                    job.name,
                    job.stderr.text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the builder of {name} did not start: {}",
                job.stderr.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Let the gated builder of `name`, which has started, finish.
    pub fn release(&self, name: &str) {
        let fifo = self.share.join(format!("{name}.gate"));
        assert!(
            self.share.join(format!("{name}.started")).exists(),
            "release {name} only once its builder has started"
        );
        // Non-blocking: the builder holds the FIFO open, so a reader exists.
        let mut gate = OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(&fifo)
            .unwrap_or_else(|e| panic!("open the gate {}: {e}", fifo.display()));
        gate.write_all(b"go\n").unwrap();
    }

    /// The derivations whose builders ran, in order, one line per run.
    pub fn builder_runs(&self) -> Vec<String> {
        fs::read_to_string(self.share.join("built"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// A finished job (or [`background`] process).
#[derive(Debug)]
pub struct JobOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl JobOutput {
    /// Assert it succeeded; returns the last line of its stdout (for a job
    /// that ran `nix-build`, the output path).
    pub fn ok(&self) -> String {
        assert!(
            self.status.success(),
            "it failed ({}): {}{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self.stdout.lines().last().unwrap_or("").trim().to_string()
    }
}

/// Lines of a job's stderr as they come, for waiting on one.
#[derive(Default)]
struct Stream {
    state: Mutex<(String, bool)>,
    changed: Condvar,
}

impl Stream {
    fn push(&self, line: &str) {
        self.state.lock().unwrap().0.push_str(line);
        self.changed.notify_all();
    }

    fn close(&self) {
        self.state.lock().unwrap().1 = true;
        self.changed.notify_all();
    }

    fn text(&self) -> String {
        self.state.lock().unwrap().0.clone()
    }
}

/// Start `cmd` (a hydrafy run beside the jobs) in the background.
pub fn background(cmd: &mut Command) -> RunningJob {
    let name = cmd.get_program().to_string_lossy().into_owned();
    RunningJob::start(cmd, name, false)
}

/// A job (or another process, see [`background`]) running in the
/// background; stopped (a job's container by its name) if dropped before it
/// finished or when it does not end.
pub struct RunningJob {
    child: Option<Child>,
    pub name: String,
    container: bool,
    stderr: Arc<Stream>,
    stderr_reader: Option<std::thread::JoinHandle<()>>,
    stdout_reader: Option<std::thread::JoinHandle<String>>,
}

impl RunningJob {
    fn start(cmd: &mut Command, name: String, container: bool) -> RunningJob {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let stderr = Arc::new(Stream::default());
        let mut pipe = BufReader::new(child.stderr.take().unwrap());
        let feed = Arc::clone(&stderr);
        let stderr_reader = std::thread::spawn(move || {
            let mut line = String::new();
            while pipe.read_line(&mut line).is_ok_and(|n| n > 0) {
                feed.push(&line);
                line.clear();
            }
            feed.close();
        });
        let mut pipe = child.stdout.take().unwrap();
        let stdout_reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        });
        RunningJob {
            child: Some(child),
            name,
            container,
            stderr,
            stderr_reader: Some(stderr_reader),
            stdout_reader: Some(stdout_reader),
        }
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.exited().is_none()
    }

    /// Stop it: a job's container by name (podman then ends), another process itself.
    fn stop(&mut self) {
        if self.container {
            let _ = Command::new("podman")
                .args(["kill", &self.name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        } else if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
        }
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().unwrap().try_wait().unwrap()
    }

    /// Wait until its stderr contains `needle`.
    pub fn wait_for_stderr(&mut self, needle: &str) {
        let deadline = Instant::now() + PATIENCE;
        let mut state = self.stderr.state.lock().unwrap();
        while !state.0.contains(needle) {
            assert!(
                !state.1,
                "{} ended without printing {needle:?}: {}",
                self.name, state.0
            );
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{} did not print {needle:?}: {}",
                self.name,
                state.0
            );
            state = self.stderr.changed.wait_timeout(state, left).unwrap().0;
        }
    }

    /// Wait for it to end (stopping it, and failing, if it does not).
    pub fn finish(mut self) -> JobOutput {
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = self.exited() {
                break status;
            }
            if Instant::now() > deadline {
                self.stop();
                panic!("{} did not end: {}", self.name, self.stderr.text());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.child.take();
        self.stderr_reader.take().unwrap().join().unwrap();
        let stdout = self.stdout_reader.take().unwrap().join().unwrap();
        JobOutput {
            status,
            stdout,
            stderr: self.stderr.text(),
        }
    }
}

impl Drop for RunningJob {
    fn drop(&mut self) {
        if self.child.is_some() {
            if self.exited().is_none() {
                self.stop();
            }
            let _ = self.child.take().unwrap().wait();
        }
    }
}

/// A Nix-layered image pushed to `reg` as `nixos/nix:TAG`, made from a real
/// store of sample sources called `names` (and a wrapper of each) under
/// `work/TAG`. A name in two images is the same store path in both.
pub fn nix_image(
    reg: &Registry,
    work: &Path,
    tag: &str,
    names: &[&str],
) -> (Pushed, nix::NixStore) {
    let mut sources = Vec::new();
    for name in names {
        let dir = work.join(tag).join(format!("src-{name}"));
        nix::sample_source(&dir, name, 200);
        sources.push((*name, dir));
    }
    let sources: Vec<(&str, &Path)> = sources.iter().map(|(n, d)| (*n, d.as_path())).collect();
    let store = nix::make_store(&work.join(tag).join("store"), &sources);
    let layers = nix::layers(&store)
        .iter()
        .map(|t| layer(t, Comp::Gzip, Media::Docker))
        .collect();
    let pushed = push(
        &reg.addr,
        "nixos/nix",
        Some(tag),
        &Image::new(Media::Docker, layers),
    );
    (pushed, store)
}

/// Whether `path` is valid in the store at `seed`, asked of the host's `nix-store`.
pub fn valid(seed: &Path, path: &str) -> bool {
    nix::is_valid(seed, path)
}

/// Assert the host's `nix-store --verify --check-contents` passes on `seed`.
pub fn assert_store_verifies(seed: &Path) {
    let (ok, text) = nix::verify(seed);
    assert!(
        ok,
        "nix-store --verify --check-contents on the seed: {text}"
    );
}
