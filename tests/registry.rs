//! Registry access as build hosts meet it: token and Basic auth, credentials
//! from docker's config, CDN redirects, rate limits, flaky networks and
//! resumed downloads, the blob cache, mirrors, TLS with a private CA, and
//! proxies from the environment. A real `docker-registry` serves every test;
//! the test proxy stands in front of it only where misbehaviour is staged,
//! and its log (requests, headers, body bytes sent) is the witness.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::support::image::{Blob, Comp, Image, Media, Pushed, Tar, layer, push, push_index};
use crate::support::proxy::{Action, Proxy, Request, Seen, Tunnel};
use crate::support::registry::Registry;
use crate::support::tls::Pki;
use crate::support::token::{Issuer, Policy, SERVICE};
use crate::support::{
    TestEnv, assert_fails, assert_ok, fingerprint, json, listing, stderr, stdout,
};

/// A Nix-shaped image: a base layer with the database, then one store path
/// per entry of `sizes`, each a file of pseudo-random (incompressible) bytes
/// from `seed`, in uncompressed layers so blob sizes are what the test says.
/// Equal seeds and sizes give byte-identical layers (shared between images).
fn nix_image(addr: &str, repo: &str, tag: &str, seeds: &[(u64, usize)]) -> (Pushed, Vec<Blob>) {
    let mut base = Tar::new();
    base.dir("/nix", 0o755).dir("/nix/store", 0o755);
    base.dir("nix/var", 0o755)
        .dir("nix/var/nix", 0o755)
        .dir("nix/var/nix/db", 0o755);
    base.file("nix/var/nix/db/db.sqlite", b"db", 0o644);
    let mut layers = vec![layer(&base.finish(), Comp::None, Media::Oci)];
    for (seed, size) in seeds {
        let data = store_data(*seed, *size);
        let mut t = Tar::new();
        let dir = format!("/nix/store/{seed:032}-p");
        t.dir(&dir, 0o555)
            .file(&format!("{dir}/data"), &data, 0o444);
        layers.push(layer(&t.finish(), Comp::None, Media::Oci));
    }
    let pushed = push(
        addr,
        repo,
        Some(tag),
        &Image::new(Media::Oci, layers.clone()),
    );
    (pushed, layers)
}

/// The bytes of the one file in `nix_image`'s store path for `seed`.
fn store_data(seed: u64, size: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..size).map(|_| rng.u8(..)).collect()
}

/// DIR holds exactly the store paths of `nix_image` with `seeds`, each file
/// with its bytes.
fn assert_seed(dir: &Path, seeds: &[(u64, usize)]) {
    let store = dir.join("nix/store");
    let mut want: Vec<String> = seeds.iter().map(|(s, _)| format!("{s:032}-p")).collect();
    want.sort();
    assert_eq!(
        listing(&store),
        want,
        "the store paths in {}",
        store.display()
    );
    for (seed, size) in seeds {
        let data = std::fs::read(store.join(format!("{seed:032}-p/data"))).unwrap();
        assert!(
            data == store_data(*seed, *size),
            "store path {seed:032}-p: wrong bytes"
        );
    }
}

/// `hydrafy ARGS` with short retry delays (the defaults are for real networks).
fn run(env: &TestEnv, args: &[&str]) -> Output {
    hydrafy(env).args(args).output().expect("run hydrafy")
}

fn hydrafy(env: &TestEnv) -> Command {
    let mut cmd = env.hydrafy();
    cmd.env("HYDRAFY_RETRY_BACKOFF_MS", "50")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy");
    cmd
}

/// Body bytes the proxy sent for GETs of blob `digest`.
fn served(seen: &[Seen], digest: &str) -> u64 {
    gets_of(seen, digest).iter().map(|s| s.body_bytes).sum()
}

/// The GETs of the manifest or blob `digest`.
fn gets_of<'a>(seen: &'a [Seen], digest: &str) -> Vec<&'a Seen> {
    seen.iter()
        .filter(|s| s.request.method == "GET" && s.request.path.ends_with(digest))
        .collect()
}

/// A rule that answers `first` to the first request matching `pick`, then passes.
fn once(
    pick: impl Fn(&Request) -> bool + Send + Sync + 'static,
    first: Action,
) -> impl Fn(&Request) -> Action + Send + Sync + 'static {
    let done = Mutex::new(false);
    move |r| {
        let mut done = done.lock().unwrap();
        if !*done && pick(r) {
            *done = true;
            first.clone()
        } else {
            Action::Pass
        }
    }
}

fn write_docker_config(env: &TestEnv, config: serde_json::Value) {
    std::fs::write(env.join("docker/config.json"), config.to_string()).unwrap();
}

