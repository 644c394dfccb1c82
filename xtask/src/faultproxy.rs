//! A fault-injecting TCP proxy, placed between a service and its Redis or broker.
//!
//! The failures the services must survive are not "Redis is down" (killing the process covers
//! that) but the ambiguous ones in between: the `EXEC` ran but its reply never came back, the
//! broker confirmed a publish and then the connection died, the link got slow. A mock cannot
//! tell whether the service really copes, and killing the server loses the very write whose
//! fate is in question. [`FaultProxy`] produces these for real: the service connects to the
//! proxy's port instead of the server's, the real server executes every command it receives,
//! and the proxy decides what the client gets to hear.
//!
//! Like the rest of the kit this is plain blocking std code: one accept thread, two threads per
//! connection (one per direction), sockets with short timeouts so that a mode change or a reset
//! takes effect within a few milliseconds. The methods take `&self` and the proxy is `Send +
//! Sync`, so a `#[tokio::test]` can hold it next to the service under test and flip faults
//! while requests are in flight. The few calls that wait ([`FaultProxy::reset_all`],
//! [`FaultProxy::set_mode`] to [`Mode::Reset`], drop) wait tens of milliseconds at most.
//!
//! ```no_run
//! use xtask::faultproxy::{FaultProxy, Mode};
//! use xtask::{free_port, RedisServer, ScratchDir};
//!
//! let dir = ScratchDir::new("example").unwrap();
//! let redis = RedisServer::start(dir.path(), free_port(), None, None).unwrap();
//! let proxy = FaultProxy::start(redis.port()).unwrap();
//! // Point the service at redis://127.0.0.1:{proxy.port()}/ ... then:
//! proxy.drop_reply_after(b"EXEC"); // the next EXEC runs, its reply is lost, the link dies
//! proxy.set_mode(Mode::Delay(std::time::Duration::from_millis(300)));
//! proxy.reset_all(); // every open connection dies once; new ones work
//! ```

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// How often blocked threads look at the proxy's state: the read and write timeout of every
/// socket and the poll interval of the listener. Bounds how late a mode change or reset lands.
const TICK: Duration = Duration::from_millis(10);

/// How long after the server's (swallowed) answer a [`FaultProxy::drop_reply_after`]
/// connection is reset: long enough that the server has surely finished with the command,
/// short enough that the client is not merely waiting for its own timeout.
const RESET_AFTER_REPLY: Duration = Duration::from_millis(200);

/// Longest pattern [`FaultProxy::drop_reply_after`] accepts (the per-connection tail kept to
/// find a pattern split across two reads is one byte shorter).
pub const MAX_PATTERN: usize = 1024;

/// How long the proxy tries to reach the target for a new connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long `reset_all`, `set_mode(Mode::Reset)` and drop wait for connections to close.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the proxy does with the bytes of every connection, current and future.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Pass everything both ways, unchanged.
    #[default]
    Forward,
    /// Hold every chunk read, in either direction, this long before passing it on: a slow link.
    /// A request/reply round trip takes at least twice the delay; chunks of one direction are
    /// delayed one after the other, so a burst of them adds up.
    Delay(Duration),
    /// Pass client→server bytes, swallow server→client bytes: every command runs, the client
    /// never hears back (and times out). Replies swallowed here are lost for good, so a
    /// connection that lived through this mode is out of step with the server afterwards.
    DropReplies,
    /// Reset every current connection (TCP RST, as after SO_LINGER 0) and reset every new one
    /// right after accepting it, until the mode changes: the server is unreachable.
    Reset,
}

