//! What several steps share: running the external validators and finding the files to give
//! them.
//!
//! Every program is run the same way ([`exec`]): its command line is printed first, so the
//! output of `cargo xtask validate` shows exactly what ran and can be repeated by hand, and
//! a failure reports the program's own output ([`exec_ok`]). Files are found by a plain
//! directory walk ([`files_under`]) that skips build and tool directories: the patterns the
//! steps need (`*.yaml`, `*.sh`, `*.conf`) are only file endings.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, Context, Result};

/// Directories never searched for files to check.
const SKIPPED_DIRS: &[&str] = &[
    "target",
    ".git",
    "node_modules",
    ".venv",
    "venv",
    "__pycache__",
    ".pytest_cache",
];

/// A program on PATH, or in the sbin directories a non-root PATH may lack (nginx).
pub(super) fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// The interpreter that runs the PyPI validators, as modules (`python3 -m yamllint`), so
/// they work whether or not pip put their scripts on PATH.
pub(super) fn python() -> &'static str {
    "python3"
}

/// The command line as a shell would show it.
fn show(program: &Path, args: &[OsString]) -> String {
    let mut line = program.display().to_string();
    for a in args {
        line.push(' ');
        line.push_str(&a.to_string_lossy());
    }
    line
}

/// Runs a program in `dir`, printing the command line; returns its output.
pub(super) fn exec(dir: &Path, program: &Path, args: &[OsString]) -> Result<Output> {
    let line = show(program, args);
    // Cut for the reader only (yamllint gets a long list of files); the program gets all.
    println!("  $ {}", shorten(&line, 300));
    Command::new(program)
        .args(args)
        .current_dir(dir)
        // apt-get must never stop to ask a question: nobody is there to answer.
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .with_context(|| format!("could not run {}", program.display()))
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let head: String = s.chars().take(max).collect();
        format!("{head} ...")
    }
}

/// stdout then stderr, as one text: the validators disagree on where they report.
pub(super) fn combined(out: &Output) -> String {
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    if !err.trim().is_empty() {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&err);
    }
    text.trim_end().to_string()
}

/// Runs a program and fails with its output when it exits non-zero.
pub(super) fn exec_ok(dir: &Path, what: &str, program: &Path, args: &[OsString]) -> Result<String> {
    let out = exec(dir, program, args)?;
    let text = combined(&out);
    if out.status.success() {
        Ok(text)
    } else {
        bail!("{what} failed ({}):\n{text}", out.status)
    }
}

/// Literal arguments, for the `Command` calls that mix them with paths.
pub(super) fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// Relative paths (to `root`) as arguments: the programs run in `root`, so the printed
/// command lines and the validators' messages name files as the repository does.
pub(super) fn rel_args(root: &Path, files: &[PathBuf]) -> Vec<OsString> {
    files
        .iter()
        .map(|f| f.strip_prefix(root).unwrap_or(f).as_os_str().to_owned())
        .collect()
}

/// Files under `dir` (recursively, sorted) for which `keep` holds; none if `dir` is missing.
pub(super) fn files_under(dir: &Path, keep: &dyn Fn(&Path) -> bool) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                let name = entry.file_name();
                if !SKIPPED_DIRS.iter().any(|s| name == *s) {
                    stack.push(path);
                }
            } else if kind.is_file() && keep(&path) {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

pub(super) fn is_yaml(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml") | Some("yml")
    )
}

pub(super) fn has_ext(p: &Path, ext: &str) -> bool {
    p.extension().and_then(|e| e.to_str()) == Some(ext)
}

/// The manifests under `k8s/`, which steps `k8s` and `consistency` both read.
pub(super) fn k8s_manifests(root: &Path) -> Vec<PathBuf> {
    files_under(&root.join("k8s"), &is_yaml)
}

/// `docker-compose.yml`, which steps `compose` and `consistency` both read.
pub(super) fn compose_file(root: &Path) -> Result<PathBuf> {
    let f = root.join("docker-compose.yml");
    if f.is_file() {
        Ok(f)
    } else {
        bail!("{} is missing", f.display())
    }
}

/// A scratch directory removed on drop.
///
/// Kept apart from the process kit's `xtask::ScratchDir`: its `fleet-validate-…` paths show
/// in the `nginx -t` command lines that step `nginx` prints.
pub(super) struct Scratch(PathBuf);

impl Scratch {
    pub(super) fn new(tag: &str) -> Result<Self> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "fleet-validate-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
        Ok(Self(dir))
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_under_skips_build_dirs() {
        let scratch = Scratch::new("files").unwrap();
        let d = scratch.path();
        fs::create_dir_all(d.join("a/target")).unwrap();
        fs::create_dir_all(d.join("a/b")).unwrap();
        fs::write(d.join("a/target/x.sh"), "").unwrap();
        fs::write(d.join("a/b/y.sh"), "").unwrap();
        fs::write(d.join("a/b/z.txt"), "").unwrap();
        let found = files_under(d, &|p| has_ext(p, "sh"));
        assert_eq!(found, vec![d.join("a/b/y.sh")]);
    }
}
