//! A small HTTP/1.1 proxy placed in front of the real registry, for what a
//! real server cannot do on demand: stall, cut a transfer, answer 503 or 429,
//! redirect, or lie about bytes. Each request is decided by a rule that sees
//! the method, path and headers (and how many requests came before it), and
//! every request is logged with what was sent back, so a test can assert on
//! byte counts and headers.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A request as the proxy saw it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// How many requests the proxy saw before this one.
    pub index: usize,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn is_blob(&self) -> bool {
        self.path.contains("/blobs/sha256:")
    }

    pub fn is_manifest(&self) -> bool {
        self.path.contains("/manifests/")
    }
}

/// What to do with a request.
#[derive(Clone, Debug)]
pub enum Action {
    /// Forward to the upstream and relay the answer.
    Pass,
    /// Answer this status with these headers and body, without asking upstream.
    Status(u16, Vec<(String, String)>, String),
    /// Relay the answer but close the connection after this many body bytes.
    CutAfter(u64),
    /// Relay this many body bytes, then send nothing more (until the client gives up).
    StallAfter(u64),
    /// Answer 307 with this Location.
    Redirect(String),
    /// Relay the answer with one body byte changed (a lying mirror or CDN).
    Corrupt,
    /// Forward without the Range header (a server that ignores Range).
    IgnoreRange,
    /// Forward at once, but hold the answer back this long (a slow link).
    Delay(Duration),
    /// Forward this path instead (a mirror that serves something else).
    Forward(String),
    /// Close the connection without answering (a reset before any response).
    Drop,
    /// Relay this many body bytes, then pause this long, then relay the rest.
    PauseAfter(u64, Duration),
    /// Forward this path instead, and pause as `PauseAfter` does (a lie that
    /// a reader has taken in part before the lie can be seen).
    ForwardPausing(String, u64, Duration),
    /// Relay the head at once, then the body one byte per interval (a
    /// source that trickles: never silent long enough for a read timeout).
    Trickle(Duration),
    /// Relay the head itself one byte per interval (a server that trickles
    /// its headers, or is as good as never answering).
    TrickleHead(Duration),
}

/// One logged exchange.
#[derive(Clone, Debug)]
pub struct Seen {
    pub request: Request,
    pub status: u16,
    pub body_bytes: u64,
}

type Rule = dyn Fn(&Request) -> Action + Send + Sync;

pub struct Proxy {
    pub addr: String,
    pub log: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    /// Exchanges still being served (logged only when they end).
    in_flight: Arc<AtomicUsize>,
}

impl Proxy {
    /// Listen on `bind_ip` (a loopback address) and forward to `upstream` (`host:port`).
    pub fn start(
        bind_ip: &str,
        upstream: &str,
        rule: impl Fn(&Request) -> Action + Send + Sync + 'static,
    ) -> Proxy {
        let listener = TcpListener::bind(format!("{bind_ip}:0")).expect("bind proxy");
        let addr = listener.local_addr().unwrap().to_string();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let rule: Arc<Rule> = Arc::new(rule);
        let counter = Arc::new(AtomicUsize::new(0));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let upstream = upstream.to_string();
        {
            let (log, stop, in_flight) =
                (Arc::clone(&log), Arc::clone(&stop), Arc::clone(&in_flight));
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (log, rule, counter, upstream, stop) = (
                        Arc::clone(&log),
                        Arc::clone(&rule),
                        Arc::clone(&counter),
                        upstream.clone(),
                        Arc::clone(&stop),
                    );
                    in_flight.fetch_add(1, Ordering::SeqCst);
                    let in_flight = Arc::clone(&in_flight);
                    std::thread::spawn(move || {
                        let logged = AtomicBool::new(false);
                        let _ = serve(conn, &upstream, &*rule, &counter, &log, &stop, &|| {
                            logged.store(true, Ordering::SeqCst);
                            in_flight.fetch_sub(1, Ordering::SeqCst);
                        });
                        if !logged.load(Ordering::SeqCst) {
                            in_flight.fetch_sub(1, Ordering::SeqCst);
                        }
                    });
                }
            });
        }
        Proxy {
            addr,
            log,
            stop,
            in_flight,
        }
    }

    /// Everything logged so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.log.lock().unwrap().clone()
    }

    /// Everything logged once the exchanges in progress have ended (a client
    /// may exit before the proxy thread logs the answer it relayed). Gives up
    /// waiting after a few seconds (a stalled exchange never ends).
    pub fn seen_settled(&self) -> Vec<Seen> {
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while self.in_flight.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.seen()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(&self.addr);
    }
}