fn basic(user: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

// ---------------------------------------------------------------- token auth

/// A registry with `auth: token` trusting `issuer`, serving the storage of
/// `plain` (images are pushed to `plain`, which needs no token).
fn token_registry(issuer: &Issuer, plain: &Registry) -> Registry {
    Registry::start_sharing(&issuer.registry_config(), plain)
}

#[test]
fn token_auth_gets_a_pull_token_anonymously_and_renews_it_before_it_expires() {
    let plain = Registry::start();
    let (img, _) = nix_image(
        &plain.addr,
        "pub/nix",
        "v1",
        &[(1, 2000), (2, 2000), (3, 2000)],
    );
    // The client may use a token for 2 s (expires_in); the registry takes it
    // for 4, so a request sent just before renewal still arrives in time.
    let issuer = Issuer::start(Policy {
        public: vec!["pub/nix".into()],
        user: None,
        refresh_token: None,
        expires_in: 2,
        valid_for: 4,
    });
    let reg = token_registry(&issuer, &plain);
    // Each blob answer takes 1.2 s: four blobs one at a time outlive a token.
    let proxy = Proxy::start("127.0.0.1", &reg.addr, |r| {
        if r.is_blob() {
            Action::Delay(Duration::from_millis(1200))
        } else {
            Action::Pass
        }
    });
    let env = TestEnv::new();
    let reference = format!("{}/pub/nix@{}", proxy.addr, img.digest);
    assert_ok(&run(
        &env,
        &[
            "fetch",
            "--plain-http",
            "-j",
            "1",
            "-q",
            &reference,
            "-o",
            "out",
        ],
    ));
    assert!(env.join("out/nix/store").is_dir());

    let tokens = issuer.requests();
    assert!(tokens.len() >= 2, "the token was not renewed: {tokens:?}");
    for t in &tokens {
        assert_eq!(t.status, 200);
        assert_eq!(t.user, None, "no credentials are configured");
        assert!(
            t.query.contains("service=hydrafy-test-registry"),
            "{}",
            t.query
        );
        assert!(
            t.query.contains("scope=repository%3Apub%2Fnix%3Apull"),
            "{}",
            t.query
        );
        assert_eq!(t.granted, ["repository:pub/nix:pull"]);
    }
    let seen = proxy.seen_settled();
    let with_token: Vec<_> = seen
        .iter()
        .filter(|s| {
            s.request
                .header("authorization")
                .is_some_and(|a| a.starts_with("Bearer "))
        })
        .collect();
    assert!(
        tokens.len() < with_token.len(),
        "a token is reused until it expires ({} tokens for {} requests)",
        tokens.len(),
        with_token.len()
    );
    assert!(
        with_token.iter().all(|s| s.status != 401),
        "the token is renewed before it expires, so the registry never refuses it"
    );
    assert_eq!(SERVICE, "hydrafy-test-registry");
}

#[test]
fn a_token_the_registry_stops_accepting_early_is_replaced_on_its_401() {
    let plain = Registry::start();
    let (img, _) = nix_image(
        &plain.addr,
        "pub/nix",
        "v1",
        &[(1, 2000), (2, 2000), (3, 2000)],
    );
    // The issuer promises 300 s, but the registry takes the token for 2 s only
    // (clock skew, revocation): only the registry's 401 tells.
    let issuer = Issuer::start(Policy {
        public: vec!["pub/nix".into()],
        user: None,
        refresh_token: None,
        expires_in: 300,
        valid_for: 2,
    });
    let reg = token_registry(&issuer, &plain);
    let proxy = Proxy::start("127.0.0.1", &reg.addr, |r| {
        if r.is_blob() {
            Action::Delay(Duration::from_millis(1200))
        } else {
            Action::Pass
        }
    });
    let env = TestEnv::new();
    let reference = format!("{}/pub/nix@{}", proxy.addr, img.digest);
    assert_ok(&run(
        &env,
        &[
            "fetch",
            "--plain-http",
            "-j",
            "1",
            "-q",
            &reference,
            "-o",
            "out",
        ],
    ));
    assert!(issuer.requests().len() >= 2, "{:?}", issuer.requests());
    let refused: Vec<_> = proxy
        .seen()
        .into_iter()
        .filter(|s| s.status == 401 && s.request.header("authorization").is_some())
        .collect();
    assert!(
        !refused.is_empty(),
        "the registry never refused the stale token"
    );
}

#[test]
fn an_identity_token_from_config_json_is_traded_for_pull_tokens_with_oauth() {
    let plain = Registry::start();
    let (img, _) = nix_image(&plain.addr, "private/nix", "v1", &[(1, 1000)]);
    let issuer = Issuer::start(Policy {
        public: vec![],
        user: None,
        refresh_token: Some("rt-0123456789".into()),
        expires_in: 60,
        valid_for: 60,
    });
    let reg = token_registry(&issuer, &plain);
    let proxy = Proxy::start("127.0.0.1", &reg.addr, |_| Action::Pass);
    let reference = format!("{}/private/nix@{}", proxy.addr, img.digest);
    let env = TestEnv::new();

    // A stale identity token: OAuth2's 400 invalid_grant, said plainly.
    write_docker_config(
        &env,
        serde_json::json!({"auths": {proxy.addr.clone(): {"identitytoken": "rt-revoked"}}}),
    );
    let out = run(&env, &["fetch", "--plain-http", &reference, "-o", "out"]);
    assert_fails(
        &out,
        1,
        &[
            "refused the credentials",
            "an identity token",
            "docker login",
        ],
    );
    assert!(
        !stderr(&out).contains("rt-revoked"),
        "the token is never shown"
    );
    assert!(!env.join("out").exists());

    // `docker login` against an OAuth2 token service stores this.
    write_docker_config(
        &env,
        serde_json::json!({"auths": {proxy.addr.clone(): {"identitytoken": "rt-0123456789"}}}),
    );
    assert_ok(&run(
        &env,
        &["fetch", "--plain-http", "-q", &reference, "-o", "out"],
    ));
    let last = issuer.requests().pop().unwrap();
    assert_eq!(last.method, "POST");
    assert!(
        last.query.contains("grant_type=refresh_token")
            && last.query.contains("refresh_token=rt-0123456789")
            && last
                .query
                .contains("scope=repository%3Aprivate%2Fnix%3Apull"),
        "{}",
        last.query
    );
    assert_eq!(last.granted, ["repository:private/nix:pull"]);
    for s in proxy.seen_settled() {
        let auth = s.request.header("authorization").unwrap_or("");
        assert!(
            auth.is_empty() || auth.starts_with("Bearer "),
            "only access tokens go to the registry: {}",
            s.request.path
        );
    }
}

#[test]
fn token_auth_sends_config_json_credentials_to_the_realm_and_never_to_the_registry() {
    let plain = Registry::start();
    let (img, _) = nix_image(&plain.addr, "private/nix", "v1", &[(1, 1000)]);
    let issuer = Issuer::start(Policy {
        public: vec![],
        user: Some(("hydrafy".into(), "s3cret".into())),
        refresh_token: None,
        expires_in: 60,
        valid_for: 60,
    });
    let reg = token_registry(&issuer, &plain);
    let proxy = Proxy::start("127.0.0.1", &reg.addr, |_| Action::Pass);
    let reference = format!("{}/private/nix@{}", proxy.addr, img.digest);

    // No credentials: the anonymous token grants nothing, and the error says what to do.
    let env = TestEnv::new();
    let out = run(&env, &["fetch", "--plain-http", &reference, "-o", "out"]);
    assert_fails(
        &out,
        1,
        &["401 Unauthorized", "private/nix", "docker login"],
    );
    assert!(!env.join("out").exists());
    assert_eq!(
        issuer.requests().last().unwrap().granted,
        Vec::<String>::new()
    );

    // Wrong password: the realm refuses it, and the error names the user.
    write_docker_config(
        &env,
        serde_json::json!({"auths": {proxy.addr.clone(): {"auth": basic("hydrafy", "wrong")}}}),
    );
    let out = run(&env, &["fetch", "--plain-http", &reference, "-o", "out"]);
    assert_fails(
        &out,
        1,
        &["refused the credentials", "user hydrafy", "docker login"],
    );
    assert!(!env.join("out").exists());

    // The right credentials in `auths`: Basic to the realm, the token to the registry.
    write_docker_config(
        &env,
        serde_json::json!({"auths": {proxy.addr.clone(): {"auth": basic("hydrafy", "s3cret")}}}),
    );
    assert_ok(&run(
        &env,
        &["fetch", "--plain-http", "-q", &reference, "-o", "out"],
    ));
    let last = issuer.requests().pop().unwrap();
    assert_eq!(last.user.as_deref(), Some("hydrafy"));
    assert_eq!(last.granted, ["repository:private/nix:pull"]);
    for s in proxy.seen_settled() {
        let auth = s.request.header("authorization").unwrap_or("");
        assert!(
            !auth.starts_with("Basic"),
            "credentials went to the registry: {}",
            s.request.path
        );
    }
}

// ------------------------------------------------------------ htpasswd auth

const HTPASSWD: &str = "hydrafy:$2b$12$TE1kcjnVB3qZ58lMChAZ/.vlVoNTjE/J52a8GbRQ3gmo2KIRV5Wgi\n";

/// A registry with htpasswd Basic auth (user hydrafy, password s3cret) over
/// `plain`'s storage.
fn htpasswd_registry(plain: &Registry) -> Registry {
    let path = plain.dir().join("htpasswd");
    std::fs::write(&path, HTPASSWD).unwrap();
    Registry::start_sharing(
        &format!(
            "auth:\n  htpasswd:\n    realm: basic-realm\n    path: {}\n",
            path.display()
        ),
        plain,
    )
}

/// A `docker-credential-NAME` script in `env`'s bin dir answering for `server`.
fn credential_helper(env: &TestEnv, name: &str, server: &str, password: &str) {
    let bin = env.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = format!(
        "#!/bin/sh\n[ \"$1\" = get ] || exit 1\nread server\necho \"$server\" >> {log}\n\
         if [ \"$server\" = '{server}' ]; then\n  printf '{{\"ServerURL\":\"%s\",\"Username\":\"hydrafy\",\"Secret\":\"{password}\"}}' \"$server\"\n\
         else\n  echo 'credentials not found in native keychain'; exit 1\nfi\n",
        log = env.join(&format!("{name}.log")).display()
    );
    let path = bin.join(format!("docker-credential-{name}"));
    std::fs::write(&path, script).unwrap();
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&path, perms).unwrap();
}

