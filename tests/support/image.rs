//! Building fixture images in the test and pushing them to a real registry
//! with oci-client. Layers are written entry by entry with raw headers, so a
//! test can make any tar it needs: absolute names, `..`, whiteouts, links to
//! anywhere, long names.

use std::io::Write;

use oci_client::Reference;
use reqwest::header::HeaderValue;
use sha2::{Digest as _, Sha256};

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Docker or OCI media types for manifests, configs and layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Media {
    Docker,
    Oci,
}

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comp {
    Gzip,
    Zstd,
    None,
}

/// A tar stream built entry by entry.
pub struct Tar {
    out: Vec<u8>,
    pub mtime: u64,
}

impl Default for Tar {
    fn default() -> Self {
        Tar::new()
    }
}

impl Tar {
    pub fn new() -> Tar {
        Tar {
            out: Vec::new(),
            mtime: 1,
        }
    }

    /// Append one entry with raw name and link bytes (no checks at all).
    /// Names over 100 bytes get a GNU long-name entry first.
    pub fn entry(
        &mut self,
        kind: tar::EntryType,
        name: &[u8],
        link: &[u8],
        data: &[u8],
        mode: u32,
    ) -> &mut Tar {
        if name.len() > 100 {
            self.long(tar::EntryType::GNULongName, name);
        }
        if link.len() > 100 {
            self.long(tar::EntryType::GNULongLink, link);
        }
        let mut h = tar::Header::new_gnu();
        {
            let gnu = h.as_gnu_mut().unwrap();
            let n = name.len().min(100);
            gnu.name[..n].copy_from_slice(&name[..n]);
            let l = link.len().min(100);
            gnu.linkname[..l].copy_from_slice(&link[..l]);
        }
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(self.mtime);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.push_header_and_data(&h, data);
        self
    }

    fn long(&mut self, kind: tar::EntryType, value: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
        h.set_entry_type(kind);
        h.set_mode(0o644);
        let mut data = value.to_vec();
        data.push(0);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.push_header_and_data(&h, &data);
    }

    /// A PAX extended header applying to the next entry.
    pub fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Tar {
        let mut data = Vec::new();
        for (k, v) in records {
            let body_len = k.len() + v.len() + 3; // ' ' '=' '\n'
            let mut len = body_len + 1;
            while len.to_string().len() + body_len != len {
                len = body_len + len.to_string().len();
            }
            data.extend_from_slice(format!("{len} {k}=").as_bytes());
            data.extend_from_slice(v);
            data.push(b'\n');
        }
        let mut h = tar::Header::new_ustar();
        h.set_path("PaxHeader").unwrap();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.push_header_and_data(&h, &data);
        self
    }

    /// Append a header the caller built (owner, device numbers, any type) and its data.
    pub fn header(&mut self, h: &tar::Header, data: &[u8]) -> &mut Tar {
        self.push_header_and_data(h, data);
        self
    }

    /// Append bytes as they are (garbage, a truncated entry).
    pub fn raw_bytes(&mut self, bytes: &[u8]) -> &mut Tar {
        self.out.extend_from_slice(bytes);
        self
    }

    /// The stream so far, without the end marker.
    pub fn unfinished(&self) -> Vec<u8> {
        self.out.clone()
    }

    fn push_header_and_data(&mut self, h: &tar::Header, data: &[u8]) {
        self.out.extend_from_slice(h.as_bytes());
        self.out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.out.extend(std::iter::repeat_n(0u8, pad));
    }

    pub fn dir(&mut self, name: &str, mode: u32) -> &mut Tar {
        self.entry(tar::EntryType::Directory, name.as_bytes(), b"", b"", mode)
    }

    pub fn file(&mut self, name: &str, data: &[u8], mode: u32) -> &mut Tar {
        self.entry(tar::EntryType::Regular, name.as_bytes(), b"", data, mode)
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Tar {
        self.entry(
            tar::EntryType::Symlink,
            name.as_bytes(),
            target.as_bytes(),
            b"",
            0o777,
        )
    }

    pub fn hardlink(&mut self, name: &str, target: &str) -> &mut Tar {
        self.entry(
            tar::EntryType::Link,
            name.as_bytes(),
            target.as_bytes(),
            b"",
            0o644,
        )
    }

    pub fn fifo(&mut self, name: &str) -> &mut Tar {
        self.entry(tar::EntryType::Fifo, name.as_bytes(), b"", b"", 0o644)
    }

    /// `.wh.NAME` for `path` (`dir/name`).
    pub fn whiteout(&mut self, path: &str) -> &mut Tar {
        let (dir, name) = path.rsplit_once('/').map_or(("", path), |(d, n)| (d, n));
        let wh = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&wh, b"", 0o644)
    }

