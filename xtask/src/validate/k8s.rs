//! Step `k8s`: every manifest under `k8s/` against the Kubernetes schemas.
//!
//! `kubernetes-validate --strict` checks each object against the OpenAPI schema of the
//! Kubernetes version the fleet targets, so a misspelt field or a wrong type fails here and
//! not at `kubectl apply` time. The version is pinned ([`KUBERNETES_VERSION`]): left to
//! itself, kubernetes-validate would check against the newest Kubernetes its release knows,
//! and the result would change with the release installed.

use std::path::Path;

use anyhow::{anyhow, bail, Result};

use super::shared::{combined, exec, find_program, k8s_manifests, os, python, rel_args};

/// Kubernetes version the manifests are validated against (kubernetes-validate ships it).
pub(super) const KUBERNETES_VERSION: &str = "1.34.0";

pub(super) fn check_k8s(root: &Path) -> Result<String> {
    let files = k8s_manifests(root);
    if files.is_empty() {
        bail!("no manifests (*.yaml) under {}", root.join("k8s").display());
    }
    let mut args = os(&[
        "-m",
        "kubernetes_validate",
        "--strict",
        "--quiet",
        "--kubernetes-version",
        KUBERNETES_VERSION,
    ]);
    args.extend(rel_args(root, &files));
    let py = find_program(python()).ok_or_else(|| anyhow!("python3 is missing"))?;
    let out = exec(root, &py, &args)?;
    let problems = kubernetes_validate_problems(&combined(&out));
    if !out.status.success() || !problems.is_empty() {
        bail!(
            "kubernetes-validate ({}) found problems:\n{}",
            out.status,
            if problems.is_empty() {
                combined(&out)
            } else {
                problems.join("\n")
            }
        );
    }
    Ok(format!(
        "{} files valid for Kubernetes {KUBERNETES_VERSION}, strict",
        files.len()
    ))
}

/// With `--quiet`, kubernetes-validate prints only warnings and failures. A warning is a
/// problem too: it is what an unknown kind or apiVersion (a typo) produces.
fn kubernetes_validate_problems(output: &str) -> Vec<String> {
    output
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_of_kubernetes_validate_are_problems() {
        let out = "WARN k8s/x.yaml Couldn't find schema for kind Foo\n\n";
        assert_eq!(kubernetes_validate_problems(out).len(), 1);
        assert!(kubernetes_validate_problems("  \n").is_empty());
    }
}