fn with_helpers_on_path(env: &TestEnv) -> Command {
    let mut cmd = hydrafy(env);
    let path = format!(
        "{}:{}",
        env.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    cmd.env("PATH", path);
    cmd
}

#[test]
fn htpasswd_basic_auth_uses_auths_credsstore_and_credhelpers() {
    let plain = Registry::start();
    let (img, _) = nix_image(&plain.addr, "team/nix", "v1", &[(1, 1000)]);
    let reg = htpasswd_registry(&plain);
    let reference = format!("{}/team/nix@{}", reg.addr, img.digest);
    let env = TestEnv::new();
    let fetch = |dir: &str| {
        with_helpers_on_path(&env)
            .args(["fetch", "--plain-http", "-q", &reference, "-o", dir])
            .output()
            .unwrap()
    };

    // No credentials at all.
    assert_fails(
        &fetch("none"),
        1,
        &["401 Unauthorized", "team/nix", "docker login"],
    );
    assert!(!env.join("none").exists());

    // `auths` with a wrong password: refused, naming the user.
    write_docker_config(
        &env,
        serde_json::json!({"auths": {reg.addr.clone(): {"auth": basic("hydrafy", "nope")}}}),
    );
    assert_fails(
        &fetch("wrong"),
        1,
        &["401 Unauthorized", "user hydrafy", "docker login"],
    );
    assert!(!env.join("wrong").exists());

    // `auths`.
    write_docker_config(
        &env,
        serde_json::json!({"auths": {reg.addr.clone(): {"auth": basic("hydrafy", "s3cret")}}}),
    );
    assert_ok(&fetch("auths"));

    // `credsStore`: the helper is asked for this registry.
    credential_helper(&env, "hystore", &reg.addr, "s3cret");
    write_docker_config(&env, serde_json::json!({"credsStore": "hystore"}));
    assert_ok(&fetch("store"));
    let asked = std::fs::read_to_string(env.join("hystore.log")).unwrap();
    assert_eq!(asked.trim(), reg.addr);

    // `credHelpers` wins over `credsStore` for its registry.
    credential_helper(&env, "hyhelper", &reg.addr, "s3cret");
    credential_helper(&env, "hybroken", "nothing-matches", "x");
    write_docker_config(
        &env,
        serde_json::json!({"credsStore": "hybroken", "credHelpers": {reg.addr.clone(): "hyhelper"}}),
    );
    assert_ok(&fetch("helper"));
    assert!(env.join("hyhelper.log").exists());
    assert!(
        !env.join("hybroken.log").exists(),
        "credsStore was asked although credHelpers names a helper"
    );
}

#[test]
fn credentials_are_not_looked_up_for_a_registry_that_asks_for_none() {
    let reg = Registry::start();
    let (img, _) = nix_image(&reg.addr, "open/nix", "v1", &[(1, 1000)]);
    let env = TestEnv::new();
    credential_helper(&env, "hystore", &reg.addr, "s3cret");
    write_docker_config(&env, serde_json::json!({"credsStore": "hystore"}));
    let reference = format!("{}/open/nix@{}", reg.addr, img.digest);
    let out = with_helpers_on_path(&env)
        .args(["fetch", "--plain-http", "-q", &reference, "-o", "out"])
        .output()
        .unwrap();
    assert_ok(&out);
    assert!(
        !env.join("hystore.log").exists(),
        "the helper ran for an anonymous pull"
    );
}

// ------------------------------------------------------------ CDN redirects

#[test]
fn blob_redirects_to_a_cdn_are_followed_without_the_registrys_authorization() {
    let plain = Registry::start();
    let (img, layers) = nix_image(&plain.addr, "pub/nix", "v1", &[(1, 50_000), (2, 50_000)]);
    let issuer = Issuer::start(Policy {
        public: vec!["pub/nix".into()],
        user: None,
        refresh_token: None,
        expires_in: 60,
        valid_for: 60,
    });
    let reg = token_registry(&issuer, &plain);
    // The CDN: another address, serving the same bytes with no auth at all.
    let cdn = Proxy::start("127.0.0.2", &plain.addr, |_| Action::Pass);
    let cdn_addr = cdn.addr.clone();
    // The registry answers authorised blob GETs with a 307 to the CDN, as Docker Hub does.
    let front = Proxy::start("127.0.0.1", &reg.addr, move |r| {
        if r.is_blob() && r.method == "GET" && r.header("authorization").is_some() {
            Action::Redirect(format!("http://{cdn_addr}{}", r.path))
        } else {
            Action::Pass
        }
    });
    let env = TestEnv::new();
    let reference = format!("{}/pub/nix@{}", front.addr, img.digest);
    assert_ok(&run(
        &env,
        &["fetch", "--plain-http", "-q", &reference, "-o", "out"],
    ));

    let redirected: Vec<_> = front
        .seen()
        .into_iter()
        .filter(|s| s.status == 307)
        .collect();
    assert_eq!(
        redirected.len(),
        layers.len() + 1,
        "every blob (layers and config) was redirected"
    );
    for s in &redirected {
        assert!(
            s.request
                .header("authorization")
                .is_some_and(|a| a.starts_with("Bearer ")),
            "the registry request carried the token"
        );
    }
    let at_cdn = cdn.seen_settled();
    for l in &layers {
        assert_eq!(
            served(&at_cdn, &l.digest),
            l.bytes.len() as u64,
            "layer {} came from the CDN",
            l.digest
        );
    }
    for s in &at_cdn {
        assert_eq!(
            s.request.header("authorization"),
            None,
            "the registry's Authorization header leaked to the CDN host"
        );
    }
}

// --------------------------------------------------------------- rate limits

fn rate_limited() -> Action {
    Action::Status(
        429,
        vec![
            ("ratelimit-limit".into(), "100;w=21600".into()),
            ("ratelimit-remaining".into(), "0;w=21600".into()),
        ],
        r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"You have reached your pull rate limit."}]}"#.into(),
    )
}

#[test]
fn a_429_with_a_short_retry_after_is_waited_out_and_retried() {
    let reg = Registry::start();
    let (img, _) = nix_image(&reg.addr, "pub/nix", "v1", &[(1, 1000)]);
    let Action::Status(code, mut headers, body) = rate_limited() else {
        unreachable!()
    };
    headers.push(("Retry-After".into(), "1".into()));
    let proxy = Proxy::start(
        "127.0.0.1",
        &reg.addr,
        once(|r| r.is_manifest(), Action::Status(code, headers, body)),
    );
    let env = TestEnv::new();
    let reference = format!("{}/pub/nix@{}", proxy.addr, img.digest);
    let start = Instant::now();
    let out = run(&env, &["fetch", "--plain-http", &reference, "-o", "out"]);
    assert_ok(&out);
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "Retry-After was not waited out"
    );
    let err = stderr(&out);
    assert!(
        err.contains("rate limited (limit 100;w=21600, remaining 0;w=21600); waiting 1s"),
        "{err}"
    );
    let manifest_gets = proxy
        .seen()
        .iter()
        .filter(|s| s.request.is_manifest())
        .count();
    assert_eq!(manifest_gets, 2, "one 429, one retry");
}

