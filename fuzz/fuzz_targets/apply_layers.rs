//! Fuzz layer application with a containment oracle (issue 3).
//!
//! Not crashing proves little here: the harm a hostile layer could do is a
//! write, chmod, chown, link or delete outside the root, which crashes
//! nothing. So each input is decoded into a few layers of tar entries built
//! from a vocabulary that aims at the boundary (`..`, absolute paths of a
//! canary tree beside the root, `/proc/self/root`, whiteout names, symlinks
//! and hard links to all of them, raw 512-byte headers, PAX records), applied
//! with `Applier` onto a fresh root, and then the oracle checks:
//!
//! - the canary tree beside the root hashes as before, nothing new appeared
//!   beside the root, and the host's /etc/passwd gained no link;
//! - the root is still a directory;
//! - a failed layer's error is one line naming that layer.
//!
//! Device nodes are confined to harmless numbers (1,3 and 1,5) even in raw
//! headers, so that a bug that wrote into a node could not reach a disk.

#![no_main]

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use hydrafy::unpack::{Applier, ApplyOptions};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

struct Lab {
    dir: PathBuf,
    root: PathBuf,
    canary: String,
    outside: BTreeMap<PathBuf, String>,
    passwd: Option<(u64, u64)>,
}

fn lab() -> &'static Lab {
    static LAB: OnceLock<Lab> = OnceLock::new();
    LAB.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("hydrafy-fuzz-{}", std::process::id()));
        let canary = dir.join("canary");
        std::fs::create_dir_all(canary.join("dir/sub")).unwrap();
        std::fs::write(canary.join("dir/keep"), "keep").unwrap();
        std::fs::write(canary.join("dir/sub/deep"), "deep").unwrap();
        std::fs::write(canary.join("victim"), "victim").unwrap();
        std::os::unix::fs::symlink("victim", canary.join("link")).unwrap();
        let mut lab = Lab {
            root: dir.join("root"),
            canary: canary.to_str().unwrap().to_string(),
            outside: BTreeMap::new(),
            passwd: passwd(),
            dir,
        };
        lab.outside = outside(&lab.dir);
        lab
    })
}

fn passwd() -> Option<(u64, u64)> {
    std::fs::symlink_metadata("/etc/passwd")
        .ok()
        .map(|m| (m.nlink(), m.len()))
}

/// Everything in `dir` except `root`: type, mode, mtime, content or target.
fn outside(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(p) = todo.pop() {
        if p == dir.join("root") {
            continue;
        }
        let m = std::fs::symlink_metadata(&p).unwrap();
        let desc = if m.file_type().is_symlink() {
            format!("link {:?}", std::fs::read_link(&p).unwrap())
        } else if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                todo.push(e.unwrap().path());
            }
            if p == dir {
                // Making and removing the root changes this one's mtime;
                // its names are what count, and they are all listed.
                "top".to_string()
            } else {
                format!("dir {:o} {} {}", m.mode(), m.uid(), m.mtime())
            }
        } else {
            let data = std::fs::read(&p).unwrap_or_default();
            format!(
                "file {:o} {} {} {} {}",
                m.mode(),
                m.uid(),
                m.nlink(),
                m.mtime(),
                hex::encode(Sha256::digest(&data))
            )
        };
        out.insert(p, desc);
    }
    out
}

/// Reads the fuzz input a byte at a time; zeros once it runs out.
struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let start = self.pos.min(self.data.len());
        let end = (start + n).min(self.data.len());
        self.pos = start + n;
        &self.data[start..end]
    }
    fn pick<'v>(&mut self, from: &[&'v str]) -> &'v str {
        from[self.byte() as usize % from.len()]
    }
}

const PARTS: &[&str] = &[
    "a",
    "b",
    "d",
    "s",
    "l",
    "..",
    ".",
    "etc",
    "passwd",
    "proc",
    "self",
    "root",
    ".wh.a",
    ".wh.d",
    ".wh.s",
    ".wh..wh..opq",
    ".wh.",
    ".wh..",
    ".wh...",
    "f",
    "p",
    "",
];
const TARGETS: &[&str] = &[
    "a",
    "d",
    "s",
    "..",
    "../..",
    "../../..",
    "/",
    ".",
    "/etc/passwd",
    "/etc",
    "/proc/self/root",
    "/proc/self/cwd",
    "a/b",
    "d/f",
    "s/..",
    "l",
    "CANARY",
    "CANARY/dir",
    "CANARY/victim",
    "CANARY/dir/keep",
    "CANARY/link",
    "CANARY/missing",
    "",
];
const MODES: &[u32] = &[
    0o644, 0o755, 0o777, 0o4755, 0o2775, 0o000, 0o555, 0o1777, 0o700,
];

struct Builder {
    out: Vec<u8>,
    canary: String,
}

