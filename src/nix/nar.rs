//! NAR serialisation of a file-system tree, streamed into SHA-256.
//!
//! Nix identifies a store path's contents by the SHA-256 of its NAR (Nix
//! ARchive) serialisation and records that hash and the NAR's size in its
//! database. `hydrafy verify` must recompute both without a `nix` binary (the
//! runner hosts often have none), so this module writes the NAR format as the
//! Nix manual's grammar describes it:
//!
//! - every string is its length as a little-endian `u64`, the bytes, then
//!   zero padding to a multiple of 8;
//! - a node is `(`, `type`, then `regular` (optional `executable` ``,
//!   `contents` and the bytes), `symlink` (`target` and the link text) or
//!   `directory` (one `entry ( name N node … )` per child, in byte order of
//!   the names), then `)`.
//!
//! The tree is walked once and file contents stream through a fixed buffer,
//! so memory stays bounded whatever the store path's size. Only owner-execute
//! is recorded for files, and ownership, times and other mode bits are not,
//! exactly as Nix does; a FIFO, socket or device cannot be in a NAR, so one is
//! an error naming its path. Files and directories are opened with
//! `O_NOATIME` ([`crate::nix::noatime`]): hashing a path is not using it.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use sha2::{Digest as _, Sha256};

use crate::nix::hash::NixHash;

/// The first string of every NAR.
const MAGIC: &[u8] = b"nix-archive-1";

/// Read buffer for file contents.
const BUF: usize = 256 * 1024;

/// Why a tree could not be serialised.
#[derive(Debug, thiserror::Error)]
pub enum NarError {
    #[error("{path}: {action}", path = .path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    /// A FIFO, socket or device node: NAR has no way to say it.
    #[error("{path}: is a {kind}, which a Nix store path cannot contain", path = .path.display())]
    Unsupported { path: PathBuf, kind: &'static str },
    /// A file's size changed while it was read (someone is writing it).
    #[error("{path}: changed size while it was read", path = .path.display())]
    Changed { path: PathBuf },
    #[error("interrupted")]
    Cancelled,
}

/// A NAR's SHA-256 and size, as the Nix database records them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NarInfo {
    pub hash: NixHash,
    pub size: u64,
}

/// Serialise `path` as a NAR into `out`; returns the bytes written.
pub fn dump(path: &Path, out: &mut dyn Write, cancel: &AtomicBool) -> Result<u64, NarError> {
    let mut w = NarWriter {
        out: Counting { inner: out, n: 0 },
        buf: vec![0; BUF],
        cancel,
    };
    w.string(MAGIC, path)?;
    w.node(path)?;
    Ok(w.out.n)
}

/// The NAR hash and size of `path`, without writing the NAR anywhere.
pub fn hash_path(path: &Path, cancel: &AtomicBool) -> Result<NarInfo, NarError> {
    let mut sink = HashSink(Sha256::new());
    let size = dump(path, &mut sink, cancel)?;
    Ok(NarInfo {
        hash: NixHash(sink.0.finalize().into()),
        size,
    })
}

/// An `io::Write` that only hashes.
struct HashSink(Sha256);

impl Write for HashSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Counting<'a> {
    inner: &'a mut dyn Write,
    n: u64,
}

struct NarWriter<'a> {
    out: Counting<'a>,
    buf: Vec<u8>,
    cancel: &'a AtomicBool,
}

