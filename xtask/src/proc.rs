//! Spawning processes and stopping them again by pid.
//!
//! Why this is more than `Command::spawn`:
//! - every child starts in a session of its own (`setsid`), so a Ctrl-C at the terminal reaches
//!   only xtask, which then stops the fleet in a deliberate order, and `up --detach` leaves
//!   processes that survive the terminal;
//! - processes are later stopped by pid from a state file, possibly by another xtask process, so
//!   a pid alone is not proof of identity (pids are reused): [`start_ticks`] records the kernel's
//!   start time of the process beside the pid and [`same_process`] checks both;
//! - a child that died but was never waited for stays a zombie, which `kill(pid, 0)` still
//!   reports as alive: [`is_alive`] reaps our own zombies and ignores other ones;
//! - processes may carry a tag in their environment ([`set_child_tag`]), so `down` can find
//!   processes that belong to the fleet even when the state file was lost. Programs that
//!   rewrite their process title (redis-server, nginx) overwrite that memory, so for them
//!   [`processes_with_cwd_under`] (their working directory) is the clue instead.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// The environment variable that marks fleet processes (see [`set_child_tag`]).
pub const TAG_VAR: &str = "XTASK_FLEET_TAG";

static CHILD_TAG: Mutex<Option<String>> = Mutex::new(None);

/// From now on, every process the kit spawns carries `XTASK_FLEET_TAG=<tag>` in its environment
/// (and so do its own children, e.g. nginx workers or RabbitMQ's helpers). `None` stops tagging.
///
/// A process-wide setting rather than a parameter because the tag concerns the launcher, not
/// the callers of `RedisServer::start` and friends, and it must also reach processes started
/// through scripts (`rabbitmq-server`) that xtask does not control.
pub fn set_child_tag(tag: Option<&str>) {
    *CHILD_TAG.lock().unwrap_or_else(|e| e.into_inner()) = tag.map(str::to_string);
}

/// A `Command` for `program` that runs in its own session, with stdin from /dev/null and the
/// current child tag, if any.
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.stdin(Stdio::null());
    if let Some(tag) = CHILD_TAG
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_deref()
    {
        cmd.env(TAG_VAR, tag);
    }
    // SAFETY: setsid() is async-signal-safe and touches no memory of the parent; it is the only
    // thing done between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Spawns `cmd` with stdout and stderr appended to `log` (created if missing).
pub fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<Child> {
    if let Some(parent) = log.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open log {}", log.display()))?;
    let err = out.try_clone()?;
    cmd.stdout(out).stderr(err);
    cmd.spawn()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))
}

/// True when this process runs as root (then packages can be installed and RabbitMQ's scripts
/// switch to the `rabbitmq` user themselves).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Sends `sig` to `pid`; false when there is no such process (or no permission).
pub fn signal(pid: u32, sig: i32) -> bool {
    // SAFETY: kill has no memory-safety preconditions; pid 0 and negative pids (groups) are
    // excluded so a bad record can never signal a whole group by accident.
    pid > 0 && pid <= i32::MAX as u32 && unsafe { libc::kill(pid as i32, sig) } == 0
}

/// The fields of /proc/<pid>/stat after the command name, which may itself contain spaces and
/// parentheses: so split after the last ')'. Index 0 is field 3 (state) of proc(5).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

fn parse_stat(stat: &str) -> Option<Vec<String>> {
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// When the process started, in clock ticks since boot (field 22 of /proc/<pid>/stat).
pub fn start_ticks(pid: u32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// The process group of `pid` (field 5 of /proc/<pid>/stat).
fn process_group(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(2)?.parse().ok()
}

/// True when `pid` runs and is not a zombie. An exited child of this very process is reaped on
/// the way (otherwise it would stay a zombie for as long as xtask runs). Do not use it on a pid
/// whose `Child` handle you still mean to `wait()` on.
pub fn is_alive(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    let mut status = 0;
    // SAFETY: waitpid with WNOHANG only reaps an exited child of ours (ECHILD otherwise).
    unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
    if !signal(pid, 0) {
        return false;
    }
    !matches!(stat_fields(pid), Some(f) if f.first().map(String::as_str) == Some("Z"))
}

/// True when `pid` is alive and is still the process that started at `ticks` (`None`: the start
/// time was not recorded, trust the pid).
pub fn same_process(pid: u32, ticks: Option<u64>) -> bool {
    is_alive(pid) && (ticks.is_none() || start_ticks(pid) == ticks)
}

/// Waits until `pid` is gone; true if it went within `timeout`.
pub fn wait_gone(pid: u32, ticks: Option<u64>, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !same_process(pid, ticks) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(Duration::from_millis(50));
    }
}

/// How a process ended under [`terminate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It was not running (any more).
    NotRunning,
    /// It exited after SIGTERM.
    Terminated,
    /// It ignored SIGTERM for `grace` and was killed.
    Killed,
}

/// SIGTERM, then SIGKILL after `grace`. When the process leads its own process group (as
/// everything spawned by [`command`] does), SIGKILL goes to the whole group so helpers such as
/// nginx workers do not outlive their master.
pub fn terminate(pid: u32, ticks: Option<u64>, grace: Duration) -> Result<Stopped> {
    if !same_process(pid, ticks) {
        return Ok(Stopped::NotRunning);
    }
    signal(pid, libc::SIGTERM);
    if wait_gone(pid, ticks, grace) {
        return Ok(Stopped::Terminated);
    }
    kill9(pid, ticks);
    if wait_gone(pid, ticks, Duration::from_secs(5)) {
        Ok(Stopped::Killed)
    } else {
        anyhow::bail!("process {pid} survived SIGKILL")
    }
}