impl Builder {
    fn name(&self, b: &mut Bytes) -> Vec<u8> {
        let n = 1 + b.byte() % 4;
        let lead = b.byte();
        let mut s = String::new();
        if lead.is_multiple_of(5) {
            s.push_str(&self.canary);
            s.push('/');
        } else if lead.is_multiple_of(2) {
            s.push('/');
        }
        for i in 0..n {
            if i > 0 {
                s.push('/');
            }
            s.push_str(b.pick(PARTS));
        }
        s.into_bytes()
    }

    fn target(&self, b: &mut Bytes) -> Vec<u8> {
        if b.byte().is_multiple_of(3) {
            return self.name(b);
        }
        b.pick(TARGETS).replace("CANARY", &self.canary).into_bytes()
    }

    fn header(
        &mut self,
        kind: u8,
        name: &[u8],
        link: &[u8],
        data: &[u8],
        mode: u32,
        b: &mut Bytes,
    ) {
        if name.len() > 100 {
            self.long(b'L', name);
        }
        if link.len() > 100 {
            self.long(b'K', link);
        }
        let mut h = [0u8; 512];
        let n = name.len().min(100);
        h[..n].copy_from_slice(&name[..n]);
        octal(&mut h[100..108], u64::from(mode));
        let (uid, gid) = match b.byte() % 8 {
            0 => (1000, 1000),
            1 => (u64::from(u32::MAX), 0),
            _ => (0, 0),
        };
        octal(&mut h[108..116], uid);
        octal(&mut h[116..124], gid);
        octal(&mut h[124..136], data.len() as u64);
        octal(&mut h[136..148], 1_600_000_000 + u64::from(b.byte()));
        h[156] = kind;
        let l = link.len().min(100);
        h[157..157 + l].copy_from_slice(&link[..l]);
        h[257..263].copy_from_slice(b"ustar ");
        h[263..265].copy_from_slice(b" \0");
        if kind == b'3' || kind == b'4' {
            octal(&mut h[329..337], 1);
            octal(
                &mut h[337..345],
                if b.byte().is_multiple_of(2) { 3 } else { 5 },
            );
        }
        self.block(h, data);
    }

    fn long(&mut self, kind: u8, value: &[u8]) {
        let mut h = [0u8; 512];
        h[..13].copy_from_slice(b"././@LongLink");
        octal(&mut h[100..108], 0o644);
        let mut data = value.to_vec();
        data.push(0);
        octal(&mut h[124..136], data.len() as u64);
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar ");
        h[263..265].copy_from_slice(b" \0");
        self.block(h, &data);
    }

    fn pax(&mut self, records: &[(&str, Vec<u8>)]) {
        let mut data = Vec::new();
        for (k, v) in records {
            let body = k.len() + v.len() + 3;
            let mut len = body + 1;
            while len.to_string().len() + body != len {
                len = body + len.to_string().len();
            }
            data.extend_from_slice(format!("{len} {k}=").as_bytes());
            data.extend_from_slice(v);
            data.push(b'\n');
        }
        let mut h = [0u8; 512];
        h[..9].copy_from_slice(b"PaxHeader");
        octal(&mut h[100..108], 0o644);
        octal(&mut h[124..136], data.len() as u64);
        h[156] = b'x';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        self.block(h, &data);
    }

    /// A header block (checksum fixed here) and its data, padded.
    fn block(&mut self, mut h: [u8; 512], data: &[u8]) {
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&x| u32::from(x)).sum();
        let cks = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(cks.as_bytes());
        self.out.extend_from_slice(&h);
        self.out.extend_from_slice(data);
        self.out
            .extend(std::iter::repeat_n(0u8, (512 - data.len() % 512) % 512));
    }
}

fn octal(field: &mut [u8], v: u64) {
    let s = format!("{v:0w$o}", w = field.len() - 1);
    if s.len() < field.len() {
        field[..s.len()].copy_from_slice(s.as_bytes());
        field[s.len()] = 0;
    } else {
        // base-256, as GNU tar writes numbers that do not fit
        field.fill(0);
        field[0] = 0x80;
        let bytes = v.to_be_bytes();
        let width = field.len();
        let n = bytes.len().min(width - 1);
        field[width - n..].copy_from_slice(&bytes[bytes.len() - n..]);
    }
}