    /// `DIR/.wh..wh..opq`.
    pub fn opaque(&mut self, dir: &str) -> &mut Tar {
        self.file(&format!("{dir}/.wh..wh..opq"), b"", 0o644)
    }

    /// The finished stream: entries and the two zero blocks.
    pub fn finish(&self) -> Vec<u8> {
        let mut out = self.out.clone();
        out.extend(std::iter::repeat_n(0u8, 1024));
        out
    }
}

/// A layer blob ready to push.
#[derive(Clone, Debug)]
pub struct Blob {
    pub bytes: Vec<u8>,
    pub digest: String,
    pub diff_id: String,
    pub media_type: String,
}

/// Compress a tar stream into a layer blob.
pub fn layer(tar: &[u8], comp: Comp, media: Media) -> Blob {
    let bytes = match comp {
        Comp::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).unwrap();
            e.finish().unwrap()
        }
        Comp::Zstd => zstd::encode_all(tar, 3).unwrap(),
        Comp::None => tar.to_vec(),
    };
    let media_type = match (media, comp) {
        (Media::Docker, Comp::Gzip) => "application/vnd.docker.image.rootfs.diff.tar.gzip",
        (Media::Docker, Comp::None) => "application/vnd.docker.image.rootfs.diff.tar",
        (_, Comp::Gzip) => "application/vnd.oci.image.layer.v1.tar+gzip",
        (_, Comp::Zstd) => "application/vnd.oci.image.layer.v1.tar+zstd",
        (_, Comp::None) => "application/vnd.oci.image.layer.v1.tar",
    };
    Blob {
        digest: sha256(&bytes),
        diff_id: sha256(tar),
        bytes,
        media_type: media_type.to_string(),
    }
}

/// A single-platform image.
#[derive(Clone, Debug)]
pub struct Image {
    pub layers: Vec<Blob>,
    pub media: Media,
    pub os: String,
    pub arch: String,
    /// Replace the computed diff_ids (to make an inconsistent image).
    pub diff_ids: Option<Vec<String>>,
}

impl Image {
    pub fn new(media: Media, layers: Vec<Blob>) -> Image {
        Image {
            layers,
            media,
            os: "linux".into(),
            arch: "amd64".into(),
            diff_ids: None,
        }
    }

    pub fn config(&self) -> Vec<u8> {
        let diff_ids = self
            .diff_ids
            .clone()
            .unwrap_or_else(|| self.layers.iter().map(|l| l.diff_id.clone()).collect());
        serde_json::to_vec(&serde_json::json!({
            "architecture": self.arch, "os": self.os,
            "config": {"Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap()
    }

    fn manifest(&self, config: &[u8]) -> Vec<u8> {
        let (mt, cmt) = match self.media {
            Media::Docker => (
                "application/vnd.docker.distribution.manifest.v2+json",
                "application/vnd.docker.container.image.v1+json",
            ),
            Media::Oci => (
                "application/vnd.oci.image.manifest.v1+json",
                "application/vnd.oci.image.config.v1+json",
            ),
        };
        let layers: Vec<_> = self
            .layers
            .iter()
            .map(|l| serde_json::json!({"mediaType": l.media_type, "digest": l.digest, "size": l.bytes.len()}))
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": mt,
            "config": {"mediaType": cmt, "digest": sha256(config), "size": config.len()},
            "layers": layers,
        }))
        .unwrap()
    }
}

/// What was pushed.
#[derive(Clone, Debug)]
pub struct Pushed {
    /// `ADDR/REPO@DIGEST`.
    pub reference: String,
    pub digest: String,
    pub body: Vec<u8>,
    pub media_type: String,
    pub config_digest: Option<String>,
    pub layer_digests: Vec<String>,
    pub platform: Option<(String, String)>,
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn client() -> oci_client::Client {
    oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::Http,
        ..Default::default()
    })
}

