//! `cargo xtask up`: build the services and start the whole fleet as local processes.
//!
//! Order matters: stores first (Redis sets, then the Sentinels once the sets replicate), the
//! broker in parallel with them because it is by far the slowest to boot, then the services
//! (which need both), then the gateway. Every process is recorded in state.json the moment it
//! is handed over, so a failure at any point stops exactly what was started. Once everything
//! is ready a supervisor (`supervise.rs`) watches it and starts again whatever dies: this very
//! process in the foreground, a detached `cargo xtask supervise` with `--detach`.

use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::fleet::{self, EnvAction};
use crate::state::{self, Broker, Kind, Record, State};
use crate::supervise::{self, Ended};
use crate::{down, interrupt};
use xtask::gateway;
use xtask::proc::{self, spawn_logged, tail};
use xtask::{ensure_installed, http_get, port_is_free, RabbitNode, RedisServer, Sentinel};

/// Programs `up` needs.
pub const REQUIRED: &[&str] = &["redis-server", "rabbitmq-server", "rabbitmqctl", "nginx"];

const READY_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
pub struct Options {
    /// Return once everything is ready and leave it running.
    pub detach: bool,
    pub port: u16,
    /// Run `cargo build --release` for the services first.
    pub build: bool,
}

pub fn run(root: &Path, opts: &Options) -> Result<()> {
    ensure_installed(REQUIRED)?;
    let fleet = fleet::fleet_dir(root);
    if let Some(old) = State::load(root)? {
        if old.any_alive() || old.live_supervisor().is_some() {
            bail!(
                "a fleet is already running (see `cargo xtask ps`); stop it with `cargo xtask down`"
            );
        }
    }
    check_ports(opts.port)?;
    if opts.build {
        build(root)?;
    }
    for inst in fleet::instances() {
        let bin = fleet::release_dir(root).join(inst.service);
        if !bin.is_file() {
            bail!(
                "{} is missing; build it with `cargo build --release -p {}`",
                bin.display(),
                inst.service
            );
        }
    }
    interrupt::check()?;

    wipe(&fleet)?;
    for sub in ["logs", "redis", "sentinel", "nginx"] {
        std::fs::create_dir_all(fleet.join(sub))?;
    }
    let fleet = fleet.canonicalize()?;
    let nofile = raise_nofile_limit();
    let tag = fleet.display().to_string();
    let mut state = State {
        gateway_url: format!("http://127.0.0.1:{}", opts.port),
        tag: tag.clone(),
        broker: None,
        processes: Vec::new(),
        supervisor: None,
    };
    state.save(root)?;

    // Everything started from here on carries the fleet's tag (see proc::set_child_tag).
    proc::set_child_tag(Some(&tag));
    let started = start_all(root, &fleet, opts, nofile, &mut state);
    proc::set_child_tag(None);
    if let Err(e) = started {
        eprintln!("xtask: start-up failed; stopping what was started");
        if let Err(stop_err) = down::run(root) {
            eprintln!("xtask: {stop_err:#}");
        }
        return Err(e);
    }

    println!();
    print!("{}", state::table(&state.processes));
    println!();
    println!("gateway: {}", state.gateway_url);
    println!("logs:    {}", fleet.join("logs").display());
    if opts.detach {
        let pid = match supervise::spawn_detached(root) {
            Ok(pid) => pid,
            Err(e) => {
                eprintln!("xtask: the supervisor did not start; stopping the fleet");
                if let Err(stop_err) = down::run(root) {
                    eprintln!("xtask: {stop_err:#}");
                }
                return Err(e);
            }
        };
        println!(
            "running in the background, supervised by pid {pid} (log: {}); stop it with \
             `cargo xtask down`",
            supervise::log_path(&fleet).display()
        );
        return Ok(());
    }
    println!(
        "running and supervised: a process that dies is started again; Ctrl-C stops everything \
         (or `cargo xtask down` from another terminal)"
    );
    match supervise::run(root, false)? {
        Ended::Interrupted => down::run(root),
        Ended::DownRequested | Ended::StateGone => {
            println!("xtask: the fleet is being stopped from elsewhere (`cargo xtask down`)");
            Ok(())
        }
    }
}

