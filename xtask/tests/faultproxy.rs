//! The fault proxy between a plain RESP client and a real redis-server.
//!
//! Unlike the process-kit tests these do not skip when redis-server is missing: the services'
//! fault tests rely on the proxy, so a machine that cannot run these must fail loudly.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::Result;
use redis::Value;
use xtask::faultproxy::Mode;
use xtask::resp;
use xtask::{free_port, FaultProxy, RedisServer, ScratchDir};

/// How long a client waits for a reply that the proxy is expected to swallow.
const NO_REPLY_WAIT: Duration = Duration::from_millis(700);

/// A RESP client on a raw stream, so the tests can see timeouts and resets as such and send
/// a command in pieces; redis-rs encodes the commands and parses the replies.
struct Client {
    stream: TcpStream,
    parser: redis::Parser,
}

impl Client {
    fn connect(proxy: &FaultProxy) -> Result<Client> {
        let stream = TcpStream::connect_timeout(&proxy.addr(), Duration::from_secs(2))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        stream.set_write_timeout(Some(Duration::from_secs(3)))?;
        Ok(Client {
            stream,
            parser: redis::Parser::new(),
        })
    }

    fn send(&mut self, bytes: &[u8]) -> Result<()> {
        Ok(self.stream.write_all(bytes)?)
    }

    /// The next reply; a failed read is an io::Error of the read's own kind (redis-rs wraps
    /// it in its own error, and the tests tell a reset from a timeout by that kind).
    fn read(&mut self, timeout: Duration) -> Result<Value> {
        self.stream.set_read_timeout(Some(timeout))?;
        let mut reading = Reading {
            stream: &self.stream,
            failed: None,
        };
        self.parser
            .parse_value(&mut reading)
            .map_err(|e| match reading.failed {
                Some(kind) => std::io::Error::new(kind, e.to_string()).into(),
                None => e.into(),
            })
    }

    fn command(&mut self, args: &[&str]) -> Result<Value> {
        self.send(&encode(args))?;
        self.read(Duration::from_secs(3))
    }
}

/// The stream as the parser reads it, keeping the kind of a failed read.
struct Reading<'a> {
    stream: &'a TcpStream,
    failed: Option<ErrorKind>,
}

impl Read for Reading<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let read = (&*self.stream).read(buf);
        if let Err(e) = &read {
            self.failed = Some(e.kind());
        }
        read
    }
}

/// The command as redis-rs puts it on the wire.
fn encode(args: &[&str]) -> Vec<u8> {
    let mut cmd = redis::Cmd::new();
    for a in args {
        cmd.arg(*a);
    }
    cmd.get_packed_command()
}

/// The io::ErrorKind behind a failed read or write, if any.
fn io_kind(e: &anyhow::Error) -> Option<ErrorKind> {
    e.downcast_ref::<std::io::Error>().map(|e| e.kind())
}

fn is_timeout(e: &anyhow::Error) -> bool {
    matches!(
        io_kind(e),
        Some(ErrorKind::WouldBlock | ErrorKind::TimedOut)
    )
}

fn simple(s: &str) -> Value {
    match s {
        "OK" => Value::Okay,
        _ => Value::SimpleString(s.into()),
    }
}

fn bulk(s: &str) -> Value {
    Value::BulkString(s.as_bytes().to_vec())
}

/// A fresh redis-server and a proxy in front of it. A missing redis-server fails the test.
fn setup(name: &str) -> (ScratchDir, RedisServer, FaultProxy) {
    let dir = ScratchDir::new(name).unwrap();
    let redis = RedisServer::start(dir.path(), free_port(), None, None)
        .expect("redis-server must be installed for the fault proxy tests");
    let proxy = FaultProxy::start(redis.port()).unwrap();
    assert_eq!(proxy.target_port(), redis.port());
    assert_eq!(proxy.addr().port(), proxy.port());
    (dir, redis, proxy)
}

/// The value of `key` read directly from the server, bypassing the proxy.
fn direct_get(redis: &RedisServer, key: &str) -> Option<String> {
    resp::text(&redis.command(&["GET", key]).unwrap())
}

/// Waits until `key` holds `want` on the server itself.
fn wait_direct(redis: &RedisServer, key: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while direct_get(redis, key).as_deref() != Some(want) {
        assert!(
            Instant::now() < deadline,
            "{key} never became {want} on the server (is {:?})",
            direct_get(redis, key)
        );
        sleep(Duration::from_millis(10));
    }
}

