//! Step `tools`: installs the validators the other steps run, when they are missing.
//!
//! So that `cargo xtask validate` works on a fresh machine or CI runner, instead of failing
//! with "command not found" in five steps, this first step installs what is missing: the PyPI tools with pip, shellcheck and nginx with apt-get (only
//! as root; otherwise it says which command to run). Tools already present are left alone,
//! which keeps a second run offline.

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};

use super::k8s::KUBERNETES_VERSION;
use super::shared::{exec_ok, find_program, os, python};

/// PyPI tools: (python module, pip requirement).
const PYTHON_TOOLS: &[(&str, &str)] = &[
    ("kubernetes_validate", "kubernetes-validate>=1.34"),
    ("check_jsonschema", "check-jsonschema"),
    ("yamllint", "yamllint"),
];

/// Debian tools: (program, package).
const APT_TOOLS: &[(&str, &str)] = &[("shellcheck", "shellcheck"), ("nginx", "nginx")];

/// Whether `python3` can import `module`: the validators run as modules, so this is the
/// test that they will run, wherever pip put them.
fn python_has(module: &str) -> bool {
    Command::new(python())
        .args(["-c", &format!("import {module}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Whether the installed kubernetes-validate ships the schemas of KUBERNETES_VERSION
/// (its own version follows the newest Kubernetes it knows).
fn kubernetes_validate_recent() -> bool {
    Command::new(python())
        .args(["-m", "kubernetes_validate", "--version"])
        .output()
        .ok()
        .and_then(|o| version_pair(String::from_utf8_lossy(&o.stdout).trim()))
        .zip(version_pair(KUBERNETES_VERSION))
        .is_some_and(|(installed, wanted)| installed >= wanted)
}

/// (major, minor) of a version such as `1.34.0`.
fn version_pair(v: &str) -> Option<(u32, u32)> {
    let mut parts = v.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// apt-get installs only as root; anyone else is told the command instead.
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

pub(super) fn ensure_tools(_root: &Path) -> Result<String> {
    let mut notes = Vec::new();
    // An installed kubernetes-validate older than KUBERNETES_VERSION lacks its schemas.
    let missing: Vec<&(&str, &str)> = PYTHON_TOOLS
        .iter()
        .filter(|(m, _)| {
            !python_has(m) || (*m == "kubernetes_validate" && !kubernetes_validate_recent())
        })
        .collect();
    if !missing.is_empty() {
        let py = find_program(python()).ok_or_else(|| {
            anyhow!("python3 is missing: install it (apt-get install python3 python3-pip)")
        })?;
        let packages: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
        let mut args = os(&["-m", "pip", "install", "-q", "--upgrade"]);
        args.extend(packages.iter().map(OsString::from));
        if exec_ok(Path::new("."), "pip install", &py, &args).is_err() {
            // Debian's own python refuses system-wide installs (PEP 668).
            args.push("--break-system-packages".into());
            exec_ok(Path::new("."), "pip install", &py, &args)
                .context("pip could not install the validators")?;
        }
        notes.push(format!("installed {}", packages.join(", ")));
        if let Some((m, p)) = PYTHON_TOOLS.iter().find(|(m, _)| !python_has(m)) {
            bail!("python module {m} is still missing after `pip install {p}`");
        }
    }
    let missing: Vec<&(&str, &str)> = APT_TOOLS
        .iter()
        .filter(|(p, _)| find_program(p).is_none())
        .collect();
    if !missing.is_empty() {
        let packages: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
        if !is_root() {
            bail!(
                "missing {}: install them as root with `apt-get install {}`",
                missing
                    .iter()
                    .map(|(p, _)| *p)
                    .collect::<Vec<_>>()
                    .join(", "),
                packages.join(" ")
            );
        }
        let apt = find_program("apt-get").ok_or_else(|| {
            anyhow!(
                "missing {} and no apt-get to install them",
                packages.join(", ")
            )
        })?;
        exec_ok(
            Path::new("."),
            "apt-get update",
            &apt,
            &os(&["update", "-qq"]),
        )?;
        let mut args = os(&["install", "-y", "-qq", "--no-install-recommends"]);
        args.extend(packages.iter().map(OsString::from));
        exec_ok(Path::new("."), "apt-get install", &apt, &args)?;
        notes.push(format!("installed {}", packages.join(", ")));
        if let Some((p, _)) = APT_TOOLS.iter().find(|(p, _)| find_program(p).is_none()) {
            bail!("{p} is still missing after apt-get install");
        }
    }
    if notes.is_empty() {
        notes.push(
            "kubernetes-validate, check-jsonschema, yamllint, shellcheck, nginx present".into(),
        );
    }
    Ok(notes.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare() {
        assert_eq!(version_pair("1.37.0"), Some((1, 37)));
        assert!(version_pair("1.9.2") < version_pair(KUBERNETES_VERSION));
        assert_eq!(version_pair("garbage"), None);
    }
}