/// Fails, naming every port, when something already listens where the fleet wants to.
fn check_ports(gateway_port: u16) -> Result<()> {
    let taken: Vec<String> = fleet::all_ports(gateway_port)
        .into_iter()
        .filter(|(port, _)| !port_is_free(*port))
        .map(|(port, what)| format!("{port} ({what})"))
        .collect();
    if !taken.is_empty() {
        bail!(
            "port(s) already in use: {}. If an earlier fleet is still running, stop it with \
             `cargo xtask down`; otherwise stop whatever holds them.",
            taken.join(", ")
        );
    }
    Ok(())
}

pub fn cargo() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

fn build(root: &Path) -> Result<()> {
    let args = [
        "build",
        "--release",
        "-p",
        "stock",
        "-p",
        "payment",
        "-p",
        "order",
    ];
    println!("xtask: cargo {}", args.join(" "));
    let status = std::process::Command::new(cargo())
        .args(args)
        .current_dir(root)
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo build of the services failed ({status})");
    }
    Ok(())
}

/// Removes the previous run's state, logs and data, including RabbitMQ data that was relocated
/// out of the tree (then `rabbitmq` is a symlink to it).
fn wipe(fleet: &Path) -> Result<()> {
    let rabbit = fleet.join("rabbitmq");
    if let Ok(target) = std::fs::read_link(&rabbit) {
        let _ = std::fs::remove_dir_all(target);
    }
    match std::fs::remove_dir_all(fleet) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", fleet.display())),
    }
}

/// Raises the soft open-files limit to the hard one (children inherit it): 1000 concurrent
/// clients need thousands of descriptors in nginx and the services. Returns the new limit.
pub(crate) fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_cur.min(1 << 20)
}

/// logs/<name>.log as a symlink to a log the process writes elsewhere, so every log is found in
/// one directory.
fn link_log(fleet: &Path, name: &str, target: &Path) -> PathBuf {
    let link = fleet.join("logs").join(format!("{name}.log"));
    let _ = std::fs::remove_file(&link);
    let _ = std::os::unix::fs::symlink(target, &link);
    link
}

fn start_all(
    root: &Path,
    fleet: &Path,
    opts: &Options,
    nofile: u64,
    state: &mut State,
) -> Result<()> {
    // The broker boots in 10-25 s; start it first, beside the stores.
    let rabbit_dir = fleet.join("rabbitmq");
    println!(
        "xtask: starting RabbitMQ node {} (AMQP {})",
        fleet::BROKER_NODE,
        fleet::AMQP_PORT
    );
    let broker = std::thread::spawn(move || {
        RabbitNode::start(
            &rabbit_dir,
            fleet::BROKER_NODE,
            fleet::AMQP_PORT,
            fleet::DIST_PORT,
        )
    });
    let stores = start_stores(root, fleet, state);
    // Join even when the stores failed: a node that did start is then stopped by its Drop.
    let node = broker
        .join()
        .map_err(|_| anyhow!("the thread starting RabbitMQ panicked"))?;
    stores?;
    let node = node?;
    let broker_info = Broker {
        node: node.node_name().to_string(),
        dir: node.dir().to_path_buf(),
        amqp_port: node.amqp_port(),
        dist_port: node.dist_port(),
        started_epmd: node.started_epmd(),
    };
    let log = link_log(fleet, "rabbitmq", &node.log_file());
    let pid = node.disarm();
    state.broker = Some(broker_info);
    state.record(
        root,
        Record::new(
            Kind::Broker,
            "broker",
            "rabbitmq",
            pid,
            fleet::AMQP_PORT,
            None,
            &log,
        ),
    )?;
    println!("xtask: RabbitMQ is up");
    interrupt::check()?;

    start_services(root, fleet, opts.port, state)?;
    interrupt::check()?;

    let gw = gateway::start(root, fleet, &gateway_params(fleet, opts.port, nofile))?;
    state.record(
        root,
        Record::new(
            Kind::Gateway,
            "gateway",
            "nginx",
            gw.pid,
            opts.port,
            None,
            &gw.log,
        ),
    )?;
    println!("xtask: nginx listens on {}", state.gateway_url);

    wait_ready(state)?;
    gateway::check_routes(&state.gateway_url)
}