/// The next reply on `client` is a connection reset (not a timeout, not a reply).
fn assert_reset(client: &mut Client) {
    let start = Instant::now();
    let err = client.read(Duration::from_secs(3)).unwrap_err();
    assert_eq!(
        io_kind(&err),
        Some(ErrorKind::ConnectionReset),
        "expected a reset, got {err:#} after {:?}",
        start.elapsed()
    );
}

#[test]
fn the_proxy_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<FaultProxy>();
}

#[test]
fn forward_passes_commands_both_ways() {
    let (_dir, redis, proxy) = setup("fp-forward");
    assert_eq!(proxy.mode(), Mode::Forward);
    let mut c = Client::connect(&proxy).unwrap();
    assert_eq!(c.command(&["PING"]).unwrap(), simple("PONG"));
    assert_eq!(c.command(&["SET", "k", "v"]).unwrap(), simple("OK"));
    assert_eq!(c.command(&["GET", "k"]).unwrap(), bulk("v"));
    assert_eq!(direct_get(&redis, "k").as_deref(), Some("v"));
    // A value larger than one read buffer arrives whole.
    let big = "x".repeat(200_000);
    assert_eq!(c.command(&["SET", "big", &big]).unwrap(), simple("OK"));
    assert_eq!(c.command(&["GET", "big"]).unwrap(), bulk(&big));
    // The crate's own client works through the proxy too.
    assert_eq!(
        resp::query(proxy.port(), None, &["GET", "k"]).unwrap(),
        bulk("v")
    );
    assert_eq!(proxy.connections(), 2);
    assert_eq!(proxy.fired(), 0);
}

#[test]
fn delay_slows_every_round_trip_until_switched_off() {
    let (_dir, _redis, proxy) = setup("fp-delay");
    let delay = Duration::from_millis(250);
    let mut c = Client::connect(&proxy).unwrap();
    let round_trip = |c: &mut Client| {
        let start = Instant::now();
        assert_eq!(c.command(&["PING"]).unwrap(), simple("PONG"));
        start.elapsed()
    };
    assert!(round_trip(&mut c) < delay);
    // Applies to an existing connection; request and reply are each held back.
    proxy.set_mode(Mode::Delay(delay));
    let slow = round_trip(&mut c);
    assert!(slow >= 2 * delay, "round trip took only {slow:?}");
    proxy.set_mode(Mode::Forward);
    assert!(round_trip(&mut c) < delay);
}

#[test]
fn drop_replies_runs_the_command_but_the_client_never_hears_back() {
    let (_dir, redis, proxy) = setup("fp-drop");
    let mut c = Client::connect(&proxy).unwrap();
    assert_eq!(c.command(&["PING"]).unwrap(), simple("PONG"));
    proxy.set_mode(Mode::DropReplies);
    c.send(&encode(&["INCR", "k"])).unwrap();
    let err = c.read(NO_REPLY_WAIT).unwrap_err();
    assert!(is_timeout(&err), "expected a timeout, got {err:#}");
    wait_direct(&redis, "k", "1");
    // New connections are affected too.
    let mut other = Client::connect(&proxy).unwrap();
    other.send(&encode(&["INCR", "k"])).unwrap();
    assert!(is_timeout(&other.read(NO_REPLY_WAIT).unwrap_err()));
    wait_direct(&redis, "k", "2");
    proxy.set_mode(Mode::Forward);
    let mut fresh = Client::connect(&proxy).unwrap();
    assert_eq!(fresh.command(&["INCR", "k"]).unwrap(), Value::Int(3));
}

#[test]
fn drop_reply_after_exec_loses_the_reply_and_resets_only_that_connection() {
    let (_dir, redis, proxy) = setup("fp-exec");
    // Opened before arming: pooled connections of a service are hit too.
    let mut c = Client::connect(&proxy).unwrap();
    let mut bystander = Client::connect(&proxy).unwrap();
    assert_eq!(c.command(&["PING"]).unwrap(), simple("PONG"));
    proxy.drop_reply_after(b"EXEC");
    // Traffic without the pattern is untouched.
    assert_eq!(c.command(&["MULTI"]).unwrap(), simple("OK"));
    assert_eq!(c.command(&["INCR", "k"]).unwrap(), simple("QUEUED"));
    assert_eq!(proxy.fired(), 0);
    c.send(&encode(&["EXEC"])).unwrap();
    let start = Instant::now();
    assert_reset(&mut c);
    // Swallowed first, reset about 200 ms after the server answered.
    assert!(start.elapsed() >= Duration::from_millis(150));
    assert_eq!(proxy.fired(), 1);
    // The transaction ran.
    assert_eq!(direct_get(&redis, "k").as_deref(), Some("1"));
    // One shot: the other connection and new ones work, even with EXEC.
    assert_eq!(bystander.command(&["GET", "k"]).unwrap(), bulk("1"));
    let mut fresh = Client::connect(&proxy).unwrap();
    assert_eq!(fresh.command(&["MULTI"]).unwrap(), simple("OK"));
    assert_eq!(fresh.command(&["INCR", "k"]).unwrap(), simple("QUEUED"));
    assert_eq!(
        fresh.command(&["EXEC"]).unwrap(),
        Value::Array(vec![Value::Int(2)])
    );
    assert_eq!(proxy.fired(), 1);
    assert_eq!(proxy.mode(), Mode::Forward);
}

