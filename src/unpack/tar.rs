//! A tar reader that reads a layer as Go's `archive/tar` reads it.
//!
//! Docker, containerd and BuildKit write and read image layers with Go's
//! `archive/tar`, so what that reader makes of a stream is what the image
//! holds: `docker run` shows those names, types, sizes, link targets, modes,
//! owners and times. The tar crate reads some streams differently (a PAX
//! `size` record, the data after a header-only entry, old-style directories,
//! the ustar prefix in a GNU header, several PAX headers in a row), and it
//! cannot leave out the data a header-only entry declares. Issue 13 asked
//! for Go's reading; this module is that reading, restated from Go's rules
//! (no code of Go's is carried here).
//!
//! The rules, as Go applies them:
//!
//! - A header block is valid when its checksum field (octal) equals the sum
//!   of the block's bytes taken unsigned (POSIX) or signed (old Sun tar),
//!   the checksum field itself counting as eight spaces.
//! - The format comes from the magic: `ustar\0` is USTAR (or STAR, with
//!   `tar\0` in the last four bytes), `ustar ` with version ` \0` is GNU,
//!   anything else V7. The owner names and device numbers exist from USTAR
//!   on; the name prefix exists in USTAR (155 bytes) and STAR (131 bytes),
//!   and in a GNU header only when its atime/ctime fields do not parse as
//!   numbers and the prefix field is ASCII (what Go writers before 1.8 left
//!   there). A non-empty prefix is joined to the name with a `/`.
//! - A numeric field is octal, spaces and NULs around it ignored (empty or
//!   all NUL is 0), or base-256 when its first byte has the high bit set
//!   (the next bit giving the sign). A field that is neither is an error.
//! - Two zero blocks end the archive; so does the end of the stream where a
//!   header would start (or in the padding after an entry), and a zero
//!   block followed by the end of the stream. A zero block followed by a
//!   non-zero one is an error.
//! - A PAX header (`x`) applies to the next entry, and only the last of
//!   several in a row counts. Its records override the header's `path`,
//!   `linkpath`, `uname`, `gname`, `uid`, `gid`, `mtime`, `atime`, `ctime`
//!   (decimal seconds, optional sign and fraction) and `size`; an empty
//!   value keeps the header's. A global header (`g`) is returned as an
//!   entry of its own, and what was pending before it is dropped.
//! - A GNU long name (`L`) or long link (`K`) sets the next entry's name or
//!   link target (up to its first NUL); it wins over a PAX path.
//! - Hard links, symlinks, devices, directories and FIFOs have no data,
//!   whatever size their header gives.
//! - An entry of type NUL whose name ends in `/` is a directory (old
//!   archives); otherwise type NUL is a regular file.
//!
//! Where hydrafy reads less than Go, to protect the host, the reader
//! refuses: a sparse entry (type `S`, or any `GNU.sparse.*` PAX record: its
//! data is not the file's bytes), and an extension header (PAX or GNU long
//! name) over 1 MiB, which Go refuses too. Everything else Go returns, this
//! reader returns, including entry types hydrafy will not apply (the caller
//! decides).
//!
//! The reader stops at the end marker without reading further;
//! [`Reader::into_inner`] gives the stream back for the caller to drain.
//! Names and extension records live in buffers the reader reuses, so an
//! entry costs no allocation once they have grown.

use std::io::{self, Read};

use crate::unpack::decompress::read_full;

/// The largest PAX record set or GNU long name accepted (1 MiB, Go's limit).
pub const MAX_EXTENSION_BYTES: u64 = 1 << 20;

const BLOCK: usize = 512;

/// A tar entry type flag, as the header carries it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Kind(pub u8);

