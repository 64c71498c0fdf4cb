//! Image files for air-gapped hosts: OCI image layouts (a directory or an
//! `oci-archive` tar) and `docker save` archives, read and written.
//!
//! Reading never touches the network. An archive is indexed once (entry
//! name to offset and size, seeking past the data: [`files`]), then manifests and
//! configs are read by name, bounded, and verified against the descriptors
//! that name them; layer blobs are streamed straight from the file into the
//! unpack pipeline, which hashes them on the way. Nothing is extracted to a
//! temporary directory and nothing is held in memory whole.
//!
//! A compressed image file is decompressed once into an unnamed temporary
//! file first ([`crate::oci::compressed`] says why), and read from there.
//!
//! A file may hold several images: an OCI layout several `skopeo copy ...
//! oci:DIR:TAG` runs filled, a `docker save` of two images. SOURCE picks one
//! with skopeo's names ([`crate::oci::source`]); [`Archive::list`] shows them.
//! Entries that are not container images (artifacts such as Helm charts,
//! referrers such as signatures) are told apart and named as what they are.
//!
//! `docker save` from Docker 25 on writes an OCI layout and a `manifest.json`
//! in one tar; where its `index.json` lists no image the file holds, the
//! `manifest.json` is read, as skopeo does.
//!
//! A partial archive (`pull --have`) leaves out layers the far side holds
//! and says so in `index.json`'s own annotations ([`Partial`]); its reader
//! does not ask for those blobs, and the caller decides whether it may do
//! without them.
//!
//! Writing ([`write`]) keeps the registry's manifest bytes exactly, Docker media types
//! included, so the pinned digests still verify on the far side. An archive
//! is written as a stream into a temporary file beside its final name and
//! renamed when complete.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::oci::compressed::Packing;
use crate::oci::digest::Digest;
use crate::oci::manifest::{
    self, Descriptor, ImageManifest, Index, MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES, Manifest,
};
use crate::oci::platform::Platform;
use crate::oci::reference::ImageRef;
use crate::oci::resolve::{FinishResolve, ResolvedImage, finish_resolve};
use crate::oci::source::{Format, Pick, SourceName};
use crate::ui::progress::Reporter;
use crate::ui::words::{plural, shell_word};
use crate::unpack::pipeline::LayerInput;

mod files;
mod write;

use files::Files;
pub use write::{BlobData, LayoutContent};

/// The annotation that names an image in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The annotation Docker 25+ and containerd add with the full image name.
const CONTAINERD_NAME: &str = "io.containerd.image.name";
const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;
/// An archive with more entries than this is not an image archive.
const MAX_ENTRIES: usize = 1_000_000;
/// Helm's chart config media type.
const HELM_CONFIG: &str = "application/vnd.cncf.helm.config.v1+json";

/// `index.json` annotation: `"true"` when `pull --have` left layers out.
pub const PARTIAL: &str = "io.hydrafy.partial";
/// `index.json` annotation: the sha256 of the STATE the archive was made against.
pub const PARTIAL_AGAINST: &str = "io.hydrafy.partial.against";
/// `index.json` annotation: what that STATE was, in words.
pub const PARTIAL_AGAINST_WHAT: &str = "io.hydrafy.partial.against.what";
/// `index.json` annotation: the digests of the layers left out, comma-separated.
pub const PARTIAL_OMITTED: &str = "io.hydrafy.partial.omitted";

/// What a partial archive (`pull --have`) says of itself in `index.json`:
/// the layers it leaves out, because the far side holds their store paths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partial {
    /// `sha256:...` of the STATE it was made against.
    pub against: String,
    /// That STATE, in words.
    pub what: String,
    /// The layer blobs left out.
    pub omitted: HashSet<Digest>,
}

impl Partial {
    /// The annotations that say so, for `index.json`.
    pub fn annotations(&self, omitted_in_order: &[Digest]) -> Vec<(String, String)> {
        let list: Vec<String> = omitted_in_order.iter().map(Digest::to_string).collect();
        vec![
            (PARTIAL.to_string(), "true".to_string()),
            (PARTIAL_AGAINST.to_string(), self.against.clone()),
            (PARTIAL_AGAINST_WHAT.to_string(), self.what.clone()),
            (PARTIAL_OMITTED.to_string(), list.join(",")),
        ]
    }

    /// Read from `index.json`'s own annotations; `None` for a whole archive.
    fn from_index(source: &str, index_json: &[u8]) -> Result<Option<Partial>> {
        #[derive(Deserialize)]
        struct Top {
            #[serde(default)]
            annotations: HashMap<String, String>,
        }
        let Ok(top) = serde_json::from_slice::<Top>(index_json) else {
            return Ok(None);
        };
        let a = top.annotations;
        if a.get(PARTIAL).map(String::as_str) != Some("true") {
            return Ok(None);
        }
        let omitted = a
            .get(PARTIAL_OMITTED)
            .map(String::as_str)
            .unwrap_or_default()
            .split(',')
            .filter(|d| !d.is_empty())
            .map(|d| {
                d.parse::<Digest>().map_err(|_| Error::Archive {
                    what: "partial archive",
                    input: source.to_string(),
                    reason: format!(
                        "index.json annotation {PARTIAL_OMITTED} names {d:?}, which is not a digest; the archive is damaged, pull it again"
                    ),
                })
            })
            .collect::<Result<HashSet<Digest>>>()?;
        Ok(Some(Partial {
            against: a.get(PARTIAL_AGAINST).cloned().unwrap_or_default(),
            what: a
                .get(PARTIAL_AGAINST_WHAT)
                .cloned()
                .unwrap_or_else(|| "an unnamed state".to_string()),
            omitted,
        }))
    }
}

