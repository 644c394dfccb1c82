//! The faults a chaos run injects, their order, and how each is done: by pid, from the fleet's
//! state file, with signals (SIGKILL a crash, SIGTERM a deploy, SIGSTOP/SIGCONT a node that
//! stalls without dying). Healing is not ours: the supervisor restarts what died (Redis nodes
//! as replicas of the current master, the broker as the same node, services on their ports)
//! and keeps the state file pointing at the current processes.

use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use serde::Serialize;

use super::health::master_port;
use super::world::Clock;
use crate::fleet;
use crate::state::{Kind, Record, State};
use xtask::{http_get, proc};

/// One fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Fault {
    /// SIGKILL one (random) instance of the service.
    KillService(&'static str),
    /// SIGKILL the store's current master.
    KillMaster(&'static str),
    /// SIGKILL a replica of a random store.
    KillReplica,
    /// SIGKILL a random Sentinel.
    KillSentinel,
    /// SIGKILL the RabbitMQ node.
    KillBroker,
    /// SIGTERM every service instance in turn, each once the previous one is back and ready.
    RollingRestart,
    /// SIGSTOP a random store's master for longer than Sentinel's down-after, then SIGCONT:
    /// a master that stalls, is failed over, and wakes up believing it is still the master.
    StallMaster,
}

const SERVICES: [&str; 3] = ["stock", "payment", "order"];
const STORES: [&str; 4] = ["order", "stock", "payment", "saga"];

impl Fault {
    /// The kind without its target, for the per-kind summary and `--faults`.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::KillService(_) => "kill-service",
            Fault::KillMaster(_) => "kill-master",
            Fault::KillReplica => "kill-replica",
            Fault::KillSentinel => "kill-sentinel",
            Fault::KillBroker => "kill-broker",
            Fault::RollingRestart => "rolling-restart",
            Fault::StallMaster => "stall-master",
        }
    }

    pub fn label(&self) -> String {
        match self {
            Fault::KillService(s) | Fault::KillMaster(s) => format!("{}:{s}", self.kind()),
            _ => self.kind().to_string(),
        }
    }

    /// Every fault once: an instance of each service, each store's master, a replica, a
    /// Sentinel, the broker, a rolling restart and a stalled master.
    pub fn all() -> Vec<Fault> {
        let mut v: Vec<Fault> = SERVICES.iter().map(|s| Fault::KillService(s)).collect();
        v.extend(STORES.iter().map(|s| Fault::KillMaster(s)));
        v.extend([
            Fault::KillReplica,
            Fault::KillSentinel,
            Fault::KillBroker,
            Fault::RollingRestart,
            Fault::StallMaster,
        ]);
        v
    }

    /// `all`, or a comma-separated list of kinds (`kill-service` is one fault per service,
    /// `kill-master` one per store) and targeted faults (`kill-service:order`,
    /// `kill-master:saga`).
    pub fn parse_list(text: &str) -> Result<Vec<Fault>> {
        let mut out = Vec::new();
        for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            let (kind, target) = match word.split_once(':') {
                Some((k, t)) => (k, Some(t)),
                None => (word, None),
            };
            let pick = |names: &[&'static str], make: fn(&'static str) -> Fault| match target {
                None => Ok(names.iter().map(|n| make(n)).collect::<Vec<_>>()),
                Some(t) => names
                    .iter()
                    .find(|n| **n == t)
                    .map(|n| vec![make(n)])
                    .ok_or_else(|| anyhow!("{kind}: no target {t:?} (one of {names:?})")),
            };
            let faults = match kind {
                "all" if target.is_none() => Fault::all(),
                "kill-service" => pick(&SERVICES, Fault::KillService)?,
                "kill-master" => pick(&STORES, Fault::KillMaster)?,
                _ => {
                    let f = Fault::all()
                        .into_iter()
                        .find(|f| f.kind() == kind)
                        .ok_or_else(|| {
                            anyhow!(
                                "unknown fault {word:?}: all, kill-service[:stock|payment|order], \
                                 kill-master[:order|stock|payment|saga], kill-replica, \
                                 kill-sentinel, kill-broker, rolling-restart, stall-master"
                            )
                        })?;
                    if target.is_some() {
                        bail!("{kind} takes no target");
                    }
                    vec![f]
                }
            };
            for f in faults {
                if !out.contains(&f) {
                    out.push(f);
                }
            }
        }
        if out.is_empty() {
            bail!("--faults names no fault");
        }
        Ok(out)
    }

    /// About how long the fault takes, healing and settling included: whether one more round
    /// fits in `--duration`.
    pub fn estimate(&self) -> Duration {
        Duration::from_secs(match self {
            Fault::KillBroker => 25,
            Fault::RollingRestart => 40,
            Fault::StallMaster => 20,
            _ => 12,
        })
    }
}