#[test]
fn a_429_without_retry_after_fails_with_the_limit_figures_and_what_to_do() {
    let reg = Registry::start();
    let (img, _) = nix_image(&reg.addr, "pub/nix", "v1", &[(1, 1000)]);
    let proxy = Proxy::start("127.0.0.1", &reg.addr, |r| {
        if r.is_manifest() {
            rate_limited()
        } else {
            Action::Pass
        }
    });
    let env = TestEnv::new();
    let reference = format!("{}/pub/nix@{}", proxy.addr, img.digest);
    let out = run(&env, &["fetch", "--plain-http", &reference, "-o", "out"]);
    assert_fails(
        &out,
        1,
        &[
            "pub/nix",
            "429 Too Many Requests",
            "limit 100;w=21600, remaining 0;w=21600",
            "docker login",
            "--mirror",
            "or wait",
        ],
    );
    assert!(!env.join("out").exists());
    assert_eq!(
        listing(env.path()),
        ["cache", "docker", "home"],
        "nothing left beside DIR"
    );
}

#[test]
fn a_tag_whose_image_dir_already_holds_costs_one_head_and_no_manifest_get() {
    let reg = Registry::start();
    let (img, _) = nix_image(&reg.addr, "pub/nix", "v1", &[(1, 1000)]);
    let proxy = Proxy::start("127.0.0.1", &reg.addr, |_| Action::Pass);
    let env = TestEnv::new();
    assert_ok(&run(
        &env,
        &[
            "fetch",
            "--plain-http",
            "-q",
            &format!("{}/pub/nix@{}", proxy.addr, img.digest),
            "-o",
            "out",
        ],
    ));
    let before = fingerprint(&env.join("out"));
    let already = proxy.seen_settled().len();

    let out = run(
        &env,
        &[
            "fetch",
            "--plain-http",
            "--json",
            &format!("{}/pub/nix:v1", proxy.addr),
            "-o",
            "out",
        ],
    );
    assert_ok(&out);
    assert_eq!(json(&out)["unchanged"], true);
    assert!(
        stderr(&out).contains(&img.digest),
        "the digest to pin is printed"
    );
    let seen: Vec<_> = proxy.seen_settled().into_iter().skip(already).collect();
    let heads = seen
        .iter()
        .filter(|s| s.request.method == "HEAD" && s.request.is_manifest())
        .count();
    let gets = seen.iter().filter(|s| s.request.method == "GET").count();
    assert_eq!((heads, gets), (1, 0), "{seen:?}");
    assert_eq!(fingerprint(&env.join("out")), before);
}

// ------------------------------------------------------------ flaky networks

#[test]
fn dropped_connections_503s_and_stalls_are_retried_and_cut_transfers_resume_with_range() {
    let reg = Registry::start();
    let (img, layers) = nix_image(
        &reg.addr,
        "pub/nix",
        "v1",
        &[(1, 600_000), (2, 600_000), (3, 600_000), (4, 600_000)],
    );
    let (cut, refused, closed, stalled) = (
        layers[1].digest.clone(),
        layers[2].digest.clone(),
        layers[3].digest.clone(),
        layers[4].digest.clone(),
    );
    let firsts = Mutex::new(HashSet::new());
    let proxy = Proxy::start("127.0.0.1", &reg.addr, move |r| {
        let key = if r.is_manifest() {
            "manifest".to_string()
        } else {
            r.path.clone()
        };
        if !firsts.lock().unwrap().insert(key) {
            return Action::Pass;
        }
        if r.is_manifest() {
            Action::Drop
        } else if r.path.ends_with(&refused) {
            Action::Status(503, vec![], "busy".into())
        } else if r.path.ends_with(&cut) {
            Action::CutAfter(250_000)
        } else if r.path.ends_with(&closed) {
            Action::CutAfter(0)
        } else if r.path.ends_with(&stalled) {
            Action::StallAfter(100_000)
        } else {
            Action::Pass
        }
    });
    let env = TestEnv::new();
    let reference = format!("{}/pub/nix@{}", proxy.addr, img.digest);
    let out = hydrafy(&env)
        .env("HYDRAFY_READ_TIMEOUT_MS", "1000")
        .args(["fetch", "--plain-http", "-q", &reference, "-o", "out"])
        .output()
        .unwrap();
    assert_ok(&out);
    let seen = proxy.seen_settled();

    let size = layers[1].bytes.len() as u64;
    let cut = &layers[1].digest;
    let gets = gets_of(&seen, cut);
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[1].request.header("range"), Some("bytes=250000-"));
    assert_eq!(gets[1].status, 206);
    let total = served(&seen, cut);
    eprintln!(
        "resume figure: blob cut after 250000 bytes: {total} bytes served for a {size}-byte blob ({:.3}x)",
        total as f64 / size as f64
    );
    assert_eq!(total, size, "a resumed blob is not downloaded twice");

    let stall_gets = gets_of(&seen, &layers[4].digest);
    assert_eq!(stall_gets[1].request.header("range"), Some("bytes=100000-"));
    assert_eq!(
        served(&seen, &layers[4].digest),
        layers[4].bytes.len() as u64
    );
    for l in &layers[2..4] {
        assert_eq!(served(&seen, &l.digest), l.bytes.len() as u64);
    }
    let manifest_gets: Vec<_> = seen.iter().filter(|s| s.request.is_manifest()).collect();
    assert_eq!(manifest_gets.len(), 2, "one dropped, one retried");
    assert!(env.join("out/nix/store").is_dir());
}

#[test]
fn a_server_that_ignores_range_is_restarted_from_zero_and_still_verified() {
    let reg = Registry::start();
    let (img, layers) = nix_image(&reg.addr, "pub/nix", "v1", &[(1, 600_000)]);
    let digest = layers[1].digest.clone();
    let first = Mutex::new(true);
    let proxy = Proxy::start("127.0.0.1", &reg.addr, move |r| {
        if !r.path.ends_with(&digest) {
            return Action::Pass;
        }
        if std::mem::replace(&mut *first.lock().unwrap(), false) {
            Action::CutAfter(250_000)
        } else {
            Action::IgnoreRange
        }
    });
    let env = TestEnv::new();
    let reference = format!("{}/pub/nix@{}", proxy.addr, img.digest);
    assert_ok(&run(
        &env,
        &["fetch", "--plain-http", "-q", &reference, "-o", "out"],
    ));
    let seen = proxy.seen_settled();
    let gets = gets_of(&seen, &layers[1].digest);
    assert_eq!(gets.len(), 2);
    assert_eq!(
        gets[1].request.header("range"),
        Some("bytes=250000-"),
        "hydrafy asked to resume"
    );
    assert_eq!(gets[1].status, 200, "the server sent everything instead");
    assert_eq!(
        served(&seen, &layers[1].digest),
        250_000 + layers[1].bytes.len() as u64
    );
}

