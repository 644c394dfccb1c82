//! A private RabbitMQ node beside whatever RabbitMQ the machine already runs.
//!
//! Follows the measured recipe in shared/NOTES.md: a second node starts beside the machine's
//! own only when every RABBITMQ_* setting differs (node name, AMQP and distribution ports, data,
//! log, config, plugins and pid files), and Debian's `rabbitmq-server` script drops to the
//! `rabbitmq` user, so everything the node writes must be owned by `rabbitmq`. A directory the
//! `rabbitmq` user cannot reach (e.g. a repository under /root, mode 0700) would make the node
//! die at once with `eacces`; then the data goes to a temp directory and `dir` becomes a symlink
//! to it, so it is still found where the caller asked.
//!
//! epmd (port 4369) is shared by every Erlang node on the machine. `rabbitmq-server` starts it
//! when it is not running and `rabbitmqctl stop` leaves it behind, so we stop it only when we
//! started it and no other node is registered with it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::install::find_binary;
use crate::net::{port_is_free, port_is_open};
use crate::proc::{self, is_root, run_with_timeout, spawn_logged, tail};

const EPMD_PORT: u16 = 4369;

/// A RabbitMQ node started by us; stopped (`rabbitmqctl stop`) when dropped.
#[derive(Debug)]
pub struct RabbitNode {
    dir: PathBuf,
    node_name: String,
    amqp_port: u16,
    dist_port: u16,
    management_port: Option<u16>,
    pid: u32,
    started_epmd: bool,
    armed: bool,
}