/// The order of the first `rounds` rounds: every fault once per round, shuffled per round.
pub fn rounds(faults: &[Fault], rounds: u32, rng: &mut StdRng) -> Vec<Fault> {
    let mut out = Vec::new();
    for _ in 0..rounds {
        let mut round = faults.to_vec();
        round.shuffle(rng);
        out.extend(round);
    }
    out
}

/// One fault as done.
#[derive(Debug, Clone, Serialize)]
pub struct Injection {
    /// What was hit, e.g. `stock-redis-2 (pid 1234, master of stock)`.
    pub target: String,
    /// When the first signal went out.
    pub at: f64,
    /// When the fault's own action ended (SIGCONT sent, the last instance restarted).
    pub done: f64,
}

/// How long a stalled master stays stopped: several times Sentinel's down-after, so it is
/// failed over while stalled, and long enough for the services to notice.
pub fn stall_time() -> Duration {
    Duration::from_millis(fleet::DOWN_AFTER_MS * 5)
}

fn records(root: &Path) -> Result<Vec<Record>> {
    Ok(State::load(root)?
        .context("no fleet state file: is the fleet up?")?
        .processes)
}

fn by_port(records: &[Record], kind: Kind, port: u16) -> Result<Record> {
    records
        .iter()
        .find(|r| r.kind == kind && r.port == port)
        .cloned()
        .ok_or_else(|| anyhow!("no {kind:?} process on port {port} in the state file"))
}

fn alive_one(candidates: Vec<&Record>, rng: &mut StdRng, what: &str) -> Result<Record> {
    let alive: Vec<&Record> = candidates.into_iter().filter(|r| r.alive()).collect();
    alive
        .choose(rng)
        .map(|r| (*r).clone())
        .ok_or_else(|| anyhow!("no running {what} to hit"))
}

fn send(r: &Record, sig: i32, name: &str) -> Result<()> {
    if !r.alive() || !proc::signal(r.pid, sig) {
        bail!(
            "{} (pid {}) is not running: cannot send {name}",
            r.name,
            r.pid
        );
    }
    Ok(())
}

