//! `target/fleet/state.json`: every process `up` started, so `down` and `ps` can find them from
//! another xtask process (and after `up --detach` has exited).
//!
//! Written after every single start, not once at the end: if `up` dies half-way, `down` still
//! knows what to stop. Each record keeps the process's start time beside its pid, so a pid
//! reused by an unrelated process after a reboot is never signalled.
//!
//! After start-up the supervisor (`supervise.rs`) is the only writer: when it restarts a
//! process it puts the new pid and start time into that process's record and counts the
//! restart, so a record always names the current process (a dead one while it waits for its
//! restart). Other tools (`chaos`, `kill`, `restart`) read the file and never write it while a
//! supervisor runs.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::fleet;
use xtask::{proc, resp};

/// What kind of process a record is, which decides how it is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Redis,
    Sentinel,
    Broker,
    Service,
    Gateway,
}

/// One started process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Role at start (`ps` asks Redis for the current one).
    pub role: String,
    pub name: String,
    pub pid: u32,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    pub kind: Kind,
    /// Kernel start time of `pid`, to tell it from a later process with the same pid.
    #[serde(default)]
    pub start_ticks: Option<u64>,
    pub log: PathBuf,
    /// How often the supervisor started it again.
    #[serde(default)]
    pub restarts: u32,
}

impl Record {
    pub fn new(
        kind: Kind,
        role: &str,
        name: &str,
        pid: u32,
        port: u16,
        store: Option<&str>,
        log: &Path,
    ) -> Self {
        Record {
            role: role.to_string(),
            name: name.to_string(),
            pid,
            port,
            store: store.map(str::to_string),
            kind,
            start_ticks: proc::start_ticks(pid),
            log: log.to_path_buf(),
            restarts: 0,
        }
    }

    /// True while the recorded process (not just some process with its pid) runs.
    pub fn alive(&self) -> bool {
        proc::same_process(self.pid, self.start_ticks)
    }

    /// The role now: a Redis that was started as master may be a replica after a failover,
    /// and the other way round. Falls back to the recorded role when it cannot be asked.
    pub fn current_role(&self) -> String {
        match (&self.kind, &self.store) {
            (Kind::Redis, Some(store)) if self.alive() => match resp::role(self.port, None) {
                Ok(r) if r == "master" => format!("{store}-redis-master"),
                Ok(r) if r == "slave" => format!("{store}-redis-replica"),
                _ => self.role.clone(),
            },
            _ => self.role.clone(),
        }
    }
}

/// What `stop` needs to know about the broker beyond its pid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Broker {
    pub node: String,
    /// The directory the node really uses (may be a relocated temp dir, see rabbit.rs).
    pub dir: PathBuf,
    pub amqp_port: u16,
    pub dist_port: u16,
    pub started_epmd: bool,
}

/// The process that supervises the fleet: a detached `cargo xtask supervise`, or the
/// foreground `cargo xtask up` itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupervisorRecord {
    pub pid: u32,
    #[serde(default)]
    pub start_ticks: Option<u64>,
}

impl SupervisorRecord {
    /// This very process.
    pub fn me() -> Self {
        let pid = std::process::id();
        SupervisorRecord {
            pid,
            start_ticks: proc::start_ticks(pid),
        }
    }

    pub fn alive(&self) -> bool {
        proc::same_process(self.pid, self.start_ticks)
    }
}

/// The whole state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub gateway_url: String,
    /// Value of `XTASK_FLEET_TAG` in every process of this fleet.
    pub tag: String,
    #[serde(default)]
    pub broker: Option<Broker>,
    pub processes: Vec<Record>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervisor: Option<SupervisorRecord>,
}

pub fn path(root: &Path) -> PathBuf {
    fleet::fleet_dir(root).join("state.json")
}

