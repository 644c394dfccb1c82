//! Finding the external programs the fleet needs, and installing them from Debian when allowed.
//!
//! The fleet runs the distribution's `redis-server`, `rabbitmq-server` and `nginx` rather than
//! anything downloaded, so on a fresh Debian machine one `apt-get install` is all it takes. As
//! root we do it ourselves; otherwise we stop and name the exact packages, since guessing at
//! sudo would hang on a password prompt in CI.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::proc::is_root;

/// Directories searched after `PATH`: nginx and rabbitmq-server live in /usr/sbin, which a
/// normal user's PATH often lacks.
const EXTRA_DIRS: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// The Debian package that provides a program.
pub fn debian_package(binary: &str) -> &str {
    match binary {
        "redis-server" | "redis-sentinel" | "redis-check-aof" => "redis-server",
        "redis-cli" | "redis-benchmark" => "redis-tools",
        "rabbitmq-server" | "rabbitmqctl" | "rabbitmq-plugins" | "rabbitmq-diagnostics" => {
            "rabbitmq-server"
        }
        "epmd" | "erl" => "erlang-base",
        "nginx" => "nginx",
        "python3" => "python3",
        "pip3" => "python3-pip",
        "shellcheck" => "shellcheck",
        "ps" | "pkill" | "pgrep" => "procps",
        "curl" => "curl",
        "su" | "runuser" => "util-linux",
        // Most Debian packages are named after their main program.
        other => other,
    }
}

/// The full path of an executable, searched in PATH and then in the sbin directories.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The Debian packages (deduplicated, in order) that would provide the missing `binaries`.
pub fn missing_packages(binaries: &[&str]) -> Vec<String> {
    let mut pkgs: Vec<String> = Vec::new();
    for b in binaries {
        let pkg = debian_package(b);
        if find_binary(b).is_none() && !pkgs.iter().any(|p| p == pkg) {
            pkgs.push(pkg.to_string());
        }
    }
    pkgs
}

/// Makes sure every program in `binaries` can be found. Missing ones are installed with
/// `apt-get` when running as root; otherwise the error names the packages to install.
///
/// The Debian `rabbitmq-server` package may start a node of its own on 5672 when installed;
/// nothing here depends on that node or touches it.
pub fn ensure_installed(binaries: &[&str]) -> Result<()> {
    let pkgs = missing_packages(binaries);
    if pkgs.is_empty() {
        return Ok(());
    }
    let list = pkgs.join(" ");
    if !is_root() {
        bail!(
            "missing programs; install them with: sudo apt-get install -y {list} \
             (or run this command as root and it will install them)"
        );
    }
    if Command::new("apt-get").arg("--version").output().is_err() {
        bail!("missing packages {list}, and apt-get is not available to install them");
    }
    eprintln!("xtask: installing {list} with apt-get");
    apt(&["update"])?;
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend(pkgs.iter().map(String::as_str));
    apt(&args)?;
    let still = missing_packages(binaries);
    if !still.is_empty() {
        bail!(
            "apt-get install finished but these are still missing: {}",
            still.join(" ")
        );
    }
    Ok(())
}

fn apt(args: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .with_context(|| format!("cannot run apt-get {}", args.join(" ")))?;
    if !status.success() {
        bail!("apt-get {} failed ({status})", args.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_for_binaries() {
        assert_eq!(debian_package("rabbitmqctl"), "rabbitmq-server");
        assert_eq!(debian_package("redis-cli"), "redis-tools");
        assert_eq!(debian_package("jq"), "jq");
    }

    #[test]
    fn present_binaries_are_found_and_absent_ones_reported() {
        assert!(find_binary("sh").is_some());
        assert!(find_binary("/bin/sh").is_some());
        assert!(find_binary("definitely-not-a-program-xyz").is_none());
        assert_eq!(
            missing_packages(&[
                "sh",
                "definitely-not-a-program-xyz",
                "definitely-not-a-program-xyz"
            ]),
            vec!["definitely-not-a-program-xyz".to_string()]
        );
        assert!(ensure_installed(&["sh"]).is_ok());
    }
}
