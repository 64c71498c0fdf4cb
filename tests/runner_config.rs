//! `hydrafy runner-config` on a realistic gitlab-runner config.toml: comments,
//! three docker runners (volumes on one line, volumes one per line, no
//! `[runners.docker]` at all) and a shell runner.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use crate::support::{TestEnv, assert_fails, assert_ok, stderr, stdout};

const CONFIG: &str = r#"# Global settings: managed by ops (see the runbook)
concurrent = 4
check_interval = 0
shutdown_timeout = 0

[session_server]
  session_timeout = 1800

# Main docker runner for the monorepo
[[runners]]
  name = "docker-big"
  url = "https://gitlab.example.com"
  id = 12
  token = "glrt-SECRET1"
  token_obtained_at = 2024-01-01T00:00:00Z
  token_expires_at = 0001-01-01T00:00:00Z
  executor = "docker"
  [runners.cache]
    MaxUploadedArchiveSize = 0
  [runners.docker]
    tls_verify = false
    image = "nixos/nix:2.24.9"
    privileged = false
    disable_cache = false
    # the docker socket, for builds that run containers
    volumes = ["/cache", "/var/run/docker.sock:/var/run/docker.sock"]
    shm_size = 0

[[runners]]
  name = "docker-bare"
  url = "https://gitlab.example.com"
  token = "glrt-SECRET2"
  executor = "docker"

[[runners]]
  name = "docker-multiline"
  url = "https://gitlab.example.com"
  token = "glrt-SECRET3"
  executor = "docker"
  [runners.docker]
    image = "alpine:3.20"
    volumes = [
      "/cache",
      # certificates for the internal registry
      "/etc/ssl/certs:/etc/ssl/certs:ro",
    ]
  [runners.cache]
    Type = "s3"

[[runners]]
  name = "shell"
  url = "https://gitlab.example.com"
  token = "glrt-SECRET4"
  executor = "shell"
"#;

/// CONFIG with the two volumes added, every other byte kept; `{S}` is the seed.
const EXPECTED: &str = r#"# Global settings: managed by ops (see the runbook)
concurrent = 4
check_interval = 0
shutdown_timeout = 0

[session_server]
  session_timeout = 1800

# Main docker runner for the monorepo
[[runners]]
  name = "docker-big"
  url = "https://gitlab.example.com"
  id = 12
  token = "glrt-SECRET1"
  token_obtained_at = 2024-01-01T00:00:00Z
  token_expires_at = 0001-01-01T00:00:00Z
  executor = "docker"
  [runners.cache]
    MaxUploadedArchiveSize = 0
  [runners.docker]
    tls_verify = false
    image = "nixos/nix:2.24.9"
    privileged = false
    disable_cache = false
    # the docker socket, for builds that run containers
    volumes = ["/cache", "/var/run/docker.sock:/var/run/docker.sock", "{S}/nix/store:/nix/store:rw", "{S}/nix/var/nix/db:/nix/var/nix/db:rw"]
    shm_size = 0

[[runners]]
  name = "docker-bare"
  url = "https://gitlab.example.com"
  token = "glrt-SECRET2"
  executor = "docker"
  [runners.docker]
    volumes = ["{S}/nix/store:/nix/store:rw", "{S}/nix/var/nix/db:/nix/var/nix/db:rw"]

[[runners]]
  name = "docker-multiline"
  url = "https://gitlab.example.com"
  token = "glrt-SECRET3"
  executor = "docker"
  [runners.docker]
    image = "alpine:3.20"
    volumes = [
      "/cache",
      # certificates for the internal registry
      "/etc/ssl/certs:/etc/ssl/certs:ro",
      "{S}/nix/store:/nix/store:rw",
      "{S}/nix/var/nix/db:/nix/var/nix/db:rw",
    ]
  [runners.cache]
    Type = "s3"

[[runners]]
  name = "shell"
  url = "https://gitlab.example.com"
  token = "glrt-SECRET4"
  executor = "shell"
"#;

/// A test dir with `config.toml` (mode 0600, as gitlab-runner writes it) and a seed.
fn setup(config: &str) -> (TestEnv, PathBuf, String) {
    let env = TestEnv::new();
    let file = env.join("config.toml");
    fs::write(&file, config).unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    fs::create_dir_all(env.join("nix-backup/nix/store")).unwrap();
    fs::create_dir_all(env.join("nix-backup/nix/var/nix/db")).unwrap();
    let seed = env
        .path()
        .canonicalize()
        .unwrap()
        .join("nix-backup")
        .display()
        .to_string();
    (env, file, seed)
}

/// `runner-config` with a relative --nix-backup, run from the test dir.
fn run(env: &TestEnv, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "runner-config",
        "--config",
        "config.toml",
        "--nix-backup",
        "./nix-backup",
    ];
    args.extend_from_slice(extra);
    env.run(&args)
}

