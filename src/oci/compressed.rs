//! Compressed image files: `docker save | gzip`, the `.tar.gz` docker
//! images releases.nixos.org publishes, `.tar.zst`, `.tar.xz`. They are told
//! by their first bytes, whatever their name, and decompressed once, as a
//! stream, into an unnamed temporary file: the layers of an image file are
//! read in manifest order, not in the order the tar holds them, and a
//! compressed stream cannot seek. The file is unlinked as soon as it is
//! created, so nothing is left behind whatever ends the run; it needs as
//! much room as the uncompressed tar, which is why the caller puts it beside
//! the output.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};
use crate::unpack::decompress::{GZIP_MAGIC, ZSTD_MAGIC};

/// The most memory the xz decoder may use for one block, in KiB: xz -9
/// needs 64 MiB of dictionary; a file that asks for more than this is
/// refused rather than allowed to take the machine's memory.
const XZ_MEMORY_KIB: u32 = 512 * 1024;

/// How an image file (or a layer in a `docker save` archive) is
/// compressed, told by its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packing {
    Gzip,
    Zstd,
    Xz,
    Bzip2,
}

impl Packing {
    /// How many first bytes [`Packing::sniff`] looks at.
    pub const HEAD: usize = 10;

    pub fn sniff(head: &[u8]) -> Option<Packing> {
        if head.starts_with(GZIP_MAGIC) {
            Some(Packing::Gzip)
        } else if head.starts_with(ZSTD_MAGIC) {
            Some(Packing::Zstd)
        } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            Some(Packing::Xz)
        } else if head.len() >= 10
            && head.starts_with(b"BZh")
            && (b'1'..=b'9').contains(&head[3])
            && head[4..10] == [0x31, 0x41, 0x59, 0x26, 0x53, 0x59]
        {
            Some(Packing::Bzip2)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Packing::Gzip => "gzip",
            Packing::Zstd => "zstd",
            Packing::Xz => "xz",
            Packing::Bzip2 => "bzip2",
        }
    }
}

/// A reader that fails once `cancel` is set (Ctrl-C while decompressing).
struct CancelRead<'a, R> {
    inner: R,
    cancel: &'a AtomicBool,
}

impl<R: Read> Read for CancelRead<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(io::Error::other("interrupted"));
        }
        self.inner.read(buf)
    }
}

/// A writer that remembers whether writing failed, to tell a full disk
/// from a corrupt compressed stream.
struct NoteWrite<W> {
    inner: W,
    failed: bool,
}

impl<W: Write> Write for NoteWrite<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let r = self.inner.write(buf);
        self.failed |= r.is_err();
        r
    }

    fn flush(&mut self) -> io::Result<()> {
        let r = self.inner.flush();
        self.failed |= r.is_err();
        r
    }
}

/// Decompress `file` (compressed with `packing`) into an unnamed temporary
/// file in `scratch`, as a stream.
pub fn decompress(
    path: &Path,
    file: impl Read,
    packing: Packing,
    scratch: &Path,
    cancel: &AtomicBool,
) -> Result<File> {
    let tmp_path = scratch.join(format!(
        ".hydrafy-decompressed-{}-{:08x}.tar",
        std::process::id(),
        fastrand::u32(..)
    ));
    let tmp = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp_path)
        .map_err(|e| Error::io(&tmp_path, "cannot create a temporary file", e))?;
    // Unnamed from the start: nothing is left behind, whatever ends the run.
    fs::remove_file(&tmp_path)
        .map_err(|e| Error::io(&tmp_path, "cannot remove a temporary file", e))?;
    let input = BufReader::with_capacity(
        1 << 20,
        CancelRead {
            inner: file,
            cancel,
        },
    );
    let mut out = NoteWrite {
        inner: BufWriter::with_capacity(1 << 20, &tmp),
        failed: false,
    };
    let copied = match packing {
        Packing::Gzip => io::copy(&mut flate2::bufread::MultiGzDecoder::new(input), &mut out),
        Packing::Zstd => zstd::stream::read::Decoder::with_buffer(input)
            .and_then(|mut d| io::copy(&mut d, &mut out)),
        Packing::Xz => io::copy(
            &mut lzma_rust2::XzReader::new_mem_limit(input, true, XZ_MEMORY_KIB),
            &mut out,
        ),
        Packing::Bzip2 => unreachable!("bzip2 is refused before decompression"),
    }
    .and_then(|_| out.flush());
    if cancel.load(Ordering::Relaxed) {
        return Err(Error::Interrupted);
    }
    match copied {
        Ok(()) => {}
        Err(e) if out.failed => {
            return Err(Error::io(
                scratch,
                "cannot write the decompressed image file (it needs as much room as the uncompressed tar)",
                e,
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::OutOfMemory => {
            return Err(Error::Archive {
                what: "image archive",
                input: path.display().to_string(),
                reason: format!(
                    "its {} stream asks for more than the {} MiB of memory hydrafy gives a decoder; decompress it first (xz -dk) and extract the .tar",
                    packing.name(),
                    XZ_MEMORY_KIB / 1024
                ),
            });
        }
        Err(e) => {
            return Err(Error::Archive {
                what: "image archive",
                input: path.display().to_string(),
                reason: format!(
                    "the {} stream is damaged ({e}); the file is corrupt or truncated, copy it again",
                    packing.name()
                ),
            });
        }
    }
    drop(out);
    let mut tmp = tmp;
    tmp.seek(SeekFrom::Start(0))
        .map_err(|e| Error::io(scratch, "cannot seek in the decompressed image file", e))?;
    Ok(tmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_files_are_told_by_their_first_bytes_and_a_tar_is_not() {
        let gz = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(b"x").unwrap();
            e.finish().unwrap()
        };
        assert_eq!(Packing::sniff(&gz), Some(Packing::Gzip));
        let zst = zstd::encode_all(&b"x"[..], 3).unwrap();
        assert_eq!(Packing::sniff(&zst), Some(Packing::Zstd));
        let xz = [0xfd, b'7', b'z', b'X', b'Z', 0, 0, 4, 0xe6, 0xd6];
        assert_eq!(Packing::sniff(&xz), Some(Packing::Xz));
        assert_eq!(Packing::sniff(b"BZh91AY&SY\x00"), Some(Packing::Bzip2));
        // A tar whose first entry is named "BZh..." is still a tar.
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(0);
        tar.append_data(&mut h, "BZh9-notes", io::empty()).unwrap();
        assert_eq!(Packing::sniff(&tar.into_inner().unwrap()), None);
        assert_eq!(Packing::sniff(b""), None);
    }
}
