//! `hydrafy verify` against real Nix stores, with `nix-store --verify
//! --check-contents` as the oracle: both must call the same stores good or bad.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use crate::support::nix::{instantiate, make_writable, nix, nix_verify};
use crate::support::{TestEnv, assert_fails, assert_ok, stderr, stdout};

/// A seed at `env/seed` holding a tree with every kind of NAR node
/// (`/nix/store/...-tree`) and a text file referencing it (`...-wrapper`).
struct Fixture {
    env: TestEnv,
    tree: String,
    wrapper: String,
}

impl Fixture {
    fn new() -> Fixture {
        let env = TestEnv::new();
        let src = env.join("src");
        write_tricky_tree(&src);
        let paths = instantiate(
            &env.join("seed"),
            &format!(
                r#"let t = builtins.path {{ path = {}; name = "tree"; }}; in
                   [ t (builtins.toFile "wrapper" "exec ${{t}}/bin/run") ]"#,
                src.display()
            ),
        );
        Fixture {
            env,
            tree: paths[0].clone(),
            wrapper: paths[1].clone(),
        }
    }

    fn seed(&self) -> PathBuf {
        self.env.join("seed")
    }

    /// The on-disk directory of a store path, made writable for tampering.
    fn on_disk(&self, store_path: &str) -> PathBuf {
        let p = self.seed().join(store_path.trim_start_matches('/'));
        make_writable(&p);
        p
    }

    fn verify(&self, extra: &[&str]) -> std::process::Output {
        let mut args = vec!["verify", "seed"];
        args.extend_from_slice(extra);
        self.env.run(&args)
    }

    /// hydrafy and nix-store both say "bad", and hydrafy names `path` on stdout.
    fn assert_both_reject(&self, path: &str) {
        let out = self.verify(&[]);
        assert_fails(&out, 1, &["1 of 2 store paths failed verification"]);
        let lines = stdout(&out);
        assert!(
            lines
                .lines()
                .any(|l| l.starts_with(&format!("{path}: was modified"))),
            "hydrafy did not report {path}: {lines}"
        );
        let verdict = nix_verify(&self.seed());
        assert!(!verdict.ok, "nix-store accepted it: {}", verdict.output);
        assert!(verdict.output.contains(path), "{}", verdict.output);
        // Both name the same hash for what is on disk now.
        let got = verdict
            .output
            .split("got '")
            .nth(1)
            .and_then(|s| s.split('\'').next())
            .expect("nix-store printed the hash it found");
        assert!(
            lines.contains(got),
            "hydrafy: {lines}\nnix: {}",
            verdict.output
        );
    }
}