/// The four Redis sets (a master and two replicas each) and the three Sentinels.
fn start_stores(root: &Path, fleet: &Path, state: &mut State) -> Result<()> {
    println!(
        "xtask: starting Redis sets {:?} (a master and {} replicas each)",
        fleet::STORES.map(|s| s.0),
        fleet::NODES_PER_STORE - 1
    );
    // (store, node name, role, server), the master of each store first.
    let mut nodes: Vec<(&str, String, &str, RedisServer)> = Vec::new();
    for (store, ports) in fleet::STORES {
        let master_port = ports[0];
        for (i, port) in ports.into_iter().enumerate() {
            let name = format!("{store}-redis-{}", i + 1);
            let (role, replica_of) = match i {
                0 => ("master", None),
                _ => ("replica", Some(master_port)),
            };
            // Every node refuses writes while it is a master without a replica
            // (min-replicas-to-write); the replicas' sync is accepted all the same.
            let server =
                RedisServer::start_in_set(fleet::redis_dir(fleet, &name), port, replica_of, None)?;
            nodes.push((store, name, role, server));
        }
    }
    for (_, name, role, server) in &nodes {
        if *role == "replica" {
            server
                .wait_replica_synced(Duration::from_secs(20))
                .with_context(|| format!("{name} did not sync"))?;
        }
    }
    for (_, name, role, server) in &nodes {
        if *role == "master" {
            server
                .wait_replicas_online(fleet::NODES_PER_STORE - 1, Duration::from_secs(20))
                .with_context(|| format!("{name} does not count its replicas as online"))?;
        }
    }
    interrupt::check()?;
    // Hand the processes over only now: until here, an error drops (kills) them.
    for (store, name, role, server) in nodes {
        let log = link_log(fleet, &name, server.log_path());
        let port = server.port();
        let pid = server.disarm();
        state.record(
            root,
            Record::new(
                Kind::Redis,
                &format!("{store}-redis-{role}"),
                &name,
                pid,
                port,
                Some(store),
                &log,
            ),
        )?;
    }

    println!("xtask: starting Sentinels on {:?}", fleet::SENTINEL_PORTS);
    let monitors: Vec<(&str, u16)> = fleet::STORES.iter().map(|(s, n)| (*s, n[0])).collect();
    let mut sentinels = Vec::new();
    for (i, port) in fleet::SENTINEL_PORTS.into_iter().enumerate() {
        let name = format!("sentinel-{}", i + 1);
        let s = Sentinel::start(
            fleet::sentinel_dir(fleet, &name),
            port,
            &monitors,
            fleet::QUORUM,
            fleet::DOWN_AFTER_MS,
            fleet::FAILOVER_TIMEOUT_MS,
        )?;
        sentinels.push((name, s));
    }
    // Until every Sentinel knows its peers and the replicas, a master's death would not be
    // failed over; chaos runs start right after `up`, so wait for it here.
    let names: Vec<&str> = fleet::STORES.iter().map(|s| s.0).collect();
    for (name, s) in &sentinels {
        s.wait_monitoring(
            &names,
            fleet::NODES_PER_STORE - 1,
            fleet::SENTINEL_PORTS.len() - 1,
            Duration::from_secs(40),
        )
        .with_context(|| format!("{name} did not see the whole topology"))?;
    }
    for (name, s) in sentinels {
        let log = link_log(fleet, &name, s.log_path());
        let port = s.port();
        let pid = s.disarm();
        state.record(
            root,
            Record::new(Kind::Sentinel, "sentinel", &name, pid, port, None, &log),
        )?;
    }
    Ok(())
}