#[test]
fn a_download_killed_mid_blob_resumes_where_it_stopped_in_the_next_run() {
    let reg = Registry::start();
    let (img, layers) = nix_image(&reg.addr, "pub/nix", "v1", &[(1, 800_000)]);
    let digest = layers[1].digest.clone();
    let size = layers[1].bytes.len() as u64;
    let proxy = Proxy::start("127.0.0.1", &reg.addr, {
        let digest = digest.clone();
        move |r| {
            if r.path.ends_with(&digest) && r.header("range").is_none() {
                Action::StallAfter(300_000)
            } else {
                Action::Pass
            }
        }
    });
    let env = TestEnv::new();
    let reference = format!("{}/pub/nix@{}", proxy.addr, img.digest);
    let mut first = hydrafy(&env)
        .args(["fetch", "--plain-http", "-q", &reference, "-o", "out"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let partial = env
        .join("cache/hydrafy/tmp")
        .join(format!("{}.partial", digest.trim_start_matches("sha256:")));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&partial).map_or(0, |m| m.len()) < 300_000 {
        assert!(
            Instant::now() < deadline,
            "the first run never wrote its partial blob"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    first.kill().unwrap(); // SIGKILL: no cleanup at all
    first.wait().unwrap();
    assert!(!env.join("out").exists());

    let out = run(&env, &["fetch", "--plain-http", &reference, "-o", "out"]);
    assert_ok(&out);
    assert!(
        stderr(&out).contains(&format!("blob {digest}: resuming at byte 300000 of {size}")),
        "{}",
        stderr(&out)
    );
    let seen = proxy.seen_settled();
    let gets = gets_of(&seen, &digest);
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[1].request.header("range"), Some("bytes=300000-"));
    assert_eq!(
        served(&seen, &digest),
        size,
        "the second run fetched only the rest"
    );
    assert!(!partial.exists());
    assert!(env.join("out/nix/store").is_dir());
}

// ------------------------------------------------ bodies cut short, trickles

/// Run `cmd` to its end; kill it and fail after `limit`. A run that hangs (on
/// a source that trickles) must fail its test, not stall the suite.
fn run_within(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run hydrafy");
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait for hydrafy"),
        Err(_) => {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            panic!(
                "hydrafy was still running after {} s and was killed: it hangs",
                limit.as_secs()
            );
        }
    }
}

/// Generous for a run that must end by itself; reached only by one that hangs.
const HANG: Duration = Duration::from_secs(120);

/// What a flaky link does to one request after another: the body cut
/// halfway, then the connection closed before any answer, then a 503. The
/// fourth request is served.
fn cut_reset_503(half: u64) -> Vec<Action> {
    vec![
        Action::CutAfter(half),
        Action::Drop,
        Action::Status(503, vec![], "busy".into()),
    ]
}

/// A rule dealing `actions` in turn to the requests `pick` matches, then
/// passing them.
fn in_turn(
    pick: impl Fn(&Request) -> bool + Send + Sync + 'static,
    actions: Vec<Action>,
) -> impl Fn(&Request) -> Action + Send + Sync + 'static {
    let next = Mutex::new(actions.into_iter());
    move |r| {
        if pick(r) {
            next.lock().unwrap().next().unwrap_or(Action::Pass)
        } else {
            Action::Pass
        }
    }
}

/// The objects a fetch reads a body of.
#[derive(Clone, Copy, PartialEq)]
enum Object {
    Index,
    Manifest,
    Config,
    Layer,
}

/// Fetch an index-pinned Nix image through a proxy that deals
/// [`cut_reset_503`] to the GETs of `object`; the run succeeds with the
/// right seed, and each GET is as the fault left it. Blobs are resumed with
/// Range from the half that arrived; manifests are asked for whole again.
fn fetch_through_a_cut(object: Object) {
    let reg = Registry::start();
    let seeds = [(1, 40_000), (2, 40_000)];
    let (img, layers) = nix_image(&reg.addr, "pub/nix", "v1", &seeds);
    let index = push_index(&reg.addr, "pub/nix", None, Media::Oci, &[&img]);
    let manifest: serde_json::Value = serde_json::from_slice(&img.body).unwrap();
    let (digest, size) = match object {
        Object::Index => (index.digest.clone(), index.body.len() as u64),
        Object::Manifest => (img.digest.clone(), img.body.len() as u64),
        Object::Config => (
            manifest["config"]["digest"].as_str().unwrap().to_string(),
            manifest["config"]["size"].as_u64().unwrap(),
        ),
        Object::Layer => (layers[1].digest.clone(), layers[1].bytes.len() as u64),
    };
    let half = size / 2;
    let proxy = Proxy::start("127.0.0.1", &reg.addr, {
        let digest = digest.clone();
        in_turn(
            move |r| r.method == "GET" && r.path.ends_with(&digest),
            cut_reset_503(half),
        )
    });
    let env = TestEnv::new();
    let reference = format!("{}/pub/nix@{}", proxy.addr, index.digest);
    let out = run_within(
        hydrafy(&env).args(["fetch", "--plain-http", "-q", &reference, "-o", "out"]),
        HANG,
    );
    assert_ok(&out);
    assert_seed(&env.join("out"), &seeds);

    let seen = proxy.seen_settled();
    let gets: Vec<_> = gets_of(&seen, &digest)
        .into_iter()
        .map(|g| (g.status, g.body_bytes, g.request.header("range")))
        .collect();
    let blob = matches!(object, Object::Config | Object::Layer);
    let resume = format!("bytes={half}-");
    let range = blob.then_some(resume.as_str());
    let rest = if blob { size - half } else { size };
    assert_eq!(
        gets,
        [
            (200, half, None),
            (0, 0, range),
            (503, 0, range),
            (if blob { 206 } else { 200 }, rest, range),
        ],
        "GETs of {digest} (cut, dropped, 503, served)"
    );
}

#[test]
fn a_body_cut_short_is_retried_for_an_index() {
    fetch_through_a_cut(Object::Index);
}

#[test]
fn a_body_cut_short_is_retried_for_a_manifest() {
    fetch_through_a_cut(Object::Manifest);
}

#[test]
fn a_body_cut_short_is_retried_for_a_config() {
    fetch_through_a_cut(Object::Config);
}

#[test]
fn a_body_cut_short_is_retried_for_a_layer() {
    fetch_through_a_cut(Object::Layer);
}

/// A registry with `auth: token` over `plain`'s storage whose realm is a
/// proxy in front of a public-pull issuer, dealing `actions` to the token
/// requests in turn. Fetches `plain`'s image through it, within [`HANG`],
/// with a floor of 1000 B/s over 1 s.
fn fetch_with_token_faults(actions: Vec<Action>) -> (Output, TestEnv, Vec<Seen>, usize) {
    let plain = Registry::start();
    let (img, _) = nix_image(&plain.addr, "pub/nix", "v1", &TOKEN_SEEDS);
    let issuer = Issuer::start(Policy {
        public: vec!["pub/nix".into()],
        user: None,
        refresh_token: None,
        expires_in: 300,
        valid_for: 300,
    });
    let realm = Proxy::start(
        "127.0.0.1",
        &issuer.addr,
        in_turn(|r| r.path.starts_with("/token"), actions),
    );
    let reg = Registry::start_sharing(&issuer.registry_config_via(&realm.addr), &plain);
    let env = TestEnv::new();
    let reference = format!("{}/pub/nix@{}", reg.addr, img.digest);
    let out = fetch_with_floor(&env, &reference);
    let seen = realm.seen_settled();
    (out, env, seen, issuer.requests().len())
}

const TOKEN_SEEDS: [(u64, usize); 1] = [(1, 20_000)];

/// `hydrafy fetch --plain-http -q REFERENCE -o out` with a low-speed floor
/// of 1000 B/s over 1 s, killed if it outlives [`HANG`].
fn fetch_with_floor(env: &TestEnv, reference: &str) -> Output {
    run_within(
        hydrafy(env).env("HYDRAFY_LOW_SPEED", "1000/1").args([
            "fetch",
            "--plain-http",
            "-q",
            reference,
            "-o",
            "out",
        ]),
        HANG,
    )
}

#[test]
fn a_body_cut_short_is_retried_for_a_token_answer() {
    let (out, env, seen, issued) = fetch_with_token_faults(cut_reset_503(40));
    assert_ok(&out);
    assert_seed(&env.join("out"), &TOKEN_SEEDS);
    let asked: Vec<_> = seen.iter().map(|s| (s.status, s.body_bytes)).collect();
    assert_eq!(asked.len(), 4, "{asked:?}");
    assert_eq!(&asked[..3], [(200, 40), (0, 0), (503, 0)]);
    assert!(asked[3].0 == 200 && asked[3].1 > 40, "{asked:?}");
    assert_eq!(
        issued, 2,
        "the dropped and the 503 never reached the issuer"
    );
}

