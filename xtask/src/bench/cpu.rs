//! The CPU each part of the fleet used during a measured window, from /proc: the kernel's
//! utime + stime of every process in the state file and of all its descendants (nginx's
//! workers under its master, RabbitMQ's helpers), summed per component (nginx, order, stock,
//! payment, redis per store, sentinel, rabbitmq), plus the bench itself and the whole machine
//! (/proc/stat). Divided by the checkouts of the window it is the cost of one checkout per
//! component, which is what says where the time goes.
//!
//! Snapshots, not a sampler thread: the counters are cumulative, so two readings (start and
//! end of the window) are exact. A process is keyed by pid and start time, so a process the
//! supervisor restarted mid-window counts from zero, not as a negative delta.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use crate::state::{Kind, State};

/// `(ppid, utime + stime in ticks, start time in ticks)` from the text of /proc/<pid>/stat.
/// The command name (field 2) may hold spaces and parentheses, so fields are counted after
/// the last ')': there index 0 is field 3 (state), index 1 ppid, 11 utime, 12 stime, 19
/// starttime (proc(5)).
pub fn parse_stat(stat: &str) -> Option<(u32, u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ppid = f.get(1)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let start = f.get(19)?.parse().ok()?;
    Some((ppid, utime + stime, start))
}

/// `(busy, total)` ticks of all CPUs from the first line of /proc/stat; busy leaves out idle
/// and iowait. Guest time is already inside user and nice.
pub fn parse_proc_stat(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let (idle, iowait) = (v[3], *v.get(4).unwrap_or(&0));
    let total: u64 = v.iter().sum();
    Some((total - idle - iowait, total))
}

/// The component a state-file record belongs to.
pub fn component(kind: Kind, role: &str, store: Option<&str>) -> String {
    match kind {
        Kind::Redis => format!("redis {}", store.unwrap_or("?")),
        Kind::Sentinel => "sentinel".into(),
        Kind::Broker => "rabbitmq".into(),
        Kind::Gateway => "nginx".into(),
        Kind::Service => role.trim_end_matches("-service").to_string(),
    }
}

/// The processes of the machine, read once: ticks and children by pid.
struct Table {
    procs: BTreeMap<u32, (u32, u64, u64)>,
}

impl Table {
    fn read() -> Table {
        let mut procs = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for e in entries.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if let Some(p) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| parse_stat(&s))
                {
                    procs.insert(pid, p);
                }
            }
        }
        Table { procs }
    }

    /// `root` and all its descendants that run now.
    fn tree(&self, root: u32) -> Vec<u32> {
        let mut out = Vec::new();
        let mut todo = vec![root];
        while let Some(pid) = todo.pop() {
            if !self.procs.contains_key(&pid) || out.contains(&pid) {
                continue;
            }
            out.push(pid);
            todo.extend(
                self.procs
                    .iter()
                    .filter(|(_, (ppid, _, _))| *ppid == pid)
                    .map(|(child, _)| *child),
            );
        }
        out
    }
}

/// Ticks per process (keyed by pid and start time) per component at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    at: Instant,
    per_component: BTreeMap<String, BTreeMap<(u32, u64), u64>>,
    machine: Option<(u64, u64)>,
}

/// Reads the counters of the fleet in `state` (if any), of this process and of the machine.
pub fn snapshot(state: Option<&State>) -> Snapshot {
    let table = Table::read();
    // The bench is this process alone: anything it started is not load generation.
    let me = std::process::id();
    let mut roots: Vec<(String, Vec<u32>)> = vec![("bench".into(), vec![me])];
    if let Some(state) = state {
        for r in &state.processes {
            let name = component(r.kind, &r.role, r.store.as_deref());
            roots.push((name, table.tree(r.pid)));
        }
    }
    let mut per_component: BTreeMap<String, BTreeMap<(u32, u64), u64>> = BTreeMap::new();
    for (name, pids) in roots {
        let entry = per_component.entry(name).or_default();
        for pid in pids.into_iter().filter(|p| table.procs.contains_key(p)) {
            let (_, ticks, start) = table.procs[&pid];
            entry.insert((pid, start), ticks);
        }
    }
    Snapshot {
        at: Instant::now(),
        per_component,
        machine: std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| parse_proc_stat(&s)),
    }
}