/// `blobs/sha256/<hex>`.
pub fn blob_name(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerSaveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

impl DockerSaveEntry {
    fn tags(&self) -> &[String] {
        self.repo_tags.as_deref().unwrap_or_default()
    }
}

/// The fields of a manifest or index that say what kind of thing it is.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Shape {
    media_type: Option<String>,
    manifests: Option<Vec<Descriptor>>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    subject: Option<Descriptor>,
    artifact_type: Option<String>,
}

/// The os/arch of an image config, if it says.
#[derive(Deserialize)]
struct ConfigPlatform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

/// What an `index.json` entry is.
#[derive(Clone, Debug)]
enum What {
    /// A container image, or an index of them: the platforms the file holds
    /// and the bytes of its blobs.
    Image { platforms: Vec<String>, size: u64 },
    /// Named, but its manifests could not be read: resolving it says why.
    Unreadable,
    /// An artifact (a Helm chart, a WASM module): its type.
    Artifact(String),
    /// A manifest about another one (`subject`): a signature, SBOM, attestation.
    Referrer(String),
    /// Named in `index.json` but not in the file.
    Missing,
}

impl What {
    fn is_image(&self) -> bool {
        matches!(self, What::Image { .. } | What::Unreadable)
    }
}

/// One `index.json` entry and what it is.
struct Listed {
    desc: Descriptor,
    what: What,
}

impl Listed {
    fn ref_name(&self) -> Option<&str> {
        self.desc
            .annotations
            .as_ref()?
            .get(REF_NAME)
            .map(String::as_str)
    }

    /// Does `name` (a ref name, or a full image name) name this entry?
    /// A ref name that is a full image name (as `pull` writes it) matches
    /// that image however it is spelled (`nixos/nix@...` is `docker.io/nixos/nix@...`).
    fn named(&self, name: &str) -> bool {
        match self.ref_name() {
            Some(r) if r == name => return true,
            Some(r) if r.contains('/') && same_image_name(r, name) => return true,
            _ => {}
        }
        let full = self
            .desc
            .annotations
            .as_ref()
            .and_then(|a| a.get(CONTAINERD_NAME));
        full.is_some_and(|full| same_image_name(full, name))
    }
}

/// `docker.io/library/nix:1` and `nix:1` are the same name.
fn same_image_name(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    match (ImageRef::parse(a), ImageRef::parse(b)) {
        (Ok(a), Ok(b)) => a.to_string() == b.to_string(),
        _ => false,
    }
}

/// What an artifact type is, in words.
fn artifact_words(kind: &str) -> String {
    if kind == HELM_CONFIG {
        format!("a Helm chart (config {kind})")
    } else if kind.contains("cosign") || kind.contains("sigstore") {
        format!("a signature ({kind})")
    } else if kind.contains("in-toto") || kind.contains("spdx") || kind.contains("cyclonedx") {
        format!("an attestation or SBOM ({kind})")
    } else {
        format!("an artifact of type {kind}")
    }
}

/// What an image file is read as.
enum View {
    /// An OCI layout: `index.json`'s entries.
    Oci(Vec<Listed>),
    /// A `docker save` archive: `manifest.json`'s entries.
    Docker(Vec<DockerSaveEntry>),
}

/// One image a file holds, as `extract --list` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ListedImage {
    /// What the file names it: `org.opencontainers.image.ref.name`, or a
    /// `docker save`'s RepoTags; empty when unnamed.
    pub references: Vec<String>,
    /// The index or manifest digest (a `docker save`'s image ID, the config digest).
    pub digest: Digest,
    /// `image`, or what else it is (`a Helm chart (config ...)`).
    pub kind: String,
    pub platforms: Vec<String>,
    /// The bytes of its blobs (manifests, config, layers) in the file.
    pub size: u64,
    /// The SOURCE that extracts exactly this image.
    pub source: String,
}

/// What `extract --list` prints.
#[derive(Clone, Debug, Serialize)]
pub struct Listing {
    pub source: String,
    /// `oci-layout`, `oci-archive` or `docker-archive`.
    pub format: &'static str,
    pub images: Vec<ListedImage>,
    /// Set for a partial archive (`pull --have`): what it leaves out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partial: Option<ListedPartial>,
}

/// What `extract --list` says of a partial archive.
#[derive(Clone, Debug, Serialize)]
pub struct ListedPartial {
    /// `sha256:...` of the STATE it was made against, and that STATE in words.
    pub against: String,
    pub against_what: String,
    /// The layer digests left out, sorted.
    pub omitted: Vec<Digest>,
}

