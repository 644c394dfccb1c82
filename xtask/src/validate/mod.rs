//! Offline validation of the deployment files (`cargo xtask validate`).
//!
//! Every step runs and prints its outcome; the run fails if any step failed:
//!
//! | step        | what runs                                                                  |
//! |-------------|----------------------------------------------------------------------------|
//! | tools       | installs what is missing: the PyPI tools with pip, shellcheck/nginx with apt |
//! | k8s         | `kubernetes-validate --strict -k 1.34.0` on every manifest under `k8s/`     |
//! | compose     | `check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml`  |
//! | yamllint    | `yamllint --strict` on `k8s/`, `helm-config/`, `deploy/`, `.github/`, compose |
//! | nginx       | `nginx -t` on the compose gateway config and `gateway/nginx.conf.template`   |
//! | shellcheck  | `shellcheck -x` on `helm-config/*.sh`, `.ci/run` and every `*.sh`            |
//! | consistency | names, ports and keys that k8s/, helm-config/, compose and env/ must share   |
//! | monitoring  | dashboard queries name emitted metrics; Prometheus/ServiceMonitor targets    |
//!
//! Nothing here needs a network (once the tools are installed), a Docker engine, Helm or a
//! cluster.
//!
//! One module a step, named like it, so a failing step's code is found by its name; what
//! several steps need (running a program, finding files, a scratch directory) is in
//! [`shared`]. This module only holds the list of steps and the loop that runs them.

mod compose;
mod consistency;
mod k8s;
mod monitoring;
mod nginx;
mod shared;
mod shellcheck;
mod tools;
mod yamllint;

use std::path::Path;

use anyhow::{bail, Context, Result};

use compose::check_compose;
use consistency::check_consistency;
use k8s::check_k8s;
use monitoring::check_monitoring;
use nginx::check_nginx;
use shellcheck::check_shellcheck;
use tools::ensure_tools;
use yamllint::check_yamllint;

/// One step: checks the repository at the given root; a one-line summary when it passes,
/// every problem it found when it fails.
type Step = fn(&Path) -> Result<String>;

/// Runs every validation step on the repository at `root`, printing each one.
pub fn run(root: &Path) -> Result<()> {
    let root = root
        .canonicalize()
        .with_context(|| format!("repository root {}", root.display()))?;
    // `tools` comes first: the steps after it run what it installs.
    let steps: [(&str, Step); 8] = [
        ("tools", ensure_tools),
        ("k8s", check_k8s),
        ("compose", check_compose),
        ("yamllint", check_yamllint),
        ("nginx", check_nginx),
        ("shellcheck", check_shellcheck),
        ("consistency", check_consistency),
        ("monitoring", check_monitoring),
    ];
    // A failed step does not stop the run: one run shows every problem of the deployment
    // files, instead of one problem a run.
    let mut failures = Vec::new();
    for (name, step) in steps {
        println!("validate: {name}");
        match step(&root) {
            Ok(summary) => println!("validate: {name}: ok ({summary})"),
            Err(e) => {
                println!("validate: {name}: FAILED\n{}", indent(&format!("{e:#}")));
                failures.push(format!("{name}: {e:#}"));
            }
        }
    }
    if failures.is_empty() {
        println!("validate: all {} steps passed", steps.len());
        Ok(())
    } else {
        bail!(
            "validation failed in {} of {} steps:\n{}",
            failures.len(),
            steps.len(),
            indent(&failures.join("\n"))
        )
    }
}

/// Every line of `text` indented under the step's heading.
fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole validation on this repository (needs the tools; installs them if allowed).
    /// `cargo test -p xtask -- --ignored validate_repository`
    #[test]
    #[ignore = "runs external validators; `cargo xtask validate` does the same"]
    fn validate_repository() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        run(&root).unwrap();
    }
}
