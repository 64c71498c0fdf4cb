//! Real job containers on a seed that hydrafy fetched: what the runners do
//! to the shared store while hydrafy and other jobs use it. Each test ends
//! with the host's `nix-store --verify --check-contents` on the seed.

use std::path::PathBuf;

use crate::support::jobs::{Gate, Jobs, assert_store_verifies, background, nix_image, valid};
use crate::support::registry::Registry;
use crate::support::{TestEnv, assert_ok, nix};

/// A seed fetched by hydrafy from a local registry, and jobs on it.
struct Runner {
    env: TestEnv,
    reg: Registry,
    seed: PathBuf,
    jobs: Jobs,
    /// The store paths of the image the seed was fetched from.
    image_paths: Vec<String>,
}

fn runner() -> Runner {
    let env = TestEnv::new();
    let reg = Registry::start();
    let (image, store) = nix_image(&reg, &env.join("images"), "old", &["base", "tools"]);
    assert_ok(&env.run(&["fetch", "--plain-http", &image.reference, "-q"]));
    let seed = env.join("nix-backup");
    let jobs = Jobs::new(&seed, &env.join("share"));
    Runner {
        env,
        reg,
        seed,
        jobs,
        image_paths: store.paths,
    }
}

#[test]
fn a_build_made_in_one_job_is_found_by_the_next_job_without_rebuilding() {
    let r = runner();
    r.jobs.derivation("cached", Gate::Open);
    let first = r.jobs.run(&Jobs::nix_build("cached"));
    let out = first.ok();
    assert!(
        first.stderr.contains("will be built"),
        "the first job builds: {}",
        first.stderr
    );
    assert_eq!(r.jobs.builder_runs(), ["cached"]);

    // A new container: nothing of the first job is left but the seed.
    let second = r.jobs.run(&format!(
        "out=$({}) && echo \"$out\" && cat \"$out\"",
        Jobs::nix_build("cached")
    ));
    assert!(second.status.success(), "{second:?}");
    assert_eq!(
        second.stdout.lines().collect::<Vec<_>>(),
        [out.as_str(), "cached"],
        "the second job gets the same output, with its contents"
    );
    assert!(
        !second.stderr.contains("will be built"),
        "the second job found the build in the seed: {}",
        second.stderr
    );
    assert_eq!(r.jobs.builder_runs(), ["cached"], "the builder ran once");
    assert!(valid(&r.seed, &out), "{out} is valid on the host");
    assert_store_verifies(&r.seed);
}

#[test]
fn two_jobs_build_two_derivations_at_once() {
    let r = runner();
    r.jobs.derivation("left", Gate::Gated);
    r.jobs.derivation("right", Gate::Gated);
    let mut left = r.jobs.spawn(&Jobs::nix_build("left"));
    let mut right = r.jobs.spawn(&Jobs::nix_build("right"));
    // Both builders are running now, each in its own job.
    r.jobs.wait_started("left", &mut left);
    r.jobs.wait_started("right", &mut right);
    r.jobs.release("right");
    r.jobs.release("left");
    let (right, left) = (right.finish().ok(), left.finish().ok());
    assert_ne!(left, right);
    let mut runs = r.jobs.builder_runs();
    runs.sort();
    assert_eq!(runs, ["left", "right"]);
    for out in [&left, &right] {
        assert!(valid(&r.seed, out), "{out} is valid on the host");
    }
    for p in &r.image_paths {
        assert!(valid(&r.seed, p), "the image's {p} is still valid");
    }
    assert_store_verifies(&r.seed);
}

#[test]
fn a_job_building_what_another_job_is_building_waits_for_its_lock_and_reuses_its_output() {
    let r = runner();
    r.jobs.derivation("shared", Gate::Gated);
    let mut first = r.jobs.spawn(&Jobs::nix_build("shared"));
    r.jobs.wait_started("shared", &mut first);
    let mut second = r.jobs.spawn(&Jobs::nix_build("shared"));
    // Nix in the second job takes the output's `.lock` in the shared store.
    second.wait_for_stderr("waiting for lock on");
    r.jobs.release("shared");
    let (first, second) = (first.finish().ok(), second.finish().ok());
    assert_eq!(first, second, "both jobs get the same output");
    assert_eq!(
        r.jobs.builder_runs(),
        ["shared"],
        "the second job did not build it again"
    );
    assert!(valid(&r.seed, &first), "{first} is valid on the host");
    assert_store_verifies(&r.seed);
}

#[test]
fn a_fetch_merge_during_a_running_build_keeps_the_build_and_adds_the_image() {
    let r = runner();
    let (new, new_store) = nix_image(
        &r.reg,
        &r.env.join("images"),
        "new",
        &["base", "tools", "extra"],
    );
    let added: Vec<String> = new_store
        .paths
        .iter()
        .filter(|p| !r.image_paths.contains(p))
        .cloned()
        .collect();
    assert_eq!(added.len(), 2, "the new image adds extra and its wrapper");

    r.jobs.derivation("busy", Gate::Gated);
    let mut job = r.jobs.spawn(&Jobs::nix_build("busy"));
    r.jobs.wait_started("busy", &mut job);
    // The job's Nix holds the store open and is mid-build: merge now.
    // It must not wait for the job (it would wait forever: the build waits for us).
    let merge = background(r.env.hydrafy().args([
        "fetch",
        "--plain-http",
        &new.reference,
        "--merge",
        "-q",
    ]));
    merge.finish().ok();
    for p in &added {
        assert!(valid(&r.seed, p), "{p} was merged while the job built");
    }
    r.jobs.release("busy");
    let out = job.finish().ok();
    assert!(valid(&r.seed, &out), "the job's {out} is valid on the host");
    assert_eq!(r.jobs.builder_runs(), ["busy"]);

    // A later job sees the merged paths as valid, and the build.
    let mut check = vec!["nix-store", "--check-validity"];
    check.extend(added.iter().map(String::as_str));
    check.push(&out);
    let later = r.jobs.run(&check.join(" "));
    later.ok();
    for p in r.image_paths.iter().chain(&new_store.paths) {
        assert!(
            !nix::query(&r.seed, &["--hash", p]).is_empty(),
            "{p} is valid"
        );
    }
    assert_store_verifies(&r.seed);
}

/// What `hydrafy gc` relies on (issue 12): Nix in a job holds
/// `nix/var/nix/db/big-lock` shared for as long as it uses the store, so an
/// exclusive lock can be had only when no job's Nix is running.
#[test]
fn a_building_job_holds_the_big_lock_shared_until_its_nix_ends() {
    use rustix::fs::{FlockOperation, flock};
    let r = runner();
    r.jobs.derivation("locked", Gate::Gated);
    let mut job = r.jobs.spawn(&Jobs::nix_build("locked"));
    r.jobs.wait_started("locked", &mut job);
    let big_lock = r.seed.join("nix/var/nix/db/big-lock");
    let try_lock = |op| {
        let file = std::fs::File::open(&big_lock).unwrap();
        flock(&file, op).is_ok()
    };
    assert!(
        !try_lock(FlockOperation::NonBlockingLockExclusive),
        "the building job holds big-lock"
    );
    assert!(
        try_lock(FlockOperation::NonBlockingLockShared),
        "shared, so other jobs and hydrafy's merge can use the store"
    );
    r.jobs.release("locked");
    job.finish().ok();
    assert!(
        try_lock(FlockOperation::NonBlockingLockExclusive),
        "the job's Nix released big-lock when it ended"
    );
    assert_store_verifies(&r.seed);
}
