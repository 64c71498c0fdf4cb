//! Layer decompression, chosen by media type and confirmed by magic bytes.
//!
//! Registries and tools mislabel layers now and then (an "uncompressed" tar
//! that is gzip, zstd in a `+gzip` slot), so the first bytes decide when they
//! name a known format; a blob whose media type promises compression but
//! whose bytes are neither gzip nor zstd is refused. gzip streams may have
//! several members (pigz and `cat a.gz b.gz` make them), so every member is
//! read. zstd's window is bounded so a hostile frame cannot demand gigabytes.

use std::io::{self, BufRead, Read};

use crate::error::{Error, Result};
use crate::oci::manifest::Compression;

/// zstd's decoder window limit, as log2 bytes: 2^27 = 128 MiB, zstd's own
/// default ceiling for frames that do not ask for more with `--long`.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 27;

pub(crate) const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
pub(crate) const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// What the first bytes of a blob say it is.
pub fn sniff(head: &[u8]) -> Option<Compression> {
    if head.starts_with(GZIP_MAGIC) {
        Some(Compression::Gzip)
    } else if head.starts_with(ZSTD_MAGIC) {
        Some(Compression::Zstd)
    } else if head.len() >= 262 && &head[257..262] == b"ustar" {
        Some(Compression::None)
    } else {
        None
    }
}

/// Wrap `input` in the decoder its bytes and `declared` media type call for.
/// `layer` names the blob in errors.
pub fn decoder<'a, R: BufRead + Send + 'a>(
    layer: &str,
    mut input: R,
    declared: Compression,
) -> Result<Box<dyn Read + Send + 'a>> {
    let head = input.fill_buf().map_err(|e| Error::Layer {
        layer: layer.to_string(),
        reason: "cannot read the layer blob".to_string(),
        source: Some(e),
    })?;
    let actual = match (sniff(head), declared) {
        (Some(found), _) => found,
        (None, Compression::None) => Compression::None,
        (None, _) if head.is_empty() => Compression::None,
        (None, declared) => {
            return Err(Error::Layer {
                layer: layer.to_string(),
                reason: format!(
                    "the media type says {declared:?} but the blob is not in that format"
                ),
                source: None,
            });
        }
    };
    Ok(match actual {
        Compression::None => Box::new(input),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
        Compression::Zstd => {
            let mut z =
                zstd::stream::read::Decoder::with_buffer(input).map_err(|e| Error::Layer {
                    layer: layer.to_string(),
                    reason: "cannot start the zstd decoder".to_string(),
                    source: Some(e),
                })?;
            z.window_log_max(ZSTD_WINDOW_LOG_MAX)
                .map_err(|e| Error::Layer {
                    layer: layer.to_string(),
                    reason: "cannot bound the zstd window".to_string(),
                    source: Some(e),
                })?;
            Box::new(z)
        }
    })
}

/// Read up to `buf.len()` bytes; fewer only at the end of the stream.
pub fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn read_all(layer: &[u8], declared: Compression) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        decoder("test", layer, declared)?
            .read_to_end(&mut out)
            .unwrap();
        Ok(out)
    }

    #[test]
    fn multi_member_gzip_is_read_to_the_end() {
        let mut two = gzip(b"first ");
        two.extend(gzip(b"second"));
        assert_eq!(read_all(&two, Compression::Gzip).unwrap(), b"first second");
    }

    #[test]
    fn magic_bytes_win_over_a_wrong_media_type() {
        let z = zstd::encode_all(&b"zstd data"[..], 3).unwrap();
        assert_eq!(read_all(&z, Compression::Gzip).unwrap(), b"zstd data");
        let g = gzip(b"gz data");
        assert_eq!(read_all(&g, Compression::None).unwrap(), b"gz data");
    }

    #[test]
    fn a_blob_that_is_not_what_its_type_says_is_refused() {
        let err = read_all(b"plain text, not gzip", Compression::Gzip).unwrap_err();
        assert!(err.to_string().contains("not in that format"), "{err}");
    }
}