#[test]
fn a_token_service_that_trickles_its_answer_or_headers_is_asked_again() {
    let every = Duration::from_millis(500);
    let (out, env, seen, issued) =
        fetch_with_token_faults(vec![Action::Trickle(every), Action::TrickleHead(every)]);
    assert_ok(&out);
    assert_seed(&env.join("out"), &TOKEN_SEEDS);
    let asked: Vec<_> = seen.iter().map(|s| s.status).collect();
    assert_eq!(asked, [200, 200, 200], "trickled, trickled, served");
    assert_eq!(issued, 3);
}

/// Fetch through a proxy that deals `action` to every manifest GET, with a
/// floor of 1000 B/s over 1 s: the run fails on one line naming the source
/// and what it managed, after the usual five attempts, and DIR is untouched.
fn fetch_a_trickling_manifest(action: Action, managed: &str) {
    let reg = Registry::start();
    let (img, _) = nix_image(&reg.addr, "pub/nix", "v1", &[(1, 1000)]);
    let proxy = Proxy::start("127.0.0.1", &reg.addr, move |r| {
        if r.is_manifest() {
            action.clone()
        } else {
            Action::Pass
        }
    });
    let env = TestEnv::new();
    let reference = format!("{}/pub/nix@{}", proxy.addr, img.digest);
    let out = fetch_with_floor(&env, &reference);
    assert_fails(
        &out,
        1,
        &[
            &format!("manifest {}", img.digest),
            &format!("({})", proxy.addr),
            "transfer too slow: ",
            managed,
            "(floor 1000 B/s)",
        ],
    );
    assert!(!env.join("out").exists());
    let gets = proxy
        .seen_settled()
        .iter()
        .filter(|s| s.request.is_manifest())
        .count();
    assert_eq!(gets, 5, "each slow transfer is a failed attempt");
}

#[test]
fn a_source_that_trickles_a_manifest_fails_the_run_instead_of_hanging_it() {
    fetch_a_trickling_manifest(
        Action::Trickle(Duration::from_millis(500)),
        " B/s over 1 s ",
    );
}

#[test]
fn a_source_that_trickles_its_headers_fails_the_run_instead_of_hanging_it() {
    fetch_a_trickling_manifest(
        Action::TrickleHead(Duration::from_millis(500)),
        "no answer in 1 s ",
    );
}

// -------------------------------------------------------------------- cache

#[test]
fn the_cache_serves_a_new_dir_and_a_new_image_downloads_only_its_new_layers() {
    let reg = Registry::start();
    let (one, layers_one) = nix_image(&reg.addr, "pub/nix", "one", &[(1, 300_000), (2, 300_000)]);
    let (two, layers_two) = nix_image(
        &reg.addr,
        "pub/nix",
        "two",
        &[(1, 300_000), (2, 300_000), (3, 300_000)],
    );
    let proxy = Proxy::start("127.0.0.1", &reg.addr, |_| Action::Pass);
    let env = TestEnv::new();
    let blob_bytes = |seen: &[Seen]| -> u64 {
        seen.iter()
            .filter(|s| s.request.is_blob() && s.request.method == "GET")
            .map(|s| s.body_bytes)
            .sum()
    };
    let fetch = |image: &Pushed, dir: &str| -> (Output, u64) {
        let before = proxy.seen_settled().len();
        let out = run(
            &env,
            &[
                "fetch",
                "--plain-http",
                "--json",
                &format!("{}/pub/nix@{}", proxy.addr, image.digest),
                "-o",
                dir,
            ],
        );
        assert_ok(&out);
        let seen: Vec<_> = proxy.seen_settled().into_iter().skip(before).collect();
        (out, blob_bytes(&seen))
    };

    let (_, first) = fetch(&one, "a");
    let layer_bytes: u64 = layers_one.iter().map(|l| l.bytes.len() as u64).sum();
    assert!(
        first > layer_bytes,
        "the first fetch downloads the layers and the config"
    );

    let (out, again) = fetch(&one, "b");
    eprintln!(
        "cache figure: the second fetch into a new DIR downloaded {again} blob bytes (first: {first})"
    );
    assert_eq!(again, 0, "every blob came from the cache");
    assert_eq!(json(&out)["bytes_downloaded"], 0);
    assert_eq!(
        fingerprint(&env.join("a/nix/store")),
        fingerprint(&env.join("b/nix/store"))
    );

    let (_, third) = fetch(&two, "c");
    let new_layer = layers_two[3].bytes.len() as u64;
    let config = third - new_layer;
    assert!(
        third >= new_layer && config < 2_000,
        "only the new layer and config: {third} bytes"
    );
    eprintln!(
        "cache figure: a new image sharing 3 of 4 layers downloaded {third} blob bytes ({new_layer} for its new layer, {config} for its config)"
    );
}