/// A TCP proxy on 127.0.0.1:[`port`](Self::port) to 127.0.0.1:`target_port`, with faults on
/// demand. Dropping it stops the listener and resets every connection it holds.
pub struct FaultProxy {
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

/// State shared by the handle, the accept thread and the connection threads.
struct Shared {
    target: SocketAddr,
    mode: Mutex<Mode>,
    /// The armed one-shot pattern of `drop_reply_after`, taken by the connection it fires on.
    trigger: Mutex<Option<Vec<u8>>>,
    /// Bumped by `reset_all`: connections born in an older generation are reset.
    generation: AtomicU64,
    stop: AtomicBool,
    accepted: AtomicUsize,
    fired: AtomicUsize,
    next_id: AtomicU64,
    /// Connections whose threads have not finished yet.
    live: Mutex<HashMap<u64, Arc<Conn>>>,
}

/// One proxied connection, as seen by its two pump threads.
struct Conn {
    generation: u64,
    /// Set by either pump when the connection must die (a reset, or an error on one side).
    killed: AtomicBool,
    /// The trigger fired here: swallow every byte from the server from now on.
    swallowing: AtomicBool,
    /// When a swallowing connection is to be reset (set by the first swallowed reply).
    reset_at: Mutex<Option<Instant>>,
    /// Pumps still running (2, then 1, then 0 and the connection leaves `live`).
    running: AtomicUsize,
}

impl FaultProxy {
    /// Starts a proxy in [`Mode::Forward`] on a free port of 127.0.0.1, forwarding every
    /// accepted connection to 127.0.0.1:`target_port`. The target is dialled per connection, so
    /// it may be down (or restarted) meanwhile; a connection the target refuses is reset.
    pub fn start(target_port: u16) -> Result<FaultProxy> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("fault proxy: cannot bind 127.0.0.1:0")?;
        // Non-blocking so that the accept thread can poll with a timeout and notice `stop`.
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared::new(target_port, None));
        let acceptor = {
            let shared = shared.clone();
            thread::Builder::new()
                .name(format!("faultproxy-{port}"))
                .spawn(move || accept_loop(&shared, &listener))
                .context("fault proxy: cannot start the accept thread")?
        };
        Ok(FaultProxy {
            port,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The port clients connect to instead of the target's.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// 127.0.0.1:[`port`](Self::port).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The port of the server behind the proxy.
    pub fn target_port(&self) -> u16 {
        self.shared.target.port()
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.shared.mode()
    }

    /// Switches the mode for current and new connections; it applies to the next chunk each
    /// connection reads (within a few milliseconds). Switching to [`Mode::Reset`] returns once
    /// the current connections are closed.
    pub fn set_mode(&self, mode: Mode) {
        *lock(&self.shared.mode) = mode;
        if mode == Mode::Reset {
            self.shared.settle(|_| true);
        }
    }

    /// Arms a one-shot fault: "the command ran, its reply was lost, the connection died".
    ///
    /// Bytes keep flowing as the mode says until client→server bytes containing `pattern`
    /// (e.g. `b"EXEC"`, or a marker in an AMQP message body) pass through any connection,
    /// current or new. Those bytes are forwarded, so the server executes the command; from then
    /// on everything the server sends on that connection is swallowed (replies to commands
    /// that came in the same read too, such as the MULTI and INCR of a pipelined transaction),
    /// and the connection is reset 200 ms after the server's answer began. The trigger is then
    /// spent: other and new connections are untouched (re-arm to fire again). A pattern
    /// split across two reads is found too. [`fired`](Self::fired) counts the firings.
    ///
    /// Panics if `pattern` is empty or longer than [`MAX_PATTERN`].
    pub fn drop_reply_after(&self, pattern: &[u8]) {
        assert!(
            !pattern.is_empty() && pattern.len() <= MAX_PATTERN,
            "drop_reply_after: the pattern must have 1 to {MAX_PATTERN} bytes"
        );
        *lock(&self.shared.trigger) = Some(pattern.to_vec());
    }

    /// How many times a [`drop_reply_after`](Self::drop_reply_after) trigger has fired.
    pub fn fired(&self) -> usize {
        self.shared.fired.load(Ordering::SeqCst)
    }

    /// Resets every current connection once (TCP RST to both the client and the server), as a
    /// network failure would; the mode is unchanged and new connections work. Returns once the
    /// connections are closed.
    pub fn reset_all(&self) {
        let generation = self.shared.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.shared.settle(|c| c.generation < generation);
    }

    /// Connections accepted so far, including those reset at once in [`Mode::Reset`].
    pub fn connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("port", &self.port)
            .field("target_port", &self.target_port())
            .field("mode", &self.mode())
            .field("connections", &self.connections())
            .field("fired", &self.fired())
            .finish()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        self.shared.settle(|_| true);
    }
}

impl Shared {
    /// Fresh state for a proxy to `127.0.0.1:target_port`, forwarding, with `trigger` armed.
    fn new(target_port: u16, trigger: Option<Vec<u8>>) -> Self {
        Shared {
            target: SocketAddr::from((Ipv4Addr::LOCALHOST, target_port)),
            mode: Mutex::new(Mode::Forward),
            trigger: Mutex::new(trigger),
            generation: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            accepted: AtomicUsize::new(0),
            fired: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            live: Mutex::new(HashMap::new()),
        }
    }

    fn mode(&self) -> Mode {
        *lock(&self.mode)
    }

    /// Waits (bounded) until no live connection matches `doomed`.
    fn settle(&self, doomed: impl Fn(&Conn) -> bool) {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        while Instant::now() < deadline && lock(&self.live).values().any(|c| doomed(c)) {
            thread::sleep(Duration::from_millis(2));
        }
    }

