//! hydrafy reads tar layers as Go's `archive/tar` (docker's reader) does
//! (issue 13).
//!
//! The oracle is Go itself: `tests/support/gotar/main.go`, run with Debian's
//! `go run`, prints each archive's headers as `archive/tar` reads them, and
//! hydrafy's [`hydrafy::unpack::tar::Reader`] must print the same, archive by
//! archive: Go's own test archives (`tests/fixtures/go-tar`, see its README)
//! and the archives crafted below, one or more per difference the issue
//! found. Where Go reads an archive, hydrafy reads the same entries and
//! applies them, and the tree matches GNU tar's; where Go fails, hydrafy
//! refuses with one line naming the layer. hydrafy refuses more than Go only
//! for the reasons in [`PROTECTIVE`], each of which protects the host.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use hydrafy::unpack::tar::{Fault, Header, Kind, Reader, Time};
use hydrafy::unpack::{Applier, ApplyOptions};
use sha2::{Digest as _, Sha256};

use crate::support::require_tool;

/// Where GNU tar's tree is not Go's, and hydrafy follows Go.
const GNU_TAR_DIFFERS: &[(&str, &str)] = &[
    (
        "invalid-go17.tar",
        "Go joins the ustar prefix that Go writers before 1.8 put in a GNU header; GNU tar does not",
    ),
    ("prefix.tar", "the same, crafted below"),
];

/// Where hydrafy refuses an archive Go reads, and why that protects the host.
/// Each entry: the archive, and a phrase of hydrafy's one-line refusal (of
/// the reader or of the applier; an archive may be listed more than once).
const PROTECTIVE: &[(&str, &str)] = &[
    // Sparse entries: the data is a hole map, not the file's bytes; hydrafy
    // refuses every GNU sparse form (old `S`, PAX 0.0/0.1/1.0) rather than
    // expand holes into the store.
    ("gnu-nil-sparse-data.tar", "sparse files are not supported"),
    ("gnu-nil-sparse-hole.tar", "sparse files are not supported"),
    ("gnu-sparse-big.tar", "sparse files are not supported"),
    ("pax-nil-sparse-data.tar", "sparse files are not supported"),
    ("pax-nil-sparse-hole.tar", "sparse files are not supported"),
    ("pax-sparse-big.tar", "sparse files are not supported"),
    ("sparse-formats.tar", "sparse files are not supported"),
    // Entry types that are no file (GNU incremental dump directories `D`):
    // docker refuses them too ("unhandled tar header type"). The archive's
    // last entry is sparse as well.
    ("gnu-incremental.tar", "unsupported tar entry type 'D'"),
    ("gnu-incremental.tar", "sparse files are not supported"),
];

// ---- printing headers, the same way on both sides ----------------------