impl Listing {
    /// The table on stdout: one line per entry, and how to pick one.
    pub fn render(&self) -> String {
        let rows: Vec<[String; 5]> = self
            .images
            .iter()
            .map(|i| {
                [
                    if i.references.is_empty() {
                        "-".to_string()
                    } else {
                        i.references.join(",")
                    },
                    i.digest.to_string(),
                    if i.kind == "image" {
                        i.platforms.join(",")
                    } else {
                        format!("not an image: {}", i.kind)
                    },
                    format!("{:.1} MB", i.size as f64 / 1e6),
                    i.source.clone(),
                ]
            })
            .collect();
        let header = ["REFERENCE", "DIGEST", "PLATFORMS", "SIZE", "EXTRACT WITH"].map(String::from);
        let mut widths = [0usize; 5];
        for row in std::iter::once(&header).chain(&rows) {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&header).chain(&rows) {
            let mut line = String::new();
            for (i, (w, cell)) in widths.iter().zip(row).enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<w$}  "));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        if self.images.is_empty() {
            out.push_str(&format!("{}: holds no image\n", self.source));
        }
        if let Some(p) = &self.partial {
            out.push_str(&format!(
                "{}: partial, made by `pull --have` against {} ({}): leaves out {} {}; extract it with --merge into that seed\n",
                self.source,
                p.against_what,
                p.against,
                p.omitted.len(),
                plural(p.omitted.len() as u64, "layer")
            ));
        }
        out.trim_end().to_string()
    }
}

/// An image file to extract from.
pub struct Archive {
    files: Arc<Files>,
    name: SourceName,
    view: View,
    /// Set when `pull --have` made the file and left layers out.
    partial: Option<Partial>,
}

impl Archive {
    /// Open SOURCE: an OCI layout directory, an oci-archive tar, or a
    /// `docker save` tar, any of them compressed; a compressed file (which
    /// may be a pipe) is decompressed into `scratch` (see the module's doc).
    /// Setting `cancel` stops the decompression.
    pub fn open(
        name: &SourceName,
        scratch: &Path,
        cancel: &AtomicBool,
        reporter: &dyn Reporter,
    ) -> Result<Archive> {
        let path = &name.path;
        let files = Files::open(path, scratch, cancel, reporter)?;
        let is_oci = files.size("index.json").is_some() && files.size("oci-layout").is_some();
        let is_docker = files.size("manifest.json").is_some();
        let input = path.display().to_string();
        let not = |reason: String| Error::Archive {
            what: "image archive",
            input: input.clone(),
            reason,
        };
        let view = match (name.format, is_oci, is_docker) {
            (Format::DockerArchive, _, true) => View::Docker(docker_entries(&files)?),
            (Format::DockerArchive, oci, false) => {
                return Err(not(format!(
                    "not a docker save archive (no manifest.json){}",
                    if oci {
                        "; it is an OCI layout: name it oci-archive:FILE or oci:DIR"
                    } else {
                        ""
                    }
                )));
            }
            (Format::Oci | Format::OciArchive, true, _) => View::Oci(oci_entries(&files)?),
            (Format::Oci | Format::OciArchive, false, docker) => {
                return Err(not(format!(
                    "not an OCI image layout (no oci-layout and index.json){}",
                    if docker {
                        "; it is a docker save archive: name it docker-archive:FILE"
                    } else {
                        ""
                    }
                )));
            }
            // Docker 25+ `docker save`: where index.json lists nothing the
            // file holds (or cannot be read), manifest.json still says what it does.
            (Format::Detect, true, docker) => match oci_entries(&files) {
                Ok(listed) if listed.iter().any(|l| l.what.is_image()) => View::Oci(listed),
                _ if docker => View::Docker(docker_entries(&files)?),
                listed => View::Oci(listed?),
            },
            (Format::Detect, false, true) => View::Docker(docker_entries(&files)?),
            (Format::Detect, false, false) => {
                return Err(not(
                    "neither an OCI image layout (oci-layout, index.json) nor a docker save archive (manifest.json)"
                        .to_string(),
                ));
            }
        };
        let partial = match view {
            View::Oci(_) => {
                Partial::from_index(&input, &files.read("index.json", MAX_MANIFEST_BYTES)?)?
            }
            View::Docker(_) => None,
        };
        Ok(Archive {
            files: Arc::new(files),
            name: name.clone(),
            view,
            partial,
        })
    }

    /// The file or directory read.
    pub fn source(&self) -> &Path {
        self.files.source()
    }

    /// What the file says it leaves out, when `pull --have` made it.
    pub fn partial(&self) -> Option<&Partial> {
        self.partial.as_ref()
    }

