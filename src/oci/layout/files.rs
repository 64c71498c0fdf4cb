//! The files of an image archive, found by name: a directory as it is, or a
//! tar indexed once (entry name to offset and size, links resolved), read
//! with positioned reads so that any number of readers share one handle.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::error::{Error, Result};
use crate::oci::compressed::{Packing, decompress};
use crate::oci::digest::Digest;
use crate::oci::manifest::Descriptor;
use crate::ui::progress::Reporter;
use crate::unpack::decompress::read_full;

use super::{MAX_ENTRIES, blob_name};

#[derive(Clone, Debug)]
pub(super) enum Entry {
    File { offset: u64, size: u64 },
    Link(String),
}

/// The files of an image archive: a directory, or a tar indexed by name.
pub(super) enum Files {
    Dir(PathBuf),
    Tar {
        path: PathBuf,
        file: Arc<File>,
        entries: HashMap<String, Entry>,
    },
}

/// A reader over `file` from `pos` to `end`, with positioned reads, so that
/// any number of them share one open file.
pub(super) struct Slice {
    file: Arc<File>,
    pos: u64,
    end: u64,
}

impl Read for Slice {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the image file ends inside an entry",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Files {
    /// Open `path`: a directory, a tar, or a compressed tar (decompressed
    /// into `scratch`).
    pub(super) fn open(
        path: &Path,
        scratch: &Path,
        cancel: &AtomicBool,
        reporter: &dyn Reporter,
    ) -> Result<Files> {
        let meta =
            fs::metadata(path).map_err(|e| Error::io(path, "cannot open image archive", e))?;
        if meta.is_dir() {
            return Ok(Files::Dir(path.to_path_buf()));
        }
        let mut file =
            File::open(path).map_err(|e| Error::io(path, "cannot open image archive", e))?;
        let mut head = [0u8; Packing::HEAD];
        let n = read_full(&mut file, &mut head)
            .map_err(|e| Error::io(path, "cannot read image archive", e))?;
        let packing = Packing::sniff(&head[..n]);
        let file = match packing {
            None => {
                file.seek(SeekFrom::Start(0)).map_err(|e| Error::Archive {
                    what: "image archive",
                    input: path.display().to_string(),
                    reason: format!(
                        "cannot be read out of order ({e}): an uncompressed image file must be a regular file; save it to one first"
                    ),
                })?;
                file
            }
            Some(Packing::Bzip2) => {
                return Err(Error::Archive {
                    what: "image archive",
                    input: path.display().to_string(),
                    reason: "is bzip2-compressed, which hydrafy does not read; decompress it first (bunzip2 -k) and extract the .tar".to_string(),
                });
            }
            Some(p) => {
                reporter.info(&format!(
                    "{}: {}-compressed; decompressing it into a temporary file in {}",
                    path.display(),
                    p.name(),
                    scratch.display()
                ));
                // The first bytes are read already: a pipe cannot be rewound.
                let input = io::Cursor::new(head[..n].to_vec()).chain(file);
                decompress(path, input, p, scratch, cancel)?
            }
        };
        let mut entries = HashMap::new();
        let not_tar = |e: io::Error| Error::Archive {
            what: "image archive",
            input: path.display().to_string(),
            reason: match packing {
                None => format!("not a tar archive or an OCI layout directory ({e})"),
                Some(p) => format!(
                    "a {}-compressed file that is not a tar archive ({e})",
                    p.name()
                ),
            },
        };
        let mut archive = tar::Archive::new(&file);
        for entry in archive.entries_with_seek().map_err(not_tar)? {
            let entry = entry.map_err(not_tar)?;
            if entries.len() >= MAX_ENTRIES {
                return Err(not_tar(io::Error::other("too many entries")));
            }
            let name = clean(&entry.path_bytes());
            match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    entries.insert(
                        name,
                        Entry::File {
                            offset: entry.raw_file_position(),
                            size: entry.size(),
                        },
                    );
                }
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    let target = entry
                        .link_name_bytes()
                        .map(|t| t.into_owned())
                        .unwrap_or_default();
                    let target = if entry.header().entry_type() == tar::EntryType::Symlink {
                        let base = Path::new(&name).parent().unwrap_or(Path::new(""));
                        clean(
                            base.join(String::from_utf8_lossy(&target).as_ref())
                                .to_string_lossy()
                                .as_bytes(),
                        )
                    } else {
                        clean(&target)
                    };
                    entries.insert(name, Entry::Link(target));
                }
                _ => {}
            }
        }
        Ok(Files::Tar {
            path: path.to_path_buf(),
            file: Arc::new(file),
            entries,
        })
    }

    pub(super) fn source(&self) -> &Path {
        match self {
            Files::Dir(p) | Files::Tar { path: p, .. } => p,
        }
    }

    /// Offset and size of `name` in a tar, following up to a few links.
    pub(super) fn locate(&self, name: &str) -> Option<(u64, u64)> {
        let Files::Tar { entries, .. } = self else {
            return None;
        };
        let mut name = name.to_string();
        for _ in 0..8 {
            match entries.get(&name)? {
                Entry::File { offset, size } => return Some((*offset, *size)),
                Entry::Link(target) => name = target.clone(),
            }
        }
        None
    }

    pub(super) fn size(&self, name: &str) -> Option<u64> {
        match self {
            Files::Dir(dir) => fs::metadata(dir.join(name))
                .ok()
                .filter(|m| m.is_file())
                .map(|m| m.len()),
            Files::Tar { .. } => self.locate(name).map(|(_, size)| size),
        }
    }

    pub(super) fn has_blob(&self, digest: &Digest) -> bool {
        self.size(&blob_name(digest)).is_some()
    }

    /// A stream over `name` and its size.
    pub(super) fn stream(&self, name: &str) -> Result<(Box<dyn Read + Send>, u64)> {
        let missing = || Error::Archive {
            what: "image archive",
            input: self.source().display().to_string(),
            reason: format!("{name} is missing; the archive is incomplete, copy it again"),
        };
        match self {
            Files::Dir(dir) => {
                let path = dir.join(name);
                let file = match File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing()),
                    Err(e) => return Err(Error::io(&path, "cannot open", e)),
                };
                let size = file
                    .metadata()
                    .map_err(|e| Error::io(&path, "cannot stat", e))?
                    .len();
                Ok((Box::new(file), size))
            }
            Files::Tar { file, .. } => {
                let (offset, size) = self.locate(name).ok_or_else(missing)?;
                let slice = Slice {
                    file: Arc::clone(file),
                    pos: offset,
                    end: offset + size,
                };
                Ok((Box::new(slice), size))
            }
        }
    }

    /// How the file `name` is compressed, from its first bytes.
    pub(super) fn packing(&self, name: &str) -> Result<Option<Packing>> {
        let (mut r, _) = self.stream(name)?;
        let mut head = [0u8; Packing::HEAD];
        let n = read_full(&mut r, &mut head)
            .map_err(|e| Error::io(self.source().join(name), "cannot read", e))?;
        Ok(Packing::sniff(&head[..n]))
    }

    /// Read a small file whole; `max` bounds it.
    pub(super) fn read(&self, name: &str, max: u64) -> Result<Vec<u8>> {
        let (mut r, size) = self.stream(name)?;
        if size > max {
            return Err(Error::Archive {
                what: "image archive",
                input: self.source().display().to_string(),
                reason: format!("{name} is {size} bytes, more than the {max} allowed for it"),
            });
        }
        let mut out = Vec::with_capacity(size as usize);
        r.read_to_end(&mut out)
            .map_err(|e| Error::io(self.source().join(name), "cannot read", e))?;
        Ok(out)
    }

    /// Read a blob named by `desc` and check digest and size.
    pub(super) fn blob(&self, desc: &Descriptor, what: &'static str, max: u64) -> Result<Vec<u8>> {
        let bytes = self.read(&blob_name(&desc.digest), max)?;
        desc.check(what, &bytes, "the archive is corrupt; copy it again")?;
        Ok(bytes)
    }
}

pub(super) fn clean(name: &[u8]) -> String {
    crate::unpack::fsroot::normalize(name)
        .to_string_lossy()
        .into_owned()
}
