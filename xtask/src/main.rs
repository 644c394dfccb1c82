//! `cargo xtask <command>`: the project's automation, in Rust so it runs wherever cargo does.
//!
//! The commands are thin: topology in `fleet`, the state file and `ps` in `state`, start-up in
//! `up`, shutdown in `down`, the gateway in `gateway`, the test pipeline in `test_cmd`. The
//! process kit they use is the library half of this crate (`xtask::...`).

mod bench;
mod chaos;
mod down;
mod flags;
mod fleet;
mod interrupt;
mod kill;
mod restart;
mod state;
mod supervise;
mod test_cmd;
mod up;
mod validate;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  up [--detach] [--port N] [--no-build]
                 build the services and run the whole fleet on 127.0.0.1 (gateway on
                 port N, default 8000); stays in the foreground until Ctrl-C unless --detach
  down           stop everything `up` started (idempotent)
  ps             the fleet's processes as JSON (current role, name, pid, port, alive, store,
                 restarts)
  kill <name|role>
                 SIGKILL one process (a name from `ps`, or a role it has now, such as
                 stock-redis-master); the supervisor starts it again
  restart <name|role>
                 stop one process with SIGTERM and wait until it is back
  supervise [--detach]
                 supervise a running fleet again (`up` starts a supervisor by itself)
  validate       check the deployment files offline
  test           fmt, clippy, validate, up, cargo test, pytest, chaos, down: the CI pipeline
";

/// The repository root: the parent of this crate's directory.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the repository")
        .to_path_buf()
}

/// Options of `up`.
fn parse_up(args: &[String]) -> Result<up::Options> {
    let mut opts = up::Options {
        detach: false,
        port: fleet::DEFAULT_GATEWAY_PORT,
        build: true,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--detach" | "-d" => opts.detach = true,
            "--no-build" => opts.build = false,
            "--port" => {
                let v = it.next().context("--port needs a value")?;
                opts.port = v.parse().with_context(|| format!("bad port {v:?}"))?;
            }
            other => match other.strip_prefix("--port=") {
                Some(v) => opts.port = v.parse().with_context(|| format!("bad port {v:?}"))?,
                None => bail!("unknown option {other:?} for up\n\n{USAGE}"),
            },
        }
    }
    Ok(opts)
}

fn no_args(cmd: &str, rest: &[String]) -> Result<()> {
    if !rest.is_empty() {
        bail!("{cmd} takes no arguments\n\n{USAGE}");
    }
    Ok(())
}

fn one_arg<'a>(cmd: &str, rest: &'a [String]) -> Result<&'a str> {
    match rest {
        [arg] => Ok(arg),
        _ => bail!("{cmd} takes one process name or role\n\n{USAGE}"),
    }
}

fn run(args: &[String]) -> Result<()> {
    let root = repo_root();
    let Some((cmd, rest)) = args.split_first() else {
        print!(
            "{USAGE}{}{}{}{}",
            xtask::sagas::USAGE,
            xtask::dlq::USAGE,
            chaos::USAGE,
            bench::USAGE
        );
        return Ok(());
    };
    match cmd.as_str() {
        "up" => {
            let opts = parse_up(rest)?;
            interrupt::install();
            up::run(&root, &opts)
        }
        "down" => {
            no_args(cmd, rest)?;
            down::run(&root)
        }
        "ps" => {
            no_args(cmd, rest)?;
            state::ps(&root)
        }
        "kill" => kill::run(&root, one_arg(cmd, rest)?),
        "restart" => restart::run(&root, one_arg(cmd, rest)?),
        "supervise" => match rest {
            [] => {
                interrupt::install();
                supervise::run(&root, false).map(|_| ())
            }
            [flag] if flag == "--detach" || flag == "-d" => {
                let pid = supervise::spawn_detached(&root)?;
                println!("xtask: supervising in the background (pid {pid})");
                Ok(())
            }
            // How `up --detach` and `supervise --detach` start it: stdout is the log.
            [flag] if flag == "--daemon" => {
                interrupt::install();
                supervise::run(&root, true).map(|_| ())
            }
            _ => bail!("supervise takes only --detach\n\n{USAGE}"),
        },
        "validate" => {
            no_args(cmd, rest)?;
            validate::run(&root)
        }
        "test" => {
            no_args(cmd, rest)?;
            interrupt::install();
            test_cmd::run(&root)
        }
        "sagas" => {
            let instances: Vec<String> = fleet::SERVICES
                .iter()
                .filter(|(name, _)| *name == "order")
                .flat_map(|(_, ports)| ports.iter().map(|p| format!("http://127.0.0.1:{p}")))
                .collect();
            tokio::runtime::Runtime::new()?.block_on(xtask::sagas::cli(rest, &instances))
        }
        "dlq" => {
            tokio::runtime::Runtime::new()?.block_on(xtask::dlq::cli(rest, &fleet::amqp_url()))
        }
        "bench" => {
            let opts = bench::parse(rest)?;
            interrupt::install();
            bench::run(&root, &opts)
        }
        "chaos" => {
            let opts = chaos::parse(rest)?;
            interrupt::install();
            chaos::run(&root, &opts)
        }
        "help" | "--help" | "-h" => {
            print!(
                "{USAGE}{}{}{}{}",
                xtask::sagas::USAGE,
                xtask::dlq::USAGE,
                chaos::USAGE,
                bench::USAGE
            );
            Ok(())
        }
        other => bail!("unknown command {other:?}\n\n{USAGE}"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args) {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn up_options() {
        let o = parse_up(&args(&["--detach", "--port", "9000", "--no-build"])).unwrap();
        assert!(o.detach && !o.build);
        assert_eq!(o.port, 9000);
        assert_eq!(parse_up(&args(&["--port=8001"])).unwrap().port, 8001);
        let d = parse_up(&[]).unwrap();
        assert!(!d.detach && d.build);
        assert_eq!(d.port, 8000);
        assert!(parse_up(&args(&["--port"])).is_err());
        assert!(parse_up(&args(&["--bogus"])).is_err());
    }

    #[test]
    fn root_holds_the_workspace() {
        assert!(repo_root().join("Cargo.toml").is_file());
        assert!(repo_root().join(xtask::gateway::TEMPLATE).is_file());
    }

    #[test]
    fn unknown_commands_fail() {
        assert!(run(&args(&["frobnicate"])).is_err());
        assert!(run(&args(&["down", "extra"])).is_err());
        assert!(run(&args(&["kill"])).is_err());
        assert!(run(&args(&["restart", "a", "b"])).is_err());
    }
}
