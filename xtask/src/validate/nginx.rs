//! Step `nginx`: `nginx -t` on the gateway configurations.
//!
//! The compose gateway (`deploy/gateway/*.conf`) is only loaded inside a container, and the
//! template of the local one (`gateway/nginx.conf.template`) only once `cargo xtask up` has
//! rendered it; either way a mistake shows up late, as a gateway that does not start.
//! Testing them here takes two adaptations, both made on a scratch copy so the files
//! themselves stay as they are:
//!
//! - host names that exist only in a container network are mapped to 127.0.0.1
//!   ([`map_hosts_for_test`]), since nginx resolves them at load time;
//! - the template's placeholders are filled with test values ([`render_template`]).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use super::shared::{combined, exec, files_under, find_program, has_ext, Scratch};

/// Every compose gateway config must pass; the template is tested when there is one.
pub(super) fn check_nginx(root: &Path) -> Result<String> {
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
    // The default pid file (under /run) is root's; but a config that sets its own `pid`
    // would reject a second one given with -g as a duplicate.
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

/// Whether a line of `text` starts with the directive `name`.
fn has_directive(text: &str, name: &str) -> bool {
    text.lines().any(|l| {
        let l = l.trim_start();
        l.strip_prefix(name)
            .is_some_and(|rest| rest.starts_with(char::is_whitespace))
    })
}

/// Hosts that resolve anywhere, left as they are.
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
            "no test value for the placeholder(s) {} (teach xtask/src/validate/nginx.rs::placeholder_value)",
            unknown.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(out)
}

/// UPPER_SNAKE_CASE of two characters or more: never one of nginx's own `$variables`.
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

/// A test value for a placeholder, guessed from the words of its name; `None` when the name
/// says nothing, so a new kind of placeholder is reported rather than filled with garbage.
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn directives_are_found() {
        assert!(has_directive("worker_processes 1;\n  pid /x;\n", "pid"));
        assert!(!has_directive("pidfile x;\n", "pid"));
    }
}
