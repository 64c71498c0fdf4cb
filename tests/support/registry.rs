//! A real CNCF distribution registry (Debian's `docker-registry`) on a free
//! loopback port, with its storage in a temp dir. Killed when dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::require_tool;

pub struct Registry {
    child: Child,
    pub addr: String,
    pub dir: tempfile::TempDir,
}

/// A free TCP port on 127.0.0.1 (bound and released; racy only against other tests picking at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Registry {
    /// A plain-HTTP registry with no auth.
    pub fn start() -> Registry {
        Registry::start_with("")
    }

    /// A registry whose config.yml gets `extra` appended (auth, proxy, http.tls sections).
    /// `extra` may use `{dir}` for the registry's own temp dir.
    pub fn start_with(extra: &str) -> Registry {
        Registry::start_on(extra, None)
    }

    /// A second registry process serving `other`'s storage (e.g. without auth,
    /// as a CDN serves what the registry redirects to).
    pub fn start_sharing(extra: &str, other: &Registry) -> Registry {
        Registry::start_on(extra, Some(&other.dir.path().join("storage")))
    }

    fn start_on(extra: &str, storage: Option<&Path>) -> Registry {
        require_tool("docker-registry", "docker-registry");
        let dir = tempfile::Builder::new()
            .prefix("hydrafy-registry-")
            .tempdir()
            .unwrap();
        let mut last_log = String::new();
        // A port taken between free_port() and the registry's bind is retried on another.
        for _ in 0..5 {
            let port = free_port();
            let addr = format!("127.0.0.1:{port}");
            let extra = extra.replace("{dir}", &dir.path().display().to_string());
            let (http_extra, rest) = split_http(&extra);
            let config = format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{http_extra}{rest}",
                storage
                    .map_or_else(|| dir.path().join("storage"), Path::to_path_buf)
                    .display()
            );
            std::fs::write(dir.path().join("config.yml"), config).unwrap();
            let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(dir.path().join("config.yml"))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start docker-registry");
            if wait_ready(&mut child, &addr) {
                return Registry { child, addr, dir };
            }
            let _ = child.kill();
            let _ = child.wait();
            last_log = std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default();
        }
        panic!("docker-registry did not start: {last_log}");
    }

    /// Where the registry keeps a blob's bytes (to corrupt storage on purpose).
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn wait_ready(child: &mut Child, addr: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.write_all(format!("GET /v2/ HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes());
            let mut buf = [0u8; 12];
            if s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/") {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Lines under `http:` must be indented into that block; everything else is top level.
fn split_http(extra: &str) -> (String, String) {
    let mut http = String::new();
    let mut rest = String::new();
    for line in extra.lines() {
        if let Some(l) = line.strip_prefix("http.") {
            http.push_str("  ");
            http.push_str(l);
            http.push('\n');
        } else {
            rest.push_str(line);
            rest.push('\n');
        }
    }
    (http, rest)
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