    fn forget(&self, id: u64) {
        lock(&self.live).remove(&id);
    }
}

impl Conn {
    /// True when the connection must be reset now.
    fn doomed(&self, shared: &Shared) -> bool {
        shared.stop.load(Ordering::SeqCst)
            || self.killed.load(Ordering::SeqCst)
            || self.generation < shared.generation.load(Ordering::SeqCst)
            || shared.mode() == Mode::Reset
            || lock(&self.reset_at).is_some_and(|at| Instant::now() >= at)
    }

    /// Client→server: fires the armed trigger if `chunk` completes its pattern. `tail` holds
    /// the last bytes of the previous chunks, for a pattern split across reads.
    fn watch_request(&self, shared: &Shared, tail: &mut Vec<u8>, chunk: &[u8]) {
        let mut trigger = lock(&shared.trigger);
        if let Some(pattern) = trigger.as_deref() {
            // Only the last len-1 bytes of the tail: a match must end inside this chunk, so a
            // pattern that passed before the trigger was armed does not fire it.
            let keep = tail.len().min(pattern.len() - 1);
            let mut window = tail[tail.len() - keep..].to_vec();
            window.extend_from_slice(chunk);
            if window.windows(pattern.len()).any(|w| w == pattern) {
                *trigger = None;
                // Before the bytes go out, so that no part of the reply can slip through.
                self.swallowing.store(true, Ordering::SeqCst);
                shared.fired.fetch_add(1, Ordering::SeqCst);
            }
        }
        drop(trigger);
        tail.extend_from_slice(chunk);
        if tail.len() >= MAX_PATTERN {
            tail.drain(..tail.len() - (MAX_PATTERN - 1));
        }
    }

    /// Server→client: whether this chunk reaches the client.
    fn pass_reply(&self, shared: &Shared) -> bool {
        if self.swallowing.load(Ordering::SeqCst) {
            lock(&self.reset_at).get_or_insert_with(|| Instant::now() + RESET_AFTER_REPLY);
            return false;
        }
        shared.mode() != Mode::DropReplies
    }

