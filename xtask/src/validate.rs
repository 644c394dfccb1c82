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
//!
//! Nothing here needs a network (once the tools are installed), a Docker engine, Helm or a
//! cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_yaml_ng::Value;
use xtask::yaml::{at, scalar, seq_at, str_at};

/// Kubernetes version the manifests are validated against (kubernetes-validate ships it).
pub const KUBERNETES_VERSION: &str = "1.34.0";

/// PyPI tools: (python module, pip requirement).
const PYTHON_TOOLS: &[(&str, &str)] = &[
    ("kubernetes_validate", "kubernetes-validate>=1.34"),
    ("check_jsonschema", "check-jsonschema"),
    ("yamllint", "yamllint"),
];

/// Debian tools: (program, package).
const APT_TOOLS: &[(&str, &str)] = &[("shellcheck", "shellcheck"), ("nginx", "nginx")];

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

type Step = fn(&Path) -> Result<String>;

/// Runs every validation step on the repository at `root`, printing each one.
pub fn run(root: &Path) -> Result<()> {
    let root = root
        .canonicalize()
        .with_context(|| format!("repository root {}", root.display()))?;
    let steps: [(&str, Step); 7] = [
        ("tools", ensure_tools),
        ("k8s", check_k8s),
        ("compose", check_compose),
        ("yamllint", check_yamllint),
        ("nginx", check_nginx),
        ("shellcheck", check_shellcheck),
        ("consistency", check_consistency),
    ];
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

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

// ------------------------------------------------------------------------------------------
// running tools

/// A program on PATH, or in the sbin directories a non-root PATH may lack (nginx).
fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

fn python() -> &'static str {
    "python3"
}

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

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn show(program: &Path, args: &[OsString]) -> String {
    let mut line = program.display().to_string();
    for a in args {
        line.push(' ');
        line.push_str(&a.to_string_lossy());
    }
    line
}