/// Does `fault`; `say` prints progress.
pub fn inject(
    fault: &Fault,
    root: &Path,
    rng: &mut StdRng,
    clock: &Clock,
    say: &dyn Fn(String),
) -> Result<Injection> {
    let recs = records(root)?;
    let kill = |r: Record, what: String| -> Result<Injection> {
        let at = clock.now();
        send(&r, libc::SIGKILL, "SIGKILL")?;
        let target = format!("{} (pid {}{what})", r.name, r.pid);
        say(format!("SIGKILL {target}"));
        // Gone for sure before anyone looks: a large process (the broker's VM) takes a moment
        // to die, and meanwhile it would still count as running.
        if !proc::wait_gone(r.pid, r.start_ticks, Duration::from_secs(10)) {
            bail!("{} (pid {}) survived SIGKILL", r.name, r.pid);
        }
        Ok(Injection {
            target,
            at,
            done: clock.now(),
        })
    };
    match fault {
        Fault::KillService(service) => {
            let prefix = format!("{service}-");
            let r = alive_one(
                recs.iter()
                    .filter(|r| r.kind == Kind::Service && r.name.starts_with(&prefix))
                    .collect(),
                rng,
                service,
            )?;
            kill(r, String::new())
        }
        Fault::KillMaster(store) => {
            let r = by_port(&recs, Kind::Redis, master_port(store)?)?;
            kill(r, format!(", master of {store}"))
        }
        Fault::KillReplica => {
            let store = *STORES.choose(rng).expect("stores");
            let master = master_port(store)?;
            let r = alive_one(
                recs.iter()
                    .filter(|r| r.store.as_deref() == Some(store) && r.port != master)
                    .collect(),
                rng,
                "replica",
            )?;
            kill(r, format!(", replica of {store}"))
        }
        Fault::KillSentinel => {
            let r = alive_one(
                recs.iter().filter(|r| r.kind == Kind::Sentinel).collect(),
                rng,
                "Sentinel",
            )?;
            kill(r, String::new())
        }
        Fault::KillBroker => {
            let r = alive_one(
                recs.iter().filter(|r| r.kind == Kind::Broker).collect(),
                rng,
                "broker",
            )?;
            kill(r, String::new())
        }
        Fault::StallMaster => {
            let store = *STORES.choose(rng).expect("stores");
            let r = by_port(&recs, Kind::Redis, master_port(store)?)?;
            stall(&r, store, clock, say)
        }
        Fault::RollingRestart => rolling_restart(root, &recs, clock, say),
    }
}

/// SIGCONT when dropped: a stalled master must never stay stopped, not even when the run
/// fails or is interrupted half-way.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        proc::signal(self.0, libc::SIGCONT);
    }
}

fn stall(r: &Record, store: &str, clock: &Clock, say: &dyn Fn(String)) -> Result<Injection> {
    let at = clock.now();
    send(r, libc::SIGSTOP, "SIGSTOP")?;
    let resume = Resume(r.pid);
    let target = format!("{} (pid {}, master of {store})", r.name, r.pid);
    let pause = stall_time();
    say(format!("SIGSTOP {target} for {} s", pause.as_secs_f64()));
    let until = Instant::now() + pause;
    while Instant::now() < until && !crate::interrupt::requested() {
        sleep(Duration::from_millis(100));
    }
    drop(resume);
    say(format!("SIGCONT {}", r.name));
    Ok(Injection {
        target,
        at,
        done: clock.now(),
    })
}

/// How long one instance may take to stop after SIGTERM (graceful shutdown) and then to be
/// restarted and ready.
const STOP_TIMEOUT: Duration = Duration::from_secs(40);
const RESTART_TIMEOUT: Duration = Duration::from_secs(60);

fn rolling_restart(
    root: &Path,
    recs: &[Record],
    clock: &Clock,
    say: &dyn Fn(String),
) -> Result<Injection> {
    let at = clock.now();
    let names: Vec<String> = fleet::instances().into_iter().map(|i| i.name).collect();
    for name in &names {
        let old = recs
            .iter()
            .find(|r| r.kind == Kind::Service && &r.name == name)
            .cloned()
            .ok_or_else(|| anyhow!("{name} is not in the state file"))?;
        let t = clock.now();
        send(&old, libc::SIGTERM, "SIGTERM")?;
        say(format!("SIGTERM {name} (pid {})", old.pid));
        if !proc::wait_gone(old.pid, old.start_ticks, STOP_TIMEOUT) {
            bail!(
                "{name} (pid {}) still runs {} s after SIGTERM",
                old.pid,
                STOP_TIMEOUT.as_secs()
            );
        }
        let back = wait_restarted(root, &old, RESTART_TIMEOUT)?;
        say(format!(
            "{name} back as pid {} and ready after {:.1} s",
            back.pid,
            clock.now() - t
        ));
        if crate::interrupt::requested() {
            bail!("interrupted");
        }
    }
    Ok(Injection {
        target: format!("{} instances", names.len()),
        at,
        done: clock.now(),
    })
}

