//! Hostile layers: every way a tar stream from a compromised registry could
//! try to write, chmod, chown, link or delete outside the output (issue 3).
//!
//! Each case in [`layer`] applies crafted layers with the library's
//! `Applier` onto `<tmp>/root` and then checks two things: the outcome the
//! case names, and that nothing beside the root changed. A canary tree
//! (`<tmp>/canary`) sits next to the root and is fingerprinted before and
//! after; "outside" targets in the layers are the canary's absolute host
//! paths, so an escape would hit something the test can see. Cases that must
//! fail check that the error is one line naming the entry and the layer
//! digest, and, where the bad entry comes first, that the root is untouched.
//!
//! The [`layer`] cases run twice: as the user running the suite (root in CI)
//! and, through `library_cases_pass_as_an_unprivileged_user`, again as
//! `nobody`, because ownership, device nodes and setuid bits are handled
//! differently for the two. The end-to-end cases below them go through
//! `hydrafy fetch` and a real registry to prove the whole path: the staging
//! folder, DIR left untouched on failure, and memory bounded by streaming.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::image::{Comp, Image, Media, Tar, layer, push};
use crate::support::registry::Registry;
use crate::support::{
    TestEnv, assert_fails, assert_ok, fingerprint, listing, require_tool, stderr, stdout,
};

/// Library-level cases: no network, no root needed (they adapt to the user).
mod layer {
    use std::collections::BTreeMap;
    use std::ffi::OsStr;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use std::path::{Path, PathBuf};

    use hydrafy::unpack::{Applier, ApplyOptions};
    use tar::EntryType;

    use crate::support::fingerprint;
    use crate::support::image::{Tar, sha256};

    /// A temp dir holding the root to apply onto and a canary tree beside it.
    pub struct Lab {
        tmp: tempfile::TempDir,
        pub root: PathBuf,
        pub canary: PathBuf,
        outside_before: BTreeMap<PathBuf, String>,
        root_before: BTreeMap<PathBuf, String>,
        passwd_before: Option<(u64, u64, i64)>,
        pub opts: ApplyOptions,
        pub warnings: Vec<String>,
    }

    pub fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    fn passwd_stat() -> Option<(u64, u64, i64)> {
        std::fs::symlink_metadata("/etc/passwd")
            .ok()
            .map(|m| (m.nlink(), m.len(), m.mtime()))
    }

    impl Lab {
        /// A lab for the current user: root keeps owners and makes device
        /// nodes (as `--rootfs` does), anyone else gets neither.
        pub fn new() -> Lab {
            let root_user = is_root();
            Lab::with_options(ApplyOptions {
                as_root: root_user,
                special_files: root_user,
            })
        }

        pub fn with_options(opts: ApplyOptions) -> Lab {
            let tmp = tempfile::Builder::new()
                .prefix("hydrafy-hostile-")
                .tempdir()
                .expect("temp dir");
            let root = tmp.path().join("root");
            let canary = tmp.path().join("canary");
            std::fs::create_dir(&root).unwrap();
            std::fs::create_dir_all(canary.join("dir/sub")).unwrap();
            std::fs::write(canary.join("dir/keep"), "keep").unwrap();
            std::fs::write(canary.join("dir/sub/deep"), "deep").unwrap();
            std::fs::write(canary.join("victim"), "victim").unwrap();
            std::fs::write(canary.join("secret"), "secret").unwrap();
            std::fs::set_permissions(
                canary.join("secret"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
            std::fs::set_permissions(canary.join("dir"), std::fs::Permissions::from_mode(0o750))
                .unwrap();
            std::os::unix::fs::symlink("victim", canary.join("link")).unwrap();
            let mut lab = Lab {
                root_before: fingerprint(&root),
                outside_before: BTreeMap::new(),
                passwd_before: passwd_stat(),
                tmp,
                root,
                canary,
                opts,
                warnings: Vec::new(),
            };
            lab.outside_before = lab.outside();
            lab
        }

        /// Everything under the temp dir except the root (and its mode), not
        /// walking into the root, which may be deeper than the stack allows.
        fn outside(&self) -> BTreeMap<PathBuf, String> {
            let tmp = self.tmp.path();
            let meta = std::fs::symlink_metadata(tmp).unwrap();
            let mut out = BTreeMap::new();
            out.insert(
                PathBuf::new(),
                format!("dir {:o} {}", meta.mode() & 0o7777, meta.mtime()),
            );
            for name in crate::support::listing(tmp) {
                if name != "root" {
                    for (k, v) in fingerprint(&tmp.join(&name)) {
                        out.insert(Path::new(&name).join(k), v);
                    }
                }
            }
            out
        }

        /// The canary's absolute host path for `rel` ("" for the canary itself).
        pub fn host(&self, rel: &str) -> String {
            let p = if rel.is_empty() {
                self.canary.clone()
            } else {
                self.canary.join(rel)
            };
            p.to_str().expect("utf-8 temp path").to_string()
        }

        /// Where an absolute host path lands inside the root.
        pub fn inside(&self, host_path: &str) -> PathBuf {
            self.root.join(host_path.trim_start_matches('/'))
        }

        pub fn at(&self, rel: &str) -> PathBuf {
            self.root.join(rel)
        }

        /// Plant something in the root before the layers, as a lower layer would have.
        pub fn plant(&mut self, f: impl FnOnce(&Path)) {
            f(&self.root);
            self.root_before = fingerprint(&self.root);
        }

        /// Apply `layers` in order, stopping at the first error; `finish` on success.
        pub fn apply(&mut self, layers: &[Vec<u8>]) -> Result<(), String> {
            let mut applier = Applier::new(&self.root, self.opts).map_err(|e| e.to_string())?;
            for tar in layers {
                let label = sha256(tar);
                let result = applier.apply_layer(&label, tar.as_slice());
                self.warnings.extend(applier.take_warnings());
                result.map_err(|e| hydrafy::report(&e))?;
            }
            applier.finish().map_err(|e| hydrafy::report(&e))
        }

        /// Nothing outside the root changed (and the host's /etc/passwd gained no link).
        pub fn assert_contained(&self) {
            let after = self.outside();
            if after != self.outside_before {
                let mut diff = Vec::new();
                for (k, v) in &after {
                    if self.outside_before.get(k) != Some(v) {
                        diff.push(format!("changed or new: {} {v}", k.display()));
                    }
                }
                for k in self.outside_before.keys() {
                    if !after.contains_key(k) {
                        diff.push(format!("removed: {}", k.display()));
                    }
                }
                panic!("something outside the root changed:\n{}", diff.join("\n"));
            }
            assert_eq!(
                passwd_stat(),
                self.passwd_before,
                "the host's /etc/passwd changed"
            );
        }

        /// Apply, assert success and containment.
        pub fn ok(&mut self, layers: &[Vec<u8>]) {
            let result = self.apply(layers);
            self.assert_contained();
            if let Err(e) = result {
                panic!("applying failed: {e}");
            }
        }

        /// Apply, assert failure at layer `failing` with a one-line error that
        /// names the layer digest and contains each of `needles`, and
        /// containment. Returns the message.
        pub fn fails(&mut self, layers: &[Vec<u8>], failing: usize, needles: &[&str]) -> String {
            let result = self.apply(layers);
            self.assert_contained();
            let err = match result {
                Ok(()) => panic!("applying succeeded; expected a failure"),
                Err(e) => e,
            };
            assert!(!err.contains('\n'), "the error is not one line: {err}");
            let digest = sha256(&layers[failing]);
            assert!(
                err.contains(&format!("layer {digest}")),
                "the error does not name layer {digest}: {err}"
            );
            for n in needles {
                assert!(err.contains(n), "the error lacks {n:?}: {err}");
            }
            err
        }

        /// The root is exactly as it was before applying (the bad entry came first).
        pub fn assert_root_untouched(&self) {
            assert_eq!(
                fingerprint(&self.root),
                self.root_before,
                "the root was modified"
            );
        }
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            // The root may hold 0555 directories an unprivileged user cannot
            // empty without fixing their modes first.
            let _ = hydrafy::unpack::remove_tree(&self.root);
        }
    }

