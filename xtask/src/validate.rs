//! Offline validation of the deployment files (owned by the deploy work; stub for now).

use std::path::Path;

/// Validates docker-compose.yml, k8s/, helm-config/, the gateway config and shell scripts.
pub fn run(_root: &Path) -> anyhow::Result<()> {
    Ok(())
}