#[test]
fn a_corrupted_cached_blob_is_caught_on_reuse_and_downloaded_again() {
    let reg = Registry::start();
    let (img, layers) = nix_image(&reg.addr, "pub/nix", "v1", &[(1, 100_000)]);
    let proxy = Proxy::start("127.0.0.1", &reg.addr, |_| Action::Pass);
    let env = TestEnv::new();
    let reference = format!("{}/pub/nix@{}", proxy.addr, img.digest);
    assert_ok(&run(
        &env,
        &["fetch", "--plain-http", "-q", &reference, "-o", "a"],
    ));
    let digest = &layers[1].digest;
    let cached = env
        .join("cache/hydrafy/blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&cached).unwrap();
    bytes[5000] ^= 0xff;
    std::fs::write(&cached, bytes).unwrap();
    let before = served(&proxy.seen_settled(), digest);

    let out = run(&env, &["fetch", "--plain-http", &reference, "-o", "b"]);
    assert_ok(&out);
    assert!(
        stderr(&out).contains(&format!(
            "cached blob {digest} was corrupt; downloading it again"
        )),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        served(&proxy.seen_settled(), digest) - before,
        layers[1].bytes.len() as u64
    );
    assert_eq!(std::fs::read(&cached).unwrap(), layers[1].bytes);
    assert_eq!(
        fingerprint(&env.join("a/nix/store")),
        fingerprint(&env.join("b/nix/store"))
    );
}

#[test]
fn two_runs_at_once_on_one_cache_both_succeed_and_download_each_layer_once() {
    let reg = Registry::start();
    let (img, layers) = nix_image(
        &reg.addr,
        "pub/nix",
        "v1",
        &[(1, 400_000), (2, 400_000), (3, 400_000)],
    );
    // Slow blob answers: the two runs overlap on every layer.
    let proxy = Proxy::start("127.0.0.1", &reg.addr, |r| {
        if r.is_blob() {
            Action::Delay(Duration::from_millis(300))
        } else {
            Action::Pass
        }
    });
    let env = TestEnv::new();
    let reference = format!("{}/pub/nix@{}", proxy.addr, img.digest);
    let spawn = |dir: &str| {
        hydrafy(&env)
            .args(["fetch", "--plain-http", "-q", &reference, "-o", dir])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("a"), spawn("b"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert_ok(&a);
    assert_ok(&b);
    assert_eq!(
        fingerprint(&env.join("a/nix/store")),
        fingerprint(&env.join("b/nix/store"))
    );
    let seen = proxy.seen_settled();
    for l in &layers {
        assert_eq!(
            served(&seen, &l.digest),
            l.bytes.len() as u64,
            "layer {} was downloaded once",
            l.digest
        );
    }
    let cache = env.join("cache/hydrafy");
    assert_eq!(
        listing(&cache.join("tmp")),
        Vec::<String>::new(),
        "no partial file is left"
    );
    for l in &layers {
        let stored = std::fs::read(
            cache
                .join("blobs/sha256")
                .join(l.digest.trim_start_matches("sha256:")),
        )
        .unwrap();
        assert_eq!(stored, l.bytes, "no torn blob");
    }
}

#[test]
fn hydrafy_cache_shows_its_path_and_size_and_clears() {
    let reg = Registry::start();
    let (img, layers) = nix_image(&reg.addr, "pub/nix", "v1", &[(1, 100_000)]);
    let env = TestEnv::new();
    let cache = env.join("cache/hydrafy");
    let out = run(&env, &["cache", "path"]);
    assert_ok(&out);
    assert_eq!(stdout(&out).trim(), cache.display().to_string());
    let out = run(&env, &["cache", "du", "--json"]);
    assert_ok(&out);
    assert_eq!(json(&out)["blobs"], 0, "an absent cache is empty");

    assert_ok(&run(
        &env,
        &[
            "fetch",
            "--plain-http",
            "-q",
            &format!("{}/pub/nix@{}", reg.addr, img.digest),
            "-o",
            "out",
        ],
    ));
    let out = run(&env, &["cache", "du", "--json"]);
    assert_ok(&out);
    let du = json(&out);
    let expected: u64 =
        layers.iter().map(|l| l.bytes.len() as u64).sum::<u64>() + img.body.len() as u64;
    assert_eq!(
        du["blobs"],
        layers.len() + 1,
        "the layers and the config: {du}"
    );
    assert!(
        du["blob_bytes"].as_u64().unwrap() > expected - img.body.len() as u64,
        "{du}"
    );
    assert_eq!(du["path"], cache.display().to_string());

    let out = run(&env, &["cache", "clear"]);
    assert_ok(&out);
    assert!(
        stdout(&out).contains(&format!("removed {} blobs", layers.len() + 1)),
        "{}",
        stdout(&out)
    );
    let out = run(&env, &["cache", "du"]);
    assert!(
        stdout(&out).contains(": 0 blobs, 0.0 MB; 0 unfinished downloads"),
        "{}",
        stdout(&out)
    );
    assert!(
        env.join("out/nix/store").is_dir(),
        "clearing the cache leaves fetched DIRs alone"
    );
}

// ------------------------------------------------------------------ mirrors

/// `hydrafy fetch --plain-http --mirror ORIGIN=http://MIRROR [EXTRA] ORIGIN/pub/nix@DIGEST -o out`.
fn fetch_with_mirror(
    env: &TestEnv,
    origin: &str,
    mirror: &str,
    digest: &str,
    extra: &[&str],
) -> Output {
    let reference = format!("{origin}/pub/nix@{digest}");
    let mirror_arg = format!("{origin}=http://{mirror}");
    let mut args = vec!["fetch", "--plain-http", "--mirror", &mirror_arg];
    args.extend_from_slice(extra);
    args.extend([reference.as_str(), "-o", "out"]);
    run(env, &args)
}

#[test]
fn a_pull_through_mirror_is_tried_first_and_a_lying_one_is_skipped() {
    let origin = Registry::start();
    let (img, layers) = nix_image(&origin.addr, "pub/nix", "v1", &[(1, 100_000), (2, 100_000)]);
    // The image is known by this address (the origin seen through a logging proxy).
    let at_origin = Proxy::start("127.0.0.1", &origin.addr, |_| Action::Pass);
    // A real pull-through cache of the origin, and a proxy in front of it that
    // corrupts one layer: a mirror that lies.
    let mirror = Registry::start_with(&format!("proxy:\n  remoteurl: http://{}\n", origin.addr));
    let lied = layers[2].digest.clone();
    let at_mirror = Proxy::start("127.0.0.1", &mirror.addr, move |r| {
        if r.path.ends_with(&lied) {
            Action::Corrupt
        } else {
            Action::Pass
        }
    });
    let env = TestEnv::new();
    let out = fetch_with_mirror(&env, &at_origin.addr, &at_mirror.addr, &img.digest, &[]);
    assert_ok(&out);
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "mirror http://{}: blob {}",
            at_mirror.addr, layers[2].digest
        )) && err.contains("trying the next source"),
        "{err}"
    );
    // The mirror served the manifest and all but the lying layer.
    let from_mirror = at_mirror.seen_settled();
    assert!(
        from_mirror
            .iter()
            .any(|s| s.request.is_manifest() && s.status == 200)
    );
    assert_eq!(
        served(&from_mirror, &layers[1].digest),
        layers[1].bytes.len() as u64
    );
    // The origin was asked for the lying layer only.
    let from_origin: Vec<_> = at_origin
        .seen()
        .into_iter()
        .map(|s| s.request.path)
        .collect();
    assert_eq!(
        from_origin,
        [format!("/v2/pub/nix/blobs/{}", layers[2].digest)]
    );
    assert!(env.join("out/nix/store").is_dir());
}

#[test]
fn a_lie_unpacked_while_it_downloads_is_thrown_away_and_the_image_unpacked_again() {
    let origin = Registry::start();
    let (img, layers) = nix_image(&origin.addr, "pub/nix", "v1", &[(1, 100_000), (2, 100_000)]);
    // A store path of another image, in a layer of the very same size.
    let (_, foreign) = nix_image(&origin.addr, "pub/nix", "other", &[(3, 100_000)]);
    assert_eq!(foreign[1].bytes.len(), layers[2].bytes.len());
    let mirror = Registry::start_with(&format!("proxy:\n  remoteurl: http://{}\n", origin.addr));
    // The mirror serves the foreign layer for the image's last one, and
    // pauses halfway, so hydrafy's decoder takes in part of the lie (and
    // writes its files to staging) before the digest can be checked.
    let (lied, instead) = (layers[2].digest.clone(), foreign[1].digest.clone());
    let half = layers[2].bytes.len() as u64 / 2;
    let at_mirror = Proxy::start("127.0.0.1", &mirror.addr, move |r| {
        if r.path.ends_with(&lied) {
            Action::ForwardPausing(
                format!("/v2/pub/nix/blobs/{instead}"),
                half,
                Duration::from_millis(800),
            )
        } else {
            Action::Pass
        }
    });
    let env = TestEnv::new();
    let out = fetch_with_mirror(&env, &origin.addr, &at_mirror.addr, &img.digest, &[]);
    assert_ok(&out);
    let err = stderr(&out);
    assert!(
        err.contains(&format!("blob {}: content hashes to", layers[2].digest))
            && err.contains("unpacking again from verified blobs"),
        "{err}"
    );
    let mut store: Vec<String> = std::fs::read_dir(env.join("out/nix/store"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    store.sort();
    assert_eq!(
        store,
        [format!("{:032}-p", 1), format!("{:032}-p", 2)],
        "only the image's store paths, none of the lie's"
    );
}

#[test]
fn a_mirror_serving_another_image_for_the_pinned_digest_is_skipped() {
    let origin = Registry::start();
    let (img, _) = nix_image(&origin.addr, "pub/nix", "v1", &[(1, 1000)]);
    // Another registry with another image under the same name and tag; its
    // proxy answers every manifest request with that tag's manifest.
    let other = Registry::start();
    nix_image(&other.addr, "pub/nix", "v1", &[(9, 1000)]);
    let lying = Proxy::start("127.0.0.1", &other.addr, |r| {
        if r.is_manifest() {
            Action::Forward("/v2/pub/nix/manifests/v1".into())
        } else {
            Action::Pass
        }
    });
    let env = TestEnv::new();
    let out = fetch_with_mirror(&env, &origin.addr, &lying.addr, &img.digest, &["--json"]);
    assert_ok(&out);
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "mirror http://{}: manifest {}: content hashes to",
            lying.addr, img.digest
        )),
        "{err}"
    );
    assert_eq!(json(&out)["digest"], img.digest);
}