/// The environment that makes the node (and `rabbitmqctl` talking to it) independent of the
/// machine's own node and of /etc/rabbitmq.
pub fn node_env(
    dir: &Path,
    node_name: &str,
    amqp_port: u16,
    dist_port: u16,
) -> Vec<(String, String)> {
    let p = |name: &str| dir.join(name).display().to_string();
    [
        ("RABBITMQ_NODENAME", node_name.to_string()),
        ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".to_string()),
        ("RABBITMQ_NODE_PORT", amqp_port.to_string()),
        ("RABBITMQ_DIST_PORT", dist_port.to_string()),
        ("RABBITMQ_MNESIA_BASE", p("mnesia")),
        ("RABBITMQ_LOG_BASE", p("log")),
        ("RABBITMQ_PID_FILE", p("pid")),
        // Without extension: the node reads <dir>/rabbitmq.conf.
        ("RABBITMQ_CONFIG_FILE", p("rabbitmq")),
        ("RABBITMQ_ADVANCED_CONFIG_FILE", p("advanced.config")),
        ("RABBITMQ_ENABLED_PLUGINS_FILE", p("enabled_plugins")),
        // Our own (empty) env file instead of /etc/rabbitmq/rabbitmq-env.conf, whose settings
        // are meant for the machine's node.
        ("RABBITMQ_CONF_ENV_FILE", p("rabbitmq-env.conf")),
        // Inter-node traffic on loopback only, like the AMQP listener. One scheduler
        // thread: the node shares two cores with the whole fleet, and a second scheduler
        // mostly adds thread wakeups (BENCHMARKS.md).
        (
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
            "-kernel inet_dist_use_interface {127,0,0,1} +S 1:1".to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// `rabbitmq.conf` for a loopback-only node.
fn node_config(amqp_port: u16, management_port: Option<u16>) -> String {
    let mut c = format!(
        "# Written by xtask.\nlisteners.tcp.default = 127.0.0.1:{amqp_port}\n\
         log.console = false\nlog.file.level = info\n"
    );
    if let Some(m) = management_port {
        c.push_str(&format!(
            "management.tcp.port = {m}\nmanagement.tcp.ip = 127.0.0.1\n"
        ));
    }
    c
}

/// `enabled_plugins`: nothing (so no management listener on the default 15672 colliding with
/// the machine's node), or just the management plugin.
fn plugins_file(management: bool) -> &'static str {
    if management {
        "[rabbitmq_management].\n"
    } else {
        "[].\n"
    }
}

/// Waits up to `timeout` for `port` to become free.
fn wait_port_free(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !port_is_free(port) {
        if Instant::now() >= deadline {
            return false;
        }
        sleep(Duration::from_millis(100));
    }
    true
}

fn rabbit_tool(name: &str) -> Result<PathBuf> {
    find_binary(name).ok_or_else(|| anyhow!("{name} not found (apt-get install rabbitmq-server)"))
}

/// Can the `rabbitmq` user write into `dir` (every parent traversable)? Asked of the kernel by
/// running `test -w` as that user rather than by reasoning about modes and ACLs.
fn rabbitmq_can_write(dir: &Path) -> bool {
    let Some(runuser) = find_binary("runuser") else {
        return true; // cannot tell; let the node's own error speak
    };
    Command::new(runuser)
        .args(["-u", "rabbitmq", "--", "test", "-w"])
        .arg(dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn chown_to_rabbitmq(dir: &Path) -> Result<()> {
    let status = Command::new("chown")
        .args(["-R", "rabbitmq:rabbitmq"])
        .arg(dir)
        .status()
        .context("cannot run chown")?;
    if !status.success() {
        bail!("chown -R rabbitmq:rabbitmq {} failed", dir.display());
    }
    Ok(())
}

/// The directory the node will really use: `dir` itself, or (as root, when the `rabbitmq` user
/// cannot reach `dir`) a temp directory that `dir` then links to.
fn usable_dir(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(target) = std::fs::read_link(dir) {
        std::fs::create_dir_all(&target)?;
        return Ok(target);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    if !is_root() {
        return Ok(dir);
    }
    chown_to_rabbitmq(&dir)?;
    if rabbitmq_can_write(&dir) {
        return Ok(dir);
    }
    let alt = std::env::temp_dir().join(format!("xtask-rabbitmq-{:016x}", hash_path(&dir)));
    std::fs::create_dir_all(&alt)?;
    std::fs::set_permissions(&alt, std::fs::Permissions::from_mode(0o755))?;
    std::fs::remove_dir(&dir).with_context(|| {
        format!(
            "{} is not reachable by the rabbitmq user and not empty; use another directory",
            dir.display()
        )
    })?;
    std::os::unix::fs::symlink(&alt, &dir)?;
    eprintln!(
        "xtask: {} is not reachable by the rabbitmq user; RabbitMQ data lives in {} (symlinked)",
        dir.display(),
        alt.display()
    );
    Ok(alt)
}

fn hash_path(p: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    p.hash(&mut h);
    h.finish()
}

impl RabbitNode {
    /// Starts node `node_name` (e.g. `fleet@localhost`) with AMQP on 127.0.0.1:`amqp_port`,
    /// Erlang distribution on `dist_port`, and everything it writes under `dir`. Existing data
    /// in `dir` is kept (so a node can be started again on the data of a killed one). Returns
    /// once `rabbitmqctl wait` says the node runs; that takes 10-25 s.
    pub fn start(
        dir: impl AsRef<Path>,
        node_name: &str,
        amqp_port: u16,
        dist_port: u16,
    ) -> Result<Self> {
        Self::start_inner(dir.as_ref(), node_name, amqp_port, dist_port, None)
    }

    /// As [`RabbitNode::start`], with the management plugin listening on 127.0.0.1:`management_port`.
    pub fn start_with_management(
        dir: impl AsRef<Path>,
        node_name: &str,
        amqp_port: u16,
        dist_port: u16,
        management_port: u16,
    ) -> Result<Self> {
        Self::start_inner(
            dir.as_ref(),
            node_name,
            amqp_port,
            dist_port,
            Some(management_port),
        )
    }

    fn start_inner(
        dir: &Path,
        node_name: &str,
        amqp_port: u16,
        dist_port: u16,
        management_port: Option<u16>,
    ) -> Result<Self> {
        let mut node = RabbitNode {
            dir: dir.to_path_buf(),
            node_name: node_name.to_string(),
            amqp_port,
            dist_port,
            management_port,
            pid: 0,
            started_epmd: false,
            armed: false,
        };
        node.launch()?;
        Ok(node)
    }

    fn launch(&mut self) -> Result<()> {
        if !is_root() && std::env::var("USER").as_deref() != Ok("rabbitmq") {
            bail!(
                "Debian's rabbitmq-server only runs as root or as the rabbitmq user; \
                 run this as root (e.g. sudo -E cargo xtask up)"
            );
        }
        let server = rabbit_tool("rabbitmq-server")?;
        rabbit_tool("rabbitmqctl")?;
        for port in [
            Some(self.amqp_port),
            Some(self.dist_port),
            self.management_port,
        ]
        .into_iter()
        .flatten()
        {
            // A node that was just killed may hold its ports for a moment longer.
            if !wait_port_free(port, Duration::from_secs(5)) {
                bail!(
                    "port {port} is already in use; cannot start RabbitMQ node {}",
                    self.node_name
                );
            }
        }
        let dir = usable_dir(&self.dir)?;
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        std::fs::write(
            dir.join("rabbitmq.conf"),
            node_config(self.amqp_port, self.management_port),
        )?;
        std::fs::write(
            dir.join("enabled_plugins"),
            plugins_file(self.management_port.is_some()),
        )?;
        std::fs::write(
            dir.join("rabbitmq-env.conf"),
            "# Written by xtask: intentionally empty.\n",
        )?;
        let _ = std::fs::remove_file(dir.join("pid"));
        if is_root() {
            chown_to_rabbitmq(&dir)?;
        }
        self.dir = dir;

        let epmd_was_running = port_is_open(EPMD_PORT);
        let mut cmd = proc::command(server);
        cmd.arg("-detached")
            .envs(node_env(
                &self.dir,
                &self.node_name,
                self.amqp_port,
                self.dist_port,
            ))
            .current_dir(&self.dir);
        let out = self.dir.join("startup.out");
        let mut launcher = spawn_logged(&mut cmd, &out)?;
        // `-detached` returns as soon as the VM is forked off; a failure here is a script error.
        let status = launcher.wait()?;
        if !status.success() {
            bail!(
                "rabbitmq-server -detached failed ({status}):\n{}",
                tail(&out, 20)
            );
        }
        let waited = self.ctl(
            &[
                "wait",
                &self.pid_file().display().to_string(),
                "--timeout",
                "60",
            ],
            Duration::from_secs(90),
        );
        self.started_epmd = !epmd_was_running && port_is_open(EPMD_PORT);
        let pid = std::fs::read_to_string(self.pid_file())
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        match (waited, pid) {
            (Ok(()), Some(pid)) => {
                self.pid = pid;
                self.armed = true;
                Ok(())
            }
            (result, pid) => {
                // Do not leave a half-started VM behind.
                if let Some(pid) = pid {
                    let _ = proc::terminate(pid, None, Duration::from_secs(5));
                }
                if self.started_epmd {
                    let _ = release_epmd(&self.node_name);
                }
                let why = result
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "no pid file".into());
                bail!(
                    "RabbitMQ node {} did not start: {why}\n--- {}:\n{}\n--- startup output:\n{}",
                    self.node_name,
                    self.log_file().display(),
                    tail(&self.log_file(), 30),
                    tail(&out, 10)
                )
            }
        }
    }

    /// Runs `rabbitmqctl -n <node> <args>` with this node's environment.
    fn ctl(&self, args: &[&str], timeout: Duration) -> Result<()> {
        ctl(
            &self.dir,
            &self.node_name,
            self.amqp_port,
            self.dist_port,
            args,
            timeout,
        )
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("pid")
    }

    /// The node's main log file.
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("log").join(format!("{}.log", self.node_name))
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f` (guest may log in over loopback).
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    pub fn amqp_port(&self) -> u16 {
        self.amqp_port
    }

    pub fn dist_port(&self) -> u16 {
        self.dist_port
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The directory the node really uses (differs from the one asked for when it had to be
    /// relocated for the rabbitmq user).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pid of the Erlang VM (beam.smp).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// True when epmd was not running before this node started (so the node started it).
    pub fn started_epmd(&self) -> bool {
        self.started_epmd
    }

    /// Stops the node with `rabbitmqctl stop` (signals as a fallback), then epmd when we started
    /// it and no other node uses it. Idempotent.
    pub fn stop(&mut self) -> Result<()> {
        if !self.armed {
            return Ok(());
        }
        self.armed = false;
        let result = stop_node(
            &self.dir,
            &self.node_name,
            self.amqp_port,
            self.dist_port,
            self.pid,
        );
        if self.started_epmd {
            release_epmd(&self.node_name)?;
        }
        result
    }

    /// SIGKILL to the VM, as a crash would. The data directory stays, so [`Self::restart`]
    /// shows what survived.
    pub fn kill9(&mut self) {
        if self.armed {
            proc::kill9(self.pid, None);
            proc::wait_gone(self.pid, None, Duration::from_secs(10));
        }
    }

    /// Starts the node again on the same directory and ports (after [`Self::kill9`] or
    /// [`Self::stop`]; a running node is stopped first).
    pub fn restart(&mut self) -> Result<()> {
        if self.armed && proc::is_alive(self.pid) {
            stop_node(
                &self.dir,
                &self.node_name,
                self.amqp_port,
                self.dist_port,
                self.pid,
            )?;
        }
        self.armed = false;
        let started_epmd = self.started_epmd;
        self.launch()?;
        self.started_epmd |= started_epmd;
        Ok(())
    }

    /// Hands the node over (it keeps running after this) and returns the VM's pid.
    pub fn disarm(mut self) -> u32 {
        self.armed = false;
        self.pid
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("xtask: stopping RabbitMQ node {}: {e:#}", self.node_name);
        }
    }
}

/// `rabbitmqctl -n <node> <args>` with the node's environment, failing on a non-zero exit.
fn ctl(
    dir: &Path,
    node_name: &str,
    amqp_port: u16,
    dist_port: u16,
    args: &[&str],
    timeout: Duration,
) -> Result<()> {
    let mut cmd = Command::new(rabbit_tool("rabbitmqctl")?);
    cmd.args(["-n", node_name])
        .args(args)
        .envs(node_env(dir, node_name, amqp_port, dist_port))
        .current_dir(dir);
    let (ok, output) = run_with_timeout(&mut cmd, timeout)?;
    if !ok {
        bail!("rabbitmqctl {} failed: {}", args.join(" "), output.trim());
    }
    Ok(())
}

/// Stops the node whose VM is `pid`: `rabbitmqctl stop` (which waits for the VM to exit), then
/// SIGTERM/SIGKILL if it is still there. Used by [`RabbitNode::stop`] and by `xtask down`.
pub fn stop_node(
    dir: &Path,
    node_name: &str,
    amqp_port: u16,
    dist_port: u16,
    pid: u32,
) -> Result<()> {
    if !proc::is_alive(pid) {
        return Ok(());
    }
    let pid_file = dir.join("pid").display().to_string();
    let graceful = ctl(
        dir,
        node_name,
        amqp_port,
        dist_port,
        &["stop", &pid_file],
        Duration::from_secs(60),
    );
    if proc::wait_gone(pid, None, Duration::from_secs(10)) {
        return Ok(());
    }
    proc::terminate(pid, None, Duration::from_secs(10))?;
    if let Err(e) = graceful {
        eprintln!("xtask: {e:#}; the node was stopped by signal instead");
    }
    Ok(())
}

/// Stops epmd if no node is registered with it any more (waiting a little for `node_name` to
/// deregister). Returns true when it was stopped. Only call it when we started epmd.
pub fn release_epmd(node_name: &str) -> Result<bool> {
    let Some(epmd) = find_binary("epmd") else {
        return Ok(false);
    };
    let short = node_name.split('@').next().unwrap_or(node_name);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = Command::new(&epmd).arg("-names").output()?;
        if !out.status.success() {
            return Ok(false); // not running
        }
        let names = registered_names(&String::from_utf8_lossy(&out.stdout));
        if names.iter().any(|n| n != short) {
            return Ok(false); // another node uses it
        }
        if names.is_empty() {
            // epmd itself refuses -kill while any node is registered, a second safety net.
            let ok = Command::new(&epmd).arg("-kill").output()?.status.success();
            return Ok(ok);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        sleep(Duration::from_millis(200));
    }
}

/// Node names from `epmd -names` ("name fleet at port 25673").
fn registered_names(epmd_names_output: &str) -> Vec<String> {
    epmd_names_output
        .lines()
        .filter_map(|l| l.strip_prefix("name "))
        .filter_map(|rest| rest.split(" at port ").next())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_is_private_to_the_node() {
        let env = node_env(Path::new("/x"), "fleet@localhost", 5673, 25673);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("RABBITMQ_NODENAME"), Some("fleet@localhost"));
        assert_eq!(get("RABBITMQ_NODE_PORT"), Some("5673"));
        assert_eq!(get("RABBITMQ_DIST_PORT"), Some("25673"));
        assert_eq!(get("RABBITMQ_CONFIG_FILE"), Some("/x/rabbitmq"));
        assert_eq!(get("RABBITMQ_PID_FILE"), Some("/x/pid"));
        // Every path setting points into the node's directory.
        for (k, v) in &env {
            if v.starts_with('/') {
                assert!(v.starts_with("/x/"), "{k}={v}");
            }
        }
    }

    #[test]
    fn config_and_plugins() {
        let c = node_config(5673, None);
        assert!(c.contains("listeners.tcp.default = 127.0.0.1:5673"));
        assert!(!c.contains("management"));
        assert!(node_config(5673, Some(15673)).contains("management.tcp.port = 15673"));
        assert_eq!(plugins_file(false), "[].\n");
        assert_eq!(plugins_file(true), "[rabbitmq_management].\n");
    }

    #[test]
    fn epmd_names_are_parsed() {
        let out = "epmd: up and running on port 4369 with data:\nname fleet at port 25673\nname rabbit at port 25672\n";
        assert_eq!(registered_names(out), vec!["fleet", "rabbit"]);
        assert!(registered_names("epmd: up and running on port 4369 with data:\n").is_empty());
    }
}