    /// The blobs (`blobs/sha256/<hex>`) the file holds.
    pub fn blob_digests(&self) -> HashSet<Digest> {
        let names: Vec<String> = match &*self.files {
            Files::Dir(dir) => fs::read_dir(dir.join("blobs/sha256"))
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .map(|e| format!("blobs/sha256/{}", e.file_name().to_string_lossy()))
                        .collect()
                })
                .unwrap_or_default(),
            Files::Tar { entries, .. } => entries.keys().cloned().collect(),
        };
        names
            .iter()
            .filter_map(|n| n.strip_prefix("blobs/sha256/"))
            .filter_map(|hex| format!("sha256:{hex}").parse().ok())
            .filter(|d| self.files.has_blob(d))
            .collect()
    }

    /// A stream over the blob `digest` (unverified: the caller hashes it).
    pub fn blob_stream(&self, digest: &Digest) -> Result<Box<dyn Read + Send>> {
        self.files.stream(&blob_name(digest)).map(|(r, _)| r)
    }

    /// The format this file is read as, for the names that pick its images.
    fn format(&self) -> Format {
        match (&self.view, &*self.files) {
            (View::Docker(_), _) => Format::DockerArchive,
            (View::Oci(_), Files::Dir(_)) => Format::Oci,
            (View::Oci(_), Files::Tar { .. }) => Format::OciArchive,
        }
    }

    fn source_name(&self) -> String {
        self.files.source().display().to_string()
    }

    /// Every entry the file holds, images and what is not.
    pub fn list(&self) -> Result<Listing> {
        let format = self.format();
        let images = match &self.view {
            View::Oci(listed) => listed
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let (kind, platforms, size) = match &l.what {
                        What::Image { platforms, size } => {
                            ("image".to_string(), platforms.clone(), *size)
                        }
                        What::Unreadable => ("unreadable".to_string(), Vec::new(), 0),
                        What::Artifact(k) => (artifact_words(k), Vec::new(), l.desc.size),
                        What::Referrer(k) => (format!("a referrer ({k})"), Vec::new(), l.desc.size),
                        What::Missing => ("missing from the file".to_string(), Vec::new(), 0),
                    };
                    ListedImage {
                        references: l.ref_name().map(str::to_string).into_iter().collect(),
                        digest: l.desc.digest,
                        kind,
                        platforms,
                        size,
                        source: self.name.naming(format, &self.oci_pick(listed, i)),
                    }
                })
                .collect(),
            View::Docker(entries) => entries
                .iter()
                .enumerate()
                .map(|(i, e)| self.docker_listed(entries, i, e))
                .collect::<Result<_>>()?,
        };
        Ok(Listing {
            source: self.name.path.display().to_string(),
            format: match format {
                Format::DockerArchive => "docker-archive",
                Format::Oci => "oci-layout",
                _ => "oci-archive",
            },
            images,
            partial: self.partial.as_ref().map(|p| {
                let mut omitted: Vec<Digest> = p.omitted.iter().copied().collect();
                omitted.sort_by_key(|d| d.to_string());
                ListedPartial {
                    against: p.against.clone(),
                    against_what: p.what.clone(),
                    omitted,
                }
            }),
        })
    }

    fn docker_listed(
        &self,
        entries: &[DockerSaveEntry],
        i: usize,
        e: &DockerSaveEntry,
    ) -> Result<ListedImage> {
        let config = self.files.read(&e.config, MAX_CONFIG_BYTES)?;
        let platform = serde_json::from_slice::<ConfigPlatform>(&config)
            .map(|p| platform_words(&p))
            .unwrap_or_default();
        let size = config.len() as u64
            + e.layers
                .iter()
                .filter_map(|l| self.files.size(l))
                .sum::<u64>();
        Ok(ListedImage {
            references: e.tags().to_vec(),
            digest: Digest::of(&config),
            kind: "image".to_string(),
            platforms: platform.into_iter().collect(),
            size,
            source: self
                .name
                .naming(Format::DockerArchive, &docker_pick(entries, i)),
        })
    }

    /// The name that picks entry `i`: its ref name when no other entry has
    /// it, else its position.
    fn oci_pick(&self, listed: &[Listed], i: usize) -> Pick {
        match listed[i].ref_name() {
            Some(n) if listed.iter().filter(|l| l.ref_name() == Some(n)).count() == 1 => {
                Pick::Name(n.to_string())
            }
            _ => Pick::Position(i),
        }
    }

    /// One line for "several images, name one".
    fn several(&self, labels: Vec<String>, first: Pick) -> Error {
        let source = self.name.naming(self.format(), &first);
        Error::SeveralImages {
            file: shell_word(&self.name.to_string()),
            images: labels,
            command: format!("hydrafy extract {}", shell_word(&source)),
        }
    }

    /// The index.json entries SOURCE picks: one, or several of one name
    /// that differ by platform.
    fn choose_oci<'a>(&self, listed: &'a [Listed]) -> Result<Vec<&'a Listed>> {
        let source = self.source_name();
        let usable: Vec<&Listed> = listed.iter().filter(|l| l.what.is_image()).collect();
        let label = |l: &Listed| match l.ref_name() {
            Some(n) => n.to_string(),
            None => l.desc.digest.to_string(),
        };
        match &self.name.pick {
            Some(Pick::Position(i)) => match listed.get(*i) {
                Some(l) if l.what.is_image() => Ok(vec![l]),
                Some(l) => Err(self.not_an_image(std::slice::from_ref(l))),
                None => Err(Error::Archive {
                    what: "image archive",
                    input: source,
                    reason: format!(
                        "@{i} is past its last image: index.json lists {} (@0 to @{})",
                        listed.len(),
                        listed.len().saturating_sub(1)
                    ),
                }),
            },
            Some(Pick::Name(name)) => {
                let hits: Vec<&Listed> = usable.iter().copied().filter(|l| l.named(name)).collect();
                if !hits.is_empty() {
                    return Ok(hits);
                }
                let others: Vec<&Listed> = listed.iter().filter(|l| l.named(name)).collect();
                if let Some(l) = others.first() {
                    return Err(self.not_an_image(std::slice::from_ref(l)));
                }
                let names: Vec<String> = usable.iter().map(|l| label(l)).collect();
                Err(Error::Archive {
                    what: "image archive",
                    input: source,
                    reason: format!(
                        "holds no image named {name:?}; it holds {}",
                        if names.is_empty() {
                            "none".to_string()
                        } else {
                            names.join(", ")
                        }
                    ),
                })
            }
            None => match usable.as_slice() {
                [] => Err(self.not_an_image(listed)),
                [_] => Ok(usable),
                many => {
                    let one_name = many.iter().all(|l| l.ref_name() == many[0].ref_name());
                    if one_name && many.iter().all(|l| l.desc.platform.is_some()) {
                        return Ok(usable);
                    }
                    let first = listed
                        .iter()
                        .position(|l| std::ptr::eq(l, many[0]))
                        .unwrap_or(0);
                    Err(self.several(
                        many.iter().map(|l| label(l)).collect(),
                        self.oci_pick(listed, first),
                    ))
                }
            },
        }
    }

    /// What a file holding no container image holds instead, in one line.
    fn not_an_image(&self, listed: &[Listed]) -> Error {
        let source = self.source_name();
        if listed.is_empty() {
            return Error::unsupported(
                source,
                "an empty OCI layout: index.json lists no image; copy one into it (hydrafy pull IMAGE -o DIR, or skopeo copy docker://IMAGE oci:DIR:TAG)",
            );
        }
        if listed.iter().all(|l| matches!(l.what, What::Referrer(_))) {
            let kinds: Vec<String> = listed
                .iter()
                .filter_map(|l| match &l.what {
                    What::Referrer(k) => Some(k.clone()),
                    _ => None,
                })
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            return Error::unsupported(
                source,
                format!(
                    "holds only referrers ({}): signatures, SBOMs or attestations of images the file does not hold, not a container image; copy the image itself (not only its referrers) into it",
                    kinds.join(", ")
                ),
            );
        }
        let words: Vec<String> = listed
            .iter()
            .map(|l| match &l.what {
                What::Artifact(k) => artifact_words(k),
                What::Referrer(k) => format!("a referrer ({k})"),
                What::Missing => format!(
                    "{}, which the file does not hold (it is incomplete; copy it again)",
                    l.desc.digest
                ),
                What::Image { .. } | What::Unreadable => "an image".to_string(),
            })
            .collect();
        Error::unsupported(
            source,
            format!(
                "holds no container image, only {}; hydrafy extracts container images",
                words.join(", ")
            ),
        )
    }

    /// Read and verify the image's manifest chain for `platform`.
    pub fn resolve(
        &self,
        platform: &Platform,
        explicit: bool,
        reporter: &dyn Reporter,
    ) -> Result<ResolvedImage> {
        match &self.view {
            View::Docker(entries) => {
                let entry = self.choose_docker(entries)?;
                self.resolve_docker(entry, platform, explicit, reporter)
            }
            View::Oci(listed) => {
                let chosen = self.choose_oci(listed)?;
                self.resolve_oci(&chosen, platform, explicit, reporter)
            }
        }
    }

    fn resolve_oci(
        &self,
        chosen: &[&Listed],
        platform: &Platform,
        explicit: bool,
        reporter: &dyn Reporter,
    ) -> Result<ResolvedImage> {
        let source = self.source_name();
        let entry = match chosen {
            [only] => &only.desc,
            many => {
                let top = Index {
                    media_type: manifest::media::OCI_INDEX.to_string(),
                    manifests: many.iter().map(|l| l.desc.clone()).collect(),
                };
                // Borrow from `chosen`, which outlives `top`.
                let picked = top.select(&source, platform)?.digest;
                &many
                    .iter()
                    .find(|l| l.desc.digest == picked)
                    .expect("selected from these")
                    .desc
            }
        };
        let ref_name = entry
            .annotations
            .as_ref()
            .and_then(|a| a.get(REF_NAME))
            .cloned();
        let body = self.files.blob(entry, "manifest", MAX_MANIFEST_BYTES)?;
        let (index_digest, manifest_digest, manifest, offered) =
            match Manifest::parse(&source, &body)? {
                Manifest::Index(index) => {
                    let child = self.held_child(&source, &index, platform, explicit, reporter)?;
                    let child_body = self.files.blob(&child, "manifest", MAX_MANIFEST_BYTES)?;
                    let Manifest::Image(m) = Manifest::parse(&source, &child_body)? else {
                        return Err(Error::unsupported(
                            &source,
                            "an index nested in an index is not supported",
                        ));
                    };
                    (Some(entry.digest), child.digest, m, child.platform.clone())
                }
                Manifest::Image(m) => (None, entry.digest, m, entry.platform.clone()),
            };
        let config_bytes = self
            .files
            .blob(&manifest.config, "config", MAX_CONFIG_BYTES)?;
        let top_digest = index_digest.unwrap_or(manifest_digest);
        let name = match ref_name {
            Some(r) if r.contains('@') => r,
            Some(r) => format!("{r}@{top_digest}"),
            None => format!("{source}@{top_digest}"),
        };
        let resolved = finish_resolve(FinishResolve {
            name,
            top_digest,
            index_digest,
            manifest_digest: Some(manifest_digest),
            manifest,
            config_bytes: &config_bytes,
            offered,
            platform,
            explicit,
            reporter,
        })?;
        let omitted = |d: &Digest| self.partial.as_ref().is_some_and(|p| p.omitted.contains(d));
        for layer in &resolved.manifest.layers {
            if !self.files.has_blob(&layer.digest) && !omitted(&layer.digest) {
                return Err(Error::Archive {
                    what: "image archive",
                    input: source,
                    reason: format!(
                        "layer blob {} is missing; the archive is incomplete, copy it again",
                        layer.digest
                    ),
                });
            }
        }
        Ok(resolved)
    }

    /// The manifest of `index` for `platform`, among those the file holds
    /// (`pull` without `--all-platforms` keeps the index and one of its
    /// manifests). With no platform asked for and one manifest held, that
    /// one, with a warning, as `fetch` does for a single-platform image.
    fn held_child(
        &self,
        source: &str,
        index: &Index,
        platform: &Platform,
        explicit: bool,
        reporter: &dyn Reporter,
    ) -> Result<Descriptor> {
        let held = Index {
            media_type: index.media_type.clone(),
            manifests: index
                .manifests
                .iter()
                .filter(|d| self.files.has_blob(&d.digest))
                .cloned()
                .collect(),
        };
        if held.manifests.is_empty() {
            return Err(Error::Archive {
                what: "image archive",
                input: source.to_string(),
                reason: "holds the image's index but none of its manifests; the file is incomplete, copy it again".to_string(),
            });
        }
        match held.select(source, platform) {
            Ok(child) => Ok(child.clone()),
            Err(e) => {
                let real: Vec<&Descriptor> = held
                    .manifests
                    .iter()
                    .filter(|d| d.platform.as_ref().is_some_and(|p| p.os != "unknown"))
                    .collect();
                match real.as_slice() {
                    [only] if !explicit => {
                        let p = only.platform.as_ref().expect("filtered on platform");
                        reporter.warn(&format!(
                            "{source}: holds the image for {p} only, not {platform}; unpacking it anyway"
                        ));
                        Ok((*only).clone())
                    }
                    _ => Err(e),
                }
            }
        }
    }

    fn choose_docker<'a>(&self, entries: &'a [DockerSaveEntry]) -> Result<&'a DockerSaveEntry> {
        let source = self.source_name();
        let label = |i: usize, e: &DockerSaveEntry| match e.tags().first() {
            Some(t) => t.clone(),
            None => format!("@{i} (untagged, {})", e.config),
        };
        match &self.name.pick {
            Some(Pick::Position(i)) => entries.get(*i).ok_or_else(|| Error::Archive {
                what: "docker archive",
                input: source,
                reason: format!(
                    "@{i} is past its last image: manifest.json lists {} (@0 to @{})",
                    entries.len(),
                    entries.len().saturating_sub(1)
                ),
            }),
            Some(Pick::Name(name)) => entries
                .iter()
                .find(|e| e.tags().iter().any(|t| same_image_name(t, name)))
                .ok_or_else(|| {
                    let names: Vec<String> = entries
                        .iter()
                        .enumerate()
                        .map(|(i, e)| label(i, e))
                        .collect();
                    Error::Archive {
                        what: "docker archive",
                        input: source,
                        reason: format!(
                            "holds no image tagged {name:?}; it holds {}",
                            names.join(", ")
                        ),
                    }
                }),
            None => match entries {
                [] => Err(Error::unsupported(
                    source,
                    "a docker save archive whose manifest.json lists no image",
                )),
                [only] => Ok(only),
                many => Err(self.several(
                    many.iter().enumerate().map(|(i, e)| label(i, e)).collect(),
                    docker_pick(many, 0),
                )),
            },
        }
    }

    fn resolve_docker(
        &self,
        entry: &DockerSaveEntry,
        platform: &Platform,
        explicit: bool,
        reporter: &dyn Reporter,
    ) -> Result<ResolvedImage> {
        let source = self.source_name();
        let config_bytes = self.files.read(&entry.config, MAX_CONFIG_BYTES)?;
        let config_digest = Digest::of(&config_bytes);
        // docker save names the config by its digest (the image ID): hold it to that name.
        let stem = Path::new(&entry.config)
            .file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".json").to_string())
            .unwrap_or_default();
        if let Ok(named) = format!("sha256:{stem}").parse::<Digest>()
            && named != config_digest
        {
            return Err(Error::DigestMismatch {
                what: "config",
                expected: named,
                found: config_digest,
                hint: "the archive is corrupt; copy it again",
            });
        }
        let config = manifest::ImageConfig::parse(&source, &config_bytes)?;
        let mut layers = Vec::new();
        for (i, path) in entry.layers.iter().enumerate() {
            let size = self.files.size(path).ok_or_else(|| Error::Archive {
                what: "docker archive",
                input: source.clone(),
                reason: format!(
                    "layer {path} is missing; the archive is incomplete, copy it again"
                ),
            })?;
            // docker save writes plain tars; other writers (and Docker's
            // containerd store) keep layers compressed: the bytes say which.
            let media_type = match self.files.packing(path)? {
                None => "application/vnd.docker.image.rootfs.diff.tar",
                Some(Packing::Gzip) => manifest::media::DOCKER_LAYER_GZIP,
                Some(Packing::Zstd) => manifest::media::OCI_LAYER_ZSTD,
                Some(other) => {
                    return Err(Error::unsupported(
                        &source,
                        format!(
                            "layer {path} is {}-compressed, which no image layer may be",
                            other.name()
                        ),
                    ));
                }
            };
            let diff_id = config
                .rootfs
                .diff_ids
                .get(i)
                .copied()
                .unwrap_or(config_digest);
            layers.push(Descriptor {
                media_type: media_type.to_string(),
                digest: diff_id,
                size,
                platform: None,
                urls: None,
                annotations: Some(
                    HashMap::from([("path".to_string(), path.clone())])
                        .into_iter()
                        .collect(),
                ),
            });
        }
        let name = match entry.tags().first() {
            Some(tag) => format!("{tag} (image ID {config_digest})"),
            None => format!("{source} (image ID {config_digest})"),
        };
        finish_resolve(FinishResolve {
            name,
            top_digest: config_digest,
            index_digest: None,
            manifest_digest: None,
            manifest: ImageManifest {
                media_type: "docker-archive".to_string(),
                config: Descriptor {
                    media_type: manifest::media::DOCKER_CONFIG.to_string(),
                    digest: config_digest,
                    size: config_bytes.len() as u64,
                    platform: None,
                    urls: None,
                    annotations: None,
                },
                layers,
            },
            config_bytes: &config_bytes,
            offered: None,
            platform,
            explicit,
            reporter,
        })
    }

    /// Readers for the image's layers, in order. OCI blobs are hashed while
    /// they are unpacked; `docker save` layers are named by path, and their
    /// uncompressed digest is their diff_id, which the pipeline checks anyway.
    /// Layers flagged in `skip` are left out.
    pub fn layer_inputs(&self, resolved: &ResolvedImage, skip: &[bool]) -> Result<Vec<LayerInput>> {
        let docker = matches!(self.view, View::Docker(_));
        let mut inputs = Vec::new();
        for (index, desc) in resolved.manifest.layers.iter().enumerate() {
            if skip.get(index).copied().unwrap_or(false) {
                continue;
            }
            let name = match (docker, &desc.annotations) {
                (true, Some(a)) => a.get("path").cloned().unwrap_or_default(),
                _ => blob_name(&desc.digest),
            };
            let files = Arc::clone(&self.files);
            inputs.push(LayerInput {
                index,
                descriptor: desc.clone(),
                diff_id: resolved.config.rootfs.diff_ids[index],
                compression: resolved.compression[index],
                open: Box::new(move || files.stream(&name).map(|(reader, _)| reader)),
                verify_blob: !docker,
            });
        }
        Ok(inputs)
    }
}