/// Waits until the state file shows `old`'s name as another live process that answers /ready.
fn wait_restarted(root: &Path, old: &Record, timeout: Duration) -> Result<Record> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = records(root)?
            .into_iter()
            .find(|r| r.name == old.name)
            .filter(|r| (r.pid, r.start_ticks) != (old.pid, old.start_ticks) && r.alive());
        if let Some(r) = now {
            let url = format!("http://127.0.0.1:{}/ready", r.port);
            if matches!(http_get(&url, Duration::from_secs(2)), Ok(resp) if resp.status == 200) {
                return Ok(r);
            }
        }
        if Instant::now() >= deadline || crate::interrupt::requested() {
            bail!(
                "{} was not restarted and ready within {} s (is the supervisor running?)",
                old.name,
                timeout.as_secs()
            );
        }
        sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn fault_lists_parse() {
        assert_eq!(Fault::parse_list("all").unwrap(), Fault::all());
        assert_eq!(Fault::all().len(), 12);
        assert_eq!(
            Fault::parse_list("kill-master:saga, kill-broker").unwrap(),
            vec![Fault::KillMaster("saga"), Fault::KillBroker]
        );
        assert_eq!(Fault::parse_list("kill-service").unwrap().len(), 3);
        assert_eq!(
            Fault::parse_list("kill-broker,kill-broker").unwrap(),
            vec![Fault::KillBroker],
            "a fault named twice runs once per round"
        );
        assert!(Fault::parse_list("kill-master:nope").is_err());
        assert!(Fault::parse_list("kill-broker:x").is_err());
        assert!(Fault::parse_list("explode").is_err());
        assert!(Fault::parse_list(",").is_err());
    }

    #[test]
    fn labels_and_kinds() {
        assert_eq!(Fault::KillService("order").label(), "kill-service:order");
        assert_eq!(Fault::KillService("order").kind(), "kill-service");
        assert_eq!(Fault::StallMaster.label(), "stall-master");
        for f in Fault::all() {
            assert_eq!(Fault::parse_list(&f.label()).unwrap(), vec![f]);
        }
    }

    #[test]
    fn rounds_hold_every_fault_once_each_in_a_seeded_order() {
        let all = Fault::all();
        let a = rounds(&all, 2, &mut StdRng::seed_from_u64(3));
        let b = rounds(&all, 2, &mut StdRng::seed_from_u64(3));
        assert_eq!(a, b);
        assert_eq!(a.len(), 24);
        for round in a.chunks(12) {
            for f in &all {
                assert_eq!(round.iter().filter(|g| *g == f).count(), 1);
            }
        }
        assert_ne!(a, rounds(&all, 2, &mut StdRng::seed_from_u64(4)));
    }

    #[test]
    fn a_stall_outlasts_sentinels_down_after() {
        assert!(stall_time() > Duration::from_millis(fleet::DOWN_AFTER_MS * 2));
    }

    #[test]
    fn a_stalled_process_is_resumed_when_the_guard_drops() {
        let mut child = proc::command("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let state = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap()
                .rsplit_once(')')
                .unwrap()
                .1
                .split_whitespace()
                .next()
                .unwrap()
                .to_string()
        };
        assert!(proc::signal(pid, libc::SIGSTOP));
        let deadline = Instant::now() + Duration::from_secs(5);
        while state(pid) != "T" && Instant::now() < deadline {
            sleep(Duration::from_millis(10));
        }
        assert_eq!(state(pid), "T");
        drop(Resume(pid));
        let deadline = Instant::now() + Duration::from_secs(5);
        while state(pid) == "T" && Instant::now() < deadline {
            sleep(Duration::from_millis(10));
        }
        assert_ne!(state(pid), "T");
        let _ = child.kill();
        let _ = child.wait();
    }
}