impl NarWriter<'_> {
    fn raw(&mut self, bytes: &[u8], path: &Path) -> Result<(), NarError> {
        self.out.n += bytes.len() as u64;
        self.out
            .inner
            .write_all(bytes)
            .map_err(|source| NarError::Io {
                path: path.to_path_buf(),
                action: "cannot write the NAR",
                source,
            })
    }

    fn padding(&mut self, len: u64, path: &Path) -> Result<(), NarError> {
        let pad = (8 - (len % 8) as usize) % 8;
        self.raw(&[0u8; 8][..pad], path)
    }

    fn string(&mut self, bytes: &[u8], path: &Path) -> Result<(), NarError> {
        self.raw(&(bytes.len() as u64).to_le_bytes(), path)?;
        self.raw(bytes, path)?;
        self.padding(bytes.len() as u64, path)
    }

    fn strings(&mut self, list: &[&[u8]], path: &Path) -> Result<(), NarError> {
        list.iter().try_for_each(|s| self.string(s, path))
    }

    fn node(&mut self, path: &Path) -> Result<(), NarError> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(NarError::Cancelled);
        }
        let io_err = |action| {
            move |source| NarError::Io {
                path: path.to_path_buf(),
                action,
                source,
            }
        };
        let meta = fs::symlink_metadata(path).map_err(io_err("cannot stat"))?;
        let ft = meta.file_type();
        self.string(b"(", path)?;
        if ft.is_symlink() {
            let target = fs::read_link(path).map_err(io_err("cannot read symlink"))?;
            self.strings(&[b"type", b"symlink", b"target"], path)?;
            self.string(target.as_os_str().as_bytes(), path)?;
        } else if ft.is_file() {
            self.strings(&[b"type", b"regular"], path)?;
            if meta.mode() & 0o100 != 0 {
                self.strings(&[b"executable", b""], path)?;
            }
            self.string(b"contents", path)?;
            self.contents(path)?;
        } else if ft.is_dir() {
            self.strings(&[b"type", b"directory"], path)?;
            let mut names: Vec<OsString> = crate::nix::noatime::open_dir(path)
                .and_then(crate::nix::noatime::names)
                .map_err(io_err("cannot list directory"))?;
            names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            for name in names {
                let child = path.join(&name);
                self.strings(&[b"entry", b"(", b"name"], &child)?;
                self.string(&name.into_vec(), &child)?;
                self.string(b"node", &child)?;
                self.node(&child)?;
                self.string(b")", &child)?;
            }
        } else {
            use std::os::unix::fs::FileTypeExt;
            let kind = if ft.is_fifo() {
                "FIFO"
            } else if ft.is_socket() {
                "socket"
            } else {
                "device node"
            };
            return Err(NarError::Unsupported {
                path: path.to_path_buf(),
                kind,
            });
        }
        self.string(b")", path)
    }

    /// Length, bytes and padding of a regular file, streamed.
    fn contents(&mut self, path: &Path) -> Result<(), NarError> {
        let io_err = |action| {
            move |source| NarError::Io {
                path: path.to_path_buf(),
                action,
                source,
            }
        };
        // O_NOFOLLOW: the walk saw a regular file; never follow a link that
        // replaced it since. O_NOATIME: reading is not using (see `noatime`).
        let mut file = crate::nix::noatime::open_file(path).map_err(io_err("cannot open"))?;
        let len = file.metadata().map_err(io_err("cannot stat"))?.len();
        self.raw(&len.to_le_bytes(), path)?;
        let mut left = len;
        let mut buf = std::mem::take(&mut self.buf);
        let result = loop {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            // One read past the end (want == 0 uses a 1-byte probe) catches a file that grew.
            let probe = if want == 0 { 1 } else { want };
            let n = match file.read(&mut buf[..probe]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(io_err("cannot read")(e)),
            };
            if want == 0 {
                break if n == 0 {
                    Ok(())
                } else {
                    Err(NarError::Changed {
                        path: path.to_path_buf(),
                    })
                };
            }
            if n == 0 {
                break Err(NarError::Changed {
                    path: path.to_path_buf(),
                });
            }
            if let Err(e) = self.raw(&buf[..n], path) {
                break Err(e);
            }
            left -= n as u64;
        };
        self.buf = buf;
        result?;
        self.padding(len, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn nar_string(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s);
        out.resize(out.len().div_ceil(8) * 8, 0);
    }

    #[test]
    fn a_single_file_serialises_as_the_grammar_says() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("f");
        fs::write(&f, b"hello").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o755)).unwrap();
        let mut want = Vec::new();
        for s in [
            &b"nix-archive-1"[..],
            b"(",
            b"type",
            b"regular",
            b"executable",
            b"",
            b"contents",
            b"hello",
            b")",
        ] {
            nar_string(&mut want, s);
        }
        let mut got = Vec::new();
        let n = dump(&f, &mut got, &AtomicBool::new(false)).unwrap();
        assert_eq!(got, want);
        assert_eq!(n, want.len() as u64);
        let info = hash_path(&f, &AtomicBool::new(false)).unwrap();
        assert_eq!(info.size, want.len() as u64);
        assert_eq!(info.hash.0, <[u8; 32]>::from(Sha256::digest(&want)));
    }

    #[test]
    fn a_fifo_is_refused_with_its_path() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("pipe");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &p,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let err = hash_path(tmp.path(), &AtomicBool::new(false)).unwrap_err();
        assert!(
            matches!(err, NarError::Unsupported { ref path, .. } if *path == p),
            "{err}"
        );
    }

    #[test]
    fn a_cancelled_walk_stops() {
        let tmp = tempfile::tempdir().unwrap();
        let err = hash_path(tmp.path(), &AtomicBool::new(true)).unwrap_err();
        assert!(matches!(err, NarError::Cancelled));
    }
}