fn serve(
    client: TcpStream,
    upstream: &str,
    rule: &Rule,
    counter: &AtomicUsize,
    log: &Mutex<Vec<Seen>>,
    stop: &AtomicBool,
    logged: &dyn Fn(),
) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut client = client;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let request = Request {
        method: method.clone(),
        path: path.clone(),
        headers: headers.clone(),
        index: counter.fetch_add(1, Ordering::SeqCst),
    };
    let action = rule(&request);
    let record = |status: u16, body_bytes: u64| {
        log.lock().unwrap().push(Seen {
            request: request.clone(),
            status,
            body_bytes,
        });
        logged();
    };
    match action {
        Action::Status(code, extra, body) => {
            let mut head = format!(
                "HTTP/1.1 {code} Status\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            for (k, v) in extra {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            client.write_all(head.as_bytes())?;
            if method != "HEAD" {
                client.write_all(body.as_bytes())?;
            }
            record(code, 0);
            return Ok(());
        }
        Action::Drop => {
            record(0, 0);
            return Ok(());
        }
        Action::Redirect(location) => {
            let head = format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            client.write_all(head.as_bytes())?;
            record(307, 0);
            return Ok(());
        }
        _ => {}
    }
    let mut up = TcpStream::connect(upstream)?;
    let up_path = match &action {
        Action::Forward(p) | Action::ForwardPausing(p, ..) => p.clone(),
        _ => path.clone(),
    };
    let mut req = format!("{method} {up_path} HTTP/1.1\r\n");
    for (k, v) in &headers {
        if k.eq_ignore_ascii_case("connection")
            || k.eq_ignore_ascii_case("host")
            || (matches!(action, Action::IgnoreRange) && k.eq_ignore_ascii_case("range"))
        {
            continue;
        }
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Host: {upstream}\r\nConnection: close\r\n\r\n"));
    up.write_all(req.as_bytes())?;
    let mut up_reader = BufReader::new(up);
    let mut status_line = String::new();
    up_reader.read_line(&mut status_line)?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(502);
    let mut head = status_line.clone();
    loop {
        let mut h = String::new();
        up_reader.read_line(&mut h)?;
        if h.trim_end().is_empty() {
            break;
        }
        if h.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        head.push_str(&h);
    }
    head.push_str("Connection: close\r\n\r\n");
    if let Action::Delay(d) = &action {
        std::thread::sleep(*d);
    }
    if let Action::TrickleHead(every) = action {
        // Until the client gives up (a write fails) or the head is out.
        for byte in head.as_bytes() {
            if client.write_all(&[*byte]).is_err() {
                break;
            }
            std::thread::sleep(every);
        }
        record(status, 0);
        return Ok(());
    }
    client.write_all(head.as_bytes())?;
    let limit = match action {
        Action::CutAfter(n) | Action::StallAfter(n) => Some(n),
        _ => None,
    };
    let mut sent = 0u64;
    if let Action::Trickle(every) = action {
        let mut byte = [0u8; 1];
        while up_reader.read(&mut byte)? == 1 {
            if client.write_all(&byte).is_err() {
                break;
            }
            sent += 1;
            std::thread::sleep(every);
        }
        record(status, sent);
        return Ok(());
    }
    let mut buf = vec![0u8; 64 << 10];
    let mut corrupted = false;
    let mut paused = false;
    loop {
        if let Action::PauseAfter(n, pause) | Action::ForwardPausing(_, n, pause) = &action
            && !paused
            && sent >= *n
        {
            paused = true;
            client.flush()?;
            std::thread::sleep(*pause);
        }
        let want = match (limit, &action) {
            (_, Action::PauseAfter(n, _) | Action::ForwardPausing(_, n, _)) if !paused => {
                buf.len().min((n - sent) as usize).max(1)
            }
            _ => match limit {
                Some(n) if sent >= n => break,
                Some(n) => buf.len().min((n - sent) as usize),
                None => buf.len(),
            },
        };
        let k = up_reader.read(&mut buf[..want])?;
        if k == 0 {
            break;
        }
        if matches!(action, Action::Corrupt) && !corrupted {
            buf[0] ^= 0xff;
            corrupted = true;
        }
        if client.write_all(&buf[..k]).is_err() {
            break;
        }
        sent += k as u64;
    }
    record(status, sent);
    if matches!(action, Action::StallAfter(_)) {
        client.flush()?;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// A forward proxy for `https://` URLs, as corporate networks run them: the
/// client asks `CONNECT host:port`, the tunnel answers 200 and relays the
/// (encrypted) bytes both ways. It logs each CONNECT target with the
/// Proxy-Authorization header it carried, and refuses with 407 when it
/// wants credentials and got none.
pub struct Tunnel {
    pub addr: String,
    /// (target, Proxy-Authorization) per CONNECT.
    connects: Arc<ConnectLog>,
}

impl Tunnel {
    pub fn start(require_auth: bool) -> Tunnel {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind tunnel");
        let addr = listener.local_addr().unwrap().to_string();
        let connects = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&connects);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    let _ = tunnel(conn, &log, require_auth);
                });
            }
        });
        Tunnel { addr, connects }
    }

    pub fn connects(&self) -> Vec<(String, Option<String>)> {
        self.connects.lock().unwrap().clone()
    }
}

type ConnectLog = Mutex<Vec<(String, Option<String>)>>;

fn tunnel(client: TcpStream, log: &ConnectLog, require_auth: bool) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut auth = None;
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("proxy-authorization")
        {
            auth = Some(v.trim().to_string());
        }
    }
    log.lock()
        .unwrap()
        .push((format!("{method} {target}"), auth.clone()));
    let mut client = client;
    if method != "CONNECT" {
        return client.write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n");
    }
    if require_auth && auth.is_none() {
        return client.write_all(
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"proxy\"\r\nContent-Length: 0\r\n\r\n",
        );
    }
    let mut upstream = TcpStream::connect(target)?;
    client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
    // Bytes the client sent after the head are already in the reader's buffer.
    upstream.write_all(reader.buffer())?;
    let (mut up_read, mut client_write) = (upstream.try_clone()?, client.try_clone()?);
    let back = std::thread::spawn(move || std::io::copy(&mut up_read, &mut client_write));
    let _ = std::io::copy(&mut reader, &mut upstream);
    let _ = upstream.shutdown(std::net::Shutdown::Write);
    let _ = back.join();
    Ok(())
}