/// Push a blob as-is (any bytes, under the digest of those bytes).
pub fn push_blob(addr: &str, repo: &str, bytes: &[u8]) -> String {
    let digest = sha256(bytes);
    let reference = Reference::with_tag(addr.to_string(), repo.to_string(), "x".to_string());
    rt().block_on(client().push_blob(&reference, bytes.to_vec(), &digest))
        .unwrap_or_else(|e| panic!("push blob {digest}: {e}"));
    digest
}

/// Push a manifest body under `tag` (or only by digest when `None`).
pub fn push_manifest(
    addr: &str,
    repo: &str,
    tag: Option<&str>,
    body: &[u8],
    media_type: &str,
) -> String {
    let digest = sha256(body);
    let reference = match tag {
        Some(t) => Reference::with_tag(addr.to_string(), repo.to_string(), t.to_string()),
        None => Reference::with_digest(addr.to_string(), repo.to_string(), digest.clone()),
    };
    rt().block_on(client().push_manifest_raw(
        &reference,
        body.to_vec(),
        HeaderValue::from_str(media_type).unwrap(),
    ))
    .unwrap_or_else(|e| panic!("push manifest {digest}: {e}"));
    digest
}

/// Push an image (layers, config, manifest) and return what it is called.
pub fn push(addr: &str, repo: &str, tag: Option<&str>, image: &Image) -> Pushed {
    for l in &image.layers {
        push_blob(addr, repo, &l.bytes);
    }
    let config = image.config();
    let config_digest = push_blob(addr, repo, &config);
    let body = image.manifest(&config);
    let media_type = match image.media {
        Media::Docker => "application/vnd.docker.distribution.manifest.v2+json",
        Media::Oci => "application/vnd.oci.image.manifest.v1+json",
    };
    let digest = push_manifest(addr, repo, tag, &body, media_type);
    Pushed {
        reference: format!("{addr}/{repo}@{digest}"),
        digest,
        body,
        media_type: media_type.to_string(),
        config_digest: Some(config_digest),
        layer_digests: image.layers.iter().map(|l| l.digest.clone()).collect(),
        platform: Some((image.os.clone(), image.arch.clone())),
    }
}

/// Push an index (OCI) or manifest list (Docker) over already pushed images.
pub fn push_index(
    addr: &str,
    repo: &str,
    tag: Option<&str>,
    media: Media,
    children: &[&Pushed],
) -> Pushed {
    let manifests: Vec<_> = children
        .iter()
        .map(|c| {
            let (os, arch) = c.platform.clone().expect("child has a platform");
            serde_json::json!({"mediaType": c.media_type, "digest": c.digest, "size": c.body.len(),
                "platform": {"os": os, "architecture": arch}})
        })
        .collect();
    let media_type = match media {
        Media::Docker => "application/vnd.docker.distribution.manifest.list.v2+json",
        Media::Oci => "application/vnd.oci.image.index.v1+json",
    };
    let body = serde_json::to_vec(
        &serde_json::json!({"schemaVersion": 2, "mediaType": media_type, "manifests": manifests}),
    )
    .unwrap();
    let digest = push_manifest(addr, repo, tag, &body, media_type);
    Pushed {
        reference: format!("{addr}/{repo}@{digest}"),
        digest,
        body,
        media_type: media_type.to_string(),
        config_digest: None,
        layer_digests: Vec::new(),
        platform: None,
    }
}

/// An OCI index tagged `latest` in `repo` naming two one-layer images, for
/// linux/amd64 and linux/arm64, each holding a file `arch` that says which:
/// (index, amd64, arm64).
pub fn push_two_platforms(reg: &str, repo: &str) -> (Pushed, Pushed, Pushed) {
    let make = |arch: &str| {
        let mut t = Tar::new();
        t.file("arch", arch.as_bytes(), 0o644);
        let mut image = Image::new(Media::Oci, vec![layer(&t.finish(), Comp::Gzip, Media::Oci)]);
        image.arch = arch.into();
        push(reg, repo, None, &image)
    };
    let (amd, arm) = (make("amd64"), make("arm64"));
    let index = push_index(reg, repo, Some("latest"), Media::Oci, &[&amd, &arm]);
    (index, amd, arm)
}
