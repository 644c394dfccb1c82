//! One timeout budget, from the gateway down: no layer gives up while a lower
//! one still works on the same request.
//!
//! A checkout request waits `CHECKOUT_TIMEOUT_MS` for its saga, then answers
//! 503 (the saga goes on). Before the saga starts it may spend up to one store
//! retry budget on a store that is failing over. The gateway must wait longer
//! than both together, or it answers 504 while the service still works; and a
//! saga step must be able to time out inside the checkout's wait, or no
//! refusal could ever be answered in time. Checked for the defaults and for
//! every deployment that sets these values (compose env file, k8s ConfigMap)
//! against every gateway (local template, compose nginx, k8s Ingress).
//!
//! Below the services, `/ready` answers within `common::http::READY_BOUND`, and
//! every readiness probe that asks it (k8s `readinessProbe`, the compose
//! healthcheck) waits longer than that plus a margin: a probe must see the
//! answer, not its own timeout, or a slow store makes the pods flap.

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::config::ENV_VARS;
use common::http::READY_BOUND;
use common::redis_store::DEFAULT_RETRY_BUDGET;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The number after `name` on every line of `text` that mentions it (comments aside).
fn numbers_after(text: &str, name: &str, file: &str) -> Vec<u64> {
    let found: Vec<u64> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains(name))
        .map(|line| {
            let rest = &line[line.find(name).unwrap() + name.len()..];
            let digits: String = rest
                .chars()
                .skip_while(|c| !c.is_ascii_digit())
                .take_while(|c| c.is_ascii_digit())
                .collect();
            digits
                .parse()
                .unwrap_or_else(|_| panic!("{file}: no number after {name}: {line}"))
        })
        .collect();
    assert!(!found.is_empty(), "{file} does not set {name}");
    found
}

fn number_after(text: &str, name: &str, file: &str) -> u64 {
    numbers_after(text, name, file)[0]
}

fn default_ms(name: &str) -> u64 {
    ENV_VARS
        .iter()
        .find(|v| v.name == name)
        .and_then(|v| v.default)
        .unwrap_or_else(|| panic!("{name} has no default"))
        .parse()
        .unwrap()
}

#[test]
fn timeouts_nest_from_the_gateway_down() {
    // (where, step timeout, checkout timeout) for every configuration of the order service.
    let mut services = vec![(
        "defaults (common/src/config.rs)".to_string(),
        default_ms("STEP_TIMEOUT_MS"),
        default_ms("CHECKOUT_TIMEOUT_MS"),
    )];
    for file in ["env/order.env", "k8s/configmap.yaml"] {
        let text = read(file);
        services.push((
            file.to_string(),
            number_after(&text, "STEP_TIMEOUT_MS", file),
            number_after(&text, "CHECKOUT_TIMEOUT_MS", file),
        ));
    }
    // (where, read timeout in seconds) for every gateway in front of it.
    let gateways = [
        ("gateway/nginx.conf.template", "proxy_read_timeout"),
        ("deploy/gateway/nginx.conf", "proxy_read_timeout"),
        ("k8s/ingress.yaml", "proxy-read-timeout"),
    ]
    .into_iter()
    .flat_map(|(file, directive)| {
        numbers_after(&read(file), directive, file)
            .into_iter()
            .map(move |secs| (file, secs))
    })
    .collect::<Vec<_>>();

    for (service, step_ms, checkout_ms) in &services {
        let step = Duration::from_millis(*step_ms);
        let checkout = Duration::from_millis(*checkout_ms);
        assert!(
            step < checkout,
            "{service}: a step timeout of {step:?} does not fit in the checkout's wait of {checkout:?}"
        );
        for (gateway, read_secs) in &gateways {
            let read = Duration::from_secs(*read_secs);
            assert!(
                checkout + DEFAULT_RETRY_BUDGET < read,
                "{gateway} gives up after {read:?}, but a checkout configured by {service} may \
                 take {checkout:?} plus a store retry budget of {DEFAULT_RETRY_BUDGET:?}"
            );
        }
    }
}

/// What a probe's timeout must leave beyond [`READY_BOUND`]: the HTTP round trip and the
/// scheduling of a busy node (the kubelet's or the container runtime's own latency).
const PROBE_MARGIN: Duration = Duration::from_secs(1);

/// The lines under each line of `text` whose key is `key` (`readinessProbe:`), up to the
/// next line indented no deeper than it: the body of that YAML mapping.
fn yaml_blocks(text: &str, key: &str) -> Vec<String> {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim_start().starts_with('#') || line.trim() != key {
            continue;
        }
        let body: Vec<&str> = lines[i + 1..]
            .iter()
            .take_while(|l| l.trim().is_empty() || indent(l) > indent(line))
            .copied()
            .collect();
        blocks.push(body.join("\n"));
    }
    blocks
}

#[test]
fn readiness_probes_outwait_ready() {
    let needed = READY_BOUND + PROBE_MARGIN;
    // (where, timeout in seconds) of every probe that asks /ready.
    let mut probes = Vec::new();
    let mut manifests: Vec<PathBuf> = std::fs::read_dir(root().join("k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    manifests.sort();
    for path in manifests {
        let file = format!("k8s/{}", path.file_name().unwrap().to_string_lossy());
        for block in yaml_blocks(&read(&file), "readinessProbe:") {
            // Kubernetes' default timeoutSeconds is 1.
            let secs = if block.contains("timeoutSeconds") {
                number_after(&block, "timeoutSeconds", &file)
            } else {
                1
            };
            probes.push((format!("{file} readinessProbe"), secs));
        }
    }
    let compose = read("docker-compose.yml");
    for block in yaml_blocks(&compose, "healthcheck:") {
        if block.contains("/ready") {
            // Compose's default timeout is 30 s; this project states it.
            let secs = number_after(&block, "timeout:", "docker-compose.yml");
            probes.push(("docker-compose.yml healthcheck".to_string(), secs));
        }
    }
    // The compose healthcheck's script waits this long for the status line.
    let script = "deploy/docker/healthcheck.sh";
    probes.push((
        format!("{script} read"),
        number_after(&read(script), "read -r -t", script),
    ));
    let k8s = probes.iter().filter(|(w, _)| w.starts_with("k8s/")).count();
    assert!(
        k8s >= 3,
        "expected a readinessProbe per service in k8s/: {probes:?}"
    );
    assert!(
        probes.iter().any(|(w, _)| w.starts_with("docker-compose")),
        "no compose healthcheck asks /ready"
    );
    for (probe, secs) in &probes {
        let timeout = Duration::from_secs(*secs);
        assert!(
            timeout >= needed,
            "{probe} gives up after {timeout:?}, but /ready may take {READY_BOUND:?} \
             (common::http::READY_BOUND) and a probe needs {PROBE_MARGIN:?} more"
        );
    }
}