impl State {
    pub fn load(root: &Path) -> Result<Option<State>> {
        let p = path(root);
        match std::fs::read_to_string(&p) {
            Ok(text) => {
                Ok(Some(serde_json::from_str(&text).with_context(|| {
                    format!("cannot parse {}", p.display())
                })?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
        }
    }

    /// Writes atomically (temp file + rename), so a reader never sees half a file.
    pub fn save(&self, root: &Path) -> Result<()> {
        let p = path(root);
        let tmp = p.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(self)? + "\n")?;
        std::fs::rename(&tmp, &p)?;
        Ok(())
    }

    /// Adds a record and saves at once.
    pub fn record(&mut self, root: &Path, rec: Record) -> Result<()> {
        self.processes.push(rec);
        self.save(root)
    }

    pub fn any_alive(&self) -> bool {
        self.processes.iter().any(Record::alive)
    }

    /// The supervisor, if one runs.
    pub fn live_supervisor(&self) -> Option<&SupervisorRecord> {
        self.supervisor.as_ref().filter(|s| s.alive())
    }
}

/// One line of `cargo xtask ps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PsEntry {
    pub role: String,
    pub name: String,
    pub pid: u32,
    pub port: u16,
    pub alive: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// How often the supervisor started it again.
    pub restarts: u32,
}

/// `cargo xtask ps`: a JSON array on stdout (empty when no fleet was started).
pub fn ps(root: &Path) -> Result<()> {
    let entries: Vec<PsEntry> = match State::load(root)? {
        None => Vec::new(),
        Some(state) => state.processes.iter().map(ps_entry).collect(),
    };
    println!("{}", serde_json::to_string_pretty(&entries)?);
    Ok(())
}

fn ps_entry(r: &Record) -> PsEntry {
    PsEntry {
        role: r.current_role(),
        name: r.name.clone(),
        pid: r.pid,
        port: r.port,
        alive: r.alive(),
        store: r.store.clone(),
        restarts: r.restarts,
    }
}

/// A fixed-width table of the records, for people.
pub fn table(records: &[Record]) -> String {
    let mut out = format!(
        "{:<24} {:<16} {:>8} {:>6}  {}\n",
        "ROLE", "NAME", "PID", "PORT", "STORE"
    );
    for r in records {
        out.push_str(&format!(
            "{:<24} {:<16} {:>8} {:>6}  {}\n",
            r.role,
            r.name,
            r.pid,
            r.port,
            r.store.as_deref().unwrap_or("-")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> State {
        State {
            gateway_url: "http://127.0.0.1:8000".into(),
            tag: "/x/target/fleet".into(),
            broker: Some(Broker {
                node: "fleet@localhost".into(),
                dir: "/x/target/fleet/rabbitmq".into(),
                amqp_port: 5673,
                dist_port: 25673,
                started_epmd: false,
            }),
            processes: vec![Record {
                role: "order-redis-master".into(),
                name: "order-redis-1".into(),
                pid: u32::MAX - 1, // surely not running
                port: 6400,
                store: Some("order".into()),
                kind: Kind::Redis,
                start_ticks: Some(1),
                log: "/x/log".into(),
                restarts: 2,
            }],
            supervisor: Some(SupervisorRecord {
                pid: u32::MAX - 1,
                start_ticks: None,
            }),
        }
    }

    #[test]
    fn state_round_trips_through_json() {
        let s = sample();
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains("\"kind\":\"redis\""));
        assert_eq!(serde_json::from_str::<State>(&text).unwrap(), s);
        assert!(s.live_supervisor().is_none());
    }

    /// A state file written before restarts were counted still loads.
    #[test]
    fn older_state_files_load() {
        let text = r#"{"gateway_url":"http://127.0.0.1:8000","tag":"t","processes":[
            {"role":"gateway","name":"nginx","pid":1,"port":8000,"kind":"gateway","log":"/l"}]}"#;
        let s: State = serde_json::from_str(text).unwrap();
        assert_eq!(s.processes[0].restarts, 0);
        assert_eq!(s.supervisor, None);
    }

    #[test]
    fn ps_entries_of_dead_processes_keep_their_recorded_role() {
        let s = sample();
        let e = ps_entry(&s.processes[0]);
        assert!(!e.alive);
        assert_eq!(e.role, "order-redis-master");
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["store"], "order");
        assert_eq!(json["port"], 6400);
        assert_eq!(json["restarts"], 2);
        // Non-redis entries carry no store key at all.
        let mut svc = s.processes[0].clone();
        svc.store = None;
        svc.kind = Kind::Service;
        assert!(serde_json::to_value(ps_entry(&svc))
            .unwrap()
            .get("store")
            .is_none());
    }

    #[test]
    fn table_lists_every_record() {
        let t = table(&sample().processes);
        assert!(t.starts_with("ROLE"));
        assert!(t.contains("order-redis-1"));
        assert_eq!(t.lines().count(), 2);
    }
}