/// The name that picks `docker save` entry `i`: its first tag when no other
/// entry has it, else its position.
fn docker_pick(entries: &[DockerSaveEntry], i: usize) -> Pick {
    match entries[i].tags().first() {
        Some(t)
            if entries
                .iter()
                .filter(|e| e.tags().iter().any(|o| o == t))
                .count()
                == 1 =>
        {
            Pick::Name(t.clone())
        }
        _ => Pick::Position(i),
    }
}

fn platform_words(p: &ConfigPlatform) -> Option<String> {
    if p.os.is_empty() {
        return None;
    }
    Some(match &p.variant {
        Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
        None => format!("{}/{}", p.os, p.architecture),
    })
}

/// `manifest.json` of a `docker save` archive.
fn docker_entries(files: &Files) -> Result<Vec<DockerSaveEntry>> {
    let bytes = files.read("manifest.json", MAX_MANIFEST_BYTES)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Archive {
        what: "docker archive",
        input: files.source().display().to_string(),
        reason: format!("manifest.json is not a docker save manifest: {e}"),
    })
}

/// `index.json`'s entries, each with what it is.
fn oci_entries(files: &Files) -> Result<Vec<Listed>> {
    let source = files.source().display().to_string();
    let index_json = files.read("index.json", MAX_MANIFEST_BYTES)?;
    let Manifest::Index(top) = Manifest::parse(&source, &index_json)? else {
        return Err(Error::unsupported(
            &source,
            "index.json is not an image index",
        ));
    };
    Ok(top
        .manifests
        .into_iter()
        .map(|desc| {
            let what = classify(files, &desc).unwrap_or(What::Unreadable);
            Listed { desc, what }
        })
        .collect())
}