impl Kind {
    pub const REGULAR: Kind = Kind(b'0');
    /// The old regular-file flag (NUL); never returned, see the module doc.
    pub const REGULAR_OLD: Kind = Kind(0);
    pub const LINK: Kind = Kind(b'1');
    pub const SYMLINK: Kind = Kind(b'2');
    pub const CHAR: Kind = Kind(b'3');
    pub const BLOCK: Kind = Kind(b'4');
    pub const DIR: Kind = Kind(b'5');
    pub const FIFO: Kind = Kind(b'6');
    pub const CONTIGUOUS: Kind = Kind(b'7');
    pub const PAX: Kind = Kind(b'x');
    pub const GLOBAL: Kind = Kind(b'g');
    pub const GNU_LONG_NAME: Kind = Kind(b'L');
    pub const GNU_LONG_LINK: Kind = Kind(b'K');
    pub const GNU_SPARSE: Kind = Kind(b'S');
    pub const GNU_VOLUME: Kind = Kind(b'V');

    /// Types whose entries never have data, whatever their size says.
    pub fn is_header_only(self) -> bool {
        matches!(
            self,
            Kind::LINK | Kind::SYMLINK | Kind::CHAR | Kind::BLOCK | Kind::DIR | Kind::FIFO
        )
    }
}

/// A point in time: seconds since the epoch and nanoseconds (0..1e9) after.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Time {
    pub secs: i64,
    pub nanos: u32,
}

/// One entry's header, with its extension headers applied.
///
/// Numbers are as Go keeps them (signed 64-bit); the caller decides what it
/// can represent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub name: Vec<u8>,
    pub linkname: Vec<u8>,
    pub kind: Kind,
    /// The size the headers declare (the data's length, except for the
    /// header-only types, which have none).
    pub size: i64,
    pub mode: i64,
    pub uid: i64,
    pub gid: i64,
    pub uname: Vec<u8>,
    pub gname: Vec<u8>,
    pub mtime: Time,
    pub atime: Option<Time>,
    pub ctime: Option<Time>,
    pub devmajor: i64,
    pub devminor: i64,
}

/// What is wrong with a stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Fault {
    /// Reading the stream failed (or a decoder underneath it did).
    #[error("cannot read the tar stream")]
    Io(#[source] io::Error),
    /// The stream ends inside a header or an entry's data.
    #[error("the stream ends inside a tar header or entry")]
    Truncated,
    /// A block where a header should be is not one.
    #[error("not a tar header: its checksum (cksum field) does not match")]
    Checksum,
    /// A zero block (half an end marker) is followed by a non-zero one.
    #[error("a zero block is followed by data")]
    ZeroBlock,
    /// A numeric header field is neither octal nor base-256.
    #[error("unreadable {field} field in the tar header")]
    Number { field: &'static str },
    /// The size (from the header or a PAX record) is negative.
    #[error("a negative size")]
    NegativeSize,
    /// An extension header larger than [`MAX_EXTENSION_BYTES`].
    #[error("an extended header of {size} bytes exceeds the {MAX_EXTENSION_BYTES}-byte limit")]
    TooLong { size: i64 },
    /// A PAX record that does not parse (length, `=`, newline, a NUL).
    #[error("malformed PAX record: {what}")]
    PaxRecord { what: &'static str },
    /// A PAX path, link path or owner name holding a NUL byte (shown up to
    /// it, cut to 200 bytes).
    #[error("the PAX record {key} holds a NUL byte after {before:?}")]
    PaxNul { key: &'static str, before: String },
    /// A PAX record whose value is not what its key needs.
    #[error("malformed PAX record: {key}")]
    PaxValue { key: &'static str },
    /// A sparse entry: its data is a map of holes, not the file's bytes.
    #[error("sparse files are not supported in image layers")]
    Sparse,
}

/// An entry: its header and its data.
pub struct Entry<'a, R> {
    pub header: &'a Header,
    pub body: Body<'a, R>,
}

/// An entry's data: reads end at its size; the stream ending earlier is an
/// [`io::ErrorKind::UnexpectedEof`] error.
pub struct Body<'a, R> {
    inner: &'a mut R,
    remaining: &'a mut u64,
}

impl<R: Read> Read for Body<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if *self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(*self.remaining).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the stream ends inside the entry's data",
            ));
        }
        *self.remaining -= n as u64;
        Ok(n)
    }
}