    pub fn kind(path: &Path) -> &'static str {
        match std::fs::symlink_metadata(path) {
            Err(_) => "missing",
            Ok(m) => {
                let t = m.file_type();
                if t.is_symlink() {
                    "symlink"
                } else if t.is_dir() {
                    "dir"
                } else if t.is_file() {
                    "file"
                } else if t.is_fifo() {
                    "fifo"
                } else if t.is_char_device() {
                    "char"
                } else if t.is_block_device() {
                    "block"
                } else {
                    "other"
                }
            }
        }
    }

    pub fn read(path: &Path) -> String {
        String::from_utf8(std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
            .unwrap()
    }

    pub fn link(path: &Path) -> String {
        std::fs::read_link(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .to_string_lossy()
            .into_owned()
    }

    pub fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    pub fn ino(path: &Path) -> u64 {
        std::fs::symlink_metadata(path).unwrap().ino()
    }

    /// A GNU header with every field the caller may want to change.
    pub fn header(kind: EntryType, name: &[u8], link: &[u8], size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        {
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name);
            gnu.linkname[..link.len()].copy_from_slice(link);
        }
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_size(size);
        h.set_cksum();
        h
    }

    pub fn device(t: &mut Tar, kind: EntryType, name: &str, major: u32, minor: u32) {
        let mut h = header(kind, name.as_bytes(), b"", 0, 0o666);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        h.set_cksum();
        t.header(&h, b"");
    }

    fn one(build: impl FnOnce(&mut Tar)) -> Vec<u8> {
        let mut t = Tar::new();
        build(&mut t);
        t.finish()
    }

    // ---- names ---------------------------------------------------------

    #[test]
    fn dot_dot_names_clamp_at_the_root() {
        let mut lab = Lab::new();
        lab.ok(&[one(|t| {
            t.file("../escape", b"1", 0o644);
            t.file("../../../../canary/victim", b"2", 0o644);
            t.file("a/../../../b", b"3", 0o644);
            t.dir("../../d", 0o755);
        })]);
        assert_eq!(read(&lab.at("escape")), "1");
        assert_eq!(read(&lab.at("canary/victim")), "2");
        assert_eq!(read(&lab.at("b")), "3");
        assert_eq!(kind(&lab.at("d")), "dir");
    }

    #[test]
    fn absolute_names_land_inside_the_root() {
        let mut lab = Lab::new();
        let victim = lab.host("victim");
        let keep = lab.host("dir/keep");
        lab.ok(&[one(|t| {
            t.file(&victim, b"overwritten?", 0o644);
            t.file(&keep, b"overwritten?", 0o644);
            t.file("/etc/hydrafy-hostile-abs", b"abs", 0o644);
        })]);
        assert_eq!(read(&lab.inside(&victim)), "overwritten?");
        assert_eq!(read(&lab.inside(&keep)), "overwritten?");
        assert_eq!(read(&lab.at("etc/hydrafy-hostile-abs")), "abs");
        assert!(!Path::new("/etc/hydrafy-hostile-abs").exists());
    }

    #[test]
    fn a_nul_byte_in_a_pax_path_is_refused() {
        let mut lab = Lab::new();
        let err = lab.fails(
            &[one(|t| {
                t.pax(&[("path", b"etc/passwd\0evil")]);
                t.file("innocent", b"x", 0o644);
            })],
            0,
            &["NUL byte"],
        );
        assert!(err.contains("etc/passwd"), "{err}");
        lab.assert_root_untouched();
    }

    #[test]
    fn a_pax_path_overrides_the_ustar_name() {
        let mut lab = Lab::new();
        lab.ok(&[one(|t| {
            t.pax(&[("path", b"../../from-pax")]);
            t.file("from-ustar", b"pax wins", 0o644);
            t.pax(&[("linkpath", b"/from-pax")]);
            t.symlink("link", "from-ustar-target");
        })]);
        assert_eq!(read(&lab.at("from-pax")), "pax wins");
        assert_eq!(kind(&lab.at("from-ustar")), "missing");
        assert_eq!(link(&lab.at("link")), "/from-pax");
    }

    #[test]
    fn a_pax_size_that_differs_from_the_header_wins_as_in_go() {
        // Go's reader (docker's) takes the PAX size: one byte of data, the
        // rest of the block is padding. hydrafy refused it (issue 13).
        let mut lab = Lab::new();
        lab.ok(&[one(|t| {
            t.pax(&[("size", b"1")]);
            t.file("f", b"0123456789", 0o644);
            t.file("after", b"in step", 0o644);
        })]);
        assert_eq!(read(&lab.at("f")), "0");
        assert_eq!(read(&lab.at("after")), "in step");
    }

    #[test]
    fn a_gnu_long_name_of_2_mib_is_refused() {
        let mut lab = Lab::new();
        let name = format!("{}/f", "d".repeat(2 << 20));
        let err = lab.fails(
            &[one(|t| {
                t.file(&name, b"x", 0o644);
            })],
            0,
            &["@LongLink", "exceeds the 1048576-byte limit"],
        );
        assert!(
            err.len() < 400,
            "the error line is {} bytes long",
            err.len()
        );
        lab.assert_root_untouched();
    }

    #[test]
    fn a_pax_header_over_1_mib_is_refused() {
        let mut lab = Lab::new();
        let big = vec![b'a'; (1 << 20) + 1];
        lab.fails(
            &[one(|t| {
                t.pax(&[("comment", &big)]);
                t.file("f", b"x", 0o644);
            })],
            0,
            &["PaxHeader", "exceeds the 1048576-byte limit"],
        );
        lab.assert_root_untouched();
    }

    #[test]
    fn a_name_under_the_cap_but_over_path_max_fails_on_one_short_line() {
        // Regression: the error used to quote the whole name, a line of up to 1 MiB.
        let mut lab = Lab::new();
        let name = format!("{}/f", "d/".repeat(300_000));
        let err = lab.fails(
            &[one(|t| {
                t.pax(&[("path", name.as_bytes())]);
                t.file("short", b"x", 0o644);
            })],
            0,
            &["d/d/d/"],
        );
        assert!(
            err.len() < 600,
            "the error line is {} bytes long",
            err.len()
        );
        lab.assert_root_untouched();
    }

    #[test]
    fn entries_that_would_replace_the_root_are_refused() {
        for (kind_, name, target) in [
            (EntryType::Symlink, ".", "/etc"),
            (EntryType::Symlink, "/", "."),
            (EntryType::Regular, "./", ""),
            (EntryType::Regular, "..", ""),
            (EntryType::Link, "/", "f"),
            (EntryType::Fifo, "../..", ""),
        ] {
            let mut lab = Lab::new();
            lab.fails(
                &[one(|t| {
                    t.entry(kind_, name.as_bytes(), target.as_bytes(), b"", 0o644);
                })],
                0,
                &[&format!("entry {name:?}"), "replace the root"],
            );
            lab.assert_root_untouched();
        }
    }

    #[test]
    fn a_directory_entry_for_the_root_sets_its_mode_only() {
        let mut lab = Lab::new();
        lab.ok(&[one(|t| {
            t.dir("./", 0o750);
            t.dir("/", 0o751);
            t.file("f", b"x", 0o644);
        })]);
        assert_eq!(mode(&lab.root), 0o751);
        assert_eq!(read(&lab.at("f")), "x");
    }

    // ---- symlinks in the path ------------------------------------------

    #[test]
    fn var_run_to_slash_run_then_a_write_lands_at_root_run() {
        let mut lab = Lab::new();
        let name = format!("hydrafy-hostile-{}", std::process::id());
        lab.ok(&[one(|t| {
            t.dir("var", 0o755).dir("run", 0o755);
            t.symlink("var/run", "/run");
            t.file(&format!("var/run/{name}"), b"pid", 0o644);
        })]);
        assert_eq!(read(&lab.at(&format!("run/{name}"))), "pid");
        assert_eq!(link(&lab.at("var/run")), "/run");
        assert!(!Path::new("/run").join(&name).exists());
    }

    #[test]
    fn a_symlink_to_a_host_directory_then_a_write_through_it_in_the_same_layer() {
        let mut lab = Lab::new();
        let dir = lab.host("dir");
        lab.ok(&[one(|t| {
            t.symlink("l", &dir);
            t.file("l/keep", b"evil", 0o644);
            t.file("l/new", b"evil", 0o644);
            t.dir("l/sub", 0o777);
        })]);
        assert_eq!(read(&lab.inside(&dir).join("keep")), "evil");
        assert_eq!(read(&lab.inside(&dir).join("new")), "evil");
        assert_eq!(mode(&lab.inside(&dir).join("sub")), 0o777);
    }

    #[test]
    fn a_symlink_to_a_host_directory_then_a_write_through_it_in_the_next_layer() {
        let mut lab = Lab::new();
        let dir = lab.host("dir");
        lab.ok(&[
            one(|t| {
                t.symlink("l", &dir);
            }),
            one(|t| {
                t.file("l/keep", b"evil", 0o644);
                t.hardlink("l/new", "l/keep");
            }),
        ]);
        assert_eq!(read(&lab.inside(&dir).join("keep")), "evil");
        assert_eq!(
            ino(&lab.inside(&dir).join("new")),
            ino(&lab.inside(&dir).join("keep"))
        );
        assert_eq!(link(&lab.at("l")), dir);
    }

    #[test]
    fn a_dangling_symlink_to_a_host_path_is_followed_inside_the_root() {
        let mut lab = Lab::new();
        let missing = lab.host("not-there/yet");
        lab.ok(&[one(|t| {
            t.symlink("l", &missing);
            t.file("l/a/f", b"x", 0o644);
        })]);
        assert_eq!(read(&lab.inside(&missing).join("a/f")), "x");
        assert_eq!(kind(Path::new(&missing)), "missing");
    }

    #[test]
    fn a_dangling_relative_symlink_that_climbs_out_lands_in_the_root() {
        let mut lab = Lab::new();
        lab.ok(&[one(|t| {
            t.dir("a", 0o755);
            t.symlink("a/up", "../../../../outside-dir");
            t.file("a/up/f", b"x", 0o644);
        })]);
        assert_eq!(read(&lab.at("outside-dir/f")), "x");
    }

    #[test]
    fn s_to_dot_dot_then_s_x_y_f_lands_at_x_y_f() {
        let mut lab = Lab::new();
        lab.ok(&[one(|t| {
            t.symlink("s", "..");
            t.file("s/x/y/f", b"f", 0o644);
            t.symlink("deep/s2", "../../../..");
            t.file("deep/s2/canary/victim", b"v", 0o644);
        })]);
        assert_eq!(read(&lab.at("x/y/f")), "f");
        assert_eq!(read(&lab.at("canary/victim")), "v");
    }

    #[test]
    fn a_chain_of_symlinks_ending_at_a_host_path_stays_inside() {
        let mut lab = Lab::new();
        let canary = lab.host("");
        lab.ok(&[one(|t| {
            t.symlink("a", "b");
            t.symlink("b", "c/d");
            t.dir("c", 0o755);
            t.symlink("c/d", &canary);
            t.file("a/victim", b"chain", 0o644);
        })]);
        assert_eq!(read(&lab.inside(&canary).join("victim")), "chain");
    }

    #[test]
    fn proc_self_root_is_not_a_magic_link_inside_the_root() {
        let mut lab = Lab::new();
        let victim = lab.host("victim");
        lab.ok(&[one(|t| {
            t.symlink("p", "/proc/self/root");
            t.file(&format!("p{victim}"), b"magic?", 0o644);
        })]);
        assert_eq!(
            read(
                &lab.at("proc/self/root")
                    .join(victim.trim_start_matches('/'))
            ),
            "magic?"
        );
    }

    #[test]
    fn a_symlink_loop_fails_naming_the_entry() {
        let mut lab = Lab::new();
        lab.fails(
            &[one(|t| {
                t.symlink("a", "b");
                t.symlink("b", "/a");
                t.file("a/f", b"x", 0o644);
            })],
            0,
            &["entry \"a/f\"", "symbolic links"],
        );
        let mut lab = Lab::new();
        lab.fails(
            &[one(|t| {
                t.symlink("self", "self/x");
                t.file("self/f", b"x", 0o644);
            })],
            0,
            &["entry \"self/f\""],
        );
    }

    #[test]
    fn a_symlink_replacing_a_directory_redirects_later_entries_inside() {
        let mut lab = Lab::new();
        let canary = lab.host("");
        lab.ok(&[
            one(|t| {
                t.dir("d", 0o755);
                t.file("d/old", b"old", 0o644);
            }),
            one(|t| {
                t.symlink("d", &canary);
                t.file("d/victim", b"evil", 0o644);
            }),
        ]);
        assert_eq!(link(&lab.at("d")), canary);
        assert_eq!(read(&lab.inside(&canary).join("victim")), "evil");
    }

    // ---- the last component is never followed --------------------------

    #[test]
    fn a_file_over_a_symlink_to_a_host_file_replaces_the_link() {
        for across_layers in [false, true] {
            let mut lab = Lab::new();
            let victim = lab.host("victim");
            let link_layer = one(|t| {
                t.symlink("etc/shadow", &victim);
            });
            let file_layer = one(|t| {
                t.file("etc/shadow", b"written", 0o600);
            });
            if across_layers {
                lab.ok(&[link_layer, file_layer]);
            } else {
                let mut t = Tar::new();
                t.symlink("etc/shadow", &victim);
                t.file("etc/shadow", b"written", 0o600);
                lab.ok(&[t.finish()]);
            }
            assert_eq!(kind(&lab.at("etc/shadow")), "file");
            assert_eq!(read(&lab.at("etc/shadow")), "written");
            assert_eq!(mode(&lab.at("etc/shadow")), 0o600);
        }
    }

    #[test]
    fn a_directory_entry_over_a_symlink_to_a_host_dir_never_chmods_the_target() {
        let mut lab = Lab::new();
        let dir = lab.host("dir");
        lab.ok(&[
            one(|t| {
                t.symlink("d", &dir);
            }),
            one(|t| {
                t.dir("d", 0o777);
                t.file("d/keep", b"mine", 0o644);
            }),
        ]);
        assert_eq!(kind(&lab.at("d")), "dir");
        assert_eq!(mode(&lab.at("d")), 0o777);
        assert_eq!(read(&lab.at("d/keep")), "mine");
    }

    #[test]
    fn a_deferred_directory_mode_never_follows_a_later_symlink() {
        let mut lab = Lab::new();
        let dir = lab.host("dir");
        lab.ok(&[
            one(|t| {
                t.dir("d", 0o777);
            }),
            one(|t| {
                t.whiteout("d");
                t.symlink("d", &dir);
            }),
        ]);
        assert_eq!(link(&lab.at("d")), dir);
        let mut lab = Lab::new();
        let dir = lab.host("dir");
        lab.ok(&[one(|t| {
            t.dir("d", 0o777);
            t.symlink("d", &dir);
        })]);
        assert_eq!(link(&lab.at("d")), dir);
    }

    #[test]
    fn symlink_owner_and_mtime_are_set_on_the_link_not_the_target() {
        let mut lab = Lab::new();
        let victim = lab.host("victim");
        let mut h = header(EntryType::Symlink, b"l", victim.as_bytes(), 0, 0o777);
        h.set_uid(4242);
        h.set_gid(4343);
        h.set_mtime(1);
        h.set_cksum();
        lab.ok(&[one(|t| {
            t.header(&h, b"");
        })]);
        let m = std::fs::symlink_metadata(lab.at("l")).unwrap();
        assert_eq!(m.mtime(), 1);
        if is_root() {
            assert_eq!((m.uid(), m.gid()), (4242, 4343));
        } else {
            assert_eq!(m.uid(), rustix::process::geteuid().as_raw());
        }
    }

    #[test]
    fn a_file_over_a_hardlinked_file_leaves_the_other_link_alone() {
        let mut lab = Lab::new();
        lab.ok(&[
            one(|t| {
                t.file("a", b"original", 0o644);
                t.hardlink("b", "a");
            }),
            one(|t| {
                t.file("b", b"replaced", 0o644);
            }),
        ]);
        assert_eq!(read(&lab.at("a")), "original");
        assert_eq!(read(&lab.at("b")), "replaced");
        assert_ne!(ino(&lab.at("a")), ino(&lab.at("b")));
    }

    // ---- hard links ----------------------------------------------------

    #[test]
    fn a_hardlink_to_etc_passwd_never_reaches_the_host_file() {
        let mut lab = Lab::new();
        lab.fails(
            &[one(|t| {
                t.hardlink("passwd", "/etc/passwd");
            })],
            0,
            &["entry \"passwd\"", "\"/etc/passwd\" does not exist"],
        );
        lab.assert_root_untouched();
        let mut lab = Lab::new();
        lab.ok(&[
            one(|t| {
                t.dir("etc", 0o755);
                t.file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", 0o644);
            }),
            one(|t| {
                t.hardlink("passwd", "/etc/passwd");
            }),
        ]);
        assert_eq!(ino(&lab.at("passwd")), ino(&lab.at("etc/passwd")));
    }

    #[test]
    fn a_hardlink_to_a_host_file_by_absolute_path_is_refused() {
        let mut lab = Lab::new();
        let victim = lab.host("victim");
        lab.fails(
            &[one(|t| {
                t.hardlink("h", &victim);
            })],
            0,
            &["entry \"h\"", "does not exist"],
        );
        lab.assert_root_untouched();
    }

    #[test]
    fn a_hardlink_to_dot_dot_x_links_the_roots_x() {
        let mut lab = Lab::new();
        lab.fails(
            &[one(|t| {
                t.hardlink("h", "../../canary/victim");
            })],
            0,
            &["entry \"h\"", "does not exist"],
        );
        lab.assert_root_untouched();
        let mut lab = Lab::new();
        lab.ok(&[one(|t| {
            t.file("x", b"in root", 0o644);
            t.hardlink("a/h", "../../x");
        })]);
        assert_eq!(ino(&lab.at("a/h")), ino(&lab.at("x")));
    }

    #[test]
    fn a_hardlink_through_a_symlinked_parent_to_a_host_file_is_refused() {
        let mut lab = Lab::new();
        let canary = lab.host("");
        lab.fails(
            &[one(|t| {
                t.symlink("l", &canary);
                t.hardlink("h", "l/victim");
            })],
            0,
            &["entry \"h\"", "does not exist"],
        );
    }

    #[test]
    fn a_hardlink_to_itself_is_refused_unless_a_lower_layer_made_it() {
        let mut lab = Lab::new();
        lab.fails(
            &[one(|t| {
                t.hardlink("self", "self");
            })],
            0,
            &["entry \"self\"", "itself"],
        );
        lab.assert_root_untouched();
        let mut lab = Lab::new();
        lab.ok(&[
            one(|t| {
                t.file("self", b"kept", 0o644);
            }),
            one(|t| {
                t.hardlink("self", "./self");
            }),
        ]);
        assert_eq!(read(&lab.at("self")), "kept");
    }

    #[test]
    fn a_hardlink_to_a_later_entry_is_refused() {
        let mut lab = Lab::new();
        lab.fails(
            &[one(|t| {
                t.hardlink("early", "late");
                t.file("late", b"x", 0o644);
            })],
            0,
            &["entry \"early\"", "\"late\" does not exist"],
        );
        lab.assert_root_untouched();
    }

    #[test]
    fn a_hardlink_to_a_directory_is_refused() {
        let mut lab = Lab::new();
        lab.fails(
            &[one(|t| {
                t.dir("d", 0o755);
                t.hardlink("h", "d");
            })],
            0,
            &["entry \"h\"", "is a directory"],
        );
        lab.fails(
            &[one(|t| {
                t.hardlink("root", "/");
            })],
            0,
            &["entry \"root\"", "root directory"],
        );
    }

    #[test]
    fn a_hardlink_to_a_symlink_that_points_outside_links_the_symlink() {
        let mut lab = Lab::new();
        let victim = lab.host("victim");
        lab.ok(&[one(|t| {
            t.symlink("s", &victim);
            t.hardlink("h", "s");
        })]);
        assert_eq!(kind(&lab.at("h")), "symlink");
        assert_eq!(link(&lab.at("h")), victim);
        assert_eq!(ino(&lab.at("h")), ino(&lab.at("s")));
    }

    #[test]
    fn a_hardlink_entry_carrying_data_never_writes_it() {
        // A hard link has no data, whatever its size says (Go's reading):
        // the bytes after it are the next header, here not a valid one.
        let mut lab = Lab::new();
        lab.fails(
            &[one(|t| {
                t.file("target", b"original", 0o644);
                t.entry(EntryType::Link, b"h", b"target", b"EVIL DATA", 0o644);
                t.file("after", b"still in step", 0o644);
            })],
            0,
            &["not a valid tar stream after entry \"h\"", "cksum"],
        );
        assert_eq!(read(&lab.at("target")), "original");
    }

    // ---- special files -------------------------------------------------

    #[test]
    fn fifos_and_device_nodes_only_as_root_with_rootfs() {
        let mut lab = Lab::new();
        lab.ok(&[one(|t| {
            t.fifo("p");
            device(t, EntryType::Char, "null", 1, 3);
            device(t, EntryType::Block, "disk", 7, 0);
        })]);
        if is_root() {
            assert_eq!(kind(&lab.at("p")), "fifo");
            assert_eq!(kind(&lab.at("null")), "char");
            assert_eq!(kind(&lab.at("disk")), "block");
            assert_eq!(
                std::fs::symlink_metadata(lab.at("null")).unwrap().rdev(),
                rustix::fs::makedev(1, 3)
            );
            assert!(lab.warnings.is_empty(), "{:?}", lab.warnings);
        } else {
            for n in ["p", "null", "disk"] {
                assert_eq!(kind(&lab.at(n)), "missing", "{n}");
            }
            assert!(
                lab.warnings.iter().any(|w| w.contains("skipped 3")),
                "{:?}",
                lab.warnings
            );
        }
        // Root without --rootfs (the seed layout) skips them too.
        let mut lab = Lab::with_options(ApplyOptions {
            as_root: is_root(),
            special_files: false,
        });
        lab.ok(&[one(|t| {
            t.fifo("p");
            device(t, EntryType::Char, "null", 1, 3);
        })]);
        assert_eq!(kind(&lab.at("p")), "missing");
        assert_eq!(lab.warnings.len(), 1, "{:?}", lab.warnings);
    }

    #[test]
    fn a_fifo_in_one_layer_replaced_by_a_file_in_the_next_is_never_opened() {
        let mut lab = Lab::new();
        if !is_root() {
            // An unprivileged run skips FIFO entries: plant one as a lower layer would have.
            lab.plant(|root| {
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    root.join("p"),
                    rustix::fs::FileType::Fifo,
                    rustix::fs::Mode::from_raw_mode(0o644),
                    0,
                )
                .unwrap();
            });
        }
        let mut layers = vec![one(|t| {
            t.fifo("p");
        })];
        layers.push(one(|t| {
            t.file("p", b"a file now", 0o644);
        }));
        if !is_root() {
            layers.remove(0);
        }
        // Should the applier open the FIFO to write, it would block until a
        // reader came: this watchdog comes after 5 s, so the test fails
        // (the node is still a FIFO) instead of hanging.
        let fifo = lab.at("p");
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if wait
                .recv_timeout(std::time::Duration::from_secs(5))
                .is_err()
            {
                use std::io::Read;
                let mut r = std::fs::File::open(&fifo).unwrap();
                let _ = r.read_to_end(&mut Vec::new());
            }
        });
        let result = lab.apply(&layers);
        let _ = done.send(());
        watchdog.join().unwrap();
        lab.assert_contained();
        assert_eq!(result, Ok(()));
        assert_eq!(kind(&lab.at("p")), "file");
        assert_eq!(read(&lab.at("p")), "a file now");
    }

    #[test]
    fn a_device_node_replaced_by_a_file_is_unlinked_not_written() {
        let mut lab = Lab::new();
        let mut layers = Vec::new();
        if is_root() {
            layers.push(one(|t| device(t, EntryType::Char, "dev/null", 1, 3)));
        } else {
            // Plant what an unprivileged user can: a symlink to the host's /dev/null.
            lab.plant(|root| {
                std::fs::create_dir(root.join("dev")).unwrap();
                std::os::unix::fs::symlink("/dev/null", root.join("dev/null")).unwrap();
            });
        }
        layers.push(one(|t| {
            t.file("dev/null", b"not a device", 0o644);
        }));
        let host_null = std::fs::symlink_metadata("/dev/null").unwrap();
        lab.ok(&layers);
        assert_eq!(read(&lab.at("dev/null")), "not a device");
        let after = std::fs::symlink_metadata("/dev/null").unwrap();
        assert!(after.file_type().is_char_device());
        assert_eq!(after.ino(), host_null.ino());
    }

    // ---- whiteouts -----------------------------------------------------

    #[test]
    fn whiteouts_named_dot_wh_dot_and_dot_dot_are_refused() {
        for name in [".wh.", ".wh..", ".wh...", "d/.wh.", "d/.wh..", "d/.wh..."] {
            let mut lab = Lab::new();
            lab.plant(|root| {
                std::fs::create_dir(root.join("d")).unwrap();
                std::fs::write(root.join("d/f"), "lower").unwrap();
            });
            lab.fails(
                &[one(|t| {
                    t.file(name, b"", 0o644);
                })],
                0,
                &[&format!("entry {name:?}"), "malformed whiteout"],
            );
            lab.assert_root_untouched();
        }
    }

    #[test]
    fn a_whiteout_through_a_symlink_to_a_host_dir_removes_nothing_outside() {
        let mut lab = Lab::new();
        let dir = lab.host("dir");
        lab.ok(&[
            one(|t| {
                t.symlink("l", &dir);
            }),
            one(|t| {
                t.whiteout("l/keep");
                t.whiteout("l/sub");
                t.opaque("l");
            }),
        ]);
        // The same names inside the root are what a whiteout through `l` reaches.
        let mut lab = Lab::new();
        let dir = lab.host("dir");
        let inside = lab.inside(&dir);
        lab.ok(&[
            one(|t| {
                t.symlink("l", &dir);
                t.file(&format!("{dir}/keep"), b"in root", 0o644);
                t.file(&format!("{dir}/other"), b"in root", 0o644);
            }),
            one(|t| {
                t.whiteout("l/keep");
            }),
        ]);
        assert_eq!(kind(&inside.join("keep")), "missing");
        assert_eq!(read(&inside.join("other")), "in root");
    }

    #[test]
    fn whiteout_names_with_dot_dot_clamp_at_the_root() {
        let mut lab = Lab::new();
        lab.ok(&[
            one(|t| {
                t.file("canary", b"root's own", 0o644);
            }),
            one(|t| {
                t.file("../../.wh.canary", b"", 0o644);
                t.file("a/../../../.wh.root", b"", 0o644);
            }),
        ]);
        assert_eq!(kind(&lab.at("canary")), "missing");
    }

    #[test]
    fn an_opaque_whiteout_removes_lower_children_and_keeps_this_layers() {
        for marker_first in [false, true] {
            let mut lab = Lab::new();
            let mut upper = Tar::new();
            if marker_first {
                upper.opaque("d");
            }
            upper.file("d/c", b"upper", 0o644);
            upper.file("d/sub/new", b"upper", 0o644);
            if !marker_first {
                upper.opaque("d");
            }
            upper.file("d/sub2/e", b"upper", 0o644);
            lab.ok(&[
                one(|t| {
                    t.dir("d", 0o755);
                    t.file("d/a", b"lower", 0o644);
                    t.file("d/c", b"lower", 0o644);
                    t.dir("d/sub", 0o755);
                    t.file("d/sub/b", b"lower", 0o644);
                    t.file("other", b"lower", 0o644);
                }),
                upper.finish(),
            ]);
            let names = crate::support::listing(&lab.at("d"));
            assert_eq!(names, ["c", "sub", "sub2"], "marker first: {marker_first}");
            assert_eq!(read(&lab.at("d/c")), "upper");
            assert_eq!(crate::support::listing(&lab.at("d/sub")), ["new"]);
            assert_eq!(read(&lab.at("other")), "lower");
        }
    }

    #[test]
    fn an_opaque_whiteout_at_the_top_empties_the_lower_root() {
        let mut lab = Lab::new();
        lab.ok(&[
            one(|t| {
                t.file("old", b"lower", 0o644);
                t.file("d/old", b"lower", 0o644);
            }),
            one(|t| {
                t.file("new", b"upper", 0o644);
                t.opaque("");
            }),
        ]);
        assert_eq!(crate::support::listing(&lab.root), ["new"]);
    }

    #[test]
    fn a_file_and_its_whiteout_in_one_layer_keep_the_file() {
        for whiteout_first in [false, true] {
            let mut lab = Lab::new();
            let mut t = Tar::new();
            if whiteout_first {
                t.whiteout("d/f");
                t.whiteout("d");
            }
            t.file("d/f", b"same layer", 0o644);
            if !whiteout_first {
                t.whiteout("d/f");
                t.whiteout("d");
            }
            lab.ok(&[
                one(|t| {
                    t.file("d/lower", b"lower", 0o644);
                }),
                t.finish(),
            ]);
            assert_eq!(read(&lab.at("d/f")), "same layer");
            // `.wh.d` hides the lower `d/lower` but not this layer's `d/f`.
            assert_eq!(kind(&lab.at("d/lower")), "missing");
        }
    }

    #[test]
    fn a_whiteout_of_a_missing_path_is_a_no_op() {
        let mut lab = Lab::new();
        lab.ok(&[one(|t| {
            t.whiteout("nothing");
            t.whiteout("no/such/dir/file");
            t.file("f", b"x", 0o644);
            t.whiteout("f/under-a-file");
        })]);
        assert_eq!(crate::support::listing(&lab.root), ["f"]);
    }

    #[test]
    fn a_whiteout_removes_a_lower_tree_with_read_only_directories() {
        let mut lab = Lab::new();
        lab.ok(&[
            one(|t| {
                t.dir("store", 0o555);
                t.dir("store/abc", 0o555);
                t.file("store/abc/bin", b"x", 0o555);
            }),
            one(|t| {
                t.whiteout("store/abc");
            }),
        ]);
        assert_eq!(kind(&lab.at("store/abc")), "missing");
        assert_eq!(mode(&lab.at("store")), 0o555);
    }

    #[test]
    fn aufs_bookkeeping_whiteouts_are_ignored() {
        let mut lab = Lab::new();
        lab.ok(&[
            one(|t| {
                t.file("keep", b"x", 0o644);
            }),
            one(|t| {
                t.file(".wh..wh.plnk/1.2", b"", 0o644);
                t.file(".wh..wh.keep", b"", 0o644);
            }),
        ]);
        assert_eq!(read(&lab.at("keep")), "x");
    }

    // ---- duplicates and type changes -----------------------------------

    #[test]
    fn duplicate_entries_the_last_one_wins() {
        let mut lab = Lab::new();
        lab.ok(&[one(|t| {
            t.file("f", b"first", 0o644);
            t.file("f", b"second", 0o600);
            t.file("d", b"file", 0o644);
            t.dir("d", 0o700);
            t.dir("x", 0o755);
            t.file("x/child", b"c", 0o644);
            t.file("x", b"file now", 0o644);
            t.file("s", b"file", 0o644);
            t.symlink("s", "f");
            t.symlink("s2", "f");
            t.dir("s2", 0o711);
        })]);
        assert_eq!(read(&lab.at("f")), "second");
        assert_eq!(mode(&lab.at("f")), 0o600);
        assert_eq!(kind(&lab.at("d")), "dir");
        assert_eq!(mode(&lab.at("d")), 0o700);
        assert_eq!(read(&lab.at("x")), "file now");
        assert_eq!(link(&lab.at("s")), "f");
        assert_eq!(mode(&lab.at("s2")), 0o711);
    }

    #[test]
    fn a_directory_entry_over_an_existing_directory_keeps_its_children() {
        let mut lab = Lab::new();
        lab.ok(&[
            one(|t| {
                t.dir("d", 0o755);
                t.file("d/lower", b"x", 0o644);
            }),
            one(|t| {
                t.dir("d", 0o700);
            }),
        ]);
        assert_eq!(read(&lab.at("d/lower")), "x");
        assert_eq!(mode(&lab.at("d")), 0o700);
    }

    #[test]
    fn a_read_only_directory_still_receives_later_entries() {
        let mut lab = Lab::new();
        lab.ok(&[
            one(|t| {
                t.dir("ro", 0o500);
            }),
            one(|t| {
                t.file("ro/f", b"x", 0o444);
            }),
        ]);
        assert_eq!(read(&lab.at("ro/f")), "x");
        assert_eq!(mode(&lab.at("ro")), 0o500);
    }

    // ---- limits --------------------------------------------------------

    #[test]
    fn sparse_entries_are_refused() {
        let mut lab = Lab::new();
        let h = header(EntryType::GNUSparse, b"sparse", b"", 0, 0o644);
        lab.fails(
            &[one(|t| {
                t.header(&h, b"");
            })],
            0,
            &["entry \"sparse\"", "sparse"],
        );
        lab.assert_root_untouched();
        let mut lab = Lab::new();
        lab.fails(
            &[one(|t| {
                t.pax(&[("GNU.sparse.major", b"1"), ("GNU.sparse.minor", b"0")]);
                t.file("pax-sparse", b"", 0o644);
            })],
            0,
            &["entry \"pax-sparse\"", "sparse"],
        );
        lab.assert_root_untouched();
    }

    #[test]
    fn uid_or_gid_4294967295_is_refused() {
        let mut lab = Lab::new();
        let mut h = header(EntryType::Regular, b"f", b"", 0, 0o644);
        h.set_uid(4_294_967_295);
        h.set_cksum();
        lab.fails(
            &[one(|t| {
                t.header(&h, b"");
            })],
            0,
            &["entry \"f\"", "uid 4294967295 is out of range"],
        );
        lab.assert_root_untouched();
        let mut lab = Lab::new();
        lab.fails(
            &[one(|t| {
                t.pax(&[("gid", b"4294967295")]);
                t.file("g", b"", 0o644);
            })],
            0,
            &["entry \"g\"", "gid 4294967295 is out of range"],
        );
        lab.assert_root_untouched();
    }

    #[test]
    fn owners_are_kept_only_as_root() {
        let mut lab = Lab::new();
        let mut f = header(EntryType::Regular, b"f", b"", 1, 0o644);
        f.set_uid(1234);
        f.set_gid(5678);
        f.set_cksum();
        let mut d = header(EntryType::Directory, b"d", b"", 0, 0o755);
        d.set_uid(2345);
        d.set_gid(6789);
        d.set_cksum();
        lab.ok(&[one(|t| {
            t.header(&f, b"x");
            t.header(&d, b"");
            t.pax(&[("uid", b"3000000"), ("gid", b"3000001")]);
            t.file("big-ids", b"", 0o644);
        })]);
        let owner = |p: &str| {
            let m = std::fs::symlink_metadata(lab.at(p)).unwrap();
            (m.uid(), m.gid())
        };
        if is_root() {
            assert_eq!(owner("f"), (1234, 5678));
            assert_eq!(owner("d"), (2345, 6789));
            assert_eq!(owner("big-ids"), (3_000_000, 3_000_001));
        } else {
            let me = rustix::process::geteuid().as_raw();
            for p in ["f", "d", "big-ids"] {
                assert_eq!(owner(p).0, me, "{p}");
            }
        }
    }

    #[test]
    fn setuid_and_setgid_are_kept_only_as_root() {
        let mut lab = Lab::new();
        lab.ok(&[one(|t| {
            t.file("suid", b"#!", 0o4755);
            t.file("sgid", b"#!", 0o2755);
            t.dir("sgid-dir", 0o2775);
            t.file("sticky-ish", b"", 0o1644);
        })]);
        if is_root() {
            assert_eq!(mode(&lab.at("suid")), 0o4755);
            assert_eq!(mode(&lab.at("sgid")), 0o2755);
            assert_eq!(mode(&lab.at("sgid-dir")), 0o2775);
        } else {
            assert_eq!(mode(&lab.at("suid")), 0o755);
            assert_eq!(mode(&lab.at("sgid")), 0o755);
            assert_eq!(mode(&lab.at("sgid-dir")), 0o775);
        }
        assert_eq!(mode(&lab.at("sticky-ish")), 0o1644);
    }

    // ---- the stream ----------------------------------------------------

    #[test]
    fn trailing_garbage_after_the_tar_end_is_read_and_ignored() {
        let mut lab = Lab::new();
        let mut t = Tar::new();
        t.file("f", b"x", 0o644);
        let mut bytes = t.finish();
        bytes.extend_from_slice(b"GARBAGE after the end marker, not a header at all");
        bytes.extend(std::iter::repeat_n(0xffu8, 4096));
        lab.ok(&[bytes]);
        assert_eq!(crate::support::listing(&lab.root), ["f"]);
    }

    #[test]
    fn garbage_where_a_header_should_be_is_an_error_naming_the_layer() {
        let mut lab = Lab::new();
        let mut t = Tar::new();
        t.file("f", b"x", 0o644);
        t.raw_bytes(&[0x5a; 512]);
        lab.fails(
            &[t.finish()],
            0,
            &["not a valid tar stream after entry \"f\"", "cksum"],
        );
    }

    #[test]
    fn a_truncated_layer_is_an_error_naming_the_layer() {
        let mut lab = Lab::new();
        let mut t = Tar::new();
        t.file("big", &[7u8; 4096], 0o644);
        let mut bytes = t.unfinished();
        bytes.truncate(512 + 1000);
        lab.fails(&[bytes], 0, &["not a valid tar stream after entry \"big\""]);
    }

    #[test]
    fn a_malformed_pax_record_is_refused_naming_its_header() {
        let mut lab = Lab::new();
        lab.fails(
            &[one(|t| {
                t.pax(&[("uid", b"1x")]);
                t.file("f", b"x", 0o644);
            })],
            0,
            &["entry \"PaxHeader\"", "malformed PAX record: uid"],
        );
        lab.assert_root_untouched();
        // Go reads -1 (a signed number); no file can have that owner.
        let mut lab = Lab::new();
        lab.fails(
            &[one(|t| {
                t.pax(&[("uid", b"-1")]);
                t.file("f", b"x", 0o644);
            })],
            0,
            &["entry \"f\"", "uid -1 is out of range"],
        );
        lab.assert_root_untouched();
    }

    #[test]
    fn unknown_entry_types_are_refused() {
        let mut lab = Lab::new();
        // A GNU incremental dump directory: Go returns it, docker refuses it.
        let h = header(EntryType::new(b'D'), b"dumpdir", b"", 0, 0o644);
        lab.fails(
            &[one(|t| {
                t.header(&h, b"");
            })],
            0,
            &["entry \"dumpdir\"", "unsupported tar entry type 'D'"],
        );
        lab.assert_root_untouched();
    }

    // ---- regressions ---------------------------------------------------

    /// Symlinks in [`deep_tree_layer`]: 2,000 directory levels each.
    const DEEP_LINKS: usize = 3;

    /// A tree `2000 * links` directories deep from one small layer: each
    /// entry adds 2,000 levels below a symlink to the deepest one so far.
    fn deep_tree_layer(links: usize) -> (Vec<u8>, String) {
        let p0 = vec!["a"; 2000].join("/");
        let mut t = Tar::new();
        t.file(&format!("{p0}/f"), b"x", 0o644);
        let mut prev = format!("/{p0}");
        for k in 1..links {
            t.symlink(&format!("s{k}"), &prev);
            t.file(&format!("s{k}/{p0}/f"), b"x", 0o644);
            prev = format!("/s{k}/{p0}");
        }
        (t.finish(), prev)
    }

    #[test]
    fn walking_a_tree_deeper_than_the_stack_no_longer_aborts() {
        // Regression: removal and opaque pruning recursed once per level (and
        // held a descriptor per level), so a layer nesting 4,000 directories
        // overflowed the stack and aborted the process; the next run's
        // staging cleanup then aborted too. Building such a tree also cost its
        // depth squared (minutes for 20,000 levels; now seconds).
        let start = std::time::Instant::now();
        let mut lab = Lab::new();
        let (mut deep, deepest) = deep_tree_layer(DEEP_LINKS);
        // The same layer's opaque marker at the top walks all of it, keeping it.
        deep.truncate(deep.len() - 1024);
        let mut marker = Tar::new();
        marker.opaque("");
        deep.extend(marker.finish());
        lab.ok(&[deep]);
        // Only the root's own resolution reaches the bottom (the host's would
        // follow the absolute links out, and the path is too long anyway).
        let fsroot = hydrafy::unpack::FsRoot::open(&lab.root).unwrap();
        let bottom = fsroot.open_dir(Path::new(&deepest[1..])).unwrap();
        assert_eq!(
            hydrafy::unpack::stat_at(&bottom, OsStr::new("f")).unwrap(),
            hydrafy::unpack::Node::Other
        );
        drop((bottom, fsroot));
        lab.ok(&[one(|t| {
            t.whiteout("a");
            t.file("after", b"y", 0o644);
        })]);
        assert_eq!(kind(&lab.at("a")), "missing");
        assert_eq!(read(&lab.at("after")), "y");
        assert!(
            start.elapsed() < std::time::Duration::from_secs(90),
            "took {:?}",
            start.elapsed()
        );
    }

    #[test]
    fn directory_metadata_follows_the_directory_not_the_name_it_was_given() {
        // Regression: modes were keyed by entry name and set at the end in
        // name order, so the same directory named twice (through a symlink)
        // got whichever name sorted first, not the last entry's mode.
        let mut lab = Lab::new();
        lab.ok(&[one(|t| {
            t.dir("real", 0o755);
            t.symlink("alias", "real");
            t.dir("real/sub", 0o750);
            t.dir("alias/sub", 0o700);
        })]);
        assert_eq!(mode(&lab.at("real/sub")), 0o700);
        let mut lab = Lab::new();
        lab.ok(&[
            one(|t| {
                t.dir("b", 0o755);
                t.symlink("a", "b");
                t.dir("a/sub", 0o700);
            }),
            one(|t| {
                t.whiteout("b");
                t.dir("b", 0o755);
                t.dir("b/sub", 0o751);
            }),
        ]);
        assert_eq!(mode(&lab.at("b/sub")), 0o751);
    }

    #[test]
    fn a_whiteout_spares_what_this_layer_wrote_under_another_name() {
        // Regression: what a layer wrote was tracked by entry name, so a file
        // written as `l/f` (l -> d) was removed by `d/.wh.f` in the same layer.
        let mut lab = Lab::new();
        lab.ok(&[
            one(|t| {
                t.dir("d", 0o755);
                t.file("d/f", b"lower", 0o644);
                t.file("d/g", b"lower", 0o644);
                t.symlink("l", "d");
            }),
            one(|t| {
                t.file("l/f", b"upper", 0o644);
                t.whiteout("d/f");
                t.whiteout("d/g");
            }),
        ]);
        assert_eq!(read(&lab.at("d/f")), "upper");
        assert_eq!(kind(&lab.at("d/g")), "missing");
    }

    #[test]
    fn a_zstd_frame_asking_for_a_huge_window_is_refused() {
        use std::io::{Read, Write};
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        enc.window_log(30).unwrap();
        enc.long_distance_matching(true).unwrap();
        enc.write_all(&Tar::new().finish()).unwrap();
        let frame = enc.finish().unwrap();
        let mut out = Vec::new();
        let result = hydrafy::unpack::decoder(
            "sha256:zstd-layer",
            &frame[..],
            hydrafy::oci::Compression::Zstd,
        )
        .map(|mut d| d.read_to_end(&mut out));
        match result {
            Ok(Err(e)) => assert!(e.to_string().contains("memory"), "{e}"),
            Ok(Ok(n)) => panic!("a 1 GiB window was accepted ({n} bytes)"),
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
}

/// How many cases the test binary `bin` lists under `hostile::layer::`.
fn count_layer_cases(bin: &Path) -> usize {
    let out = Command::new(bin)
        .args(["hostile::layer::", "--list"])
        .output()
        .expect("list tests");
    stdout(&out)
        .lines()
        .filter(|l| l.ends_with(": test"))
        .count()
}

#[test]
fn library_cases_pass_as_an_unprivileged_user() {
    assert!(
        layer::is_root(),
        "this test re-runs the hostile::layer cases as `nobody` and must start as root \
         (CI does); as another user, run with `--skip hostile::library_cases_pass_as_an_unprivileged_user`"
    );
    require_tool("setpriv", "util-linux");
    let shared = tempfile::Builder::new()
        .prefix("hydrafy-nobody-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = shared.path().join("tests");
    std::fs::copy(std::env::current_exe().unwrap(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let tmp = shared.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    std::os::unix::fs::chown(&tmp, Some(65534), Some(65534)).unwrap();
    let expected = count_layer_cases(&bin);
    assert!(expected >= 40, "only {expected} library cases listed");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&bin)
        .args(["hostile::layer::", "--test-threads=2"])
        .env("TMPDIR", &tmp)
        .env("HOME", &tmp)
        .current_dir(&tmp)
        .output()
        .expect("run setpriv");
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "the unprivileged pass failed:\n{text}\n{}",
        stderr(&out)
    );
    let summary = format!("test result: ok. {expected} passed; 0 failed");
    assert!(text.contains(&summary), "expected {summary:?} in:\n{text}");
    let _ = hydrafy::unpack::remove_tree(&tmp);
}

// ---- end to end through `hydrafy fetch` -------------------------------

/// A canary tree beside DIR in a TestEnv; returns its path.
fn canary(env: &TestEnv) -> PathBuf {
    let c = env.join("canary");
    std::fs::create_dir_all(c.join("dir")).unwrap();
    std::fs::write(c.join("dir/keep"), "keep").unwrap();
    std::fs::write(c.join("victim"), "victim").unwrap();
    c
}

fn staging_left(env: &TestEnv) -> Vec<String> {
    listing(env.path())
        .into_iter()
        .filter(|n| n.contains("hydrafy-staging"))
        .collect()
}

#[test]
fn fetch_rootfs_of_an_escaping_image_writes_only_inside_dir() {
    let reg = Registry::start();
    let env = TestEnv::new();
    let canary = canary(&env);
    let host_dir = canary.join("dir").display().to_string();
    let host_victim = canary.join("victim").display().to_string();
    let before = fingerprint(&canary);
    // With --no-cache the blobs sit in the staging folder beside the root,
    // at ../blobs: the first layer aims at the third one's blob, and its
    // writes must be found inside DIR instead.
    let mut l3 = Tar::new();
    l3.file("third", b"third layer", 0o644);
    let l3 = layer(&l3.finish(), Comp::Gzip, Media::Oci);
    let l3_hex = l3.digest.trim_start_matches("sha256:").to_string();
    let mut l1 = Tar::new();
    l1.file(&format!("../blobs/sha256/{l3_hex}"), b"evil", 0o644);
    l1.file(&format!("../../blobs/sha256/{l3_hex}"), b"evil", 0o644);
    l1.dir("var", 0o755).dir("run", 0o755);
    l1.symlink("var/run", "/run");
    l1.symlink("l", &host_dir);
    l1.symlink("v", &host_victim);
    l1.file("../../../escape", b"e", 0o644);
    let l1 = layer(&l1.finish(), Comp::Gzip, Media::Oci);
    // The blob cache is beside DIR too: aim at the first layer's blob.
    let blobs = env.join("cache/hydrafy/blobs/sha256");
    let l1_hex = l1.digest.trim_start_matches("sha256:").to_string();
    let pid_name = format!("hydrafy-e2e-{}", std::process::id());
    let mut l2 = Tar::new();
    l2.file(&format!("var/run/{pid_name}"), b"1", 0o644);
    l2.symlink("c", &blobs.display().to_string());
    l2.file(&format!("c/{l1_hex}"), b"evil", 0o644);
    l2.file(
        &format!("../../../../../cache/hydrafy/blobs/sha256/{l1_hex}"),
        b"evil",
        0o644,
    );
    l2.file("l/keep", b"evil", 0o644);
    l2.file("v", b"replaced", 0o644);
    l2.whiteout("l/keep-not");
    l2.dir("l", 0o777);
    let img = push(
        &reg.addr,
        "hostile/escape",
        None,
        &Image::new(
            Media::Oci,
            vec![l1, layer(&l2.finish(), Comp::Zstd, Media::Oci), l3],
        ),
    );
    let out = env.run(&[
        "fetch",
        "--plain-http",
        &img.reference,
        "--rootfs",
        "-o",
        "out",
        "-q",
    ]);
    assert_ok(&out);
    assert_eq!(fingerprint(&canary), before, "the canary changed");
    let dir = env.join("out");
    assert_eq!(
        std::fs::read(dir.join("run").join(&pid_name)).unwrap(),
        b"1"
    );
    assert!(!Path::new("/run").join(&pid_name).exists());
    let cached = listing(&blobs);
    assert!(cached.contains(&l1_hex), "{cached:?}");
    for hex in cached {
        let bytes = std::fs::read(blobs.join(&hex)).unwrap();
        assert_eq!(
            crate::support::image::sha256(&bytes),
            format!("sha256:{hex}"),
            "a cached blob was overwritten"
        );
    }
    assert_eq!(std::fs::read(dir.join("escape")).unwrap(), b"e");
    assert_eq!(std::fs::read(dir.join("v")).unwrap(), b"replaced");
    let inside = dir.join(host_dir.trim_start_matches('/'));
    assert_eq!(std::fs::read(inside.join("keep")).unwrap(), b"evil");
    let l = std::fs::symlink_metadata(dir.join("l")).unwrap();
    assert!(l.is_dir() && l.permissions().mode() & 0o7777 == 0o777);
    assert!(staging_left(&env).is_empty());
    assert!(!env.join("escape").exists());
    assert_eq!(std::fs::read(dir.join("third")).unwrap(), b"third layer");

    let out = env.run(&[
        "fetch",
        "--plain-http",
        &img.reference,
        "--rootfs",
        "--no-cache",
        "-o",
        "out-no-cache",
        "-q",
    ]);
    assert_ok(&out);
    let dir = env.join("out-no-cache");
    assert_eq!(std::fs::read(dir.join("third")).unwrap(), b"third layer");
    assert_eq!(
        std::fs::read(dir.join(format!("blobs/sha256/{l3_hex}"))).unwrap(),
        b"evil"
    );
    assert_eq!(fingerprint(&canary), before, "the canary changed");
    assert!(staging_left(&env).is_empty());
}

#[test]
fn fetch_of_a_layer_with_a_2_mib_long_name_fails_and_leaves_dir_as_it_was() {
    let reg = Registry::start();
    let env = TestEnv::new();
    let canary = canary(&env);
    let mut good = Tar::new();
    good.file("hello", b"hello", 0o644);
    let good = push(
        &reg.addr,
        "hostile/good",
        None,
        &Image::new(
            Media::Docker,
            vec![layer(&good.finish(), Comp::Gzip, Media::Docker)],
        ),
    );
    assert_ok(&env.run(&[
        "fetch",
        "--plain-http",
        &good.reference,
        "--rootfs",
        "-o",
        "out",
        "-q",
    ]));
    let before = fingerprint(&env.join("out"));
    let canary_before = fingerprint(&canary);

    let mut l1 = Tar::new();
    l1.file("fine", b"fine", 0o644);
    l1.symlink("l", &canary.display().to_string());
    let mut l2 = Tar::new();
    l2.file("l/victim", b"evil", 0o644);
    l2.file(&format!("{}/f", "n".repeat(2 << 20)), b"x", 0o644);
    let bad_layer = layer(&l2.finish(), Comp::Gzip, Media::Docker);
    let bad_digest = bad_layer.digest.clone();
    let bad = push(
        &reg.addr,
        "hostile/longname",
        None,
        &Image::new(
            Media::Docker,
            vec![layer(&l1.finish(), Comp::Gzip, Media::Docker), bad_layer],
        ),
    );
    let out = env.run(&[
        "fetch",
        "--plain-http",
        &bad.reference,
        "--rootfs",
        "--replace",
        "-o",
        "out",
        "-q",
    ]);
    assert_fails(
        &out,
        1,
        &[
            &format!("layer {bad_digest}"),
            "@LongLink",
            "exceeds the 1048576-byte limit",
        ],
    );
    assert_eq!(fingerprint(&env.join("out")), before, "DIR changed");
    assert_eq!(fingerprint(&canary), canary_before, "the canary changed");
    assert!(staging_left(&env).is_empty(), "{:?}", listing(env.path()));
}

/// A gzip layer that inflates to `gib` GiB: a small tar, its end marker, then
/// zeros, as concatenated gzip members (cheap to build, as real as any).
fn gzip_bomb(gib: usize) -> (Vec<u8>, String) {
    use sha2::{Digest as _, Sha256};
    use std::io::Write;
    let gz = |data: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    };
    let mut t = Tar::new();
    t.file("before-the-bomb", b"small", 0o644);
    let head = t.finish();
    let chunk = vec![0u8; 64 << 20];
    let member = gz(&chunk);
    let mut blob = gz(&head);
    let mut diff = Sha256::new();
    diff.update(&head);
    for _ in 0..gib * 16 {
        blob.extend_from_slice(&member);
        diff.update(&chunk);
    }
    (blob, format!("sha256:{}", hex::encode(diff.finalize())))
}

/// Run `hydrafy fetch --rootfs REFERENCE -o out` under `/usr/bin/time`;
/// returns the output and the peak resident memory in KiB.
fn fetch_measuring_peak_rss(env: &TestEnv, reference: &str) -> (std::process::Output, u64) {
    require_tool("time", "time");
    let out = Command::new("/usr/bin/time")
        .args(["-f", "peak-rss-kib=%M"])
        .arg(env!("CARGO_BIN_EXE_hydrafy"))
        .args([
            "fetch",
            "--plain-http",
            reference,
            "--rootfs",
            "-o",
            "out",
            "-q",
        ])
        .env("HOME", env.join("home"))
        .env("XDG_CACHE_HOME", env.join("cache"))
        .env("DOCKER_CONFIG", env.join("docker"))
        .current_dir(env.path())
        .output()
        .unwrap();
    let err = stderr(&out);
    let peak_kib = err
        .lines()
        .find_map(|l| l.strip_prefix("peak-rss-kib="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS in {err}"));
    (out, peak_kib)
}

#[test]
fn fetch_of_a_gzip_bomb_layer_streams_in_bounded_memory() {
    let reg = Registry::start();
    let env = TestEnv::new();
    let (bytes, diff_id) = gzip_bomb(2);
    let blob = crate::support::image::Blob {
        digest: crate::support::image::sha256(&bytes),
        diff_id,
        bytes,
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".to_string(),
    };
    let img = push(
        &reg.addr,
        "hostile/bomb",
        None,
        &Image::new(Media::Oci, vec![blob]),
    );
    let (out, peak_kib) = fetch_measuring_peak_rss(&env, &img.reference);
    assert!(out.status.success(), "hydrafy failed: {}", stderr(&out));
    // 2 GiB went through the decoder; a run that held it would peak above that.
    assert!(
        peak_kib < 200 * 1024,
        "peak RSS {peak_kib} KiB for a 2 GiB layer"
    );
    assert_eq!(
        std::fs::read(env.join("out/before-the-bomb")).unwrap(),
        b"small"
    );
}

#[test]
fn deep_names_through_symlinks_no_longer_take_quadratic_memory() {
    // Regression: each entry's name and every ancestor of it were kept as
    // full path strings for the whiteout bookkeeping, so 300 entries named
    // `xN/a/a/.../g` (xN -> ., 2,000 levels, about 4 KiB of name each) held
    // some 1.2 GB. Bookkeeping by directory identity keeps a few bytes each.
    let reg = Registry::start();
    let env = TestEnv::new();
    let deep = vec!["a"; 2000].join("/");
    let mut t = Tar::new();
    t.file(&format!("{deep}/f"), b"x", 0o644);
    for i in 0..300 {
        t.symlink(&format!("x{i}"), ".");
        t.file(&format!("x{i}/{deep}/g{i}"), b"y", 0o644);
    }
    let img = push(
        &reg.addr,
        "hostile/deep-names",
        None,
        &Image::new(Media::Oci, vec![layer(&t.finish(), Comp::Gzip, Media::Oci)]),
    );
    let (out, peak_kib) = fetch_measuring_peak_rss(&env, &img.reference);
    assert!(out.status.success(), "hydrafy failed: {}", stderr(&out));
    assert!(
        peak_kib < 200 * 1024,
        "peak RSS {peak_kib} KiB for a 1.5 MB layer"
    );
}
