//! The supervisor (`xtask::supervisor`) with the fleet's restart rules (`xtask::respawn`)
//! against real processes on free ports: what `cargo xtask up` relies on to heal the fleet.
//!
//! Like the other kit tests these never skip: redis-server must be installed.

use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use xtask::resp::sentinel_master;
use xtask::respawn::{Program, Ready, RedisNode, SentinelNode};
use xtask::supervisor::{Backoff, Event, Supervisor};
use xtask::{find_binary, free_port, port_is_free, proc, resp, ScratchDir, SentinelSet};

fn require(program: &str) {
    assert!(
        find_binary(program).is_some(),
        "{program} is not installed: install it (apt-get install redis-server) to run this \
         test; it does not skip"
    );
}

/// Kills what the supervisor started (nothing else owns it) when the test ends, pass or fail.
struct Reaper(Vec<u32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for &pid in &self.0 {
            proc::kill9(pid, None);
        }
    }
}

/// Polls until `member` was restarted; returns every event seen, the restart last.
fn until_restarted(sup: &mut Supervisor, member: usize, timeout: Duration) -> Vec<Event> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        for e in sup.poll() {
            let done = matches!(&e, Event::Restarted { member: m, .. } if *m == member);
            seen.push(e);
            if done {
                return seen;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} not restarted within {timeout:?}; events: {seen:?}",
            sup.name(member)
        );
        sleep(Duration::from_millis(100));
    }
}

fn replication(port: u16) -> String {
    resp::info(port, None, "replication").unwrap_or_default()
}

#[test]
fn a_killed_master_comes_back_as_a_replica_of_the_new_master() {
    require("redis-server");
    let dir = ScratchDir::new("supervise-redis").unwrap();
    let set = SentinelSet::start(dir.path(), "data", Duration::from_secs(40)).unwrap();
    let sentinel_ports: Vec<u16> = set.sentinels.iter().map(|s| s.port()).collect();
    let mut reaper = Reaper(Vec::new());
    let mut sup = Supervisor::new();
    let node = |port| {
        Arc::new(RedisNode {
            dir: dir.path().to_path_buf(),
            port,
            store: "data".into(),
            sentinel_ports: sentinel_ports.clone(),
            failover_grace: Duration::from_secs(30),
            sync_timeout: Duration::from_secs(20),
        })
    };
    let old_master = (set.master.port(), set.master.pid());
    let m = sup.add(
        "master",
        old_master.1,
        None,
        Backoff::fleet(),
        node(old_master.0),
    );
    for (i, r) in set.replicas.iter().enumerate() {
        sup.add(
            &format!("replica-{i}"),
            r.pid(),
            None,
            Backoff::fleet(),
            node(r.port()),
        );
    }
    let s0 = &set.sentinels[0];
    let sentinel = sup.add(
        "sentinel-0",
        s0.pid(),
        None,
        Backoff::fleet(),
        Arc::new(SentinelNode {
            dir: dir.path().to_path_buf(),
            port: s0.port(),
        }),
    );
    set.master.command(&["SET", "k", "before"]).unwrap();
    set.master.command(&["WAIT", "2", "5000"]).unwrap();
    assert!(sup.poll().is_empty(), "nothing died yet");

    let killed = Instant::now();
    assert!(proc::kill9(old_master.1, None));
    let events = until_restarted(&mut sup, m, Duration::from_secs(60));
    let back = killed.elapsed();
    let Some(Event::Restarted { started, .. }) = events.last() else {
        unreachable!()
    };
    reaper.0.push(started.pid);
    assert!(
        matches!(events[0], Event::Died { member, pid, .. } if member == m && pid == old_master.1)
    );
    assert_ne!(started.pid, old_master.1);
    assert_eq!(started.role.as_deref(), Some("data-redis-replica"));

    // A replica of the master the Sentinels name now, on its old port, replicating.
    let new_master = sentinel_master(sentinel_ports[0], "data").unwrap();
    assert_ne!(new_master, old_master.0);
    assert_eq!(resp::role(old_master.0, None).unwrap(), "slave");
    let info = replication(old_master.0);
    assert_eq!(
        resp::info_field(&info, "master_port"),
        Some(&*new_master.to_string())
    );
    assert_eq!(
        resp::info_field(&info, "master_link_status"),
        Some("up"),
        "{info}"
    );
    // The new master counts it (and the other replica) as online.
    let deadline = Instant::now() + Duration::from_secs(20);
    let online = |port: u16| {
        replication(new_master)
            .lines()
            .any(|l| l.contains(&format!("port={port},")) && l.contains("state=online"))
    };
    while !online(old_master.0) {
        assert!(Instant::now() < deadline, "{}", replication(new_master));
        sleep(Duration::from_millis(100));
    }
    let get = resp::text(&resp::query(old_master.0, None, &["GET", "k"]).unwrap());
    assert_eq!(get.as_deref(), Some("before"));
    eprintln!("killed master back as a synced replica after {back:?}");

    // A killed Sentinel comes back on its rewritten config: it knows the new master.
    let killed = Instant::now();
    assert!(proc::kill9(s0.pid(), None));
    let events = until_restarted(&mut sup, sentinel, Duration::from_secs(30));
    let Some(Event::Restarted { started, .. }) = events.last() else {
        unreachable!()
    };
    reaper.0.push(started.pid);
    assert_eq!(sentinel_master(s0.port(), "data"), Some(new_master));
    eprintln!("killed Sentinel back after {:?}", killed.elapsed());
    drop(sup.shutdown());
}

