//! Temporary directories for tests, removed on drop.
//!
//! Integration tests need a fresh directory per Redis or broker; this avoids a tempfile
//! dependency for one struct. Set `XTASK_KEEP_SCRATCH=1` to keep them for a post-mortem (the
//! path is printed).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// A fresh directory under the system temp dir. Declare it before the servers that use it:
/// locals drop in reverse order, so the servers stop before their directory goes away.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `<tmp>/xtask-<prefix>-<pid>-<n>`. Mode 0755, so a server running as another user
    /// (RabbitMQ's `rabbitmq`) can reach subdirectories it is given.
    pub fn new(prefix: &str) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!(
            "xtask-{prefix}-{}-{}",
            std::process::id(),
            crate::proc::unique()
        ));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok(ScratchDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A subdirectory path (not created).
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::env::var_os("XTASK_KEEP_SCRATCH").is_some() {
            eprintln!("xtask: keeping {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_unique_and_removed() {
        let a = ScratchDir::new("t").unwrap();
        let b = ScratchDir::new("t").unwrap();
        assert_ne!(a.path(), b.path());
        std::fs::write(a.join("f"), "x").unwrap();
        let p = a.path().to_path_buf();
        drop(a);
        assert!(!p.exists());
    }
}
