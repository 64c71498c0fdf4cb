//! `hydrafy gc` against a real job container: every Nix process in a job
//! holds `nix/var/nix/db/big-lock` shared for as long as it uses the store,
//! so a gc, which needs it exclusively, waits until the job's build is done,
//! and then keeps the job's output (registered within the hour).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::support::jobs::{Gate, Jobs, assert_store_verifies, background, nix_image, valid};
use crate::support::registry::Registry;
use crate::support::{TestEnv, assert_fails, assert_ok, nix};

/// Make `path` look unused for `days`: registered then, its files last read then.
fn age(seed: &Path, path: &str, days: u64) {
    let then = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - days * 86_400;
    let sql = format!("update ValidPaths set registrationTime = {then} where path = '{path}';");
    let status = std::process::Command::new("sqlite3")
        .arg(seed.join("nix/var/nix/db/db.sqlite"))
        .arg(&sql)
        .status()
        .expect("run sqlite3 (apt-get install sqlite3)");
    assert!(status.success());
    let status = std::process::Command::new("touch")
        .args(["-a", "-h", "-d", &format!("@{then}")])
        .arg(seed.join(path.trim_start_matches('/')))
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn a_gc_started_while_a_job_builds_waits_for_it_and_keeps_the_jobs_output() {
    let env = TestEnv::new();
    let reg = Registry::start();
    let (image, store) = nix_image(&reg, &env.join("images"), "old", &["base", "tools"]);
    assert_ok(&env.run(&["fetch", "--plain-http", &image.reference, "-q"]));
    let seed = env.join("nix-backup");
    // A build nothing uses any more: what this gc is there to remove.
    std::fs::write(env.join("stale"), "built a month ago, never used since\n").unwrap();
    let stale = nix::add(&seed, &env.join("stale"));
    age(&seed, &stale, 30);

    let jobs = Jobs::new(&seed, &env.join("share"));
    jobs.derivation("fresh", Gate::Gated);
    let mut job = jobs.spawn(&Jobs::nix_build("fresh"));
    jobs.wait_started("fresh", &mut job);
    let seed_arg = seed.to_str().unwrap();

    // The job's Nix holds big-lock shared: a gc that may not wait gives up.
    // gc dates a path's arrival by the ctime of its top entry, which no one
    // can set back: so this gc runs two days from now (the hidden --now),
    // where the stale path is two days old and the job's build, registered
    // after gc planned, is no victim of that plan.
    let later = (SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 2 * 86_400)
        .to_string();
    let out = env.run(&[
        "gc",
        seed_arg,
        "--keep-days",
        "1",
        "--wait",
        "1s",
        "--now",
        &later,
    ]);
    assert_fails(&out, 1, &["busy"]);
    assert!(valid(&seed, &stale), "a gc that gave up deleted nothing");

    // One that may wait does, until the job is done.
    let mut gc =
        background(
            env.hydrafy()
                .args(["gc", seed_arg, "--keep-days", "1", "--now", &later]),
        );
    gc.wait_for_stderr("waiting");
    assert!(gc.is_running(), "gc is still waiting while the job builds");
    jobs.release("fresh");
    let fresh = job.finish().ok();
    gc.finish().ok();

    assert!(valid(&seed, &fresh), "the job's output {fresh} is kept");
    assert!(
        seed.join(fresh.trim_start_matches('/')).exists(),
        "{fresh} is still on disk"
    );
    assert!(!valid(&seed, &stale), "the stale {stale} was collected");
    assert!(!seed.join(stale.trim_start_matches('/')).exists());
    for p in &store.paths {
        assert!(valid(&seed, p), "the image's {p} is kept");
    }
    assert_store_verifies(&seed);
    // A later job still finds the output without building it.
    let again = jobs.run(&Jobs::nix_build("fresh"));
    assert_eq!(again.ok(), fresh);
    assert_eq!(jobs.builder_runs(), ["fresh"]);
}