    /// Sleeps `delay`, waking early (false) if the connection is to be reset meanwhile.
    fn sleep(&self, shared: &Shared, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        loop {
            if self.doomed(shared) {
                return false;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            thread::sleep(left.min(TICK));
        }
    }

    /// A pump is done (its sockets already closed); the last one removes the connection.
    fn finish(&self, shared: &Shared, id: u64) {
        if self.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            shared.forget(id);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Accepts until the proxy is dropped; each connection gets a thread of its own.
fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    while !shared.stop.load(Ordering::SeqCst) {
        if !readable(listener, TICK) {
            continue;
        }
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) if transient(&e) => continue,
            Err(_) => {
                // E.g. out of file descriptors: do not spin.
                thread::sleep(TICK);
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        if shared.mode() == Mode::Reset {
            reset_on_close(&client);
            continue;
        }
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
        let conn = Arc::new(Conn {
            generation: shared.generation.load(Ordering::SeqCst),
            killed: AtomicBool::new(false),
            swallowing: AtomicBool::new(false),
            reset_at: Mutex::new(None),
            running: AtomicUsize::new(2),
        });
        lock(&shared.live).insert(id, conn.clone());
        let thread_shared = shared.clone();
        let spawned = thread::Builder::new()
            .name(format!("faultproxy-conn-{id}"))
            .spawn(move || serve(&thread_shared, &conn, id, client));
        if spawned.is_err() {
            shared.forget(id);
        }
    }
}

/// True when the listener has a connection to accept within `timeout`.
fn readable(listener: &TcpListener, timeout: Duration) -> bool {
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = timeout.as_millis().try_into().unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd for the duration of the call; the fd is owned by `listener`.
    unsafe { libc::poll(&mut fd, 1, millis) > 0 }
}

/// Dials the target and runs both directions of one connection.
fn serve(shared: &Arc<Shared>, conn: &Arc<Conn>, id: u64, client: TcpStream) {
    let setup = || -> io::Result<(TcpStream, TcpStream, TcpStream, TcpStream)> {
        // Accepted sockets must block (with timeouts), whatever the listener is.
        client.set_nonblocking(false)?;
        let server = TcpStream::connect_timeout(&shared.target, CONNECT_TIMEOUT)?;
        for s in [&client, &server] {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(TICK))?;
            s.set_write_timeout(Some(TICK))?;
        }
        let (client2, server2) = (client.try_clone()?, server.try_clone()?);
        Ok((client.try_clone()?, server, client2, server2))
    };
    let (client_up, server_up, client_down, server_down) = match setup() {
        Ok(sockets) => sockets,
        Err(_) => {
            reset_on_close(&client);
            shared.forget(id);
            return;
        }
    };
    drop(client);
    let down = {
        let (shared, conn) = (shared.clone(), conn.clone());
        thread::Builder::new()
            .name(format!("faultproxy-down-{id}"))
            .spawn(move || {
                pump(&shared, &conn, Direction::Down, server_down, client_down);
                conn.finish(&shared, id);
            })
    };
    if down.is_err() {
        // The closure (and its sockets) is gone; make this side reset too.
        conn.killed.store(true, Ordering::SeqCst);
        conn.finish(shared, id);
    }
    pump(shared, conn, Direction::Up, client_up, server_up);
    conn.finish(shared, id);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
}

/// Moves bytes `from` → `to` until end of stream, an error, or a reset. Consumes (closes) its
/// two sockets; when the connection is reset, the last close of each socket sends the RST.
fn pump(shared: &Shared, conn: &Conn, dir: Direction, mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut tail = Vec::new();
    let reset = loop {
        if conn.doomed(shared) {
            break true;
        }
        let n = match from.read(&mut buf) {
            // A server closing on a client waiting for a swallowed reply: still a reset.
            Ok(0) => break dir == Direction::Down && conn.swallowing.load(Ordering::SeqCst),
            Ok(n) => n,
            Err(e) if transient(&e) => continue,
            Err(_) => break true,
        };
        let chunk = &buf[..n];
        let forward = match dir {
            Direction::Up => {
                conn.watch_request(shared, &mut tail, chunk);
                true
            }
            Direction::Down => conn.pass_reply(shared),
        };
        if !forward {
            continue;
        }
        if let Mode::Delay(delay) = shared.mode() {
            if !conn.sleep(shared, delay) {
                break true;
            }
        }
        if !write_all(shared, conn, &mut to, chunk) {
            break true;
        }
    };
    if reset {
        conn.killed.store(true, Ordering::SeqCst);
        reset_on_close(&from);
        reset_on_close(&to);
    } else {
        // End of stream: pass the half-close on, the other direction carries on.
        let _ = to.shutdown(Shutdown::Write);
    }
}

/// Writes all of `data`, giving up (false) on an error or when the connection is to be reset.
fn write_all(shared: &Shared, conn: &Conn, to: &mut TcpStream, mut data: &[u8]) -> bool {
    while !data.is_empty() {
        if conn.doomed(shared) {
            return false;
        }
        match to.write(data) {
            Ok(0) => return false,
            Ok(n) => data = &data[n..],
            Err(e) if transient(&e) => {}
            Err(_) => return false,
        }
    }
    true
}

/// A timeout or interruption, not a failure of the connection.
fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// SO_LINGER with a zero timeout: closing the socket (its last descriptor) sends a RST instead
/// of a FIN, and the peer's next read or write fails with "connection reset".
fn reset_on_close(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized, initialised option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Conn {
        Conn {
            generation: 0,
            killed: AtomicBool::new(false),
            swallowing: AtomicBool::new(false),
            reset_at: Mutex::new(None),
            running: AtomicUsize::new(2),
        }
    }

    fn shared(trigger: &[u8]) -> Shared {
        Shared::new(1, Some(trigger.to_vec()))
    }

    #[test]
    fn a_pattern_split_across_chunks_fires_once() {
        let (s, c, mut tail) = (shared(b"EXEC"), conn(), Vec::new());
        c.watch_request(&s, &mut tail, b"*1\r\n$4\r\nEX");
        assert!(!c.swallowing.load(Ordering::SeqCst));
        c.watch_request(&s, &mut tail, b"EC\r\n");
        assert!(c.swallowing.load(Ordering::SeqCst));
        assert_eq!(s.fired.load(Ordering::SeqCst), 1);
        assert!(lock(&s.trigger).is_none());
        c.watch_request(&s, &mut tail, b"*1\r\n$4\r\nEXEC\r\n");
        assert_eq!(s.fired.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_pattern_seen_before_arming_does_not_fire_later() {
        let (s, c, mut tail) = (shared(b"EXEC"), conn(), Vec::new());
        *lock(&s.trigger) = None;
        c.watch_request(&s, &mut tail, b"EXEC");
        *lock(&s.trigger) = Some(b"EXEC".to_vec());
        c.watch_request(&s, &mut tail, b"\r\n");
        assert_eq!(s.fired.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn the_tail_stays_bounded() {
        let (s, c, mut tail) = (shared(b"never"), conn(), Vec::new());
        for _ in 0..10 {
            c.watch_request(&s, &mut tail, &[b'x'; 700]);
            assert!(tail.len() < MAX_PATTERN);
        }
        c.watch_request(&s, &mut tail, b"nev");
        c.watch_request(&s, &mut tail, b"er");
        assert_eq!(s.fired.load(Ordering::SeqCst), 1);
    }
}