/// Runs a program in `dir`, printing the command line; returns its output.
fn exec(dir: &Path, program: &Path, args: &[OsString]) -> Result<Output> {
    let line = show(program, args);
    println!("  $ {}", shorten(&line, 300));
    Command::new(program)
        .args(args)
        .current_dir(dir)
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

fn combined(out: &Output) -> String {
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
fn exec_ok(dir: &Path, what: &str, program: &Path, args: &[OsString]) -> Result<String> {
    let out = exec(dir, program, args)?;
    let text = combined(&out);
    if out.status.success() {
        Ok(text)
    } else {
        bail!("{what} failed ({}):\n{text}", out.status)
    }
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// Relative paths (to `root`) as arguments.
fn rel_args(root: &Path, files: &[PathBuf]) -> Vec<OsString> {
    files
        .iter()
        .map(|f| f.strip_prefix(root).unwrap_or(f).as_os_str().to_owned())
        .collect()
}

fn ensure_tools(_root: &Path) -> Result<String> {
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

// ------------------------------------------------------------------------------------------
// finding files

/// Files under `dir` (recursively, sorted) for which `keep` holds; none if `dir` is missing.
fn files_under(dir: &Path, keep: &dyn Fn(&Path) -> bool) -> Vec<PathBuf> {
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

fn is_yaml(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml") | Some("yml")
    )
}

fn has_ext(p: &Path, ext: &str) -> bool {
    p.extension().and_then(|e| e.to_str()) == Some(ext)
}

fn k8s_manifests(root: &Path) -> Vec<PathBuf> {
    files_under(&root.join("k8s"), &is_yaml)
}

fn compose_file(root: &Path) -> Result<PathBuf> {
    let f = root.join("docker-compose.yml");
    if f.is_file() {
        Ok(f)
    } else {
        bail!("{} is missing", f.display())
    }
}

// ------------------------------------------------------------------------------------------
// k8s, compose, yamllint

fn check_k8s(root: &Path) -> Result<String> {
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

fn check_compose(root: &Path) -> Result<String> {
    let compose = compose_file(root)?;
    let py = find_program(python()).ok_or_else(|| anyhow!("python3 is missing"))?;
    let mut args = os(&[
        "-m",
        "check_jsonschema",
        "--builtin-schema",
        "vendor.compose-spec",
    ]);
    args.extend(rel_args(root, &[compose]));
    exec_ok(root, "check-jsonschema (compose spec)", &py, &args)?;
    Ok("docker-compose.yml matches the compose spec".into())
}

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

fn check_yamllint(root: &Path) -> Result<String> {
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

// ------------------------------------------------------------------------------------------
// nginx

fn check_nginx(root: &Path) -> Result<String> {
    let nginx = find_program("nginx").ok_or_else(|| anyhow!("nginx is missing"))?;
    let compose_configs = files_under(&root.join("deploy/gateway"), &|p| has_ext(p, "conf"));
    if compose_configs.is_empty() {
        bail!("no compose gateway config (deploy/gateway/*.conf)");
    }
    let mut checked = Vec::new();
    let mut errors = Vec::new();
    for conf in &compose_configs {
        let text = fs::read_to_string(conf).with_context(|| conf.display().to_string())?;
        let label = conf
            .strip_prefix(root)
            .unwrap_or(conf)
            .display()
            .to_string();
        match nginx_test(&nginx, &text, &label) {
            Ok(()) => checked.push(label),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    let template = root.join("gateway/nginx.conf.template");
    if template.is_file() {
        let label = "gateway/nginx.conf.template".to_string();
        let text = fs::read_to_string(&template).with_context(|| label.clone())?;
        let scratch = Scratch::new("template")?;
        match render_template(&text, scratch.path())
            .and_then(|rendered| nginx_test(&nginx, &rendered, &label))
        {
            Ok(()) => checked.push(format!("{label} (placeholders filled)")),
            Err(e) => errors.push(format!("{label}: {e:#}")),
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    Ok(format!("nginx -t passed: {}", checked.join(", ")))
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Result<Self> {
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

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `nginx -t` on a copy of `text` in a scratch prefix, with host names that only exist in
/// a container network mapped to 127.0.0.1 (nginx resolves `upstream` servers and literal
/// `proxy_pass` hosts at load time). The mapping keeps every line where it was, so the
/// line numbers of a failure are those of the original file.
fn nginx_test(nginx: &Path, text: &str, label: &str) -> Result<()> {
    let scratch = Scratch::new("nginx")?;
    let dir = scratch.path();
    // Relative includes (mime.types, proxy_params, ...) resolve against the config's dir.
    if let Ok(entries) = fs::read_dir("/etc/nginx") {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_file()).unwrap_or(false) && e.file_name() != "nginx.conf"
            {
                let _ = fs::copy(e.path(), dir.join(e.file_name()));
            }
        }
    }
    let conf = dir.join("nginx.conf");
    fs::write(&conf, map_hosts_for_test(text))?;
    let mut args: Vec<OsString> = vec![
        "-t".into(),
        "-q".into(),
        "-p".into(),
        dir.as_os_str().to_owned(),
        "-e".into(),
        dir.join("error.log").into_os_string(),
        "-c".into(),
        conf.clone().into_os_string(),
    ];
    if !has_directive(text, "pid") {
        args.push("-g".into());
        args.push(format!("pid {};", dir.join("nginx.pid").display()).into());
    }
    let out = exec(dir, nginx, &args)?;
    if out.status.success() {
        Ok(())
    } else {
        let message = combined(&out).replace(&conf.display().to_string(), label);
        bail!("nginx -t rejected {label}:\n{message}")
    }
}

fn has_directive(text: &str, name: &str) -> bool {
    text.lines().any(|l| {
        let l = l.trim_start();
        l.strip_prefix(name)
            .is_some_and(|rest| rest.starts_with(char::is_whitespace))
    })
}

fn is_ip_or_local(host: &str) -> bool {
    host == "localhost"
        || host.parse::<std::net::IpAddr>().is_ok()
        || host.starts_with('[')
        || host.starts_with("unix:")
}

/// Maps the host names of `server` lines inside `upstream` blocks and of literal
/// `proxy_pass` URLs (not naming an upstream, not containing variables) to 127.0.0.1.
fn map_hosts_for_test(text: &str) -> String {
    let upstreams: BTreeSet<String> = text
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("upstream")).then(|| words.next().map(str::to_string))?
        })
        .collect();
    let mut depth = 0usize;
    let mut upstream_depth: Option<usize> = None;
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let code = line.split('#').next().unwrap_or("");
        let trimmed = code.trim_start();
        let mut mapped = line.to_string();
        if trimmed.starts_with("upstream ") && code.contains('{') {
            upstream_depth = Some(depth + 1);
        } else if upstream_depth == Some(depth) && trimmed.starts_with("server ") {
            if let Some(addr) = trimmed["server ".len()..].split_whitespace().next() {
                let addr = addr.trim_end_matches(';');
                let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
                if !is_ip_or_local(host) {
                    mapped = line.replacen(host, "127.0.0.1", 1);
                }
            }
        } else if let Some(at) = code.find("proxy_pass ") {
            let url = code[at + "proxy_pass ".len()..]
                .split([';', ' ', '}'])
                .find(|w| !w.is_empty())
                .unwrap_or_default();
            if let Some((_, after)) = url.split_once("://") {
                let host = after.split([':', '/']).next().unwrap_or_default();
                if !host.is_empty()
                    && !host.contains('$')
                    && !upstreams.contains(host)
                    && !is_ip_or_local(host)
                {
                    mapped = line.replacen(&format!("://{host}"), "://127.0.0.1", 1);
                }
            }
        }
        for c in code.chars() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth = depth.saturating_sub(1);
                    if upstream_depth.is_some_and(|d| depth < d) {
                        upstream_depth = None;
                    }
                }
                _ => {}
            }
        }
        out.push_str(&mapped);
    }
    out
}

/// Fills the placeholders of a config template with values that make it testable:
/// `{{NAME}}`, `{{ NAME }}`, `@NAME@`, `${NAME}` and `$NAME` with NAME in UPPER_SNAKE_CASE
/// (nginx's own variables are lower case). Ports get distinct numbers, directories and
/// files a path under `scratch`, hosts and addresses 127.0.0.1.
fn render_template(text: &str, scratch: &Path) -> Result<String> {
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    let mut unknown = BTreeSet::new();
    let mut next_port = 18_000u32;
    let mut value_for = |name: &str| -> Option<String> {
        if let Some(v) = values.get(name) {
            return Some(v.clone());
        }
        let v = placeholder_value(name, scratch, &mut next_port);
        match &v {
            Some(v) => {
                values.insert(name.to_string(), v.clone());
            }
            None => {
                unknown.insert(name.to_string());
            }
        }
        v
    };
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if let Some((name, len)) = placeholder_at(&chars[i..]) {
            match value_for(&name) {
                Some(v) => out.push_str(&v),
                None => out.extend(&chars[i..i + len]),
            }
            i += len;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    if !unknown.is_empty() {
        bail!(
            "no test value for the placeholder(s) {} (teach xtask/src/validate.rs::placeholder_value)",
            unknown.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(out)
}

fn is_placeholder_name(name: &str) -> bool {
    name.len() >= 2
        && name.starts_with(|c: char| c.is_ascii_uppercase())
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// The placeholder starting at `s[0]`, if any: (name, length in chars).
fn placeholder_at(s: &[char]) -> Option<(String, usize)> {
    let take_name = |from: usize| -> String {
        s[from..]
            .iter()
            .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
            .collect()
    };
    match s.first()? {
        '{' if s.get(1) == Some(&'{') => {
            let end = s.windows(2).position(|w| w == ['}', '}'])?;
            let inner: String = s[2..end].iter().collect();
            let name = inner.trim();
            is_placeholder_name(name).then(|| (name.to_string(), end + 2))
        }
        '@' => {
            let name = take_name(1);
            (is_placeholder_name(&name) && s.get(1 + name.len()) == Some(&'@'))
                .then(|| (name.clone(), name.len() + 2))
        }
        '$' if s.get(1) == Some(&'{') => {
            let name = take_name(2);
            (is_placeholder_name(&name) && s.get(2 + name.len()) == Some(&'}'))
                .then(|| (name.clone(), name.len() + 3))
        }
        '$' => {
            let name = take_name(1);
            is_placeholder_name(&name).then(|| (name.clone(), name.len() + 1))
        }
        _ => None,
    }
}

fn placeholder_value(name: &str, scratch: &Path, next_port: &mut u32) -> Option<String> {
    let has = |w: &str| name.split('_').any(|part| part == w) || name.ends_with(w);
    if has("PORT") {
        *next_port += 1;
        Some(next_port.to_string())
    } else if has("DIR") || has("PREFIX") || has("ROOT") || has("PATH") {
        Some(scratch.display().to_string())
    } else if has("LOG") || has("PID") || has("FILE") {
        Some(
            scratch
                .join(name.to_ascii_lowercase())
                .display()
                .to_string(),
        )
    } else if has("HOST") || has("ADDR") || has("ADDRESS") || has("IP") {
        Some("127.0.0.1".into())
    } else if has("WORKERS") || has("CONNECTIONS") || has("COUNT") {
        Some("1".into())
    } else {
        None
    }
}

// ------------------------------------------------------------------------------------------
// shellcheck

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

fn check_shellcheck(root: &Path) -> Result<String> {
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

// ------------------------------------------------------------------------------------------
// consistency across files

/// Every YAML document of a file, with `<<` merge keys applied.
fn yaml_docs(path: &Path) -> Result<Vec<Value>> {
    let text = fs::read_to_string(path).with_context(|| path.display().to_string())?;
    yaml_docs_str(&text).with_context(|| path.display().to_string())
}

fn yaml_docs_str(text: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for de in serde_yaml_ng::Deserializer::from_str(text) {
        let mut v = Value::deserialize(de)?;
        v.apply_merge()?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// A parsed Kubernetes object.
struct Object {
    file: String,
    kind: String,
    name: String,
    doc: Value,
}

/// The environment of one service container, as Kubernetes will build it.
#[derive(Default, Debug)]
struct ContainerEnv {
    /// Deployment name.
    deployment: String,
    file: String,
    /// Literal values (from `value` or a ConfigMap); `None` for secrets and field refs.
    vars: BTreeMap<String, Option<String>>,
    /// (variable, secret, key) of every secretKeyRef.
    secret_refs: Vec<(String, String, String)>,
}

/// Collects problems instead of stopping at the first.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, msg: impl Into<String>) {
        self.0.push(msg.into());
    }

    fn check(&mut self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            self.0.push(msg());
        }
    }

    fn into_result(self, summary: String) -> Result<String> {
        if self.0.is_empty() {
            Ok(summary)
        } else {
            bail!("{}", self.0.join("\n"))
        }
    }
}

fn check_consistency(root: &Path) -> Result<String> {
    let mut problems = Problems::default();
    let objects = load_k8s(root)?;
    check_k8s_references(&objects, &mut problems);
    let envs = container_envs(&objects, &mut problems);
    check_k8s_against_helm(root, &objects, &envs, &mut problems)?;
    check_compose_setup(root, &mut problems)?;
    check_gateway_routes(root, &mut problems)?;
    problems.into_result(format!(
        "{} k8s objects, helm-config, compose and gateway agree",
        objects.len()
    ))
}

fn load_k8s(root: &Path) -> Result<Vec<Object>> {
    let mut objects = Vec::new();
    for file in k8s_manifests(root) {
        let label = file
            .strip_prefix(root)
            .unwrap_or(&file)
            .display()
            .to_string();
        for doc in yaml_docs(&file)? {
            objects.push(Object {
                file: label.clone(),
                kind: str_at(&doc, &["kind"]).unwrap_or_default().to_string(),
                name: str_at(&doc, &["metadata", "name"])
                    .unwrap_or_default()
                    .to_string(),
                doc,
            });
        }
    }
    Ok(objects)
}

fn find<'a>(objects: &'a [Object], kind: &str, name: &str) -> Option<&'a Object> {
    objects.iter().find(|o| o.kind == kind && o.name == name)
}

fn data_keys(o: &Object) -> BTreeSet<String> {
    ["data", "stringData"]
        .iter()
        .filter_map(|k| o.doc.get(*k).and_then(Value::as_mapping))
        .flat_map(|m| m.keys().filter_map(Value::as_str).map(str::to_string))
        .collect()
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_mapping()
        .is_some_and(|sel| !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

fn pod_labels(deployment: &Object) -> &Value {
    at(&deployment.doc, &["spec", "template", "metadata", "labels"]).unwrap_or(&Value::Null)
}

fn check_k8s_references(objects: &[Object], p: &mut Problems) {
    let deployments: Vec<&Object> = objects.iter().filter(|o| o.kind == "Deployment").collect();
    for d in &deployments {
        let selector = at(&d.doc, &["spec", "selector", "matchLabels"]).unwrap_or(&Value::Null);
        p.check(labels_match(selector, pod_labels(d)), || {
            format!(
                "{}: Deployment {}: selector does not match the pod labels",
                d.file, d.name
            )
        });
    }
    for s in objects.iter().filter(|o| o.kind == "Service") {
        let selector = at(&s.doc, &["spec", "selector"]).unwrap_or(&Value::Null);
        let target = deployments
            .iter()
            .find(|d| labels_match(selector, pod_labels(d)));
        let Some(target) = target else {
            p.add(format!(
                "{}: Service {} selects no Deployment",
                s.file, s.name
            ));
            continue;
        };
        let container_ports: Vec<(Option<String>, Option<String>)> =
            seq_at(&target.doc, &["spec", "template", "spec", "containers"])
                .iter()
                .flat_map(|c| seq_at(c, &["ports"]))
                .map(|port| {
                    (
                        str_at(port, &["name"]).map(str::to_string),
                        port.get("containerPort").and_then(scalar),
                    )
                })
                .collect();
        for port in seq_at(&s.doc, &["spec", "ports"]) {
            if let Some(t) = port.get("targetPort").and_then(scalar) {
                p.check(
                    container_ports
                        .iter()
                        .any(|(n, c)| n.as_deref() == Some(&t) || c.as_deref() == Some(&t)),
                    || {
                        format!(
                            "{}: Service {}: targetPort {t} is no port of Deployment {}",
                            s.file, s.name, target.name
                        )
                    },
                );
            }
        }
    }
    for ing in objects.iter().filter(|o| o.kind == "Ingress") {
        for rule in seq_at(&ing.doc, &["spec", "rules"]) {
            for path in seq_at(rule, &["http", "paths"]) {
                let svc_name = str_at(path, &["backend", "service", "name"]).unwrap_or_default();
                let Some(svc) = find(objects, "Service", svc_name) else {
                    p.add(format!(
                        "{}: Ingress {}: backend Service {svc_name:?} is not in k8s/",
                        ing.file, ing.name
                    ));
                    continue;
                };
                let port = at(path, &["backend", "service", "port"]).unwrap_or(&Value::Null);
                let wanted = port
                    .get("name")
                    .and_then(scalar)
                    .or_else(|| port.get("number").and_then(scalar));
                let found = seq_at(&svc.doc, &["spec", "ports"]).iter().any(|sp| {
                    wanted.is_some()
                        && (sp.get("name").and_then(scalar) == wanted
                            || sp.get("port").and_then(scalar) == wanted)
                });
                p.check(found, || {
                    format!(
                        "{}: Ingress {}: Service {svc_name} has no port {:?}",
                        ing.file, ing.name, wanted
                    )
                });
            }
        }
    }
    for pdb in objects.iter().filter(|o| o.kind == "PodDisruptionBudget") {
        let selector = at(&pdb.doc, &["spec", "selector", "matchLabels"]).unwrap_or(&Value::Null);
        p.check(
            deployments
                .iter()
                .any(|d| labels_match(selector, pod_labels(d))),
            || {
                format!(
                    "{}: PodDisruptionBudget {} selects no Deployment",
                    pdb.file, pdb.name
                )
            },
        );
    }
    for hpa in objects
        .iter()
        .filter(|o| o.kind == "HorizontalPodAutoscaler")
    {
        let kind = str_at(&hpa.doc, &["spec", "scaleTargetRef", "kind"]).unwrap_or_default();
        let name = str_at(&hpa.doc, &["spec", "scaleTargetRef", "name"]).unwrap_or_default();
        p.check(find(objects, kind, name).is_some(), || {
            format!(
                "{}: HorizontalPodAutoscaler {}: no {kind} {name} in k8s/",
                hpa.file, hpa.name
            )
        });
    }
}

/// The environment of every container of every Deployment, with ConfigMaps resolved.
fn container_envs(objects: &[Object], p: &mut Problems) -> Vec<ContainerEnv> {
    let mut envs = Vec::new();
    for d in objects.iter().filter(|o| o.kind == "Deployment") {
        for c in seq_at(&d.doc, &["spec", "template", "spec", "containers"]) {
            let mut env = ContainerEnv {
                deployment: d.name.clone(),
                file: d.file.clone(),
                ..Default::default()
            };
            for from in seq_at(c, &["envFrom"]) {
                if let Some(name) = str_at(from, &["configMapRef", "name"]) {
                    match find(objects, "ConfigMap", name) {
                        Some(cm) => {
                            if let Some(data) = cm.doc.get("data").and_then(Value::as_mapping) {
                                for (k, v) in data {
                                    if let Some(k) = k.as_str() {
                                        env.vars.insert(k.to_string(), scalar(v));
                                    }
                                }
                            }
                        }
                        None => p.add(format!(
                            "{}: Deployment {}: envFrom ConfigMap {name} is not in k8s/",
                            d.file, d.name
                        )),
                    }
                }
                if let Some(name) = str_at(from, &["secretRef", "name"]) {
                    p.check(find(objects, "Secret", name).is_some(), || {
                        format!(
                            "{}: Deployment {}: envFrom Secret {name} is not in k8s/",
                            d.file, d.name
                        )
                    });
                }
            }
            for e in seq_at(c, &["env"]) {
                let Some(name) = str_at(e, &["name"]) else {
                    continue;
                };
                if let Some(value) = e.get("value").and_then(scalar) {
                    for reference in dollar_refs(&value) {
                        p.check(env.vars.contains_key(&reference), || {
                            format!(
                                "{}: Deployment {}: {name} uses $({reference}), which is not set before it",
                                d.file, d.name
                            )
                        });
                    }
                    env.vars.insert(name.to_string(), Some(value));
                } else if let Some(r) = at(e, &["valueFrom", "secretKeyRef"]) {
                    let secret = str_at(r, &["name"]).unwrap_or_default().to_string();
                    let key = str_at(r, &["key"]).unwrap_or_default().to_string();
                    match find(objects, "Secret", &secret) {
                        Some(s) => p.check(data_keys(s).contains(&key), || {
                            format!(
                                "{}: Deployment {}: {name} reads key {key:?} that Secret {secret} ({}) lacks",
                                d.file, d.name, s.file
                            )
                        }),
                        None => p.add(format!(
                            "{}: Deployment {}: {name} reads Secret {secret}, which has no template in k8s/",
                            d.file, d.name
                        )),
                    }
                    env.secret_refs.push((name.to_string(), secret, key));
                    env.vars.insert(name.to_string(), None);
                } else if let Some(r) = at(e, &["valueFrom", "configMapKeyRef"]) {
                    let cm = str_at(r, &["name"]).unwrap_or_default();
                    let key = str_at(r, &["key"]).unwrap_or_default();
                    let value = find(objects, "ConfigMap", cm)
                        .and_then(|o| at(&o.doc, &["data", key]))
                        .and_then(scalar);
                    p.check(value.is_some(), || {
                        format!(
                            "{}: Deployment {}: {name} reads {cm}/{key}, which is not in k8s/",
                            d.file, d.name
                        )
                    });
                    env.vars.insert(name.to_string(), value);
                } else {
                    env.vars.insert(name.to_string(), None);
                }
            }
            envs.push(env);
        }
    }
    envs
}

/// The names in `$(NAME)` references of a Kubernetes env value.
fn dollar_refs(value: &str) -> Vec<String> {
    let mut refs = Vec::new();
    let mut rest = value;
    while let Some(i) = rest.find("$(") {
        let after = &rest[i + 2..];
        match after.find(')') {
            Some(j) => {
                refs.push(after[..j].to_string());
                rest = &after[j + 1..];
            }
            None => break,
        }
    }
    refs
}

/// host and port of `host:port`, `scheme://[user[:pass]@]host[:port][/...]`.
fn host_port(addr: &str, default_port: u16) -> (String, u16) {
    let addr = addr.split_once("://").map_or(addr, |(_, a)| a);
    let addr = addr.split('/').next().unwrap_or_default();
    let addr = addr.rsplit_once('@').map_or(addr, |(_, a)| a);
    match addr.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().unwrap_or(0)),
        None => (addr.to_string(), default_port),
    }
}

/// The user of `scheme://user[:pass]@host...`.
fn url_user(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let (userinfo, _) = rest.split_once('@')?;
    Some(userinfo.split(':').next().unwrap_or_default().to_string())
}

/// The short name of a Service host (`x`, `x.ns`, `x.ns.svc.cluster.local` → `x`).
fn short_host(host: &str) -> &str {
    host.split('.').next().unwrap_or(host)
}

/// One Bitnami Redis release described by helm-config/redis-<store>-values.yaml.
#[derive(Debug)]
struct RedisRelease {
    file: String,
    fullname: String,
    master_set: String,
}

fn check_k8s_against_helm(
    root: &Path,
    objects: &[Object],
    envs: &[ContainerEnv],
    p: &mut Problems,
) -> Result<()> {
    let helm = root.join("helm-config");
    let common_path = helm.join("redis-values.yaml");
    let redis_common = yaml_docs(&common_path)?
        .into_iter()
        .next()
        .unwrap_or(Value::Null);
    let sentinel_port: u16 = at(&redis_common, &["sentinel", "service", "ports", "sentinel"])
        .and_then(scalar)
        .and_then(|s| s.parse().ok())
        .unwrap_or(26379);
    let mut releases = Vec::new();
    for file in files_under(&helm, &|f| {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        name.starts_with("redis-") && is_yaml(f)
    }) {
        let doc = yaml_docs(&file)?.into_iter().next().unwrap_or(Value::Null);
        let label = file
            .strip_prefix(root)
            .unwrap_or(&file)
            .display()
            .to_string();
        if let (Some(fullname), Some(master_set)) = (
            str_at(&doc, &["fullnameOverride"]),
            str_at(&doc, &["sentinel", "masterSet"]),
        ) {
            releases.push(RedisRelease {
                file: label,
                fullname: fullname.to_string(),
                master_set: master_set.to_string(),
            });
        }
    }
    if releases.is_empty() {
        bail!("helm-config/: no redis-<store>-values.yaml with fullnameOverride and sentinel.masterSet");
    }

    // The Secret the charts read must be the one the Deployments read.
    let secret_template = objects.iter().find(|o| o.kind == "Secret");
    let secret_keys = secret_template.map(data_keys).unwrap_or_default();
    let secret_name = secret_template.map(|s| s.name.clone()).unwrap_or_default();
    let redis_secret = str_at(&redis_common, &["auth", "existingSecret"]).unwrap_or_default();
    let redis_key =
        str_at(&redis_common, &["auth", "existingSecretPasswordKey"]).unwrap_or_default();
    p.check(redis_secret == secret_name && secret_keys.contains(redis_key), || {
        format!(
            "helm-config/redis-values.yaml: auth.existingSecret {redis_secret}/{redis_key} is not the k8s Secret template ({secret_name}: {secret_keys:?})"
        )
    });

    let rabbit_path = helm.join("rabbitmq-values.yaml");
    let rabbit = yaml_docs(&rabbit_path)?
        .into_iter()
        .next()
        .unwrap_or(Value::Null);
    let rabbit_host = str_at(&rabbit, &["fullnameOverride"])
        .unwrap_or("rabbitmq")
        .to_string();
    let rabbit_port: u16 = at(&rabbit, &["service", "ports", "amqp"])
        .and_then(scalar)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5672);
    let rabbit_user = str_at(&rabbit, &["auth", "username"])
        .unwrap_or("user")
        .to_string();
    let rabbit_nodes: u64 = at(&rabbit, &["replicaCount"])
        .and_then(Value::as_u64)
        .unwrap_or(1);
    for (secret_path, key_path, default_key) in [
        (
            "existingPasswordSecret",
            "existingSecretPasswordKey",
            "rabbitmq-password",
        ),
        (
            "existingErlangSecret",
            "existingSecretErlangKey",
            "rabbitmq-erlang-cookie",
        ),
    ] {
        let secret = str_at(&rabbit, &["auth", secret_path]).unwrap_or_default();
        let key = str_at(&rabbit, &["auth", key_path])
            .filter(|k| !k.is_empty())
            .unwrap_or(default_key);
        p.check(secret == secret_name && secret_keys.contains(key), || {
            format!(
                "helm-config/rabbitmq-values.yaml: auth.{secret_path} {secret}/{key} is not the k8s Secret template ({secret_name})"
            )
        });
    }

    let services: BTreeMap<&str, &Object> = objects
        .iter()
        .filter(|o| o.kind == "Service")
        .map(|o| (o.name.as_str(), o))
        .collect();
    for env in envs
        .iter()
        .filter(|e| ["stock", "payment", "order"].contains(&e.deployment.as_str()))
    {
        let who = format!("{}: Deployment {}", env.file, env.deployment);
        let literal = |name: &str| env.vars.get(name).cloned().flatten();

        // Redis: the Sentinels listed must be those of the releases, and know the masters.
        let sentinels: Vec<(String, u16)> = literal("REDIS_SENTINELS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| host_port(s, 26379))
            .collect();
        if sentinels.is_empty() && literal("REDIS_URL").is_none() {
            p.add(format!("{who}: sets neither REDIS_SENTINELS nor REDIS_URL"));
        }
        for (host, port) in &sentinels {
            let release = releases.iter().find(|r| r.fullname == short_host(host));
            match release {
                None => p.add(format!(
                    "{who}: REDIS_SENTINELS names {host}, which no helm-config/redis-*-values.yaml creates ({})",
                    releases.iter().map(|r| r.fullname.as_str()).collect::<Vec<_>>().join(", ")
                )),
                Some(r) => p.check(*port == sentinel_port, || {
                    format!("{who}: REDIS_SENTINELS uses {host}:{port}, but the Sentinel port of {} is {sentinel_port}", r.file)
                }),
            }
        }
        let mut masters = vec![(
            "REDIS_MASTER_NAME",
            literal("REDIS_MASTER_NAME").unwrap_or_else(|| env.deployment.clone()),
        )];
        if env.deployment == "order" {
            masters.push((
                "SAGA_REDIS_MASTER_NAME",
                literal("SAGA_REDIS_MASTER_NAME").unwrap_or_else(|| "saga".into()),
            ));
        }
        if !sentinels.is_empty() {
            for (var, master) in masters {
                match releases.iter().find(|r| r.master_set == master) {
                    None => p.add(format!(
                        "{who}: {var}={master} is the sentinel.masterSet of no helm-config/redis-*-values.yaml"
                    )),
                    Some(r) => p.check(
                        sentinels.iter().any(|(h, _)| short_host(h) == r.fullname),
                        || format!("{who}: {var}={master} lives behind {}:{sentinel_port} ({}), missing from REDIS_SENTINELS", r.fullname, r.file),
                    ),
                }
            }
        }
        for var in ["REDIS_PASSWORD", "REDIS_SENTINEL_PASSWORD"] {
            let auth_needed = var == "REDIS_PASSWORD"
                || at(&redis_common, &["auth", "sentinel"]).and_then(Value::as_bool) != Some(false);
            let reference = env.secret_refs.iter().find(|(v, _, _)| v == var);
            match reference {
                Some((_, secret, key)) => p.check(secret == redis_secret && key == redis_key, || {
                    format!("{who}: {var} reads {secret}/{key}, the Redis chart uses {redis_secret}/{redis_key}")
                }),
                None if auth_needed => p.add(format!(
                    "{who}: {var} must come from Secret {redis_secret} key {redis_key} (the chart enables auth)"
                )),
                None => {}
            }
        }

        // RabbitMQ.
        match literal("AMQP_URL") {
            None => p.add(format!("{who}: AMQP_URL is not set as a value")),
            Some(url) => {
                let (host, port) = host_port(&url, 5672);
                p.check(short_host(&host) == rabbit_host && port == rabbit_port, || {
                    format!("{who}: AMQP_URL points at {host}:{port}, the RabbitMQ release serves {rabbit_host}:{rabbit_port}")
                });
                p.check(url_user(&url).as_deref() == Some(rabbit_user.as_str()), || {
                    format!("{who}: AMQP_URL user is {:?}, helm-config/rabbitmq-values.yaml auth.username is {rabbit_user}", url_user(&url))
                });
            }
        }
        if rabbit_nodes > 1 {
            p.check(literal("AMQP_QUEUE_TYPE").as_deref() == Some("quorum"), || {
                format!("{who}: RabbitMQ runs {rabbit_nodes} nodes, so AMQP_QUEUE_TYPE must be quorum")
            });
        }

        // The stock service, as the order service calls it.
        if let Some(url) = literal("STOCK_URL") {
            let (host, port) = host_port(&url, 80);
            let ok = services.get(short_host(&host)).is_some_and(|s| {
                seq_at(&s.doc, &["spec", "ports"])
                    .iter()
                    .any(|sp| sp.get("port").and_then(scalar) == Some(port.to_string()))
            });
            p.check(ok, || {
                format!("{who}: STOCK_URL {url} is no Service port in k8s/")
            });
        }
    }
    Ok(())
}

/// An env file's variables by name.
fn parse_env_file_map(text: &str) -> BTreeMap<String, String> {
    xtask::envfile::parse(text).into_iter().collect()
}

/// `env_file` of a compose service: a string, a list of strings or of `{path: ...}`.
fn compose_env_files(service: &Value) -> Vec<String> {
    match service.get("env_file") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Sequence(items)) => items
            .iter()
            .filter_map(|i| {
                i.as_str()
                    .or_else(|| str_at(i, &["path"]))
                    .map(str::to_string)
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn check_compose_setup(root: &Path, p: &mut Problems) -> Result<()> {
    let compose_path = compose_file(root)?;
    let compose = yaml_docs(&compose_path)?
        .into_iter()
        .next()
        .unwrap_or(Value::Null);
    let Some(services) = compose.get("services").and_then(Value::as_mapping) else {
        p.add("docker-compose.yml: no services");
        return Ok(());
    };
    let names: BTreeSet<String> = services
        .keys()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect();
    let mut sentinel_masters: BTreeMap<String, String> = BTreeMap::new();
    let mut app_env: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (name, svc) in services {
        let name = name.as_str().unwrap_or_default();
        p.check(
            svc.get("healthcheck").is_some() || name_is_app(name),
            || format!("docker-compose.yml: service {name} has no healthcheck"),
        );
        if let Some(deps) = svc.get("depends_on") {
            match deps.as_mapping() {
                Some(m) => {
                    for (dep, spec) in m {
                        let dep = dep.as_str().unwrap_or_default();
                        p.check(names.contains(dep), || {
                            format!("docker-compose.yml: {name} depends on unknown service {dep}")
                        });
                        p.check(str_at(spec, &["condition"]) == Some("service_healthy"), || {
                            format!("docker-compose.yml: {name} should wait for {dep} with condition: service_healthy")
                        });
                    }
                }
                None => p.add(format!(
                    "docker-compose.yml: {name}: depends_on should be a map with condition: service_healthy"
                )),
            }
        }
        let mut vars = BTreeMap::new();
        for f in compose_env_files(svc) {
            let path = root.join(&f);
            match fs::read_to_string(&path) {
                Ok(text) => vars.extend(parse_env_file_map(&text)),
                Err(_) => p.add(format!(
                    "docker-compose.yml: {name}: env_file {f} does not exist"
                )),
            }
        }
        if let Some(m) = svc.get("environment").and_then(Value::as_mapping) {
            for (k, v) in m {
                if let (Some(k), Some(v)) = (k.as_str(), scalar(v)) {
                    vars.insert(k.to_string(), v);
                }
            }
        }
        for volume in seq_at(svc, &["volumes"]) {
            if let Some(src) = volume.as_str().and_then(|v| v.split(':').next()) {
                if src.starts_with("./") || src.starts_with("../") {
                    p.check(root.join(src).exists(), || {
                        format!("docker-compose.yml: {name} mounts {src}, which does not exist")
                    });
                }
            }
        }
        if let Some(masters) = vars.get("SENTINEL_MASTERS") {
            for pair in masters.split_whitespace() {
                if let Some((master, host)) = pair.split_once('=') {
                    sentinel_masters.insert(master.to_string(), host.to_string());
                    p.check(names.contains(host), || {
                        format!("docker-compose.yml: {name}: SENTINEL_MASTERS names {host}, which is no compose service")
                    });
                }
            }
        }
        if name_is_app(name) {
            let replicas = at(svc, &["deploy", "replicas"])
                .and_then(Value::as_u64)
                .unwrap_or(1);
            p.check(replicas >= 2, || {
                format!("docker-compose.yml: {name} runs {replicas} replica(s), want deploy.replicas >= 2")
            });
            p.check(svc.get("healthcheck").is_some(), || {
                format!("docker-compose.yml: {name} has no healthcheck")
            });
            app_env.insert(name.to_string(), vars);
        }
    }
    for app in ["stock", "payment", "order"] {
        let Some(vars) = app_env.get(app) else {
            p.add(format!("docker-compose.yml: no service {app}"));
            continue;
        };
        let who = format!("docker-compose.yml: {app}");
        if let Some(list) = vars.get("REDIS_SENTINELS") {
            for s in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let (host, _) = host_port(s, 26379);
                p.check(names.contains(&host), || {
                    format!("{who}: REDIS_SENTINELS names {host}, which is no compose service")
                });
            }
            let mut masters = vec![vars
                .get("REDIS_MASTER_NAME")
                .cloned()
                .unwrap_or_else(|| app.to_string())];
            if app == "order" {
                masters.push(
                    vars.get("SAGA_REDIS_MASTER_NAME")
                        .cloned()
                        .unwrap_or_else(|| "saga".into()),
                );
            }
            for m in masters {
                p.check(sentinel_masters.contains_key(&m), || {
                    format!(
                        "{who}: master {m} is not monitored by the Sentinels (SENTINEL_MASTERS)"
                    )
                });
            }
        }
        if let Some(url) = vars.get("AMQP_URL") {
            let (host, _) = host_port(url, 5672);
            p.check(names.contains(&host), || {
                format!("{who}: AMQP_URL host {host} is no compose service")
            });
        }
        if let Some(url) = vars.get("STOCK_URL") {
            let (host, _) = host_port(url, 80);
            p.check(names.contains(&host), || {
                format!("{who}: STOCK_URL host {host} is no compose service")
            });
        }
    }
    Ok(())
}

fn name_is_app(name: &str) -> bool {
    ["stock", "payment", "order"].contains(&name)
}

/// The compose gateway routes the three prefixes and retries POSTs on another instance.
fn check_gateway_routes(root: &Path, p: &mut Problems) -> Result<()> {
    for conf in files_under(&root.join("deploy/gateway"), &|f| has_ext(f, "conf")) {
        let label = conf
            .strip_prefix(root)
            .unwrap_or(&conf)
            .display()
            .to_string();
        let text = fs::read_to_string(&conf).with_context(|| label.clone())?;
        let mut missing = String::new();
        for prefix in ["/orders/", "/stock/", "/payment/"] {
            if !text.contains(&format!("location {prefix}")) {
                let _ = write!(missing, " location {prefix};");
            }
        }
        let retries = text
            .lines()
            .map(|l| {
                l.split('#')
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .any(|l| l == "proxy_next_upstream error timeout non_idempotent;");
        if !retries {
            missing.push_str(" proxy_next_upstream error timeout non_idempotent;");
        }
        p.check(missing.is_empty(), || format!("{label}: missing{missing}"));
    }
    Ok(())
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

    #[test]
    fn container_host_names_are_mapped_for_nginx_t() {
        let conf = "\
upstream stock_app {
    server stock:8080 max_fails=0;
    server 10.0.0.1:8080;
}
server {
    location /a/ { proxy_pass http://stock_app/; }
    location /b/ { proxy_pass http://payment:8080/; }
    location /c/ { proxy_pass http://$upstream; }
    server_name stock;
}
";
        let mapped = map_hosts_for_test(conf);
        assert!(
            mapped.contains("server 127.0.0.1:8080 max_fails=0;"),
            "{mapped}"
        );
        assert!(mapped.contains("server 10.0.0.1:8080;"));
        assert!(mapped.contains("proxy_pass http://stock_app/;"));
        assert!(mapped.contains("proxy_pass http://127.0.0.1:8080/;"));
        assert!(mapped.contains("proxy_pass http://$upstream;"));
        assert!(
            mapped.contains("server_name stock;"),
            "server_name outside upstream untouched"
        );
        assert_eq!(conf.lines().count(), mapped.lines().count());
    }

    #[test]
    fn template_placeholders_are_filled() {
        let scratch = Path::new("/tmp/x");
        let text = "listen {{ GATEWAY_PORT }};\nserver 127.0.0.1:${STOCK_1_PORT};\n\
                    error_log @LOG_FILE@;\nproxy_pass http://$host$request_uri;\nroot $RUN_DIR;\n";
        let out = render_template(text, scratch).unwrap();
        assert!(out.contains("listen 18001;"), "{out}");
        assert!(out.contains("server 127.0.0.1:18002;"));
        assert!(out.contains("error_log /tmp/x/log_file;"));
        assert!(
            out.contains("proxy_pass http://$host$request_uri;"),
            "nginx variables stay"
        );
        assert!(out.contains("root /tmp/x;"));
        let err = render_template("x ${WHATEVER};", scratch).unwrap_err();
        assert!(err.to_string().contains("WHATEVER"));
    }

    #[test]
    fn versions_compare() {
        assert_eq!(version_pair("1.37.0"), Some((1, 37)));
        assert!(version_pair("1.9.2") < version_pair(KUBERNETES_VERSION));
        assert_eq!(version_pair("garbage"), None);
    }

    #[test]
    fn directives_are_found() {
        assert!(has_directive("worker_processes 1;\n  pid /x;\n", "pid"));
        assert!(!has_directive("pidfile x;\n", "pid"));
    }

    #[test]
    fn urls_are_split() {
        assert_eq!(
            host_port("amqp://u:p@rabbitmq:5672/%2f", 1),
            ("rabbitmq".into(), 5672)
        );
        assert_eq!(host_port("http://stock:8080", 80), ("stock".into(), 8080));
        assert_eq!(
            host_port("stock-redis:26379", 1),
            ("stock-redis".into(), 26379)
        );
        assert_eq!(host_port("http://stock/x", 80), ("stock".into(), 80));
        assert_eq!(
            url_user("amqp://fleet:$(P)@rabbitmq:5672/%2f").as_deref(),
            Some("fleet")
        );
        assert_eq!(
            short_host("saga-redis.fleet.svc.cluster.local"),
            "saga-redis"
        );
        assert_eq!(dollar_refs("a$(X)b$(Y_Z)"), vec!["X", "Y_Z"]);
    }

    #[test]
    fn merge_keys_are_applied() {
        let docs = yaml_docs_str("x: &a {p: 1}\ny:\n  <<: *a\n  q: 2\n---\nz: 3\n").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(at(&docs[0], &["y", "p"]).and_then(Value::as_u64), Some(1));
    }

    fn objects(yaml: &str) -> Vec<Object> {
        yaml_docs_str(yaml)
            .unwrap()
            .into_iter()
            .map(|doc| Object {
                file: "t.yaml".into(),
                kind: str_at(&doc, &["kind"]).unwrap_or_default().into(),
                name: str_at(&doc, &["metadata", "name"])
                    .unwrap_or_default()
                    .into(),
                doc,
            })
            .collect()
    }

    const MINI: &str = "\
kind: ConfigMap
metadata: {name: cm}
data: {REDIS_SENTINELS: 'stock-redis:26379'}
---
kind: Secret
metadata: {name: s}
stringData: {redis-password: x}
---
kind: Deployment
metadata: {name: stock}
spec:
  selector: {matchLabels: {app: stock}}
  template:
    metadata: {labels: {app: stock}}
    spec:
      containers:
        - name: stock
          ports: [{name: http, containerPort: 8080}]
          envFrom: [{configMapRef: {name: cm}}]
          env:
            - {name: P, valueFrom: {secretKeyRef: {name: s, key: redis-password}}}
            - {name: URL, value: 'x$(P)'}
---
kind: Service
metadata: {name: stock}
spec: {selector: {app: stock}, ports: [{name: http, port: 8080, targetPort: http}]}
";

    #[test]
    fn consistent_objects_pass() {
        let objs = objects(MINI);
        let mut p = Problems::default();
        check_k8s_references(&objs, &mut p);
        let envs = container_envs(&objs, &mut p);
        assert!(p.0.is_empty(), "{:?}", p.0);
        assert_eq!(envs.len(), 1);
        assert_eq!(
            envs[0]
                .vars
                .get("REDIS_SENTINELS")
                .cloned()
                .flatten()
                .as_deref(),
            Some("stock-redis:26379")
        );
    }

    #[test]
    fn broken_references_are_reported() {
        let broken = MINI
            .replace("key: redis-password", "key: redis-pasword")
            .replace("targetPort: http", "targetPort: web")
            .replace("x$(P)", "x$(Q)");
        let objs = objects(&broken);
        let mut p = Problems::default();
        check_k8s_references(&objs, &mut p);
        container_envs(&objs, &mut p);
        let all = p.0.join("\n");
        assert!(all.contains("redis-pasword"), "{all}");
        assert!(all.contains("targetPort web"), "{all}");
        assert!(all.contains("$(Q)"), "{all}");
    }

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

    /// The whole validation on this repository (needs the tools; installs them if allowed).
    /// `cargo test -p xtask -- --ignored validate_repository`
    #[test]
    #[ignore = "runs external validators; `cargo xtask validate` does the same"]
    fn validate_repository() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        run(&root).unwrap();
    }
}