/// The gateway's parameters; the supervisor starts nginx again with the same ones.
pub(crate) fn gateway_params(fleet: &Path, port: u16, nofile: u64) -> gateway::Params {
    gateway::Params {
        bind_host: "127.0.0.1".to_string(),
        port,
        prefix: fleet.join("nginx"),
        log_dir: fleet.join("logs"),
        run_as_root: proc::is_root(),
        nofile,
        upstreams: fleet::SERVICES
            .iter()
            .map(|(svc, ports)| (svc.to_string(), ports.to_vec()))
            .collect(),
    }
}

/// The command that runs a service instance (the supervisor restarts it with the same one).
pub(crate) fn service_command(
    root: &Path,
    fleet: &Path,
    inst: &fleet::Instance,
    gateway_port: u16,
) -> std::process::Command {
    let bin = fleet::release_dir(root).join(inst.service);
    let mut cmd = proc::command(&bin);
    cmd.current_dir(fleet);
    for (var, action) in fleet::env_plan(inst, gateway_port) {
        match action {
            EnvAction::Set(v) => {
                cmd.env(var, v);
            }
            EnvAction::Remove => {
                cmd.env_remove(var);
            }
            EnvAction::PassThrough => {}
        }
    }
    cmd
}

/// A service instance's log.
pub(crate) fn service_log(fleet: &Path, inst: &fleet::Instance) -> PathBuf {
    fleet.join("logs").join(format!("{}.log", inst.name))
}

fn start_services(root: &Path, fleet: &Path, gateway_port: u16, state: &mut State) -> Result<()> {
    println!("xtask: starting services");
    for inst in fleet::instances() {
        let mut cmd = service_command(root, fleet, &inst, gateway_port);
        let log = service_log(fleet, &inst);
        let child = spawn_logged(&mut cmd, &log)?;
        // The Child handle is dropped without waiting: the process is tracked by pid from now
        // on (proc::is_alive reaps it if it dies while xtask still runs).
        state.record(
            root,
            Record::new(
                Kind::Service,
                &inst.role(),
                &inst.name,
                child.id(),
                inst.port,
                None,
                &log,
            ),
        )?;
    }
    Ok(())
}

/// Waits until every service instance answers 200 on /ready, telling which ones it still waits
/// for every few seconds, and failing at once when one exits.
fn wait_ready(state: &State) -> Result<()> {
    let services: Vec<&Record> = state
        .processes
        .iter()
        .filter(|r| r.kind == Kind::Service)
        .collect();
    let start = Instant::now();
    let mut last_report = Instant::now();
    let mut ready = vec![false; services.len()];
    println!(
        "xtask: waiting for /ready on {} service instances",
        services.len()
    );
    loop {
        interrupt::check()?;
        let mut waiting = Vec::new();
        for (i, r) in services.iter().enumerate() {
            if ready[i] {
                continue;
            }
            if !r.alive() {
                bail!(
                    "{} exited during start-up; last lines of {}:\n{}",
                    r.name,
                    r.log.display(),
                    tail(&r.log, 30)
                );
            }
            let url = format!("http://127.0.0.1:{}/ready", r.port);
            match http_get(&url, Duration::from_secs(1)) {
                Ok(resp) if resp.status == 200 => ready[i] = true,
                Ok(resp) => waiting.push(format!("{} ({})", r.name, resp.status)),
                Err(_) => waiting.push(format!("{} (no answer)", r.name)),
            }
        }
        if waiting.is_empty() {
            println!(
                "xtask: all services ready after {} s",
                start.elapsed().as_secs()
            );
            return Ok(());
        }
        if start.elapsed() >= READY_TIMEOUT {
            bail!(
                "not ready after {} s: {} (see the logs in target/fleet/logs)",
                READY_TIMEOUT.as_secs(),
                waiting.join(", ")
            );
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            println!(
                "xtask: still waiting ({} s): {}",
                start.elapsed().as_secs(),
                waiting.join(", ")
            );
            last_report = Instant::now();
        }
        sleep(Duration::from_millis(500));
    }
}