/// Where each PAX record the reader uses sits in the record buffer.
#[derive(Clone, Copy, Default)]
struct PaxFields {
    path: Option<(usize, usize)>,
    linkpath: Option<(usize, usize)>,
    uname: Option<(usize, usize)>,
    gname: Option<(usize, usize)>,
    uid: Option<(usize, usize)>,
    gid: Option<(usize, usize)>,
    size: Option<(usize, usize)>,
    mtime: Option<(usize, usize)>,
    atime: Option<(usize, usize)>,
    ctime: Option<(usize, usize)>,
    sparse: bool,
}

/// Reads entries from a tar stream, one at a time; see the module doc.
pub struct Reader<R> {
    inner: R,
    /// Data of the current entry not read yet.
    remaining: u64,
    /// Padding after the current entry's data.
    pad: usize,
    blk: [u8; BLOCK],
    header: Header,
    /// The pending PAX header's records and where its fields are.
    pax: Vec<u8>,
    pax_fields: PaxFields,
    /// The pending PAX header's own name, for errors about its records.
    pax_name: Vec<u8>,
    long_name: Vec<u8>,
    long_link: Vec<u8>,
    /// The name of the header the last fault is about, when it has one.
    fault_at: Option<Vec<u8>>,
    done: bool,
}

impl<R: Read> Reader<R> {
    pub fn new(inner: R) -> Reader<R> {
        Reader {
            inner,
            remaining: 0,
            pad: 0,
            blk: [0; BLOCK],
            header: Header::default(),
            pax: Vec::new(),
            pax_fields: PaxFields::default(),
            pax_name: Vec::new(),
            long_name: Vec::new(),
            long_link: Vec::new(),
            fault_at: None,
            done: false,
        }
    }

    /// The stream, positioned after what was read: past the end marker once
    /// [`Reader::next_entry`] returned `None` from one.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The name of the header the last [`Fault`] is about (a PAX header, a
    /// long-name header, the entry itself), if it got that far.
    pub fn fault_entry(&self) -> Option<&[u8]> {
        self.fault_at.as_deref()
    }

