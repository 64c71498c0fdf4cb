//! How `extract` names an image file, and one image in it: a bare path
//! (its kind detected from its content), or one of skopeo's transport names,
//! so that the command a user already types for skopeo works here:
//! `oci:DIR[:REF]`, `oci-archive:FILE[:REF]`, `docker-archive:FILE[:REPO:TAG]`
//! and `docker-archive:FILE:@N` (the N-th image, from 0).
//!
//! As in skopeo, the path ends at the first `:` after the transport; the
//! rest names the image.

use std::fmt;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// What kind of file SOURCE says it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A bare path: an OCI layout (directory or tar) or a `docker save` tar,
    /// whichever the content is.
    Detect,
    /// `oci:`: an OCI image layout directory.
    Oci,
    /// `oci-archive:`: an OCI image layout in a tar.
    OciArchive,
    /// `docker-archive:`: a `docker save` tar (its `manifest.json`).
    DockerArchive,
}

impl Format {
    /// The transport prefix, without the colon.
    pub fn transport(self) -> Option<&'static str> {
        match self {
            Format::Detect => None,
            Format::Oci => Some("oci"),
            Format::OciArchive => Some("oci-archive"),
            Format::DockerArchive => Some("docker-archive"),
        }
    }
}

/// Which image of a file SOURCE asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pick {
    /// `:REF`: an OCI layout's `org.opencontainers.image.ref.name`, or a
    /// `docker save` archive's `REPO:TAG`.
    Name(String),
    /// `:@N`: the N-th image, from 0.
    Position(usize),
}

impl fmt::Display for Pick {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pick::Name(n) => f.write_str(n),
            Pick::Position(i) => write!(f, "@{i}"),
        }
    }
}

/// SOURCE, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceName {
    pub path: PathBuf,
    pub format: Format,
    pub pick: Option<Pick>,
}

impl SourceName {
    /// Parse SOURCE as the user typed it.
    pub fn parse(input: &str) -> Result<SourceName> {
        let transports = [
            ("oci:", Format::Oci),
            ("oci-archive:", Format::OciArchive),
            ("docker-archive:", Format::DockerArchive),
        ];
        let Some((rest, format)) = transports
            .iter()
            .find_map(|(prefix, f)| input.strip_prefix(prefix).map(|r| (r, *f)))
        else {
            return Ok(SourceName {
                path: PathBuf::from(input),
                format: Format::Detect,
                pick: None,
            });
        };
        let (path, pick) = match rest.split_once(':') {
            Some((path, pick)) => (path, Some(pick)),
            None => (rest, None),
        };
        if path.is_empty() {
            return Err(Error::invalid(
                "image file",
                input,
                "names no file; write TRANSPORT:PATH[:IMAGE], e.g. oci-archive:nix.tar",
            ));
        }
        let pick = match pick {
            None | Some("") => None,
            Some(p) => Some(match p.strip_prefix('@') {
                Some(n) => Pick::Position(n.parse().map_err(|_| {
                    Error::invalid(
                        "image file",
                        input,
                        format!("@{n} is not an image position; write @0 for the first image"),
                    )
                })?),
                None => Pick::Name(p.to_string()),
            }),
        };
        Ok(SourceName {
            path: PathBuf::from(path),
            format,
            pick,
        })
    }

    /// The SOURCE that names image `pick` of this file, in `format`.
    pub fn naming(&self, format: Format, pick: &Pick) -> String {
        let transport = format.transport().unwrap_or("oci");
        format!("{transport}:{}:{pick}", self.path.display())
    }
}

impl fmt::Display for SourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(t) = self.format.transport() {
            write!(f, "{t}:")?;
        }
        write!(f, "{}", self.path.display())?;
        if let Some(p) = &self.pick {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> SourceName {
        SourceName::parse(s).unwrap()
    }

    #[test]
    fn skopeo_transport_names_parse_into_path_and_image() {
        assert_eq!(parse("nix.tar").format, Format::Detect);
        assert_eq!(parse("nix.tar").path, PathBuf::from("nix.tar"));
        let s = parse("oci:/srv/layout:2.24");
        assert_eq!(
            (s.format, s.path, s.pick),
            (
                Format::Oci,
                PathBuf::from("/srv/layout"),
                Some(Pick::Name("2.24".into()))
            )
        );
        let s = parse("docker-archive:saved.tar:nixos/nix:2.24");
        assert_eq!(s.pick, Some(Pick::Name("nixos/nix:2.24".into())));
        assert_eq!(s.path, PathBuf::from("saved.tar"));
        assert_eq!(
            parse("docker-archive:saved.tar:@1").pick,
            Some(Pick::Position(1))
        );
        let s = parse("oci-archive:img.tar:127.0.0.1:5000/nixos/nix@sha256:00");
        assert_eq!(
            s.pick,
            Some(Pick::Name("127.0.0.1:5000/nixos/nix@sha256:00".into()))
        );
        assert_eq!(parse("oci:layout").pick, None);
        assert_eq!(parse("oci:layout:").pick, None);
        assert_eq!(
            parse("docker-archive:saved.tar:@1").to_string(),
            "docker-archive:saved.tar:@1"
        );
    }

    #[test]
    fn a_bad_position_or_a_missing_path_is_a_usage_error() {
        let err = SourceName::parse("docker-archive:x.tar:@one").unwrap_err();
        assert!(
            err.to_string().contains("@one is not an image position"),
            "{err}"
        );
        assert_eq!(err.exit(), crate::error::Exit::Usage);
        assert!(SourceName::parse("oci:").is_err());
    }
}
