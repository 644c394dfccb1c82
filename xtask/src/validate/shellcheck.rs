//! Step `shellcheck`: every shell script of the repository.
//!
//! The deploy scripts (`helm-config/*.sh`), the container entry points and `.ci/run` run
//! where nobody watches them; shellcheck finds the quoting and word-splitting mistakes that
//! only bite there. Scripts without a `.sh` ending are found by their `#!` line under
//! `.ci/`. The step fails when no `helm-config/*.sh` is found, as a guard against a moved
//! directory silently checking nothing.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};

use super::shared::{exec_ok, files_under, find_program, has_ext, os, rel_args};

/// Every `*.sh` of the repository, and the scripts under `.ci/` known by their `#!` line.
fn shell_scripts(root: &Path) -> Vec<PathBuf> {
    let mut files = files_under(root, &|p| has_ext(p, "sh"));
    files.extend(files_under(&root.join(".ci"), &|p| {
        !has_ext(p, "sh")
            && fs::read_to_string(p)
                .map(|t| {
                    let first = t.lines().next().unwrap_or("");
                    first.starts_with("#!") && (first.contains("sh") || first.contains("bash"))
                })
                .unwrap_or(false)
    }));
    files.sort();
    files.dedup();
    files
}

pub(super) fn check_shellcheck(root: &Path) -> Result<String> {
    let files = shell_scripts(root);
    let helm_scripts = files
        .iter()
        .filter(|f| f.starts_with(root.join("helm-config")))
        .count();
    if helm_scripts == 0 {
        bail!("no deploy scripts (helm-config/*.sh)");
    }
    let shellcheck = find_program("shellcheck").ok_or_else(|| anyhow!("shellcheck is missing"))?;
    let mut args = os(&["-x", "-f", "gcc"]);
    args.extend(rel_args(root, &files));
    exec_ok(root, "shellcheck", &shellcheck, &args)?;
    Ok(format!("{} scripts clean", files.len()))
}