#[test]
fn drop_reply_after_finds_a_pattern_split_across_writes() {
    let (_dir, redis, proxy) = setup("fp-split");
    proxy.drop_reply_after(b"EXEC");
    let mut c = Client::connect(&proxy).unwrap();
    assert_eq!(c.command(&["MULTI"]).unwrap(), simple("OK"));
    assert_eq!(c.command(&["INCR", "k"]).unwrap(), simple("QUEUED"));
    let exec = encode(&["EXEC"]);
    let (first, second) = exec.split_at(exec.len() - 4); // "...EX" | "EC\r\n"
    c.send(first).unwrap();
    sleep(Duration::from_millis(100)); // the proxy reads the halves separately
    c.send(second).unwrap();
    assert_reset(&mut c);
    assert_eq!(proxy.fired(), 1);
    assert_eq!(direct_get(&redis, "k").as_deref(), Some("1"));
    // Re-arming fires again. A pipelined transaction (as redis-rs sends it) arrives in one
    // chunk, so the replies to MULTI and INCR are lost along with EXEC's.
    proxy.drop_reply_after(b"EXEC");
    let mut again = Client::connect(&proxy).unwrap();
    let pipeline = [
        encode(&["MULTI"]),
        encode(&["INCR", "k"]),
        encode(&["EXEC"]),
    ]
    .concat();
    again.send(&pipeline).unwrap();
    assert_reset(&mut again);
    assert_eq!(proxy.fired(), 2);
    assert_eq!(direct_get(&redis, "k").as_deref(), Some("2"));
}

#[test]
fn reset_mode_kills_current_connections_and_refuses_new_ones_until_switched_off() {
    let (_dir, _redis, proxy) = setup("fp-reset");
    let mut c = Client::connect(&proxy).unwrap();
    assert_eq!(c.command(&["PING"]).unwrap(), simple("PONG"));
    proxy.set_mode(Mode::Reset);
    assert_reset(&mut c);
    for _ in 0..3 {
        // The TCP handshake may complete (the kernel does it), but nothing gets through.
        if let Ok(mut n) = Client::connect(&proxy) {
            let err = n.command(&["PING"]).unwrap_err();
            assert!(!is_timeout(&err), "expected a reset, got {err:#}");
        }
    }
    assert_eq!(proxy.connections(), 4);
    proxy.set_mode(Mode::Forward);
    let mut fresh = Client::connect(&proxy).unwrap();
    assert_eq!(fresh.command(&["PING"]).unwrap(), simple("PONG"));
}

#[test]
fn reset_all_kills_current_connections_once() {
    let (_dir, _redis, proxy) = setup("fp-reset-all");
    let mut a = Client::connect(&proxy).unwrap();
    let mut b = Client::connect(&proxy).unwrap();
    assert_eq!(a.command(&["PING"]).unwrap(), simple("PONG"));
    assert_eq!(b.command(&["PING"]).unwrap(), simple("PONG"));
    proxy.reset_all();
    assert_reset(&mut a);
    assert!(b.command(&["PING"]).is_err());
    assert_eq!(proxy.mode(), Mode::Forward);
    let mut fresh = Client::connect(&proxy).unwrap();
    assert_eq!(fresh.command(&["PING"]).unwrap(), simple("PONG"));
    assert_eq!(proxy.connections(), 3);
}

#[test]
fn dropping_the_proxy_closes_its_connections_and_its_port() {
    let (_dir, _redis, proxy) = setup("fp-drop-proxy");
    let addr = proxy.addr();
    let mut c = Client::connect(&proxy).unwrap();
    assert_eq!(c.command(&["PING"]).unwrap(), simple("PONG"));
    drop(proxy);
    assert_reset(&mut c);
    assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err());
}
