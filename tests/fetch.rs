//! `hydrafy fetch` against a real distribution registry.

use crate::support::image::{Comp, Image, Media, Tar, layer, push};
use crate::support::registry::Registry;
use crate::support::{TestEnv, assert_ok, stdout};

#[test]
fn fetch_a_small_image_into_the_seed_layout() {
    let reg = Registry::start();
    let mut t = Tar::new();
    t.dir("/nix", 0o755)
        .dir("/nix/store", 0o755)
        .dir("/nix/store/abc-hello", 0o555);
    t.file("/nix/store/abc-hello/greeting", b"hello\n", 0o444);
    t.dir("nix/var", 0o755)
        .dir("nix/var/nix", 0o755)
        .dir("nix/var/nix/db", 0o755);
    t.file("nix/var/nix/db/db.sqlite", b"not really sqlite", 0o644);
    let img = push(
        &reg.addr,
        "nixos/nix",
        Some("latest"),
        &Image::new(
            Media::Docker,
            vec![layer(&t.finish(), Comp::Gzip, Media::Docker)],
        ),
    );
    let env = TestEnv::new();
    let out = env.run(&["fetch", "--plain-http", &img.reference, "--json", "-q"]);
    assert_ok(&out);
    assert!(stdout(&out).contains("\"layers\":1"), "{}", stdout(&out));
    assert_eq!(
        std::fs::read(env.join("nix-backup/nix/store/abc-hello/greeting")).unwrap(),
        b"hello\n"
    );
}