/// Decode the input into up to four layer streams.
fn layers(data: &[u8], canary: &str) -> Vec<Vec<u8>> {
    let mut b = Bytes { data, pos: 0 };
    let mut layers = Vec::new();
    let mut t = Builder {
        out: Vec::new(),
        canary: canary.to_string(),
    };
    let mut entries = 0;
    while !b.done() && entries < 64 {
        entries += 1;
        let op = b.byte() % 16;
        let mode = MODES[b.byte() as usize % MODES.len()];
        match op {
            0 if layers.len() < 3 => {
                let mut out = std::mem::take(&mut t.out);
                out.extend(std::iter::repeat_n(0u8, 1024));
                layers.push(out);
            }
            0 | 1 => {
                let name = t.name(&mut b);
                let len = b.byte() as usize % 8;
                let data = b.take(len).to_vec();
                t.header(b'0', &name, b"", &data, mode, &mut b);
            }
            2 => {
                let name = t.name(&mut b);
                t.header(b'5', &name, b"", b"", mode, &mut b);
            }
            3 => {
                let name = t.name(&mut b);
                let target = t.target(&mut b);
                t.header(b'2', &name, &target, b"", 0o777, &mut b);
            }
            4 => {
                let name = t.name(&mut b);
                let target = t.target(&mut b);
                let data = if b.byte().is_multiple_of(4) {
                    b"EVIL".to_vec()
                } else {
                    Vec::new()
                };
                t.header(b'1', &name, &target, &data, mode, &mut b);
            }
            5 => {
                let name = t.name(&mut b);
                t.header(b'6', &name, b"", b"", mode, &mut b);
            }
            6 => {
                let name = t.name(&mut b);
                let kind = if b.byte().is_multiple_of(2) {
                    b'3'
                } else {
                    b'4'
                };
                t.header(kind, &name, b"", b"", mode, &mut b);
            }
            7 => {
                let mut name = t.name(&mut b);
                let at = name.iter().rposition(|&c| c == b'/').map_or(0, |i| i + 1);
                name.splice(at..at, b".wh.".iter().copied());
                t.header(b'0', &name, b"", b"", 0o644, &mut b);
            }
            8 => {
                let mut name = t.name(&mut b);
                name.extend_from_slice(b"/.wh..wh..opq");
                t.header(b'0', &name, b"", b"", 0o644, &mut b);
            }
            9 => {
                let pax_name = t.name(&mut b);
                let name = t.name(&mut b);
                t.pax(&[("path", pax_name)]);
                t.header(b'0', &name, b"", b"pax", mode, &mut b);
            }
            10 => {
                let target = t.target(&mut b);
                let name = t.name(&mut b);
                t.pax(&[("linkpath", target)]);
                t.header(b'2', &name, b"decoy", b"", 0o777, &mut b);
            }
            11 => {
                let mut name = t.name(&mut b);
                let extra = 100 + b.byte() as usize * 4;
                name.extend(std::iter::repeat_n(b'n', extra));
                t.header(b'0', &name, b"", b"long", mode, &mut b);
            }
            12 => {
                // A raw header: libFuzzer picks every field; the checksum is made valid.
                let mut h = [0u8; 512];
                let raw = b.take(512);
                h[..raw.len()].copy_from_slice(raw);
                if h[156] == b'3' || h[156] == b'4' {
                    octal(&mut h[329..337], 1);
                    octal(&mut h[337..345], 3);
                }
                let len = b.byte() as usize;
                let data = b.take(len).to_vec();
                t.block(h, &data);
            }
            13 => {
                let keys = [
                    "path",
                    "linkpath",
                    "uid",
                    "gid",
                    "size",
                    "mtime",
                    "GNU.sparse.major",
                    "comment",
                ];
                let key = b.pick(&keys);
                let len = b.byte() as usize % 24;
                let value = b.take(len).to_vec();
                t.pax(&[(key, value)]);
            }
            14 => {
                let len = b.byte() as usize;
                let junk = b.take(len).to_vec();
                t.out.extend_from_slice(&junk);
            }
            _ => {
                let name = t.name(&mut b);
                t.header(b'0', &name, b"", b"owned", mode, &mut b);
            }
        }
    }
    t.out.extend(std::iter::repeat_n(0u8, 1024));
    layers.push(t.out);
    layers
}

fuzz_target!(|data: &[u8]| {
    let lab = lab();
    std::fs::create_dir(&lab.root).unwrap();
    let layers = layers(data, &lab.canary);
    let opts = ApplyOptions {
        as_root: rustix::process::geteuid().is_root(),
        special_files: true,
    };
    let mut applier = Applier::new(&lab.root, opts).unwrap();
    let mut ok = true;
    for (i, layer) in layers.iter().enumerate() {
        let label = format!("sha256:fuzz-layer-{i}");
        if let Err(e) = applier.apply_layer(&label, layer.as_slice()) {
            let line = hydrafy::report(&e);
            assert!(!line.contains('\n'), "error on two lines: {line}");
            assert!(line.contains(&label), "error without the layer: {line}");
            ok = false;
            break;
        }
    }
    if ok {
        let _ = applier.finish();
    }
    drop(applier);

    // The oracle.
    let after = outside(&lab.dir);
    if after != lab.outside {
        let diff: Vec<_> = after
            .iter()
            .filter(|(k, v)| lab.outside.get(*k) != Some(*v))
            .map(|(k, v)| format!("{}: {v}", k.display()))
            .chain(
                lab.outside
                    .keys()
                    .filter(|k| !after.contains_key(*k))
                    .map(|k| format!("{}: removed", k.display())),
            )
            .collect();
        panic!("escaped the root: {diff:?}");
    }
    assert_eq!(passwd(), lab.passwd, "/etc/passwd gained a link");
    assert!(
        std::fs::symlink_metadata(&lab.root).unwrap().is_dir(),
        "the root was replaced"
    );
    hydrafy::unpack::remove_tree(&lab.root).expect("remove the root");
});
