//! A token issuer as Docker Hub's auth.docker.io runs it, for a real
//! registry started with `auth: token`: it answers `GET /token?service=..&scope=..`
//! (anonymously, or with HTTP Basic credentials), and the OAuth2 form
//! `POST /token` with `grant_type=refresh_token` (an identity token), with
//! an ES256 JWT whose
//! header carries the signing certificate (`x5c`), signed by a CA the
//! registry trusts through `rootcertbundle`. The registry checks `iss`,
//! `aud` (one string), `exp`, `nbf`, the signature and the `access` claim.
//! Every request is logged so tests can count tokens and see credentials.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

pub const ISSUER: &str = "hydrafy-test-issuer";
pub const SERVICE: &str = "hydrafy-test-registry";
/// distribution accepts a token this long past its `exp` (and before its `nbf`).
const REGISTRY_LEEWAY: i64 = 60;

/// Who may pull what, and how long tokens last.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Repositories anyone may pull.
    pub public: Vec<String>,
    /// `user:password` that may pull every repository.
    pub user: Option<(String, String)>,
    /// An OAuth2 refresh token (docker's `identitytoken`) that may pull
    /// every repository.
    pub refresh_token: Option<String>,
    /// `expires_in` in the answer: how long the client may use the token.
    pub expires_in: u64,
    /// How long the registry accepts the token (its `exp`, leeway included).
    pub valid_for: u64,
}

/// One request to the issuer.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub method: String,
    /// The query of a GET, the form body of a POST.
    pub query: String,
    /// The Basic user, when credentials were sent.
    pub user: Option<String>,
    pub status: u16,
    /// What the token grants (`repository:NAME:pull` entries).
    pub granted: Vec<String>,
}

pub struct Issuer {
    pub addr: String,
    pub log: Arc<Mutex<Vec<TokenRequest>>>,
    /// The CA the registry must trust (`rootcertbundle`).
    pub ca_pem: PathBuf,
    stop: Arc<AtomicBool>,
    _dir: tempfile::TempDir,
}

impl Issuer {
    pub fn start(policy: Policy) -> Issuer {
        let dir = tempfile::Builder::new()
            .prefix("hydrafy-issuer-")
            .tempdir()
            .unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "hydrafy test token CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let ca_issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut leaf_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "hydrafy test token signer");
        let leaf = leaf_params.signed_by(&key, &ca_issuer).unwrap();
        let ca_pem = dir.path().join("token-ca.pem");
        std::fs::write(&ca_pem, ca_cert.pem()).unwrap();
        let signer =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &key.serialize_der())
                .unwrap();
        let x5c = STANDARD.encode(leaf.der());

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let signer = Arc::new(signer);
        {
            let (log, stop) = (Arc::clone(&log), Arc::clone(&stop));
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (log, signer, policy, x5c) = (
                        Arc::clone(&log),
                        Arc::clone(&signer),
                        policy.clone(),
                        x5c.clone(),
                    );
                    std::thread::spawn(move || {
                        let _ = answer(conn, &policy, &signer, &x5c, &log);
                    });
                }
            });
        }
        Issuer {
            addr,
            log,
            ca_pem,
            stop,
            _dir: dir,
        }
    }

    /// The registry config that trusts this issuer.
    pub fn registry_config(&self) -> String {
        self.registry_config_via(&self.addr)
    }

    /// The registry config that trusts this issuer and sends clients to the
    /// realm at `realm_addr` (a proxy in front of the issuer, to stage faults).
    pub fn registry_config_via(&self, realm_addr: &str) -> String {
        format!(
            "auth:\n  token:\n    realm: http://{realm_addr}/token\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
            self.ca_pem.display()
        )
    }

    pub fn requests(&self) -> Vec<TokenRequest> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Issuer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(&self.addr);
    }
}