/// A program on a port, as a service instance is: redis-server stands in for one (no store or
/// broker needed, and it is installed wherever these tests run).
fn program(dir: &ScratchDir, port: u16) -> Program {
    let dir = dir.path().to_path_buf();
    Program {
        command: Box::new(move || {
            let mut cmd = proc::command(find_binary("redis-server").unwrap());
            cmd.args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .current_dir(&dir);
            cmd
        }),
        log: std::env::temp_dir().join(format!("xtask-supervise-program-{port}.log")),
        ready: Ready::Port(port),
        ready_timeout: Duration::from_secs(10),
    }
}

#[test]
fn a_killed_program_is_restarted_on_its_port_with_growing_backoff() {
    require("redis-server");
    let dir = ScratchDir::new("supervise-program").unwrap();
    let port = free_port();
    let prog = program(&dir, port);
    let mut first = proc::spawn_logged(&mut (prog.command)(), &prog.log).unwrap();
    let mut reaper = Reaper(vec![first.id()]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while port_is_free(port) {
        assert!(Instant::now() < deadline, "the program never listened");
        sleep(Duration::from_millis(20));
    }
    let backoff = Backoff::new(
        Duration::from_millis(100),
        Duration::from_millis(400),
        Duration::from_secs(60),
    );
    let mut sup = Supervisor::new();
    let m = sup.add("program", first.id(), None, backoff, Arc::new(prog));

    // Killed three times in a row, each time soon after its restart: back on the same port
    // every time, and the wait before each restart doubles.
    let mut pid = first.id();
    let mut waits = Vec::new();
    for _ in 0..3 {
        let killed = Instant::now();
        assert!(proc::kill9(pid, None));
        let events = until_restarted(&mut sup, m, Duration::from_secs(20));
        let Some(Event::Restarted { started, .. }) = events.last() else {
            unreachable!()
        };
        reaper.0.push(started.pid);
        assert_ne!(started.pid, pid);
        pid = started.pid;
        assert_eq!(sup.pid(m), pid);
        assert!(!port_is_free(port), "nothing listens on {port} again");
        assert_eq!(
            resp::text(&resp::query(port, None, &["PING"]).unwrap()).as_deref(),
            Some("PONG")
        );
        let Event::Died { retry_in, .. } = events[0] else {
            panic!("{events:?}")
        };
        waits.push(retry_in);
        eprintln!("program back on :{port} after {:?}", killed.elapsed());
    }
    assert_eq!(
        waits,
        [100, 200, 400].map(Duration::from_millis),
        "backoff does not double"
    );
    // Killed in the first round and reaped by the supervisor already: returns at once.
    let _ = first.wait();
    drop(sup.shutdown());
}

#[test]
fn a_program_that_cannot_start_is_retried_ever_more_slowly() {
    let dir = ScratchDir::new("supervise-fails").unwrap();
    let log = dir.join("fails.log");
    let prog = Program {
        command: Box::new(|| {
            let mut cmd = proc::command("sh");
            cmd.args(["-c", "echo cannot start; exit 3"]);
            cmd
        }),
        log: log.clone(),
        ready: Ready::Port(free_port()),
        ready_timeout: Duration::from_secs(5),
    };
    let backoff = Backoff::new(
        Duration::from_millis(50),
        Duration::from_millis(400),
        Duration::from_secs(60),
    );
    let mut sup = Supervisor::new();
    // Adopted dead: the first poll finds it gone.
    let m = sup.add("fails", u32::MAX - 1, None, backoff, Arc::new(prog));
    let mut waits = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while waits.len() < 6 {
        for e in sup.poll() {
            match e {
                Event::Died { retry_in, .. } => waits.push(retry_in),
                Event::Failed {
                    retry_in, error, ..
                } => {
                    assert!(error.contains("cannot start"), "{error}");
                    waits.push(retry_in)
                }
                Event::Restarted { .. } => panic!("it cannot start"),
            }
        }
        assert!(Instant::now() < deadline, "{waits:?}");
        assert!(sup.is_down(m));
        sleep(Duration::from_millis(20));
    }
    assert_eq!(
        waits,
        [50, 100, 200, 400, 400, 400].map(Duration::from_millis)
    );
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("cannot start"));
    drop(sup.shutdown());
}