/// Is a config media type a container image's?
fn image_config(media_type: &str) -> bool {
    media_type == manifest::media::OCI_CONFIG || media_type == manifest::media::DOCKER_CONFIG
}

/// What the manifest or index `desc` names is; `Err` when it cannot be read.
fn classify(files: &Files, desc: &Descriptor) -> Result<What> {
    if !files.has_blob(&desc.digest) {
        return Ok(What::Missing);
    }
    let body = files.blob(desc, "manifest", MAX_MANIFEST_BYTES)?;
    let shape: Shape = serde_json::from_slice(&body)
        .map_err(|e| Error::unsupported(desc.digest.to_string(), e.to_string()))?;
    if shape.subject.is_some() {
        let kind = shape
            .artifact_type
            .or(shape.config.map(|c| c.media_type))
            .unwrap_or_else(|| desc.media_type.clone());
        return Ok(What::Referrer(kind));
    }
    if let Some(children) = shape.manifests {
        let mut platforms = Vec::new();
        let mut seen = HashSet::new();
        let mut size = body.len() as u64;
        let mut kinds = Vec::new();
        for child in &children {
            if child.platform.as_ref().is_some_and(|p| p.os == "unknown")
                || !files.has_blob(&child.digest)
            {
                continue;
            }
            match classify(files, child)? {
                What::Image {
                    platforms: p,
                    size: s,
                } => {
                    platforms.extend(
                        child
                            .platform
                            .as_ref()
                            .map(|p| p.to_string())
                            .or(p.into_iter().next()),
                    );
                    if seen.insert(child.digest) {
                        size += s;
                    }
                }
                What::Artifact(k) | What::Referrer(k) => kinds.push(k),
                What::Missing | What::Unreadable => {}
            }
        }
        return Ok(match (platforms.is_empty(), kinds.first()) {
            (false, _) => What::Image { platforms, size },
            (true, Some(k)) => What::Artifact(k.clone()),
            (true, None) => What::Missing,
        });
    }
    let Some(config) = shape.config else {
        return Ok(What::Artifact(
            shape
                .artifact_type
                .or(shape.media_type)
                .unwrap_or_else(|| desc.media_type.clone()),
        ));
    };
    if !image_config(&config.media_type) {
        return Ok(What::Artifact(
            shape.artifact_type.unwrap_or(config.media_type),
        ));
    }
    let size = body.len() as u64 + config.size + shape.layers.iter().map(|l| l.size).sum::<u64>();
    let platform = match &desc.platform {
        Some(p) => Some(p.to_string()),
        None => {
            let bytes = files.blob(&config, "config", MAX_CONFIG_BYTES)?;
            serde_json::from_slice::<ConfigPlatform>(&bytes)
                .ok()
                .and_then(|p| platform_words(&p))
        }
    };
    Ok(What::Image {
        platforms: platform.into_iter().collect(),
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_archive_says_so_in_index_json_and_is_read_back() {
        let layer = Digest::of(b"layer");
        let top = Descriptor {
            media_type: manifest::media::OCI_INDEX.to_string(),
            digest: Digest::of(b"index"),
            size: 5,
            platform: None,
            urls: None,
            annotations: None,
        };
        let partial = Partial {
            against: Digest::of(b"state").to_string(),
            what: "the state file of a seed holding x".to_string(),
            omitted: HashSet::from([layer]),
        };
        let bytes = LayoutContent::index_json(&top, "x", &partial.annotations(&[layer]));
        assert_eq!(Partial::from_index("f", &bytes).unwrap(), Some(partial));
        let whole = LayoutContent::index_json(&top, "x", &[]);
        assert_eq!(Partial::from_index("f", &whole).unwrap(), None);
        let mut damaged: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        damaged["annotations"][PARTIAL_OMITTED] = "sha256:nope".into();
        let err = Partial::from_index("f", &serde_json::to_vec(&damaged).unwrap()).unwrap_err();
        assert!(err.to_string().contains("sha256:nope"), "{err}");
    }

    #[test]
    fn an_entry_is_named_by_its_ref_name_or_its_image_name_however_spelled() {
        let hex = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let entry = |annotations: &[(&str, &str)]| Listed {
            desc: Descriptor {
                media_type: manifest::media::OCI_INDEX.to_string(),
                digest: format!("sha256:{hex}").parse().unwrap(),
                size: 1,
                platform: None,
                urls: None,
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
            },
            what: What::Unreadable,
        };
        let pulled = entry(&[(REF_NAME, &format!("docker.io/nixos/nix@sha256:{hex}"))]);
        assert!(pulled.named(&format!("docker.io/nixos/nix@sha256:{hex}")));
        assert!(pulled.named(&format!("nixos/nix@sha256:{hex}")));
        assert!(!pulled.named("nixos/nix"));
        let docker25 = entry(&[
            (REF_NAME, "2.24"),
            (CONTAINERD_NAME, "docker.io/nixos/nix:2.24"),
        ]);
        assert!(docker25.named("2.24"));
        assert!(docker25.named("nixos/nix:2.24"));
        assert!(!docker25.named("2.23"));
        let tag = entry(&[(REF_NAME, "latest")]);
        assert!(tag.named("latest"));
        assert!(!tag.named("docker.io/library/latest:latest"));
    }

    #[test]
    fn the_list_is_a_table_with_the_source_that_picks_each_image() {
        let d: Digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
            .parse()
            .unwrap();
        let listing = Listing {
            source: "layout".into(),
            format: "oci-layout",
            images: vec![
                ListedImage {
                    references: vec!["2.24".into()],
                    digest: d,
                    kind: "image".into(),
                    platforms: vec!["linux/amd64".into(), "linux/arm64".into()],
                    size: 123_400_000,
                    source: "oci:layout:2.24".into(),
                },
                ListedImage {
                    references: vec![],
                    digest: d,
                    kind: "a Helm chart (config x)".into(),
                    platforms: vec![],
                    size: 10,
                    source: "oci:layout:@1".into(),
                },
            ],
            partial: None,
        };
        let text = listing.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("REFERENCE  "), "{text}");
        let cells: Vec<&str> = lines[1].split("  ").filter(|c| !c.is_empty()).collect();
        assert_eq!(
            cells.iter().map(|c| c.trim()).collect::<Vec<_>>(),
            [
                "2.24",
                &d.to_string(),
                "linux/amd64,linux/arm64",
                "123.4 MB",
                "oci:layout:2.24"
            ],
            "{text}"
        );
        assert!(lines[2].starts_with("-  "), "{text}");
        assert!(lines[2].contains("not an image: a Helm chart"), "{text}");
    }
}
