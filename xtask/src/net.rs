//! Ports, and `GET` through ureq's blocking client.
//!
//! The launcher only needs "is this port taken?" and "does this URL answer 200?", from plain
//! threads: a blocking client answers the second without an async runtime in the caller.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Ports [`free_port`] picks from: below Linux's default ephemeral range (32768-60999), so a
/// port we hand out is never also picked by the kernel for someone's outgoing connection (which
/// would make a server's restart on the same port fail), and clear of the ports the fleet and
/// the machine's own services use (see fleet.rs; 15672 is RabbitMQ's management port).
const PICK_RANGE: std::ops::Range<u16> = 10_000..25_000;
const RESERVED: std::ops::RangeInclusive<u16> = 15_670..=15_680;

/// A port on 127.0.0.1 that is free now, that this process has not handed out before and that
/// no other running process handed out through this function. Something else may still take
/// it before you bind it: rare enough for tests.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut seen = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let seen = seen.get_or_insert_with(HashSet::new);
    for _ in 0..1000 {
        let port = random_in(PICK_RANGE);
        if !RESERVED.contains(&port)
            && !seen.contains(&port)
            && port_is_free(port)
            && claim_port(port)
        {
            seen.insert(port);
            return port;
        }
    }
    // Practically unreachable; let the kernel choose rather than fail.
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot bind 127.0.0.1:0")
}

/// Claims `port` among processes: `cargo test` runs test binaries side by side, and two of them
/// could both find a port free and both start a server on it (a CI run failed so: "port ...
/// is already in use"). A claim is an exclusive `flock` on a file named after the port, in a
/// directory under the system's temp dir, held until this process exits (the kernel drops
/// it then, however the process ends). Without a usable temp dir every port counts as
/// claimed by us (the bind probe alone decides).
fn claim_port(port: u16) -> bool {
    use std::fs::{self, File, OpenOptions};
    use std::os::fd::AsRawFd;
    use std::sync::Mutex;
    static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("xtask-port-claims");
    if fs::create_dir_all(&dir).is_err() {
        return true;
    }
    let Ok(file) = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(port.to_string()))
    else {
        return true;
    };
    // SAFETY: flock on a descriptor this function owns; it stays open in HELD.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    if locked {
        HELD.lock().unwrap_or_else(|e| e.into_inner()).push(file);
    }
    locked
}

/// A pseudo-random number in `range` (std's randomly keyed hasher, fed with a counter).
fn random_in(range: std::ops::Range<u16>) -> u16 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    range.start + (h.finish() % u64::from(range.end - range.start)) as u16
}

/// True when nothing listens on `port` (we can bind 127.0.0.1:port ourselves). A listener on
/// 0.0.0.0:port also makes this false, as it would make our server fail.
pub fn port_is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// True when something accepts TCP connections on 127.0.0.1:port.
pub fn port_is_open(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

/// A response of [`http_get`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

/// One `GET`, everything (connect, send, read) within `timeout`; any status is a response.
pub fn http_get(url: &str, timeout: Duration) -> Result<HttpResponse> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        // Every URL here is the fleet's own, on this machine: never through a proxy from
        // the environment.
        .proxy(None)
        .build()
        .into();
    let mut response = agent
        .get(url)
        .call()
        .with_context(|| format!("GET {url}"))?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .with_context(|| format!("GET {url}: reading the body"))?;
    Ok(HttpResponse { status, body })
}

/// Polls `url` until it answers 200, or fails after `timeout` with the last status or error.
pub fn wait_http_ok(url: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match http_get(url, Duration::from_secs(2)) {
            Ok(r) if r.status == 200 => return Ok(()),
            Ok(r) => format!("status {}: {}", r.status, r.body.trim()),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            bail!(
                "{url} did not answer 200 within {} s (last: {last})",
                timeout.as_secs()
            );
        }
        sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, Write};

    #[test]
    fn free_ports_are_distinct_and_outside_the_ephemeral_range() {
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len());
        assert!(ports
            .iter()
            .all(|p| PICK_RANGE.contains(p) && !RESERVED.contains(p)));
    }

    #[test]
    fn a_claimed_port_is_not_claimed_again() {
        let port = free_port();
        assert!(!claim_port(port), "{port} was handed out, so it is claimed");
        // Another process sees the claim as well: `flock` from a shell on the same file.
        let claim = std::env::temp_dir()
            .join("xtask-port-claims")
            .join(port.to_string());
        let other = std::process::Command::new("flock")
            .args(["--nonblock", "--exclusive"])
            .arg(&claim)
            .arg("true")
            .status();
        match other {
            Ok(status) => assert!(!status.success(), "another process could take the claim"),
            Err(e) => eprintln!("flock(1) not runnable ({e}): the cross-process check skipped"),
        }
    }

    #[test]
    fn free_port_is_free_and_taken_port_is_not() {
        let port = free_port();
        assert!(port_is_free(port));
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
        assert!(!port_is_free(port));
        assert!(port_is_open(port));
        drop(listener);
    }

    #[test]
    fn get_and_wait_against_a_one_shot_server() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            // First request: 503, second: 200.
            for status in ["503 Service Unavailable", "200 OK"] {
                let (mut s, _) = listener.accept().unwrap();
                let mut reader = std::io::BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap() > 0 && line != "\r\n" {
                    line.clear();
                }
                write!(s, "HTTP/1.1 {status}\r\nContent-Length: 2\r\n\r\nok").unwrap();
            }
        });
        wait_http_ok(
            &format!("http://127.0.0.1:{port}/ready"),
            Duration::from_secs(10),
        )
        .unwrap();
        server.join().unwrap();
    }
}