/// CPU used by one component over a window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Usage {
    pub component: String,
    pub cpu_seconds: f64,
    /// Of one core (200 % = both cores of a 2-core box).
    pub percent_of_a_core: f64,
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// What each component used between two snapshots, and the machine as a whole (`machine`,
/// all processes of the box, busy time only).
pub fn usage(before: &Snapshot, after: &Snapshot) -> Vec<Usage> {
    let hz = ticks_per_second();
    let wall = after.at.duration_since(before.at).as_secs_f64().max(1e-9);
    let row = |component: String, ticks: u64| Usage {
        component,
        cpu_seconds: ticks as f64 / hz,
        percent_of_a_core: ticks as f64 / hz / wall * 100.0,
    };
    let mut out = Vec::new();
    for (name, procs) in &after.per_component {
        let earlier = before.per_component.get(name);
        let ticks: u64 = procs
            .iter()
            .map(|(key, t)| {
                // A process that started inside the window counts from zero.
                let t0 = earlier.and_then(|e| e.get(key)).copied().unwrap_or(0);
                t.saturating_sub(t0)
            })
            .sum();
        out.push(row(name.clone(), ticks));
    }
    if let (Some((b0, _)), Some((b1, _))) = (before.machine, after.machine) {
        out.push(row("machine".into(), b1.saturating_sub(b0)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_awkward_names_parse() {
        // Field layout of proc(5); the name has a space and a parenthesis.
        let line = "4242 (redis-server *:6400) S 1 4242 4242 0 -1 4194560 500 0 0 0 \
                    250 75 0 0 20 0 5 0 123456 100000 2000 18446744073709551615 1 1 0 0 0 0 \
                    0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_stat(line), Some((1, 325, 123456)));
        let odd = "7 (a) b) R 3 7 7 0 -1 0 0 0 0 0 9 1 0 0 20 0 1 0 55 0 0";
        assert_eq!(parse_stat(odd), Some((3, 10, 55)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 0"), None);
    }

    #[test]
    fn the_machine_line_splits_busy_from_idle() {
        let text = "cpu  100 5 50 1000 20 3 2 1 0 0\ncpu0 50 2 25 500 10 1 1 0 0 0\nintr 1\n";
        // busy = user + nice + system + irq + softirq + steal = 100+5+50+3+2+1
        assert_eq!(parse_proc_stat(text), Some((161, 1181)));
        assert_eq!(parse_proc_stat("nothing"), None);
    }

    #[test]
    fn records_map_to_components() {
        assert_eq!(
            component(Kind::Redis, "stock-redis-master", Some("stock")),
            "redis stock"
        );
        assert_eq!(component(Kind::Service, "order-service", None), "order");
        assert_eq!(component(Kind::Gateway, "gateway", None), "nginx");
        assert_eq!(component(Kind::Broker, "broker", None), "rabbitmq");
        assert_eq!(component(Kind::Sentinel, "sentinel", None), "sentinel");
    }

    /// This very process burns CPU until a snapshot shows 0.2 s of it (by CPU, not wall time:
    /// the box may be busy with other work); the machine's busy time is at least as large.
    #[test]
    fn a_window_sees_the_cpu_this_process_burns() {
        let before = snapshot(None);
        let deadline = Instant::now() + std::time::Duration::from_secs(20);
        let mut x = 0u64;
        let mine = |u: &[Usage]| {
            u.iter()
                .find(|u| u.component == "bench")
                .unwrap()
                .cpu_seconds
        };
        let u = loop {
            for _ in 0..1_000_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            let u = usage(&before, &snapshot(None));
            if mine(&u) >= 0.2 || Instant::now() > deadline {
                break u;
            }
        };
        std::hint::black_box(x);
        assert!(mine(&u) >= 0.2, "{u:?}");
        let machine = u.iter().find(|u| u.component == "machine").unwrap();
        assert!(machine.cpu_seconds + 0.05 >= mine(&u), "{u:?}");
    }

    /// A recorded process's children count for its component (nginx's workers under the
    /// master): here a shell whose child burns a core.
    #[test]
    fn descendants_of_a_recorded_process_count_for_its_component() {
        let mut shell = std::process::Command::new("sh")
            .args(["-c", "yes > /dev/null & sleep 0.6; kill $!"])
            .spawn()
            .unwrap();
        let state = State {
            gateway_url: "http://127.0.0.1:1".into(),
            tag: "t".into(),
            broker: None,
            processes: vec![crate::state::Record::new(
                Kind::Gateway,
                "gateway",
                "nginx",
                shell.id(),
                1,
                None,
                std::path::Path::new("/dev/null"),
            )],
            supervisor: None,
        };
        let before = snapshot(Some(&state));
        std::thread::sleep(std::time::Duration::from_millis(400));
        let after = snapshot(Some(&state));
        shell.wait().unwrap();
        // The shell, `yes` (and `sleep`) under nginx; the bench is this process only.
        assert!(after.per_component["nginx"].len() >= 2, "{after:?}");
        assert_eq!(after.per_component["bench"].len(), 1, "{after:?}");
        let u = usage(&before, &after);
        let nginx = u.iter().find(|u| u.component == "nginx").unwrap();
        // Other tests run beside this one on a small box: a share of a core is enough.
        assert!(nginx.cpu_seconds >= 0.03, "{u:?}");
    }

    #[test]
    fn a_process_started_inside_the_window_counts_from_zero() {
        let at = Instant::now();
        let snap = |procs: &[((u32, u64), u64)]| Snapshot {
            at,
            per_component: BTreeMap::from([("order".to_string(), procs.iter().copied().collect())]),
            machine: None,
        };
        // pid 10 ran 500 ticks before and 600 after; pid 11 was restarted as pid 12 (new
        // start time) with 40 ticks: 100 + 40, never 600 - 900.
        let before = snap(&[((10, 1), 500), ((11, 1), 900)]);
        let after = snap(&[((10, 1), 600), ((12, 7), 40)]);
        let u = usage(&before, &after);
        assert_eq!(u.len(), 1);
        assert!((u[0].cpu_seconds - 140.0 / ticks_per_second()).abs() < 1e-9);
    }
}