fn write_tricky_tree(src: &Path) {
    fs::create_dir_all(src.join("bin")).unwrap();
    fs::create_dir_all(src.join("empty-dir")).unwrap();
    fs::create_dir_all(src.join("share/doc")).unwrap();
    fs::write(src.join("bin/run"), "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(src.join("bin/run"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(src.join("empty"), "").unwrap();
    fs::write(src.join("eight888"), "12345678").unwrap();
    fs::write(src.join("nine99999"), "123456789").unwrap();
    // Byte order, not locale order: 'B' < 'a' < 'a-b' < 'a.b' < 'ä'.
    for name in ["a", "B", "a-b", "a.b", "ä"] {
        fs::write(src.join(name), name).unwrap();
    }
    fs::write(src.join("share/doc/README"), "x".repeat(300_000)).unwrap();
    std::os::unix::fs::symlink("../bin/run", src.join("share/link")).unwrap();
    std::os::unix::fs::symlink("/does/not/exist", src.join("dangling")).unwrap();
}

#[test]
fn nar_serialisation_is_byte_for_byte_what_nix_store_dump_writes() {
    let f = Fixture::new();
    let path = f.seed().join(f.tree.trim_start_matches('/'));
    let theirs = nix("nix-store", &f.seed())
        .arg("--dump")
        .arg(&path)
        .output()
        .unwrap();
    assert!(theirs.status.success(), "{}", stderr(&theirs));
    let mut ours = Vec::new();
    hydrafy::nix::dump(&path, &mut ours, &AtomicBool::new(false)).unwrap();
    assert!(ours == theirs.stdout, "the NARs differ");
}

#[test]
fn verify_and_nix_store_agree_a_good_store_is_good() {
    let f = Fixture::new();
    let out = f.verify(&[]);
    assert_ok(&out);
    assert_eq!(stdout(&out), "", "a good store prints no bad path");
    assert!(stderr(&out).contains("2 store paths"), "{}", stderr(&out));
    let verdict = nix_verify(&f.seed());
    assert!(verdict.ok, "{}", verdict.output);
}

#[test]
fn verify_and_nix_store_agree_a_modified_file_is_bad() {
    let f = Fixture::new();
    // Same size, different bytes: only the hash can tell.
    fs::write(f.on_disk(&f.tree).join("a"), "A").unwrap();
    f.assert_both_reject(&f.tree);
}

#[test]
fn verify_and_nix_store_agree_a_changed_executable_bit_is_bad() {
    let f = Fixture::new();
    let file = f.on_disk(&f.tree).join("bin/run");
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    f.assert_both_reject(&f.tree);
}

#[test]
fn verify_and_nix_store_agree_an_extra_file_is_bad() {
    let f = Fixture::new();
    fs::write(f.on_disk(&f.tree).join("share/extra"), "").unwrap();
    f.assert_both_reject(&f.tree);
}

#[test]
fn a_registered_path_missing_from_disk_is_an_error() {
    let f = Fixture::new();
    // nix-store --verify would quietly unregister this path (nothing refers
    // to it), so only hydrafy's own report is asserted.
    let dir = f.on_disk(&f.wrapper);
    fs::remove_file(&dir).unwrap();
    let out = f.verify(&[]);
    assert_fails(&out, 1, &["seed", "1 of 2"]);
    let line = format!("{}: is registered but missing from", f.wrapper);
    assert!(stdout(&out).contains(&line), "{}", stdout(&out));
}

#[test]
fn an_unregistered_path_on_disk_is_only_a_warning() {
    let f = Fixture::new();
    let junk = "0000000000000000000000000000000a-junk";
    fs::create_dir(f.seed().join("nix/store").join(junk)).unwrap();
    let out = f.verify(&[]);
    assert_ok(&out);
    let warning = format!("warning: seed/nix/store/{junk}: on disk but not registered");
    assert!(stderr(&out).contains(&warning), "{}", stderr(&out));
    let verdict = nix_verify(&f.seed());
    assert!(verdict.ok, "{}", verdict.output);
}

#[test]
fn a_reference_to_an_unregistered_path_is_an_error() {
    let f = Fixture::new();
    let db = f.seed().join("nix/var/nix/db/db.sqlite");
    let conn = rusqlite::Connection::open(&db).unwrap();
    // Damage that Nix's foreign keys would refuse: turn them off for this write.
    conn.execute_batch("pragma foreign_keys = off").unwrap();
    conn.execute(
        "insert into Refs (referrer, reference) select id, 4242 from ValidPaths where path = ?",
        [&f.wrapper],
    )
    .unwrap();
    drop(conn);
    let out = f.verify(&[]);
    assert_fails(&out, 1, &["1 of 2"]);
    assert!(
        stdout(&out).contains(&format!(
            "{}: references path id 4242, which is not registered",
            f.wrapper
        )),
        "{}",
        stdout(&out)
    );
}

#[test]
fn path_limits_the_check_to_the_named_store_paths() {
    let f = Fixture::new();
    fs::write(f.on_disk(&f.tree).join("a"), "A").unwrap();
    let wrapper_name = f.wrapper.trim_start_matches("/nix/store/");
    assert_ok(&f.verify(&["--path", wrapper_name]));
    let out = f.verify(&["--path", &f.tree, "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(summary["checked"], 1);
    assert_eq!(summary["ok"], false);
    assert_eq!(summary["problems"][0]["path"], f.tree.as_str());
    assert_eq!(summary["problems"][0]["kind"], "modified");
}

#[test]
fn bad_usage_exits_2_and_names_the_object() {
    let f = Fixture::new();
    let unknown = "/nix/store/0000000000000000000000000000000a-nope";
    assert_fails(
        &f.verify(&["--path", unknown]),
        2,
        &[unknown, "not registered"],
    );
    assert_fails(
        &f.verify(&["--path", "/etc/passwd"]),
        2,
        &["/etc/passwd", "not a store path"],
    );
    let out = f.env.run(&["verify", "src"]);
    assert_fails(&out, 2, &["src", "nix/var/nix/db/db.sqlite"]);
}