    /// The next entry, skipping what is left of the current one; `None` at
    /// the end of the archive. After a [`Fault`] the position in the stream
    /// is undefined: stop reading.
    pub fn next_entry(&mut self) -> Result<Option<Entry<'_, R>>, Fault> {
        self.fault_at = None;
        if self.done {
            return Ok(None);
        }
        let mut pax = false;
        self.long_name.clear();
        self.long_link.clear();
        loop {
            if !self.skip_rest()? || !self.read_header()? {
                self.done = true;
                return Ok(None);
            }
            let kind = self.header.kind;
            let own_size = self.header.size;
            self.set_data(own_size, kind)?;
            match kind {
                Kind::PAX | Kind::GLOBAL => {
                    self.read_pax()?;
                    if kind == Kind::GLOBAL {
                        // Returned as it is, with only its name (the record's
                        // path, if any); what was pending before it is gone.
                        if let Some(path) = self.pax_value(self.pax_fields.path) {
                            let path = path.to_vec();
                            self.header.name = path;
                        }
                        let name = std::mem::take(&mut self.header.name);
                        self.header = Header {
                            name,
                            kind,
                            ..Header::default()
                        };
                        return Ok(Some(self.entry()));
                    }
                    pax = true;
                }
                Kind::GNU_LONG_NAME | Kind::GNU_LONG_LINK => {
                    let mut buf = std::mem::take(if kind == Kind::GNU_LONG_NAME {
                        &mut self.long_name
                    } else {
                        &mut self.long_link
                    });
                    self.read_extension(own_size, &mut buf)?;
                    if let Some(nul) = buf.iter().position(|&b| b == 0) {
                        buf.truncate(nul);
                    }
                    if kind == Kind::GNU_LONG_NAME {
                        self.long_name = buf;
                    } else {
                        self.long_link = buf;
                    }
                }
                _ => {
                    if pax {
                        self.merge_pax()?;
                    }
                    if !self.long_name.is_empty() {
                        std::mem::swap(&mut self.header.name, &mut self.long_name);
                    }
                    if !self.long_link.is_empty() {
                        std::mem::swap(&mut self.header.linkname, &mut self.long_link);
                    }
                    if self.header.kind == Kind::REGULAR_OLD {
                        self.header.kind = if self.header.name.ends_with(b"/") {
                            Kind::DIR
                        } else {
                            Kind::REGULAR
                        };
                    }
                    if self.header.kind == Kind::GNU_SPARSE || (pax && self.pax_fields.sparse) {
                        return Err(self.fault_here(Fault::Sparse));
                    }
                    let (size, kind) = (self.header.size, self.header.kind);
                    self.set_data(size, kind)?;
                    return Ok(Some(self.entry()));
                }
            }
        }
    }

    fn entry(&mut self) -> Entry<'_, R> {
        Entry {
            header: &self.header,
            body: Body {
                inner: &mut self.inner,
                remaining: &mut self.remaining,
            },
        }
    }

    fn fault_here(&mut self, fault: Fault) -> Fault {
        self.fault_at = Some(self.header.name.clone());
        fault
    }

    /// The data that follows the current header: `size` bytes, none for the
    /// header-only types.
    fn set_data(&mut self, size: i64, kind: Kind) -> Result<(), Fault> {
        let size = if kind.is_header_only() { 0 } else { size };
        let Ok(size) = u64::try_from(size) else {
            return Err(self.fault_here(Fault::NegativeSize));
        };
        self.remaining = size;
        self.pad = (BLOCK - (size % BLOCK as u64) as usize) % BLOCK;
        Ok(())
    }

    /// Skip the rest of the current entry and its padding. `false`: the
    /// stream ended in the padding, which ends the archive.
    fn skip_rest(&mut self) -> Result<bool, Fault> {
        if self.remaining > 0 {
            let n = self.remaining;
            let copied =
                io::copy(&mut (&mut self.inner).take(n), &mut io::sink()).map_err(Fault::Io)?;
            if copied < n {
                return Err(Fault::Truncated);
            }
            self.remaining = 0;
        }
        if self.pad > 0 {
            let pad = std::mem::take(&mut self.pad);
            let n = self.fill(pad)?;
            if n < pad {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Read up to `len` bytes into the block buffer; fewer only at the end
    /// of the stream.
    fn fill(&mut self, len: usize) -> Result<usize, Fault> {
        read_full(&mut self.inner, &mut self.blk[..len]).map_err(Fault::Io)
    }

    /// Read and parse the next header block into `self.header`; `false` at
    /// the end of the archive.
    fn read_header(&mut self) -> Result<bool, Fault> {
        match self.fill(BLOCK)? {
            0 => return Ok(false),
            BLOCK => {}
            _ => return Err(Fault::Truncated),
        }
        if is_zero(&self.blk) {
            return match self.fill(BLOCK)? {
                0 => Ok(false),
                BLOCK if is_zero(&self.blk) => Ok(false),
                BLOCK => Err(Fault::ZeroBlock),
                _ => Err(Fault::Truncated),
            };
        }
        let blk = &self.blk;
        let sum = parse_octal(&blk[148..156]);
        let (unsigned, signed) = checksums(blk);
        if sum.is_none_or(|s| s != unsigned && s != signed) {
            return Err(Fault::Checksum);
        }
        let format = Format::of(blk);
        let h = &mut self.header;
        h.kind = Kind(blk[156]);
        set_cstr(&mut h.name, &blk[0..100]);
        set_cstr(&mut h.linkname, &blk[157..257]);
        // The first unreadable field fails the header, after the name is known.
        let mut bad: Option<&'static str> = None;
        let mut num = |field: &[u8], what: &'static str| match parse_numeric(field) {
            Some(v) => v,
            None => {
                bad.get_or_insert(what);
                0
            }
        };
        h.size = num(&blk[124..136], "size");
        h.mode = num(&blk[100..108], "mode");
        h.uid = num(&blk[108..116], "uid");
        h.gid = num(&blk[116..124], "gid");
        h.mtime = Time {
            secs: num(&blk[136..148], "mtime"),
            nanos: 0,
        };
        h.atime = None;
        h.ctime = None;
        h.uname.clear();
        h.gname.clear();
        h.devmajor = 0;
        h.devminor = 0;
        let mut prefix: &[u8] = &[];
        if format != Format::V7 {
            set_cstr(&mut h.uname, &blk[265..297]);
            set_cstr(&mut h.gname, &blk[297..329]);
            h.devmajor = num(&blk[329..337], "devmajor");
            h.devminor = num(&blk[337..345], "devminor");
        }
        match format {
            Format::V7 => {}
            Format::Ustar => prefix = cstr(&blk[345..500]),
            Format::Star => {
                prefix = cstr(&blk[345..476]);
                h.atime = Some(Time {
                    secs: num(&blk[476..488], "atime"),
                    nanos: 0,
                });
                h.ctime = Some(Time {
                    secs: num(&blk[488..500], "ctime"),
                    nanos: 0,
                });
            }
            Format::Gnu => {
                // These two do not fail the header: when they do not parse,
                // a pre-1.8 Go writer put a USTAR prefix there.
                let time = |field: &[u8]| -> Result<Option<Time>, ()> {
                    if field[0] == 0 {
                        return Ok(None);
                    }
                    let secs = parse_numeric(field).ok_or(())?;
                    Ok(Some(Time { secs, nanos: 0 }))
                };
                match (time(&blk[345..357]), time(&blk[357..369])) {
                    (Ok(a), Ok(c)) => (h.atime, h.ctime) = (a, c),
                    _ => {
                        let p = cstr(&blk[345..500]);
                        if p.is_ascii() {
                            prefix = p;
                        }
                    }
                }
            }
        }
        if !prefix.is_empty() {
            let mut name = Vec::with_capacity(prefix.len() + 1 + h.name.len());
            name.extend_from_slice(prefix);
            name.push(b'/');
            name.extend_from_slice(&h.name);
            h.name = name;
        }
        if let Some(field) = bad {
            return Err(self.fault_here(Fault::Number { field }));
        }
        Ok(true)
    }

    /// Read an extension header's data (`size` bytes, its padding follows)
    /// into `buf`.
    fn read_extension(&mut self, size: i64, buf: &mut Vec<u8>) -> Result<(), Fault> {
        if size > MAX_EXTENSION_BYTES as i64 {
            return Err(self.fault_here(Fault::TooLong { size }));
        }
        let len = self.remaining as usize;
        buf.clear();
        buf.resize(len, 0);
        let mut n = 0;
        while n < len {
            match self.inner.read(&mut buf[n..]) {
                Ok(0) => return Err(Fault::Truncated),
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Fault::Io(e)),
            }
        }
        self.remaining = 0;
        Ok(())
    }

    /// Read a PAX header's records; they replace any pending ones.
    fn read_pax(&mut self) -> Result<(), Fault> {
        let mut buf = std::mem::take(&mut self.pax);
        let size = self.header.size;
        let read = self.read_extension(size, &mut buf);
        self.pax = buf;
        read?;
        self.pax_fields = PaxFields::default();
        let fields = &mut self.pax_fields;
        let parsed = each_record(&self.pax, |key, range| {
            let slot = match key {
                b"path" => &mut fields.path,
                b"linkpath" => &mut fields.linkpath,
                b"uname" => &mut fields.uname,
                b"gname" => &mut fields.gname,
                b"uid" => &mut fields.uid,
                b"gid" => &mut fields.gid,
                b"size" => &mut fields.size,
                b"mtime" => &mut fields.mtime,
                b"atime" => &mut fields.atime,
                b"ctime" => &mut fields.ctime,
                k => {
                    fields.sparse |= k.starts_with(b"GNU.sparse.");
                    return;
                }
            };
            *slot = Some(range);
        });
        match parsed {
            Ok(()) => {}
            Err(RecordError::Malformed(what)) => {
                return Err(self.fault_here(Fault::PaxRecord { what }));
            }
            Err(RecordError::Nul { key, before }) => {
                let before = &before[..before.len().min(200)];
                let before = String::from_utf8_lossy(before).into_owned();
                return Err(self.fault_here(Fault::PaxNul { key, before }));
            }
        }
        // Faults in the values name this header, as the records came from it.
        self.pax_name.clear();
        self.pax_name.extend_from_slice(&self.header.name);
        Ok(())
    }

    /// A PAX field's value, unless absent or empty (which keeps the header's).
    fn pax_value(&self, range: Option<(usize, usize)>) -> Option<&[u8]> {
        let (start, end) = range?;
        (end > start).then(|| &self.pax[start..end])
    }

    /// Apply the pending PAX records to the header just read.
    fn merge_pax(&mut self) -> Result<(), Fault> {
        let f = self.pax_fields;
        let mut bad = None;
        {
            let pax = &self.pax;
            let value = |range: Option<(usize, usize)>| {
                range.filter(|(s, e)| e > s).map(|(s, e)| &pax[s..e])
            };
            let h = &mut self.header;
            let set = |dst: &mut Vec<u8>, v: Option<&[u8]>| {
                if let Some(v) = v {
                    dst.clear();
                    dst.extend_from_slice(v);
                }
            };
            set(&mut h.name, value(f.path));
            set(&mut h.linkname, value(f.linkpath));
            set(&mut h.uname, value(f.uname));
            set(&mut h.gname, value(f.gname));
            let mut int = |dst: &mut i64, range, key| {
                if let Some(v) = value(range) {
                    match parse_decimal(v) {
                        Some(n) => *dst = n,
                        None => bad = bad.or(Some(key)),
                    }
                }
            };
            int(&mut h.uid, f.uid, "uid");
            int(&mut h.gid, f.gid, "gid");
            int(&mut h.size, f.size, "size");
            let mut time = |dst: &mut Option<Time>, range, key| {
                if let Some(v) = value(range) {
                    match parse_pax_time(v) {
                        Some(t) => *dst = Some(t),
                        None => bad = bad.or(Some(key)),
                    }
                }
            };
            let mut mtime = Some(h.mtime);
            time(&mut mtime, f.mtime, "mtime");
            h.mtime = mtime.unwrap_or_default();
            time(&mut h.atime, f.atime, "atime");
            time(&mut h.ctime, f.ctime, "ctime");
        }
        if let Some(key) = bad {
            self.fault_at = Some(self.pax_name.clone());
            return Err(Fault::PaxValue { key });
        }
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    V7,
    Ustar,
    Star,
    Gnu,
}

impl Format {
    fn of(blk: &[u8; BLOCK]) -> Format {
        let magic = &blk[257..263];
        if magic == b"ustar\0" {
            if &blk[508..512] == b"tar\0" {
                Format::Star
            } else {
                Format::Ustar
            }
        } else if magic == b"ustar " && &blk[263..265] == b" \0" {
            Format::Gnu
        } else {
            Format::V7
        }
    }
}

fn is_zero(blk: &[u8; BLOCK]) -> bool {
    blk.iter().all(|&b| b == 0)
}

/// The block's byte sum, unsigned and signed, the checksum field as spaces.
fn checksums(blk: &[u8; BLOCK]) -> (u64, u64) {
    let mut unsigned: i64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in blk.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += i64::from(b);
        signed += i64::from(b as i8);
    }
    // A negative signed sum can never equal a parsed (unsigned) field.
    (unsigned as u64, u64::try_from(signed).unwrap_or(u64::MAX))
}