/// SIGKILL to `pid` (and to its process group when it leads one), if it is still the same
/// process. Returns false when it was not running.
pub fn kill9(pid: u32, ticks: Option<u64>) -> bool {
    if !same_process(pid, ticks) {
        return false;
    }
    if process_group(pid) == Some(pid) && pid > 1 {
        // SAFETY: a negative pid addresses the process group `pid` leads; we checked it leads it.
        unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
    } else {
        signal(pid, libc::SIGKILL);
    }
    true
}

/// Pids of live processes whose environment has `TAG_VAR=<tag>` (the current process excluded).
/// Processes whose environment cannot be read (other users, when not root) are skipped.
pub fn tagged_processes(tag: &str) -> Vec<u32> {
    let needle = format!("{TAG_VAR}={tag}");
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()))
                .unwrap_or(false)
        })
        .filter(|&pid| is_alive(pid))
        .collect();
    pids.sort_unstable();
    pids
}

/// Pids of live processes (the current one excluded) whose working directory is `dir` or
/// below it. Callers should also check the program name: a shell someone opened in a log
/// directory has its working directory there too.
pub fn processes_with_cwd_under(dir: &Path) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd"))
                .map(|cwd| cwd.starts_with(dir))
                .unwrap_or(false)
        })
        .filter(|&pid| is_alive(pid))
        .collect();
    pids.sort_unstable();
    pids
}

/// The executable name of `pid` (from /proc/<pid>/comm), for messages.
pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// The last `lines` lines of a log file (at most the last 64 KiB are read), for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs `cmd` to completion, killing it after `timeout`. Returns its exit status and combined
/// output. Used for short-lived helpers (rabbitmqctl, su) that can hang on a sick node.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<(bool, String)> {
    let out_path =
        std::env::temp_dir().join(format!("xtask-cmd-{}-{}.out", std::process::id(), unique()));
    let mut child = spawn_logged(cmd, &out_path)?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    match status {
        Some(s) => Ok((s.success(), output)),
        None => Ok((
            false,
            format!("{output}\n(killed after {} s)", timeout.as_secs()),
        )),
    }
}

/// A number unique within this process, for temporary names.
pub(crate) fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_odd_command_names() {
        let stat = "1234 (we(ird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        let f = parse_stat(stat).unwrap();
        assert_eq!(f[0], "S");
        assert_eq!(f[2], "1234"); // pgrp
        assert_eq!(f[19], "987654"); // starttime
    }

    #[test]
    fn own_process_is_alive_and_identified() {
        let me = std::process::id();
        let ticks = start_ticks(me);
        assert!(ticks.is_some());
        assert!(same_process(me, ticks));
        assert!(!same_process(me, ticks.map(|t| t + 1)));
    }

    #[test]
    fn terminate_stops_a_child_and_reaps_it() {
        let child = command("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let ticks = start_ticks(pid);
        // The child leads its own session, hence its own group.
        assert_eq!(process_group(pid), Some(pid));
        drop(child); // handed over, as the launcher does
        assert_eq!(
            terminate(pid, ticks, Duration::from_secs(5)).unwrap(),
            Stopped::Terminated
        );
        assert!(!is_alive(pid));
        assert_eq!(
            terminate(pid, ticks, Duration::from_secs(1)).unwrap(),
            Stopped::NotRunning
        );
    }

    #[test]
    fn tagged_children_can_be_found() {
        let tag = format!("test-{}-{}", std::process::id(), unique());
        // Build the command while the tag is set; the tag is read at `command()` time.
        set_child_tag(Some(&tag));
        let mut cmd = command("sleep");
        set_child_tag(None);
        let mut child = cmd.arg("30").spawn().unwrap();
        let pid = child.id();
        // `contains`, not equality: a test running in parallel may have built a command in the
        // short window in which the tag was set.
        assert!(tagged_processes(&tag).contains(&pid));
        assert!(kill9(pid, None));
        assert!(wait_gone(pid, None, Duration::from_secs(5)));
        assert!(!tagged_processes(&tag).contains(&pid));
        let _ = child.wait(); // already reaped by is_alive; keeps the handle's contract
    }

    #[test]
    fn children_are_found_by_working_directory() {
        let dir = crate::ScratchDir::new("cwd").unwrap();
        let mut child = command("sleep")
            .arg("30")
            .current_dir(dir.path())
            .spawn()
            .unwrap();
        let pid = child.id();
        assert_eq!(processes_with_cwd_under(dir.path()), vec![pid]);
        assert_eq!(comm(pid), "sleep");
        let _ = child.kill();
        let _ = child.wait();
        assert!(processes_with_cwd_under(dir.path()).is_empty());
    }

    #[test]
    fn run_with_timeout_reports_output_and_kills_hangs() {
        let (ok, out) = run_with_timeout(
            Command::new("sh").args(["-c", "echo hi; exit 3"]),
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(!ok);
        assert_eq!(out.trim(), "hi");
        let start = Instant::now();
        let (ok, _) =
            run_with_timeout(Command::new("sleep").arg("30"), Duration::from_millis(300)).unwrap();
        assert!(!ok);
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
