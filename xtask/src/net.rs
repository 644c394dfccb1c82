//! Ports and a tiny HTTP/1.1 client over `std::net::TcpStream`.
//!
//! The launcher only needs "is this port taken?" and "does this URL answer 200?". A plain GET
//! with `Connection: close` covers both without pulling an async HTTP stack into a crate that
//! the services' tests also compile.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Ports [`free_port`] picks from: below Linux's default ephemeral range (32768-60999), so a
/// port we hand out is never also picked by the kernel for someone's outgoing connection (which
/// would make a server's restart on the same port fail), and clear of the ports the fleet and
/// the machine's own services use (see fleet.rs; 15672 is RabbitMQ's management port).
const PICK_RANGE: std::ops::Range<u16> = 10_000..25_000;
const RESERVED: std::ops::RangeInclusive<u16> = 15_670..=15_680;

/// A port on 127.0.0.1 that is free now and that this process has not handed out before.
/// Another process may still take it before you bind it; with random picks from 15,000 ports
/// that is rare enough for tests.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut seen = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let seen = seen.get_or_insert_with(HashSet::new);
    for _ in 0..1000 {
        let port = random_in(PICK_RANGE);
        if !RESERVED.contains(&port) && !seen.contains(&port) && port_is_free(port) {
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

/// `http://host:port/path` split into (host, port, path).
fn parse_url(url: &str) -> Result<(String, u16, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("only http:// URLs are supported: {url}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().with_context(|| format!("bad port in {url}"))?),
        None => (authority, 80),
    };
    if host.is_empty() {
        bail!("no host in {url}");
    }
    Ok((host.to_string(), port, path.to_string()))
}

/// One `GET` with `Connection: close`, everything (connect, send, read) within `timeout`.
pub fn http_get(url: &str, timeout: Duration) -> Result<HttpResponse> {
    let (host, port, path) = parse_url(url)?;
    let addr = (host.as_str(), port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| anyhow!("cannot resolve {host}"))?;
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    stream.set_read_timeout(Some(left))?;
    stream.set_write_timeout(Some(left))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\nAccept: */*\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Result<HttpResponse> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("incomplete HTTP response"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok(HttpResponse {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Decodes a chunked body (chunk extensions and trailers ignored).
fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("truncated chunk header"))?;
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size_hex = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16)
            .with_context(|| format!("bad chunk size {size_hex:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or_default();
    }
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
    use std::io::BufRead;

    #[test]
    fn urls_are_split() {
        assert_eq!(
            parse_url("http://127.0.0.1:8000/stock/find/7").unwrap(),
            ("127.0.0.1".into(), 8000, "/stock/find/7".into())
        );
        assert_eq!(
            parse_url("http://localhost").unwrap(),
            ("localhost".into(), 80, "/".into())
        );
        assert!(parse_url("https://x/").is_err());
        assert!(parse_url("http://:80/").is_err());
    }

    #[test]
    fn responses_are_parsed_plain_and_chunked() {
        let plain = b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno";
        assert_eq!(
            parse_response(plain).unwrap(),
            HttpResponse {
                status: 404,
                body: "no".into()
            }
        );
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3;x=1\r\n:1}\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap().body, "{\"a\":1}");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }

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