/// A string field: up to its first NUL.
fn cstr(field: &[u8]) -> &[u8] {
    match field.iter().position(|&b| b == 0) {
        Some(n) => &field[..n],
        None => field,
    }
}

fn set_cstr(dst: &mut Vec<u8>, field: &[u8]) {
    dst.clear();
    dst.extend_from_slice(cstr(field));
}

/// An octal field: spaces and NULs around it ignored, cut at an inner NUL,
/// empty is 0.
fn parse_octal(field: &[u8]) -> Option<u64> {
    let start = field.iter().position(|&b| b != b' ' && b != 0);
    let Some(start) = start else { return Some(0) };
    let end = field.iter().rposition(|&b| b != b' ' && b != 0)? + 1;
    let digits = cstr(&field[start..end]);
    if digits.is_empty() {
        return Some(0);
    }
    let mut x: u64 = 0;
    for &d in digits {
        if !(b'0'..=b'7').contains(&d) {
            return None;
        }
        x = x.checked_mul(8)?.checked_add(u64::from(d - b'0'))?;
    }
    Some(x)
}

/// A numeric field: base-256 when the high bit of its first byte is set
/// (the next bit is the sign), else octal.
fn parse_numeric(field: &[u8]) -> Option<i64> {
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        let inv = if field[0] & 0x40 != 0 { 0xff } else { 0 };
        let mut x: u64 = 0;
        for (i, &b) in field.iter().enumerate() {
            let mut c = b ^ inv;
            if i == 0 {
                c &= 0x7f;
            }
            if x >> 56 > 0 {
                return None;
            }
            x = x << 8 | u64::from(c);
        }
        if x >> 63 > 0 {
            return None;
        }
        let x = x as i64;
        return Some(if inv == 0xff { !x } else { x });
    }
    parse_octal(field).map(|x| x as i64)
}