#[test]
fn a_mirror_that_trickles_a_blob_is_given_up_on_for_the_origin() {
    let origin = Registry::start();
    let seeds = [(1, 50_000), (2, 50_000)];
    let (img, layers) = nix_image(&origin.addr, "pub/nix", "v1", &seeds);
    let at_origin = Proxy::start("127.0.0.1", &origin.addr, |_| Action::Pass);
    let mirror = Registry::start_with(&format!("proxy:\n  remoteurl: http://{}\n", origin.addr));
    let slow = layers[2].digest.clone();
    let at_mirror = Proxy::start("127.0.0.1", &mirror.addr, move |r| {
        if r.path.ends_with(&slow) {
            Action::Trickle(Duration::from_millis(500))
        } else {
            Action::Pass
        }
    });
    let env = TestEnv::new();
    let reference = format!("{}/pub/nix@{}", at_origin.addr, img.digest);
    let mirror_arg = format!("{}=http://{}", at_origin.addr, at_mirror.addr);
    let out = run_within(
        hydrafy(&env).env("HYDRAFY_LOW_SPEED", "1000/1").args([
            "fetch",
            "--plain-http",
            "--mirror",
            &mirror_arg,
            &reference,
            "-o",
            "out",
        ]),
        HANG,
    );
    assert_ok(&out);
    assert_seed(&env.join("out"), &seeds);
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "mirror http://{}: blob {}",
            at_mirror.addr, layers[2].digest
        )) && err.contains("transfer too slow: ")
            && err.contains("(floor 1000 B/s)")
            && err.contains("trying the next source"),
        "{err}"
    );
    assert_eq!(
        gets_of(&at_mirror.seen_settled(), &layers[2].digest).len(),
        5,
        "each slow transfer is a failed attempt"
    );
    let from_origin: Vec<_> = at_origin
        .seen_settled()
        .into_iter()
        .map(|s| s.request.path)
        .collect();
    assert_eq!(
        from_origin,
        [format!("/v2/pub/nix/blobs/{}", layers[2].digest)],
        "the origin is asked for the blob the mirror trickled, and only that"
    );
}

// ---------------------------------------------------------------------- TLS

#[test]
fn a_registry_with_a_private_ca_needs_ca_cert_and_http_needs_plain_http() {
    let plain = Registry::start();
    let (img, _) = nix_image(&plain.addr, "pub/nix", "v1", &[(1, 1000)]);
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(pki_dir.path());
    let tls = Registry::start_sharing(&pki.registry_config(), &plain);
    let env = TestEnv::new();
    let over_tls = format!("{}/pub/nix@{}", tls.addr, img.digest);

    let out = run(&env, &["fetch", &over_tls, "-o", "out"]);
    assert_fails(&out, 1, &["127.0.0.1", "certificate", "--ca-cert"]);
    assert!(!env.join("out").exists());

    let ca = pki.ca_pem.display().to_string();
    assert_ok(&run(
        &env,
        &["fetch", "--ca-cert", &ca, "-q", &over_tls, "-o", "out"],
    ));
    assert!(env.join("out/nix/store").is_dir());

    // HTTP is spoken only when asked for: without --plain-http, an HTTP-only
    // registry is a TLS failure that says so.
    let over_http = format!("{}/pub/nix@{}", plain.addr, img.digest);
    let out = run(&env, &["fetch", &over_http, "-o", "other"]);
    assert_fails(&out, 1, &["127.0.0.1", "--plain-http"]);
    assert!(!env.join("other").exists());
}

// ------------------------------------------------------ proxies from the env

#[test]
fn https_proxy_tunnels_with_connect_and_sends_the_proxy_credentials_from_its_url() {
    let plain = Registry::start();
    let (img, _) = nix_image(&plain.addr, "pub/nix", "v1", &[(1, 1000)]);
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(pki_dir.path());
    let tls = Registry::start_sharing(&pki.registry_config(), &plain);
    let tunnel = Tunnel::start(true);
    let env = TestEnv::new();
    let reference = format!("{}/pub/nix@{}", tls.addr, img.digest);
    let ca = pki.ca_pem.display().to_string();
    let fetch = |proxy: &str, out: &str| {
        hydrafy(&env)
            .env("HTTPS_PROXY", proxy)
            .args([
                "fetch",
                "--ca-cert",
                &ca,
                "--no-cache",
                "-q",
                &reference,
                "-o",
                out,
            ])
            .output()
            .unwrap()
    };

    // The proxy wants credentials: without them, a clear failure.
    let out = fetch(&format!("http://{}", tunnel.addr), "refused");
    assert_fails(
        &out,
        1,
        &[
            &tls.addr,
            "proxy wants credentials",
            "HTTPS_PROXY=http://USER:PASSWORD@",
        ],
    );
    assert!(!env.join("refused").exists());
    assert_eq!(tunnel.connects().len(), 1, "a 407 is final, not retried");

    let out = fetch(&format!("http://build:s3cret@{}", tunnel.addr), "out");
    assert_ok(&out);
    assert!(env.join("out/nix/store").is_dir());
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("build:s3cret")
    );
    let connects = tunnel.connects();
    assert!(
        connects
            .iter()
            .any(|(t, a)| t == &format!("CONNECT {}", tls.addr) && a.as_deref() == Some(&basic)),
        "{connects:?}"
    );
    assert!(
        connects.iter().all(|(t, _)| t.starts_with("CONNECT ")),
        "TLS requests only ever go through a tunnel: {connects:?}"
    );
}

#[test]
fn http_proxy_from_the_environment_carries_the_requests_and_no_proxy_bypasses_it() {
    let reg = Registry::start();
    let (img, layers) = nix_image(&reg.addr, "pub/nix", "v1", &[(1, 1000)]);
    // A forward proxy: requests arrive in absolute form and go on to the registry.
    let forward = Proxy::start("127.0.0.1", &reg.addr, |_| Action::Pass);
    let env = TestEnv::new();
    let reference = format!("{}/pub/nix@{}", reg.addr, img.digest);
    let out = hydrafy(&env)
        .env("HTTP_PROXY", format!("http://{}", forward.addr))
        .args(["fetch", "--plain-http", "-q", &reference, "-o", "out"])
        .output()
        .unwrap();
    assert_ok(&out);
    let paths: Vec<_> = forward
        .seen_settled()
        .into_iter()
        .map(|s| s.request.path)
        .collect();
    let prefix = format!("http://{}/v2/pub/nix/", reg.addr);
    assert!(
        paths
            .iter()
            .any(|p| p == &format!("{prefix}manifests/{}", img.digest)),
        "{paths:?}"
    );
    assert!(
        paths
            .iter()
            .any(|p| p == &format!("{prefix}blobs/{}", layers[1].digest)),
        "{paths:?}"
    );
    assert!(paths.iter().all(|p| p.starts_with(&prefix)), "{paths:?}");

    let before = forward.seen_settled().len();
    let out = hydrafy(&env)
        .env("HTTP_PROXY", format!("http://{}", forward.addr))
        .env("NO_PROXY", "127.0.0.1")
        .args([
            "fetch",
            "--plain-http",
            "--no-cache",
            "-q",
            &reference,
            "-o",
            "direct",
        ])
        .output()
        .unwrap();
    assert_ok(&out);
    assert_eq!(forward.seen_settled().len(), before, "NO_PROXY is honoured");
}