#[test]
fn without_write_it_prints_a_unified_diff_and_changes_nothing() {
    let (env, file, seed) = setup(CONFIG);
    let out = run(&env, &[]);
    assert_ok(&out);
    let diff = stdout(&out);
    assert!(diff.starts_with("--- "), "{diff}");
    assert!(diff.contains("\n+++ "), "{diff}");
    assert!(
        diff.contains(&format!("+      \"{seed}/nix/store:/nix/store:rw\",\n")),
        "{diff}"
    );
    assert!(diff.contains("+  [runners.docker]\n"), "{diff}");
    assert!(
        !diff.contains("glrt-SECRET"),
        "runner tokens must not be printed: {diff}"
    );
    assert_eq!(fs::read_to_string(&file).unwrap(), CONFIG);
    assert!(!env.join("config.toml.bak").exists());
    assert!(stderr(&out).contains("--write"), "{}", stderr(&out));
}

#[test]
fn write_adds_both_volumes_to_every_docker_runner_and_keeps_everything_else() {
    let (env, file, seed) = setup(CONFIG);
    let out = run(&env, &["--write"]);
    assert_ok(&out);
    // Exact bytes: every comment, indentation, other volume, the shell runner kept.
    assert_eq!(
        fs::read_to_string(&file).unwrap(),
        EXPECTED.replace("{S}", &seed)
    );
    assert_eq!(
        fs::metadata(&file).unwrap().permissions().mode() & 0o7777,
        0o600,
        "the tokens inside stay private"
    );
    assert_eq!(
        fs::read_to_string(env.join("config.toml.bak")).unwrap(),
        CONFIG
    );
    let err = stderr(&out);
    assert!(
        err.contains("docker-big, docker-bare, docker-multiline"),
        "{err}"
    );
    assert!(err.contains("left alone (not docker): shell"), "{err}");
    assert!(err.contains("gitlab-runner restart"), "{err}");
    // Nothing is left beside it but the backup.
    let mut names: Vec<String> = fs::read_dir(env.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("config"))
        .collect();
    names.sort();
    assert_eq!(names, ["config.toml", "config.toml.bak"]);
}

#[test]
fn running_it_twice_adds_nothing() {
    let (env, file, _) = setup(CONFIG);
    assert_ok(&run(&env, &["--write"]));
    let first = fs::read_to_string(&file).unwrap();
    let out = run(&env, &["--write"]);
    assert_ok(&out);
    assert!(
        stderr(&out).contains("already configured"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "");
    assert_eq!(fs::read_to_string(&file).unwrap(), first);
    assert!(!env.join("config.toml.bak.1").exists(), "no second backup");
}

#[test]
fn a_runner_that_mounts_another_store_is_an_error_naming_it() {
    let config = CONFIG.replace(
        r#"volumes = ["/cache", "/var/run/docker.sock"#,
        r#"volumes = ["/srv/old-nix/store:/nix/store", "/cache", "/var/run/docker.sock"#,
    );
    let (env, file, _) = setup(&config);
    let out = run(&env, &["--write"]);
    assert_fails(
        &out,
        1,
        &[
            "config.toml",
            "docker-big",
            "/srv/old-nix/store:/nix/store",
            "nothing was changed",
        ],
    );
    assert_eq!(fs::read_to_string(&file).unwrap(), config);
    assert!(!env.join("config.toml.bak").exists());
}

#[test]
fn a_read_only_mount_of_the_seed_is_an_error() {
    let (env, file, seed) = setup(CONFIG);
    let config = CONFIG.replace(
        r#"volumes = ["/cache", "/var/run"#,
        &format!(r#"volumes = ["{seed}/nix/store:/nix/store:ro", "/cache", "/var/run"#),
    );
    fs::write(&file, &config).unwrap();
    assert_fails(&run(&env, &["--write"]), 1, &["docker-big", "read-only"]);
    assert_eq!(fs::read_to_string(&file).unwrap(), config);
}

#[test]
fn bad_config_files_are_refused_with_their_name() {
    let (env, file, _) = setup("[[runners]]\n  name = \"s\"\n  executor = \"shell\"\n");
    assert_fails(
        &run(&env, &[]),
        1,
        &["config.toml", "no runner with executor = \"docker\""],
    );
    fs::write(&file, "[[runners]\nname = ").unwrap();
    assert_fails(
        &run(&env, &["--write"]),
        1,
        &["config.toml", "not valid TOML"],
    );
    assert_eq!(fs::read_to_string(&file).unwrap(), "[[runners]\nname = ");
    fs::remove_file(&file).unwrap();
    assert_fails(&run(&env, &[]), 1, &["config.toml", "cannot open"]);
}
