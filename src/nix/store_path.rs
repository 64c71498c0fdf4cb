//! Store paths as a type: `/nix/store/<hash>-<name>`, validated once.
//!
//! A store path's name becomes a file name under `nix/store`, and names come
//! from databases and tar streams hydrafy does not trust. Parsing refuses
//! anything that is not a store path as Nix spells one (32 nix32 characters,
//! a dash, a name of the characters Nix allows), so no caller can be handed
//! `..` or a path outside the store, and no caller glues the prefix on by hand.

use std::fmt;

/// The store directory as store paths name it.
pub const STORE_PREFIX: &str = "/nix/store/";

/// The characters of Nix's base-32 alphabet (no e, o, u, t).
const NIX32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// A valid store path; [`StorePath::name`] is its directory under `nix/store`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    /// `<hash>-<name>`.
    name: String,
}

impl StorePath {
    /// `/nix/store/<hash>-<name>`, if it is one.
    pub fn parse(path: &str) -> Option<StorePath> {
        StorePath::from_name(path.strip_prefix(STORE_PREFIX)?)
    }

    /// `<hash>-<name>` (a directory name under `nix/store`), if it is one.
    pub fn from_name(name: &str) -> Option<StorePath> {
        let (hash, rest) = name.split_at_checked(32)?;
        let rest = rest.strip_prefix('-')?;
        let valid = hash.bytes().all(|c| NIX32.contains(&c))
            && !rest.is_empty()
            && rest.len() <= 211
            && rest
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c))
            && rest != "."
            && rest != "..";
        valid.then(|| StorePath {
            name: name.to_string(),
        })
    }

    /// `<hash>-<name>`: the path's directory name in `nix/store`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/nix/store/<hash>-<name>`, as the database spells it.
    pub fn full(&self) -> String {
        format!("{STORE_PREFIX}{}", self.name)
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_PREFIX}{}", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello-2.12";

    #[test]
    fn a_store_path_parses_from_its_full_path_and_from_its_name() {
        let p = StorePath::parse(GOOD).unwrap();
        assert_eq!(p.name(), "0123456789abcdfghijklmnpqrsvwxyz-hello-2.12");
        assert_eq!(p.to_string(), GOOD);
        assert_eq!(p.full(), GOOD);
        assert_eq!(StorePath::from_name(p.name()), Some(p));
    }

    #[test]
    fn anything_that_could_leave_the_store_is_refused() {
        for bad in [
            "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-..",
            "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-.",
            "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-a/b",
            "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-",
            "/nix/store/0123456789abcdfghijklmnpqrsvwxye-x",
            "/nix/store/short-x",
            "/nix/var/0123456789abcdfghijklmnpqrsvwxyz-x",
            "0123456789abcdfghijklmnpqrsvwxyz-x",
        ] {
            assert_eq!(StorePath::parse(bad), None, "{bad}");
        }
    }
}
