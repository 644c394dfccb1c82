//! The process kit against real redis-server, Sentinel and RabbitMQ processes.
//!
//! These start real processes on free ports. They never skip: a test whose program is not
//! installed fails and names the Debian package to install, and the RabbitMQ test fails unless
//! it runs as root (Debian's `rabbitmq-server` script only runs as root or `rabbitmq`). CI runs
//! them as root with the packages installed (`.ci/run`).

use std::net::TcpStream;
use std::thread::sleep;
use std::time::{Duration, Instant};

use xtask::install::debian_package;
use xtask::{find_binary, free_port, proc, resp, RabbitNode, RedisServer, ScratchDir, SentinelSet};

/// Fails the test unless `program` is installed: a test that cannot run must not pass.
fn require(program: &str) {
    assert!(
        find_binary(program).is_some(),
        "{program} is not installed: install it (apt-get install {}) to run this test; \
         it does not skip",
        debian_package(program)
    );
}

fn get(server: &RedisServer, key: &str) -> Option<String> {
    resp::text(&server.command(&["GET", key]).unwrap())
}

#[test]
fn replica_follows_master_and_aof_survives_kill9() {
    require("redis-server");
    let dir = ScratchDir::new("kit-aof").unwrap();
    let mut master = RedisServer::start(dir.path(), free_port(), None, Some("s3cret")).unwrap();
    let replica =
        RedisServer::start(dir.path(), free_port(), Some(master.port()), Some("s3cret")).unwrap();
    replica
        .wait_replica_synced(Duration::from_secs(10))
        .unwrap();
    assert_eq!(master.role().unwrap(), "master");
    assert_eq!(replica.role().unwrap(), "slave");
    assert!(master.url().contains(":s3cret@127.0.0.1:"));

    master.command(&["SET", "k", "v1"]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(&replica, "k").as_deref() != Some("v1") {
        assert!(Instant::now() < deadline, "replica never saw the write");
        sleep(Duration::from_millis(20));
    }

    // appendfsync everysec: after a second the write is on disk and survives a crash.
    sleep(Duration::from_millis(1500));
    let old_pid = master.pid();
    master.kill9();
    assert!(!master.is_running());
    assert!(!proc::is_alive(old_pid));
    master.restart().unwrap();
    assert_ne!(master.pid(), old_pid);
    assert_eq!(get(&master, "k").as_deref(), Some("v1"));
}

#[test]
fn a_second_server_on_a_taken_port_fails_clearly() {
    require("redis-server");
    let dir = ScratchDir::new("kit-port").unwrap();
    let first = RedisServer::start(dir.join("a"), free_port(), None, None).unwrap();
    let err = RedisServer::start(dir.join("b"), first.port(), None, None).unwrap_err();
    assert!(err.to_string().contains("in use"), "{err:#}");
}

#[test]
fn sentinels_fail_over_when_the_master_is_killed() {
    require("redis-server");
    let dir = ScratchDir::new("kit-sentinel").unwrap();
    let SentinelSet {
        mut master,
        replicas,
        sentinels,
    } = SentinelSet::start(dir.path(), "data", Duration::from_secs(30)).unwrap();
    assert_eq!(replicas.len(), 2, "a store is a master and two replicas");
    for s in &sentinels {
        assert_eq!(s.master_port("data").unwrap(), Some(master.port()));
    }
    // A node of a set refuses writes while it is a master without a replica; with its
    // replicas online it writes.
    master.command(&["SET", "k", "v"]).unwrap();

    master.kill9();
    let deadline = Instant::now() + Duration::from_secs(30);
    let promoted = loop {
        let now = sentinels[0].master_port("data").unwrap();
        if let Some(r) = replicas.iter().find(|r| Some(r.port()) == now) {
            if r.role().unwrap() == "master" {
                break r;
            }
        }
        assert!(Instant::now() < deadline, "no failover within 30 s");
        sleep(Duration::from_millis(100));
    };
    // The other replica follows the promoted one, so the new master can write again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while promoted.command(&["SET", "k", "after"]).is_err() {
        assert!(
            Instant::now() < deadline,
            "the promoted replica never got a replica of its own"
        );
        sleep(Duration::from_millis(100));
    }
    // The old master comes back as a replica of the new one once Sentinel reconfigures it.
    // That takes ~10 s on an idle machine; under CI load (a fleet and other tests running
    // beside it) it took over 30 s once, so the wait is generous.
    master.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while master.role().unwrap() != "slave" {
        assert!(
            Instant::now() < deadline,
            "old master was not turned into a replica"
        );
        sleep(Duration::from_millis(200));
    }
    // Sentinel turns it into a replica and rewrites its config file in one transaction, but
    // ROLE can answer `slave` before the file is on disk, and under CI load the sentinels may
    // have failed over a second time meanwhile: wait for the file to name whichever node they
    // now call master (a clean-clone CI run once read it too early and failed).
    let deadline = Instant::now() + Duration::from_secs(30);
    let conf = loop {
        let conf = std::fs::read_to_string(master.conf_path()).unwrap();
        let current = sentinels[0].master_port("data").unwrap();
        if let Some(port) = current.filter(|&p| p != master.port()) {
            if conf.contains(&format!("replicaof 127.0.0.1 {port}")) {
                break conf;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the old master's config never named the new master ({current:?}):\n{conf}"
        );
        sleep(Duration::from_millis(200));
    };
    assert!(
        conf.contains("min-replicas-to-write 1"),
        "Sentinel's rewrite kept the write guard:\n{conf}"
    );
}

#[test]
fn a_master_of_a_set_refuses_writes_without_a_replica_but_accepts_its_sync() {
    require("redis-server");
    let dir = ScratchDir::new("kit-guard").unwrap();
    let master = RedisServer::start_in_set(dir.path(), free_port(), None, None).unwrap();
    let refused = master.command(&["SET", "k", "v"]).unwrap_err();
    assert!(refused.to_string().contains("NOREPLICAS"), "{refused:#}");
    let mut replica =
        RedisServer::start_in_set(dir.path(), free_port(), Some(master.port()), None).unwrap();
    replica
        .wait_replica_synced(Duration::from_secs(10))
        .unwrap();
    master
        .wait_replicas_online(1, Duration::from_secs(10))
        .unwrap();
    master.command(&["SET", "k", "v"]).unwrap();
    // A replica's death is seen at once (its connection closes): writes are refused again.
    replica.kill9();
    let deadline = Instant::now() + Duration::from_secs(10);
    while master.command(&["SET", "k", "w"]).is_ok() {
        assert!(
            Instant::now() < deadline,
            "writes still accepted with no replica"
        );
        sleep(Duration::from_millis(50));
    }
    // A single node started with `start` writes alone (RedisTarget::Direct).
    let single = RedisServer::start(dir.join("single"), free_port(), None, None).unwrap();
    single.command(&["SET", "k", "v"]).unwrap();
}

/// AMQP handshake: the server answers the protocol header with a method frame
/// (Connection.Start).
fn amqp_answers(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut frame = [0u8; 1];
    s.write_all(b"AMQP\x00\x00\x09\x01").is_ok()
        && s.read_exact(&mut frame).is_ok()
        && frame[0] == 1
}

#[test]
fn private_rabbitmq_node_starts_restarts_and_stops() {
    use std::os::unix::fs::PermissionsExt;
    require("rabbitmq-server");
    require("rabbitmqctl");
    assert!(
        proc::is_root(),
        "this test must run as root: Debian's rabbitmq-server script only runs as root (or as \
         the rabbitmq user); it does not skip"
    );
    let scratch = ScratchDir::new("kit-rabbit").unwrap();
    // A parent the rabbitmq user cannot enter (like a checkout under /root): the node's data
    // must be relocated, and the asked-for path must become a link to it.
    let private = scratch.join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let asked = private.join("rabbitmq");
    let (amqp, dist) = (free_port(), free_port());
    let name = format!("kit{}@localhost", std::process::id());
    let mut node = RabbitNode::start(&asked, &name, amqp, dist).unwrap();
    let relocated = node.dir().to_path_buf();
    let _cleanup = RemoveOnDrop(relocated.clone());
    assert_ne!(relocated, asked);
    assert_eq!(std::fs::read_link(&asked).unwrap(), relocated);
    assert!(proc::is_alive(node.pid()));
    assert_eq!(
        node.amqp_url(),
        format!("amqp://guest:guest@127.0.0.1:{amqp}/%2f")
    );
    assert!(amqp_answers(amqp));

    // A crash, then a start on the same data.
    let old = node.pid();
    node.kill9();
    assert!(!proc::is_alive(old));
    node.restart().unwrap();
    assert_ne!(node.pid(), old);
    assert!(amqp_answers(amqp));

    let pid = node.pid();
    node.stop().unwrap();
    assert!(!proc::is_alive(pid));
    assert!(xtask::port_is_free(amqp));
    // Stopping again is a no-op.
    node.stop().unwrap();
}

/// Removes a relocated RabbitMQ directory at the end of the test.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn resp_query_talks_to_a_real_server() {
    require("redis-server");
    let dir = ScratchDir::new("kit-resp").unwrap();
    let server = RedisServer::start(dir.path(), free_port(), None, None).unwrap();
    let info = resp::info(server.port(), None, "persistence").unwrap();
    assert_eq!(resp::info_field(&info, "aof_enabled"), Some("1"));
    assert_eq!(
        resp::query(server.port(), None, &["PING"]).unwrap(),
        redis::Value::SimpleString("PONG".into())
    );
    assert!(resp::query(server.port(), None, &["NOSUCHCOMMAND"]).is_err());
}