/// Every byte outside `!`..`~`, and the backslash, as `\xHH`.
fn esc(bytes: &[u8]) -> String {
    let mut out = String::new();
    for &b in bytes {
        if b > b' ' && b <= b'~' && b != b'\\' {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// A time as the Go side prints it (`-` for Go's zero time).
fn stamp(t: Option<Time>) -> String {
    match t {
        None => "-".to_string(),
        Some(Time {
            secs: -62_135_596_800,
            nanos: 0,
        }) => "-".to_string(),
        Some(t) => format!("{}.{:09}", t.secs, t.nanos),
    }
}

fn line(h: &Header) -> String {
    if h.kind == Kind::GLOBAL {
        return format!("global name={}", esc(&h.name));
    }
    format!(
        "entry name={} type={} size={} link={} mode={} uid={} gid={} uname={} gname={} mtime={} atime={} ctime={} dev={},{}",
        esc(&h.name),
        h.kind.0,
        h.size,
        esc(&h.linkname),
        h.mode,
        h.uid,
        h.gid,
        esc(&h.uname),
        esc(&h.gname),
        stamp(Some(h.mtime)),
        stamp(h.atime),
        stamp(h.ctime),
        h.devmajor,
        h.devminor
    )
}

/// One archive as a reader saw it: its entries and how reading ended.
#[derive(Debug, Default)]
struct Listing {
    entries: Vec<String>,
    error: Option<String>,
}

/// Go's reading of each archive, in order.
fn go_listings(paths: &[PathBuf]) -> Vec<Listing> {
    require_tool("go", "golang-go");
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Inside target/, so the build cache needs no HOME and no network.
    let go = here.join("target/go");
    let out = Command::new("go")
        .arg("run")
        .arg(here.join("tests/support/gotar/main.go"))
        .args(paths)
        .env("GOCACHE", go.join("cache"))
        .env("GOPATH", go.join("path"))
        .env("GOFLAGS", "")
        .env("GOPROXY", "off")
        .env("GO111MODULE", "on")
        .output()
        .expect("run go");
    assert!(
        out.status.success(),
        "go run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut listings = Vec::new();
    for l in String::from_utf8(out.stdout).unwrap().lines() {
        if l.starts_with("archive ") {
            listings.push(Listing::default());
            continue;
        }
        let cur = listings.last_mut().expect("a listing");
        if let Some(e) = l.strip_prefix("error ") {
            cur.error = Some(e.to_string());
        } else if l != "end" {
            cur.entries.push(l.to_string());
        }
    }
    assert_eq!(listings.len(), paths.len(), "one listing per archive");
    listings
}

/// hydrafy's reading, and the fault if there was one.
fn hydrafy_listing(bytes: &[u8]) -> (Listing, Option<Fault>) {
    let mut listing = Listing::default();
    let mut reader = Reader::new(bytes);
    let fault = loop {
        match reader.next_entry() {
            Ok(None) => break None,
            Ok(Some(mut entry)) => {
                listing.entries.push(line(entry.header));
                if let Err(e) = std::io::copy(&mut entry.body, &mut std::io::sink()) {
                    break Some(Fault::Io(e));
                }
            }
            Err(fault) => break Some(fault),
        }
    };
    listing.error = fault.as_ref().map(|f| f.to_string());
    (listing, fault)
}

// ---- applying, and GNU tar's tree ---------------------------------------

/// Apply `bytes` as one layer onto a fresh root under `work`; the root, or
/// the one-line error.
fn apply(work: &Path, bytes: &[u8]) -> Result<PathBuf, String> {
    let root = work.join("hydrafy");
    std::fs::create_dir(&root).unwrap();
    let root_user = rustix::process::geteuid().is_root();
    let opts = ApplyOptions {
        as_root: root_user,
        special_files: root_user,
    };
    let mut applier = Applier::new(&root, opts).map_err(|e| hydrafy::report(&e))?;
    let line = |e: hydrafy::Error| {
        let line = hydrafy::report(&e);
        assert!(!line.contains('\n'), "not one line: {line}");
        assert!(line.starts_with("layer test: "), "names no layer: {line}");
        line
    };
    applier.apply_layer("test", bytes).map_err(line)?;
    applier.finish().map_err(line)?;
    Ok(root)
}

/// Extract with GNU tar (owners and modes kept as root); `None` if it fails.
fn gnu_tar(work: &Path, archive: &Path) -> Option<PathBuf> {
    require_tool("tar", "tar");
    let root = work.join("gnu");
    std::fs::create_dir(&root).unwrap();
    let ok = Command::new("tar")
        .args(["-x", "-p", "--numeric-owner", "-f"])
        .arg(archive)
        .arg("-C")
        .arg(&root)
        .output()
        .expect("run tar")
        .status
        .success();
    ok.then_some(root)
}

/// The root-relative paths an archive names (a directory it does not name
/// gets its mtime from whatever wrote into it last, in any unpacker).
fn named_paths(bytes: &[u8]) -> HashSet<PathBuf> {
    let mut named = HashSet::new();
    let mut reader = Reader::new(bytes);
    while let Ok(Some(entry)) = reader.next_entry() {
        named.insert(hydrafy::unpack::normalize(&entry.header.name));
    }
    named
}

/// Per path: type, mode, owner (as root), content or target, mtime to the
/// nanosecond (of a directory only if `named`); hard links as groups.
fn describe(root: &Path, named: &HashSet<PathBuf>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut inodes: HashMap<u64, String> = HashMap::new();
    let mut todo = vec![root.to_path_buf()];
    let as_root = rustix::process::geteuid().is_root();
    while let Some(p) = todo.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let ft = m.file_type();
        let what = if ft.is_symlink() {
            format!("link -> {}", std::fs::read_link(&p).unwrap().display())
        } else if ft.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                todo.push(e.unwrap().path());
            }
            "dir".to_string()
        } else if ft.is_file() {
            let data = std::fs::read(&p).unwrap();
            let first = inodes.entry(m.ino()).or_insert_with(|| rel.clone());
            format!(
                "file {} bytes sha256 {} (first name {first})",
                data.len(),
                &hex::encode(Sha256::digest(&data))[..16]
            )
        } else if ft.is_char_device() || ft.is_block_device() {
            format!("device {:x}", m.rdev())
        } else {
            "fifo".to_string()
        };
        let owner = if as_root {
            format!(" owner {}:{}", m.uid(), m.gid())
        } else {
            String::new()
        };
        let mode = if ft.is_symlink() {
            String::new()
        } else {
            format!(" mode {:o}", m.mode() & 0o7777)
        };
        let mtime = if ft.is_dir() && !named.contains(Path::new(&rel)) {
            String::new()
        } else {
            format!(" mtime {}.{:09}", m.mtime(), m.mtime_nsec())
        };
        out.insert(rel, format!("{what}{mode}{owner}{mtime}"));
    }
    // The root itself is made by the test, not the archive.
    out.remove("");
    out
}

// ---- the comparison -----------------------------------------------------

/// Compare hydrafy with Go (and GNU tar) on each archive; panics listing
/// every disagreement.
fn compare(archives: &[(String, Vec<u8>)]) {
    let work = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = archives
        .iter()
        .map(|(name, bytes)| {
            let p = work.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        })
        .collect();
    let go = go_listings(&paths);
    let mut problems = Vec::new();
    for (((name, bytes), go), path) in archives.iter().zip(&go).zip(&paths) {
        let (ours, fault) = hydrafy_listing(bytes);
        let named = named_paths(bytes);
        let refused_for = |err: &str| {
            PROTECTIVE
                .iter()
                .any(|(n, why)| n == name && err.contains(why))
        };
        let protective = PROTECTIVE.iter().any(|(n, _)| n == name);
        let dir = work.path().join(format!("{name}.d"));
        std::fs::create_dir(&dir).unwrap();
        let applied = apply(&dir, bytes);
        match (&go.error, &fault) {
            // Go reads it: so must hydrafy, entry for entry.
            (None, None) => {
                if ours.entries != go.entries {
                    problems.push(format!(
                        "{name}: entries differ\n  go:      {:#?}\n  hydrafy: {:#?}",
                        go.entries, ours.entries
                    ));
                }
            }
            (None, Some(f)) => {
                let allowed = refused_for(&f.to_string());
                let prefix = go.entries.starts_with(&ours.entries);
                if !allowed || !prefix {
                    problems.push(format!(
                        "{name}: Go reads it, hydrafy's reader fails ({f}) after {:#?}",
                        ours.entries
                    ));
                }
            }
            // Go fails: hydrafy must fail too, after the same entries.
            (Some(e), None) => problems.push(format!(
                "{name}: Go fails ({e}), hydrafy reads {:#?}",
                ours.entries
            )),
            (Some(_), Some(_)) => {
                if !go.entries.starts_with(&ours.entries) {
                    problems.push(format!(
                        "{name}: entries before the error differ\n  go:      {:#?}\n  hydrafy: {:#?}",
                        go.entries, ours.entries
                    ));
                }
            }
        }
        match (&go.error, &applied, protective) {
            (Some(e), Ok(_), _) => {
                problems.push(format!("{name}: Go fails ({e}), hydrafy applies it"))
            }
            (None, Err(err), _) if refused_for(err) => {}
            (None, Err(err), _) => {
                problems.push(format!("{name}: Go reads it, hydrafy refuses: {err}"))
            }
            (None, Ok(_), true) => {
                problems.push(format!("{name}: listed as refused, but hydrafy applies it"))
            }
            (None, Ok(ours), false) => {
                let differs = GNU_TAR_DIFFERS.iter().any(|(n, _)| n == name);
                if let Some(theirs) = gnu_tar(&dir, path).filter(|_| !differs) {
                    let (a, b) = (describe(ours, &named), describe(&theirs, &named));
                    if a != b {
                        let diff: Vec<String> = a
                            .iter()
                            .filter(|(k, v)| b.get(*k) != Some(*v))
                            .map(|(k, v)| format!("{k}: hydrafy {v}, GNU tar {:?}", b.get(k)))
                            .chain(
                                b.iter()
                                    .filter(|(k, _)| !a.contains_key(*k))
                                    .map(|(k, v)| format!("{k}: only GNU tar: {v}")),
                            )
                            .collect();
                        problems.push(format!("{name}: trees differ:\n  {}", diff.join("\n  ")));
                    }
                }
            }
            (Some(_), Err(_), _) => {}
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_go_test_archive_reads_as_go_reads_it() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/go-tar");
    let mut archives: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "tar"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    archives.sort();
    assert!(archives.len() >= 40, "the fixtures are missing: {dir:?}");
    compare(&archives);
}

// ---- crafted archives, one or more per difference issue 13 found --------

/// A header block built field by field (offsets as in POSIX and GNU tar).
struct Block([u8; 512]);

impl Block {
    /// A USTAR header: magic `ustar\0`, version `00`.
    fn ustar(name: &[u8], kind: u8) -> Block {
        Block::v7(name, kind).raw(257, b"ustar\x0000")
    }

    /// A GNU header: magic `ustar `, version ` \0`.
    fn gnu(name: &[u8], kind: u8) -> Block {
        Block::v7(name, kind).raw(257, b"ustar  \0")
    }

    /// A V7 header: no magic.
    fn v7(name: &[u8], kind: u8) -> Block {
        Block([0; 512])
            .raw(0, name)
            .octal(100, 8, 0o644)
            .octal(108, 8, 0)
            .octal(116, 8, 0)
            .octal(124, 12, 0)
            .octal(136, 12, 1_600_000_000)
            .raw(156, &[kind])
    }

    fn raw(mut self, at: usize, bytes: &[u8]) -> Block {
        self.0[at..at + bytes.len()].copy_from_slice(bytes);
        self
    }

    /// A zero-padded octal number ending in NUL, `len` bytes in all.
    fn octal(self, at: usize, len: usize, v: u64) -> Block {
        let text = format!("{v:0width$o}\0", width = len - 1);
        self.raw(at, text.as_bytes())
    }

    fn size(self, v: u64) -> Block {
        self.octal(124, 12, v)
    }

    fn link(self, target: &[u8]) -> Block {
        self.raw(157, target)
    }

    /// The block with its checksum (unsigned, or Sun's signed sum).
    fn finish_with(mut self, signed: bool) -> Vec<u8> {
        self.0[148..156].fill(b' ');
        let sum: i64 = self
            .0
            .iter()
            .map(|&b| {
                if signed {
                    i64::from(b as i8)
                } else {
                    i64::from(b)
                }
            })
            .sum();
        let text = format!("{sum:06o}\0 ");
        self.0[148..156].copy_from_slice(text.as_bytes());
        self.0.to_vec()
    }

    fn finish(self) -> Vec<u8> {
        self.finish_with(false)
    }
}

/// Data, padded to whole blocks.
fn data(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out.resize(bytes.len().div_ceil(512) * 512, 0);
    out
}

/// A PAX header (`x`, or `g` for a global one) with `records`.
fn pax_header(kind: u8, records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (k, v) in records {
        let rest = k.len() + v.len() + 3;
        let mut len = rest + 1;
        while len.to_string().len() + rest != len {
            len = rest + len.to_string().len();
        }
        body.extend_from_slice(format!("{len} {k}=").as_bytes());
        body.extend_from_slice(v);
        body.push(b'\n');
    }
    let mut out = Block::ustar(b"PaxHeader", kind)
        .size(body.len() as u64)
        .finish();
    out.extend(data(&body));
    out
}

fn pax(records: &[(&str, &[u8])]) -> Vec<u8> {
    pax_header(b'x', records)
}

/// A regular file entry with its data.
fn file(name: &[u8], contents: &[u8]) -> Vec<u8> {
    let mut out = Block::ustar(name, b'0')
        .size(contents.len() as u64)
        .finish();
    out.extend(data(contents));
    out
}

/// The parts, then the end marker.
fn archive(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut out = parts.concat();
    out.extend([0u8; 1024]);
    out
}

/// Compare each crafted archive with Go and GNU tar, then apply it and
/// hand back the root for the test's own checks.
fn crafted(name: &str, bytes: Vec<u8>) -> (tempfile::TempDir, PathBuf) {
    compare(&[(format!("{name}.tar"), bytes.clone())]);
    let work = tempfile::tempdir().unwrap();
    let root = apply(work.path(), &bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
    (work, root)
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn a_pax_size_overrides_a_zero_header_size() {
    // Go writes files of 8 GiB and more this way: the size in a PAX record,
    // 0 in the header. hydrafy refused them as "a PAX size record that
    // differs from the header".
    let bytes = archive(&[
        pax(&[("size", b"11")]),
        {
            let mut f = Block::ustar(b"big", b'0').finish();
            f.extend(data(b"hello world"));
            f
        },
        file(b"after", b"next"),
    ]);
    let (_w, root) = crafted("pax-size", bytes);
    assert_eq!(read(&root.join("big")), b"hello world");
    assert_eq!(read(&root.join("after")), b"next");
}

#[test]
fn an_8_gib_size_in_pax_or_base_256_is_read_not_refused() {
    // Cheap: the header says 8 GiB and the stream ends; Go and hydrafy both
    // list the entry with its size and then fail on the missing data.
    let eight_gib = (8u64 << 30).to_string();
    let mut base256 = [0u8; 12];
    base256[0] = 0x80;
    base256[7] = 0x02; // 2 << 32 = 8 GiB
    let cases = [
        (
            "pax-8gib",
            [
                pax(&[("size", eight_gib.as_bytes())]),
                Block::ustar(b"huge", b'0').finish(),
            ]
            .concat(),
        ),
        (
            "base256-8gib",
            Block::gnu(b"huge", b'0').raw(124, &base256).finish(),
        ),
    ];
    for (name, bytes) in cases {
        compare(&[(format!("{name}.tar"), bytes.clone())]);
        let (listing, _) = hydrafy_listing(&bytes);
        assert!(
            listing.entries[0].contains("size=8589934592"),
            "{listing:?}"
        );
        let work = tempfile::tempdir().unwrap();
        let err = apply(work.path(), &bytes).unwrap_err();
        assert!(
            err.contains("not a valid tar stream after entry \"huge\""),
            "{err}"
        );
        assert!(!err.contains("PAX size"), "{err}");
    }
}

#[test]
fn header_only_types_with_a_size_have_no_data() {
    // hydrafy failed with "unexpected EOF during skip": it skipped the data
    // the size announced, and there is none.
    let header_only = |name: &[u8], kind: u8, link: &[u8]| {
        Block::ustar(name, kind)
            .link(link)
            .size(1000)
            .octal(329, 8, 1)
            .octal(337, 8, 3)
            .finish()
    };
    let bytes = archive(&[
        file(b"target", b"t"),
        header_only(b"hard", b'1', b"target"),
        header_only(b"sym", b'2', b"target"),
        header_only(b"dir", b'5', b""),
        header_only(b"fifo", b'6', b""),
        header_only(b"null", b'3', b""),
        header_only(b"blk", b'4', b""),
        file(b"after", b"still in step"),
    ]);
    let (_w, root) = crafted("header-only", bytes);
    assert_eq!(read(&root.join("after")), b"still in step");
    assert_eq!(read(&root.join("hard")), b"t");
    assert_eq!(
        std::fs::read_link(root.join("sym")).unwrap(),
        Path::new("target")
    );
    assert!(root.join("dir").is_dir());
}

#[test]
fn an_old_style_directory_is_a_directory() {
    // Type NUL and a name ending in `/`: a directory (hydrafy made a file).
    // Type NUL otherwise is a file; type `0` with a slash stays a file in Go
    // and in docker.
    let bytes = archive(&[
        Block::v7(b"olddir/", 0).size(0).finish(),
        file(b"olddir/inside", b"x"),
        {
            let mut f = Block::v7(b"oldfile", 0).size(3).finish();
            f.extend(data(b"abc"));
            f
        },
    ]);
    let (_w, root) = crafted("old-dir", bytes);
    assert!(root.join("olddir").is_dir());
    assert_eq!(read(&root.join("olddir/inside")), b"x");
    assert_eq!(read(&root.join("oldfile")), b"abc");
    let (listing, _) = hydrafy_listing(&archive(&[Block::v7(b"d/", 0).finish()]));
    assert!(listing.entries[0].contains("type=53"), "{listing:?}");
}

#[test]
fn the_ustar_prefix_is_joined_where_go_joins_it() {
    // moby's TestUntarUstarGnuConflict archive: GNU headers whose prefix
    // field holds a long directory (a pre-1.8 Go writer). hydrafy put its
    // last entry at the root.
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/go-tar/moby-broken.tar");
    let work = tempfile::tempdir().unwrap();
    let root = apply(work.path(), &read(&fixture)).unwrap();
    let deep = "root/.cpanm/work/1395823785.24209/Plack-1.0030/blib/man3/Plack::Middleware::LighttpdScriptNameFix.3pm";
    assert!(root.join(deep).is_file(), "{deep} is missing");
    assert!(
        !root
            .join("Plack::Middleware::LighttpdScriptNameFix.3pm")
            .exists()
    );

    // USTAR joins its prefix; GNU joins it only when atime/ctime do not
    // parse; V7 has none.
    let prefix = |b: Block| b.raw(345, b"pre/fix").finish();
    let bytes = archive(&[
        prefix(Block::ustar(b"ustar", b'0')),
        prefix(Block::gnu(b"gnu-bad-times", b'0')),
        Block::gnu(b"gnu-good-times", b'0')
            .raw(345, b"00000000001\0")
            .raw(357, b"00000000002\0")
            .finish(),
        prefix(Block::v7(b"v7", b'0')),
    ]);
    let (_w, root) = crafted("prefix", bytes);
    assert!(root.join("pre/fix/ustar").is_file());
    assert!(root.join("pre/fix/gnu-bad-times").is_file());
    assert!(root.join("gnu-good-times").is_file());
    assert!(root.join("v7").is_file());
}

#[test]
fn of_several_pax_headers_the_last_wins() {
    // hydrafy merged them: the first one's uid survived the second.
    let bytes = archive(&[
        pax(&[("path", b"first"), ("uid", b"7")]),
        pax(&[("path", b"second")]),
        file(b"ustar-name", b"x"),
    ]);
    let (listing, _) = hydrafy_listing(&bytes);
    assert!(
        listing.entries[0].starts_with("entry name=second ")
            && listing.entries[0].contains(" uid=0 "),
        "{listing:?}"
    );
    let (_w, root) = crafted("pax-multi", bytes);
    assert_eq!(read(&root.join("second")), b"x");
    if rustix::process::geteuid().is_root() {
        assert_eq!(std::fs::metadata(root.join("second")).unwrap().uid(), 0);
    }
}

#[test]
fn empty_or_nul_numeric_fields_read_as_zero() {
    let bytes = archive(&[
        Block::ustar(b"nul-uid", b'0')
            .raw(108, &[0; 8])
            .raw(116, b"       ")
            .finish(),
        Block::ustar(b"nul-mtime", b'0').raw(136, &[0; 12]).finish(),
        Block::ustar(b"spaces", b'0').raw(100, b" 644   ").finish(),
    ]);
    let (_w, root) = crafted("nul-numbers", bytes);
    let m = std::fs::metadata(root.join("nul-mtime")).unwrap();
    assert_eq!(m.mtime(), 0);
    assert!(root.join("nul-uid").is_file());
}

#[test]
fn a_gnu_volume_header_is_skipped() {
    // hydrafy refused it as an unknown type; Go returns it, and it names
    // the tape, not a file.
    let mut volume = Block::gnu(b"my volume", b'V').size(5).finish();
    volume.extend(data(b"label"));
    let bytes = archive(&[volume, file(b"f", b"x")]);
    let (_w, root) = crafted("volume", bytes);
    assert_eq!(crate::support::listing(&root), ["f"]);
}

#[test]
fn pax_times_with_fractions_and_signs_are_read() {
    // hydrafy read these already; the test pins them with Go as the oracle
    // (the malformed ones are in go_refusals_are_hydrafy_refusals).
    let timed =
        |name: &[u8], t: &[u8]| [pax(&[("mtime", t)]), Block::ustar(name, b'0').finish()].concat();
    let bytes = archive(&[
        timed(b"frac", b"1700000000.123456789"),
        timed(b"neg", b"-1.25"),
        timed(b"plus", b"+5.5"),
        timed(b"long", b"3.1234567891234"),
    ]);
    let (_w, root) = crafted("pax-times", bytes);
    let t = |n: &str| {
        let m = std::fs::symlink_metadata(root.join(n)).unwrap();
        (m.mtime(), m.mtime_nsec())
    };
    assert_eq!(t("frac"), (1_700_000_000, 123_456_789));
    assert_eq!(t("neg"), (-2, 750_000_000));
    assert_eq!(t("plus"), (5, 500_000_000));
    assert_eq!(t("long"), (3, 123_456_789));
}

#[test]
fn more_of_gos_rules() {
    // A signed (Sun) checksum, a GNU long name cut at its NUL, a global
    // header (skipped, dropping a PAX header before it), and a PAX value
    // left empty (the header's value stays).
    let mut high = Block::ustar(b"caf\xc3\xa9", b'0').size(1).finish_with(true);
    high.extend(data(b"s"));
    let mut long = Block::gnu(b"././@LongLink", b'L').size(12).finish();
    long.extend(data(b"long\0ignored"));
    let bytes = archive(&[
        high,
        long,
        file(b"short", b"l"),
        pax(&[("path", b"lost")]),
        pax_header(b'g', &[("path", b"global"), ("comment", b"archive-wide")]),
        file(b"kept", b"k"),
        pax(&[("path", b""), ("mtime", b"")]),
        file(b"empty-pax", b"e"),
    ]);
    let (_w, root) = crafted("more-rules", bytes);
    assert_eq!(read(&root.join("caf\u{e9}")), b"s");
    assert_eq!(read(&root.join("long")), b"l");
    assert_eq!(read(&root.join("kept")), b"k");
    assert_eq!(read(&root.join("empty-pax")), b"e");
    assert!(!root.join("lost").exists() && !root.join("global").exists());
    let m = std::fs::metadata(root.join("empty-pax")).unwrap();
    assert_eq!(m.mtime(), 1_600_000_000);
}

#[test]
fn go_refusals_are_hydrafy_refusals() {
    // A bad checksum, a zero block then data, a PAX record with a NUL in
    // the path, bad PAX numbers and times, a negative size, a bad octal
    // field: Go fails, and so does hydrafy, on one line naming the layer.
    let mut bad_sum = file(b"f", b"x");
    bad_sum[148] = b'7';
    let cases = [
        ("bad-checksum", archive(&[bad_sum])),
        (
            "zero-then-data",
            [vec![0u8; 512], file(b"f", b"x"), vec![0; 1024]].concat(),
        ),
        (
            "pax-nul-path",
            archive(&[pax(&[("path", b"a\0b")]), file(b"f", b"")]),
        ),
        (
            "pax-bad-uid",
            archive(&[pax(&[("uid", b"12x")]), file(b"f", b"")]),
        ),
        // hydrafy ignored atime and trimmed spaces around an mtime.
        (
            "pax-bad-atime",
            archive(&[pax(&[("atime", b"x")]), file(b"f", b"")]),
        ),
        (
            "pax-spaced-mtime",
            archive(&[pax(&[("mtime", b" 1")]), file(b"f", b"")]),
        ),
        (
            "negative-size",
            archive(&[Block::gnu(b"neg", b'0').raw(124, &[0xff; 12]).finish()]),
        ),
        (
            "bad-octal",
            archive(&[Block::ustar(b"f", b'0').raw(100, b"0000z44\0").finish()]),
        ),
    ];
    for (name, bytes) in &cases {
        let work = tempfile::tempdir().unwrap();
        assert!(
            apply(work.path(), bytes).is_err(),
            "{name}: hydrafy applies it"
        );
    }
    let archives: Vec<(String, Vec<u8>)> = cases
        .into_iter()
        .map(|(n, b)| (format!("{n}.tar"), b))
        .collect();
    let paths_go = {
        let work = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = archives
            .iter()
            .map(|(n, b)| {
                let p = work.path().join(n);
                std::fs::write(&p, b).unwrap();
                p
            })
            .collect();
        go_listings(&paths)
    };
    for ((name, _), go) in archives.iter().zip(&paths_go) {
        assert!(go.error.is_some(), "{name}: Go reads it: {go:?}");
    }
    compare(&archives);
}
