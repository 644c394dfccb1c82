//! Step `yamllint`: style and syntax of every YAML file of the deployment.
//!
//! The schema steps only see what a parser makes of a file; yamllint sees the text itself
//! (duplicate keys, which many parsers silently resolve, indentation, trailing spaces). It runs with `--strict` so a warning fails the step, and with the repository's
//! `.yamllint` when there is one.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};

use super::shared::{exec_ok, files_under, find_program, is_yaml, os, python, rel_args};

/// The YAML of the deployment: everything under the deploy directories, and the compose and
/// yamllint files at the root.
fn yaml_files(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in ["k8s", "helm-config", "deploy", ".github"] {
        files.extend(files_under(&root.join(dir), &is_yaml));
    }
    for name in [
        "docker-compose.yml",
        "docker-compose.yaml",
        "compose.yml",
        "compose.yaml",
        ".yamllint",
        ".yamllint.yaml",
        ".yamllint.yml",
    ] {
        let f = root.join(name);
        if f.is_file() && !files.contains(&f) {
            files.push(f);
        }
    }
    files
}

pub(super) fn check_yamllint(root: &Path) -> Result<String> {
    let files = yaml_files(root);
    if files.is_empty() {
        bail!("no YAML files found");
    }
    let py = find_program(python()).ok_or_else(|| anyhow!("python3 is missing"))?;
    let mut args = os(&["-m", "yamllint", "--strict", "-f", "parsable"]);
    let config = root.join(".yamllint");
    if config.is_file() {
        args.push("-c".into());
        args.push(config.into_os_string());
    }
    args.extend(rel_args(root, &files));
    exec_ok(root, "yamllint", &py, &args)?;
    Ok(format!("{} YAML files clean", files.len()))
}