fn answer(
    conn: std::net::TcpStream,
    policy: &Policy,
    signer: &EcdsaKeyPair,
    x5c: &str,
    log: &Mutex<Vec<TokenRequest>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut conn = conn;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let method = line.split_whitespace().next().unwrap_or("").to_string();
    let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut basic = None;
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.trim().eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap_or(0);
        }
        if let Some((k, v)) = h.split_once(':')
            && k.trim().eq_ignore_ascii_case("authorization")
        {
            basic = v
                .trim()
                .strip_prefix("Basic ")
                .and_then(|b| STANDARD.decode(b).ok())
                .map(|b| String::from_utf8_lossy(&b).into_owned());
        }
    }
    let query = if method == "POST" {
        let mut body = vec![0u8; length.min(1 << 16)];
        std::io::Read::read_exact(&mut reader, &mut body)?;
        String::from_utf8_lossy(&body).into_owned()
    } else {
        target.split_once('?').map_or("", |(_, q)| q).to_string()
    };
    let params: Vec<(String, String)> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect();
    let get = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let refresh = (method == "POST" && get("grant_type").as_deref() == Some("refresh_token"))
        .then(|| get("refresh_token").unwrap_or_default());
    let user = match &refresh {
        Some(_) => Some("<identity token>".to_string()),
        None => basic
            .as_ref()
            .map(|b| b.split_once(':').map_or(b.as_str(), |(u, _)| u).to_string()),
    };
    if let Some(token) = &refresh
        && policy.refresh_token.as_ref() != Some(token)
    {
        let body = r#"{"error":"invalid_grant"}"#;
        write!(
            conn,
            "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        log.lock().unwrap().push(TokenRequest {
            method,
            query,
            user,
            status: 400,
            granted: Vec::new(),
        });
        return Ok(());
    }
    let authenticated = match (&refresh, &basic, &policy.user) {
        (Some(_), _, _) => Some(true),
        (None, None, _) => Some(false),
        (None, Some(b), Some((u, p))) if *b == format!("{u}:{p}") => Some(true),
        (None, Some(_), _) => None,
    };
    let Some(authenticated) = authenticated else {
        let body = r#"{"details":"incorrect username or password"}"#;
        write!(
            conn,
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        log.lock().unwrap().push(TokenRequest {
            method,
            query,
            user,
            status: 401,
            granted: Vec::new(),
        });
        return Ok(());
    };
    // Grant what the policy allows of what was asked, like Docker Hub: an
    // anonymous request for a private repository gets a token granting nothing.
    let mut access = Vec::new();
    let mut granted = Vec::new();
    if let Some(scope) = get("scope") {
        let mut parts = scope.splitn(3, ':');
        if let (Some("repository"), Some(name), Some(actions)) =
            (parts.next(), parts.next(), parts.next())
            && actions.split(',').any(|a| a == "pull")
            && (authenticated || policy.public.iter().any(|p| p == name))
        {
            access
                .push(serde_json::json!({"type": "repository", "name": name, "actions": ["pull"]}));
            granted.push(format!("repository:{name}:pull"));
        }
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [x5c]});
    let claims = serde_json::json!({
        "iss": ISSUER,
        "sub": user.clone().unwrap_or_default(),
        "aud": get("service").unwrap_or_default(),
        "exp": now as i64 + policy.valid_for as i64 - REGISTRY_LEEWAY,
        "nbf": now - 1,
        "iat": now,
        "jti": format!("{:016x}", fastrand::u64(..)),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = signer
        .sign(&SystemRandom::new(), signing_input.as_bytes())
        .unwrap();
    let token = format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.as_ref())
    );
    let body =
        serde_json::json!({"token": token, "access_token": token, "expires_in": policy.expires_in})
            .to_string();
    write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    log.lock().unwrap().push(TokenRequest {
        method,
        query,
        user,
        status: 200,
        granted,
    });
    Ok(())
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => out.push(b),
                    Err(_) => out.extend_from_slice(&bytes[i..i + 3]),
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