/// A decimal integer as Go's `strconv.ParseInt` reads one: an optional sign,
/// then digits.
fn parse_decimal(value: &[u8]) -> Option<i64> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// A PAX time: decimal seconds with an optional sign and fraction (digits
/// past the ninth dropped).
pub fn parse_pax_time(value: &[u8]) -> Option<Time> {
    let (secs, frac) = match value.iter().position(|&b| b == b'.') {
        Some(dot) => (&value[..dot], &value[dot + 1..]),
        None => (value, &[][..]),
    };
    let secs = parse_decimal(secs)?;
    if !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut nanos: u32 = 0;
    for i in 0..9 {
        nanos = nanos * 10 + frac.get(i).map_or(0, |d| u32::from(d - b'0'));
    }
    if value.first() == Some(&b'-') && nanos > 0 {
        return Some(Time {
            secs: secs.wrapping_sub(1),
            nanos: 1_000_000_000 - nanos,
        });
    }
    Some(Time { secs, nanos })
}

/// What is wrong with a PAX record.
enum RecordError<'a> {
    Malformed(&'static str),
    /// A name record holding a NUL, with what comes before it.
    Nul {
        key: &'static str,
        before: &'a [u8],
    },
}

/// Call `f` with each record's key and the range of its value in `data`;
/// what is wrong when a record is malformed.
fn each_record(
    data: &[u8],
    mut f: impl FnMut(&[u8], (usize, usize)),
) -> Result<(), RecordError<'_>> {
    const LENGTH: RecordError<'static> = RecordError::Malformed("a bad record length");
    let mut pos = 0;
    while pos < data.len() {
        let s = &data[pos..];
        let space = s.iter().position(|&b| b == b' ').ok_or(LENGTH)?;
        let len = parse_decimal(&s[..space]).ok_or(LENGTH)?;
        if len < 5 || len > s.len() as i64 || len as usize <= space + 1 {
            return Err(LENGTH);
        }
        let len = len as usize;
        if s[len - 1] != b'\n' {
            return Err(RecordError::Malformed("a record not ending in a newline"));
        }
        let record = &s[space + 1..len - 1];
        let eq = record
            .iter()
            .position(|&b| b == b'=')
            .ok_or(RecordError::Malformed("a record without `=`"))?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        if key.is_empty() {
            return Err(RecordError::Malformed("an empty key"));
        }
        let name_key = match key {
            b"path" => Some("path"),
            b"linkpath" => Some("linkpath"),
            b"uname" => Some("uname"),
            b"gname" => Some("gname"),
            _ => None,
        };
        match name_key {
            Some(key) => {
                if let Some(nul) = value.iter().position(|&b| b == 0) {
                    let before = &value[..nul];
                    return Err(RecordError::Nul { key, before });
                }
            }
            None if key.contains(&0) => {
                return Err(RecordError::Malformed("a NUL byte in a key"));
            }
            None => {}
        }
        let start = pos + space + 1 + eq + 1;
        f(key, (start, start + value.len()));
        pos += len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times_keep_fractions_and_sign() {
        let t = |s: &[u8]| parse_pax_time(s).map(|t| (t.secs, t.nanos));
        assert_eq!(t(b"1.5"), Some((1, 500_000_000)));
        assert_eq!(t(b"1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(t(b"-1.25"), Some((-2, 750_000_000)));
        assert_eq!(t(b"-0.5"), Some((-1, 500_000_000)));
        assert_eq!(t(b"+3.1234567891"), Some((3, 123_456_789)));
        assert_eq!(t(b"2."), Some((2, 0)));
        assert_eq!(t(b"1.x"), None);
        assert_eq!(t(b".5"), None);
        assert_eq!(t(b" 1"), None);
    }

    #[test]
    fn numeric_fields_read_as_go_reads_them() {
        assert_eq!(parse_numeric(b"0000644\0"), Some(0o644));
        assert_eq!(parse_numeric(b"  644 \0"), Some(0o644));
        assert_eq!(parse_numeric(b"\0\0\0\0\0\0\0\0"), Some(0));
        assert_eq!(parse_numeric(b""), Some(0));
        assert_eq!(parse_numeric(b"        "), Some(0));
        assert_eq!(parse_numeric(b"12\x0034"), Some(0o12));
        assert_eq!(parse_numeric(b"6 44"), None);
        assert_eq!(parse_numeric(b"0009"), None);
        assert_eq!(
            parse_numeric(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
            Some(256)
        );
        assert_eq!(parse_numeric(&[0xff; 8]), Some(-1));
        assert_eq!(
            parse_numeric(&[0x80, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            None
        );
    }

    #[test]
    fn pax_records_parse_or_fail_as_in_go() {
        let keys = |data: &[u8]| {
            let mut out = Vec::new();
            each_record(data, |k, (s, e)| {
                out.push((k.to_vec(), data[s..e].to_vec()))
            })
            .map(|()| out)
            .ok()
        };
        assert_eq!(
            keys(b"6 a=b\n9 path=x\n"),
            Some(vec![
                (b"a".to_vec(), b"b".to_vec()),
                (b"path".to_vec(), b"x".to_vec())
            ])
        );
        assert_eq!(keys(b"5 a=\n"), Some(vec![(b"a".to_vec(), vec![])]));
        assert_eq!(keys(b"6 a=b "), None);
        assert_eq!(keys(b"4 a\n"), None);
        assert_eq!(keys(b"6 ab\n\n"), None);
        assert_eq!(keys(b"11 path=a\0b\n"), None);
        assert_eq!(
            keys(b"9 x=a\0bc\n"),
            Some(vec![(b"x".to_vec(), b"a\0bc".to_vec())])
        );
    }
}
