//! Step `monitoring`: the Grafana dashboards ask for metrics the services emit, and the
//! Prometheus configs (compose, ServiceMonitor) scrape them where they are served.
//!
//! A dashboard query naming a metric nobody emits is not an error anywhere: Grafana draws an
//! empty panel, and nobody notices until the day the panel is needed. So every query of every
//! dashboard Grafana is given in `docker-compose.yml` is parsed, and each metric name it
//! reads must be one the code of `common`, `order`, `stock` and `payment` records with
//! `counter!`, `gauge!` or `histogram!` (a histogram is read as `_bucket`, `_sum`,
//! `_count`). The dashboards must also show what issue 9 asks of them ([`REQUIRED_METRICS`]).
//!
//! The scrape configs are cross-checked with what they point at:
//! - compose: Prometheus' config (the file mounted where it reads it) has a job for each
//!   service, on the compose service's name and the port of its `BIND_ADDR`, at the path the
//!   services serve `/metrics` on; Grafana's provisioned data source is that Prometheus and its
//!   dashboard provider reads the directory the dashboards are mounted at;
//! - Kubernetes: `deploy/monitoring/k8s/servicemonitor.yaml` (a CRD, so step `k8s` cannot check
//!   it) has only fields of the ServiceMonitor schema that it knows ([`SPEC_FIELDS`],
//!   [`ENDPOINT_FIELDS`]), selects the Services stock, payment and order of `k8s/`, and scrapes
//!   the Service port whose target is the container port the service listens on.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_yaml_ng::Value;
use xtask::yaml::{at, scalar, seq_at, str_at};

use super::consistency::yaml_docs;
use super::shared::{compose_file, files_under, has_ext, is_yaml, k8s_manifests};

/// The three services, as compose services, k8s Services and Prometheus jobs.
const APPS: [&str; 3] = ["stock", "payment", "order"];
/// Crates whose `src/` records the metrics the services expose.
const METRIC_CRATES: [&str; 4] = ["common", "order", "stock", "payment"];
/// The path the services serve Prometheus text on (`common/src/http.rs`).
const METRICS_PATH: &str = "/metrics";
/// What the dashboards must show (issue 9): request rate and latency by route, saga outcomes,
/// compensations, redeliveries, dead letters, WAIT failures; and full stores.
const REQUIRED_METRICS: [&str; 8] = [
    "http_requests_total",
    "http_request_duration_seconds_bucket",
    "saga_outcomes_total",
    "saga_compensations_total",
    "broker_redelivered_total",
    "broker_dead_lettered_total",
    "redis_not_durable_total",
    "redis_full_total",
];
/// The ServiceMonitor, outside `k8s/` (the deploy scripts apply it only where the CRD exists).
const SERVICE_MONITOR: &str = "deploy/monitoring/k8s/servicemonitor.yaml";
/// Fields of the ServiceMonitor spec (monitoring.coreos.com/v1) this check accepts: a subset
/// of the CRD's. A misspelt field is silently dropped by the API server; add a real one here
/// when the file needs it.
const SPEC_FIELDS: &[&str] = &[
    "endpoints",
    "jobLabel",
    "namespaceSelector",
    "podTargetLabels",
    "sampleLimit",
    "selector",
    "targetLabels",
];
/// Fields of a ServiceMonitor endpoint this check accepts (a subset of the CRD's).
const ENDPOINT_FIELDS: &[&str] = &[
    "honorLabels",
    "interval",
    "metricRelabelings",
    "params",
    "path",
    "port",
    "relabelings",
    "scheme",
    "scrapeTimeout",
    "targetPort",
];

pub(super) fn check_monitoring(root: &Path) -> Result<String> {
    let mut problems = Vec::new();
    let emitted = emitted_metrics(root)?;
    if emitted.is_empty() {
        bail!("no metric recorded with counter!/gauge!/histogram! in {METRIC_CRATES:?}");
    }
    let served = fs::read_to_string(root.join("common/src/http.rs")).unwrap_or_default();
    if !served.contains(&format!("\"{METRICS_PATH}\"")) {
        problems.push(format!(
            "common/src/http.rs: no route {METRICS_PATH} (the scrape configs expect it)"
        ));
    }
    let compose = ComposeMonitoring::load(root, &mut problems)?;
    let mut queries = 0;
    for dashboard in &compose.dashboards {
        queries += check_dashboard(root, dashboard, &emitted, &compose, &mut problems)?;
    }
    check_service_monitor(root, &mut problems)?;
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(format!(
        "{} dashboard(s), {queries} queries on {} emitted metrics; Prometheus (compose) and the ServiceMonitor scrape {METRICS_PATH} of {}",
        compose.dashboards.len(),
        emitted.len(),
        APPS.join(", ")
    ))
}

// ------------------------------------------------------------------ metrics in the code

/// Every series name the services can expose: counters and gauges as recorded, histograms as
/// their `_bucket`, `_sum` and `_count` series.
fn emitted_metrics(root: &Path) -> Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for krate in METRIC_CRATES {
        for file in files_under(&root.join(krate).join("src"), &|p| has_ext(p, "rs")) {
            let text = fs::read_to_string(&file).with_context(|| file.display().to_string())?;
            for (kind, name) in recorded_metrics(&text) {
                if kind == "histogram" {
                    names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}")));
                } else {
                    names.insert(name);
                }
            }
        }
    }
    Ok(names)
}

/// `(kind, name)` of every `counter!("name" ...)`, `gauge!(...)`, `histogram!(...)` in
/// Rust source whose name is a string literal (possibly on the next line).
fn recorded_metrics(text: &str) -> Vec<(&'static str, String)> {
    let mut found = Vec::new();
    for kind in ["counter", "gauge", "histogram"] {
        let needle = format!("{kind}!(");
        let mut from = 0;
        while let Some(at) = text[from..].find(&needle) {
            let start = from + at;
            from = start + needle.len();
            // `describe_counter!(` and the like are not recordings.
            let before = text[..start].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let rest = text[from..].trim_start();
            if let Some(lit) = rest.strip_prefix('"') {
                if let Some(end) = lit.find('"') {
                    found.push((kind, lit[..end].to_string()));
                }
            }
        }
    }
    found
}

// ------------------------------------------------------------------ PromQL

/// PromQL words that are never metric names: aggregations, operators, modifiers.
const PROMQL_KEYWORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "atan2",
    "inf",
    "nan",
];

/// Keywords followed by a parenthesised list of label names, not of expressions.
const LABEL_LIST_KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names a PromQL expression reads: identifiers that are not a function call, a
/// keyword, a label name (inside `{...}` or a `by (...)` list), a string, a number or
/// duration, a range (`[5m]`) or a Grafana variable (`$__rate_interval`).
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    let c: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_string = |mut i: usize| -> usize {
        let quote = c[i];
        i += 1;
        while i < c.len() && c[i] != quote {
            if c[i] == '\\' && quote != '`' {
                i += 1;
            }
            i += 1;
        }
        i + 1
    };
    // From an opening bracket to after its closing one, strings skipped.
    let skip_group = |mut i: usize, open: char, close: char| -> usize {
        let mut depth = 0;
        while i < c.len() {
            match c[i] {
                '"' | '\'' | '`' => {
                    i = skip_string(i);
                    continue;
                }
                ch if ch == open => depth += 1,
                ch if ch == close => {
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        i
    };
    let is_ident = |ch: char| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':';
    while i < c.len() {
        let ch = c[i];
        match ch {
            '"' | '\'' | '`' => i = skip_string(i),
            '{' => i = skip_group(i, '{', '}'),
            '[' => i = skip_group(i, '[', ']'),
            '#' => {
                while i < c.len() && c[i] != '\n' {
                    i += 1;
                }
            }
            '$' => {
                i += 1;
                if c.get(i) == Some(&'{') {
                    i = skip_group(i, '{', '}');
                } else {
                    while i < c.len() && is_ident(c[i]) {
                        i += 1;
                    }
                }
            }
            _ if ch.is_ascii_digit()
                || (ch == '.' && c.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                // Numbers, durations (5m), exponents (1e3), hex: one word.
                while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.') {
                    i += 1;
                }
            }
            _ if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' => {
                let start = i;
                while i < c.len() && is_ident(c[i]) {
                    i += 1;
                }
                let word: String = c[start..i].iter().collect();
                let mut next = i;
                while next < c.len() && c[next].is_whitespace() {
                    next += 1;
                }
                let lower = word.to_ascii_lowercase();
                if LABEL_LIST_KEYWORDS.contains(&lower.as_str()) {
                    if c.get(next) == Some(&'(') {
                        i = skip_group(next, '(', ')');
                    }
                } else if c.get(next) == Some(&'(') || PROMQL_KEYWORDS.contains(&lower.as_str()) {
                    // A function or an aggregation: its arguments are read on.
                } else {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

// ------------------------------------------------------------------ compose

/// What `docker-compose.yml` gives Prometheus and Grafana.
struct ComposeMonitoring {
    /// Dashboard JSON files in the directory mounted where Grafana's provider reads.
    dashboards: Vec<PathBuf>,
    /// `uid` of the provisioned Prometheus data source, if any.
    datasource_uid: Option<String>,
}

/// The host path mounted at `target` in a compose service (`./src:target[:ro]`).
fn mount_source(svc: &Value, target: &str) -> Option<String> {
    seq_at(svc, &["volumes"]).iter().find_map(|v| {
        let mut parts = v.as_str()?.split(':');
        let src = parts.next()?;
        (parts.next()? == target && (src.starts_with("./") || src.starts_with("../")))
            .then(|| src.to_string())
    })
}

/// The value of a `--flag=value` in a compose service's `command`.
fn command_flag(svc: &Value, flag: &str) -> Option<String> {
    let prefix = format!("{flag}=");
    let words: Vec<String> = match svc.get("command") {
        Some(Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
        Some(Value::Sequence(seq)) => seq.iter().filter_map(scalar).collect(),
        _ => Vec::new(),
    };
    words
        .iter()
        .find_map(|w| w.strip_prefix(&prefix).map(str::to_string))
}

/// The port of a `host:port` or `URL` (`http://prometheus:9090/x` -> (prometheus, 9090)).
fn host_and_port(addr: &str) -> (String, Option<u16>) {
    let addr = addr.split_once("://").map_or(addr, |(_, rest)| rest);
    let addr = addr.split('/').next().unwrap_or_default();
    match addr.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().ok()),
        None => (addr.to_string(), None),
    }
}

/// The port a service listens on: BIND_ADDR of its compose environment, else the Dockerfile's.
fn compose_listen_port(root: &Path, svc: &Value) -> Option<u16> {
    let mut bind = None;
    for f in xtask::envfile::compose_env_files(svc) {
        if let Ok(text) = fs::read_to_string(root.join(&f)) {
            for (k, v) in xtask::envfile::parse(&text) {
                if k == "BIND_ADDR" {
                    bind = Some(v);
                }
            }
        }
    }
    if let Some(v) = at(svc, &["environment", "BIND_ADDR"]).and_then(scalar) {
        bind = Some(v);
    }
    let bind = bind.or_else(|| {
        let dockerfile = fs::read_to_string(root.join("Dockerfile")).ok()?;
        dockerfile.lines().find_map(|l| {
            l.trim()
                .strip_prefix("ENV BIND_ADDR=")
                .map(|v| v.trim().to_string())
        })
    })?;
    host_and_port(&bind).1
}

impl ComposeMonitoring {
    fn load(root: &Path, p: &mut Vec<String>) -> Result<Self> {
        let compose_path = compose_file(root)?;
        let compose = yaml_docs(&compose_path)?
            .into_iter()
            .next()
            .unwrap_or(Value::Null);
        let services = compose.get("services").cloned().unwrap_or(Value::Null);
        let mut found = ComposeMonitoring {
            dashboards: Vec::new(),
            datasource_uid: None,
        };
        let Some(prometheus) = services.get("prometheus") else {
            p.push("docker-compose.yml: no service prometheus".into());
            return Ok(found);
        };
        let config_at = command_flag(prometheus, "--config.file")
            .unwrap_or_else(|| "/etc/prometheus/prometheus.yml".into());
        match mount_source(prometheus, &config_at) {
            Some(src) => check_prometheus_config(root, &src, &services, p)?,
            None => p.push(format!(
                "docker-compose.yml: prometheus mounts no file of the repository at {config_at}"
            )),
        }
        let prometheus_port = command_flag(prometheus, "--web.listen-address")
            .and_then(|a| host_and_port(&a).1)
            .unwrap_or(9090);

        let Some(grafana) = services.get("grafana") else {
            p.push("docker-compose.yml: no service grafana".into());
            return Ok(found);
        };
        let Some(provisioning) = mount_source(grafana, "/etc/grafana/provisioning") else {
            p.push(
                "docker-compose.yml: grafana mounts no directory at /etc/grafana/provisioning"
                    .into(),
            );
            return Ok(found);
        };
        let provisioning = root.join(provisioning);
        let mut datasources = 0;
        for file in files_under(&provisioning.join("datasources"), &is_yaml) {
            for doc in yaml_docs(&file)? {
                for ds in seq_at(&doc, &["datasources"]) {
                    if str_at(ds, &["type"]) != Some("prometheus") {
                        continue;
                    }
                    datasources += 1;
                    let url = str_at(ds, &["url"]).unwrap_or_default();
                    let (host, port) = host_and_port(url);
                    if services.get(host.as_str()) != Some(prometheus)
                        || port != Some(prometheus_port)
                    {
                        p.push(format!(
                            "{}: data source url {url:?}, want http://prometheus:{prometheus_port}",
                            rel(root, &file)
                        ));
                    }
                    found.datasource_uid = str_at(ds, &["uid"]).map(str::to_string);
                }
            }
        }
        if datasources != 1 {
            p.push(format!(
                "{}: {datasources} Prometheus data sources, want 1",
                rel(root, &provisioning.join("datasources"))
            ));
        }
        for file in files_under(&provisioning.join("dashboards"), &is_yaml) {
            for doc in yaml_docs(&file)? {
                for provider in seq_at(&doc, &["providers"]) {
                    let Some(path) = str_at(provider, &["options", "path"]) else {
                        p.push(format!(
                            "{}: a provider without options.path",
                            rel(root, &file)
                        ));
                        continue;
                    };
                    match mount_source(grafana, path) {
                        Some(src) => found.dashboards.extend(files_under(&root.join(&src), &|f| {
                            has_ext(f, "json")
                        })),
                        None => p.push(format!(
                            "{}: dashboards read from {path}, where docker-compose.yml mounts nothing of the repository",
                            rel(root, &file)
                        )),
                    }
                }
            }
        }
        if found.dashboards.is_empty() {
            p.push("grafana (docker-compose.yml): no dashboard JSON provisioned".into());
        }
        Ok(found)
    }
}

/// Each service has a scrape job on its compose name, listen port and metrics path.
fn check_prometheus_config(
    root: &Path,
    src: &str,
    services: &Value,
    p: &mut Vec<String>,
) -> Result<()> {
    let path = root.join(src);
    let label = rel(root, &path);
    let config = yaml_docs(&path)?.into_iter().next().unwrap_or(Value::Null);
    let jobs = seq_at(&config, &["scrape_configs"]);
    for app in APPS {
        let Some(svc) = services.get(app) else {
            p.push(format!("docker-compose.yml: no service {app}"));
            continue;
        };
        let Some(port) = compose_listen_port(root, svc) else {
            p.push(format!("docker-compose.yml: {app}: no port in BIND_ADDR"));
            continue;
        };
        let scrapes = |job: &Value| {
            let statics = seq_at(job, &["static_configs"]).iter().any(|s| {
                seq_at(s, &["targets"])
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|t| host_and_port(t) == (app.to_string(), Some(port)))
            });
            let dns = seq_at(job, &["dns_sd_configs"]).iter().any(|d| {
                at(d, &["port"]).and_then(Value::as_u64) == Some(u64::from(port))
                    && seq_at(d, &["names"])
                        .iter()
                        .any(|n| n.as_str() == Some(app))
            });
            statics || dns
        };
        match jobs.iter().find(|j| scrapes(j)) {
            None => p.push(format!(
                "{label}: no scrape job for {app}:{port} (static_configs target or dns_sd_configs name + port)"
            )),
            Some(job) => {
                let path = str_at(job, &["metrics_path"]).unwrap_or("/metrics");
                if path != METRICS_PATH {
                    p.push(format!("{label}: job for {app} scrapes {path}, the services serve {METRICS_PATH}"));
                }
                if str_at(job, &["job_name"]) != Some(app) {
                    p.push(format!("{label}: the job for {app} should be named {app} (the dashboards group by job)"));
                }
            }
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ dashboards

/// Every query of the dashboard reads emitted metrics; the required ones are all shown; every
/// panel uses the provisioned data source. Returns the number of queries.
fn check_dashboard(
    root: &Path,
    file: &Path,
    emitted: &BTreeSet<String>,
    compose: &ComposeMonitoring,
    p: &mut Vec<String>,
) -> Result<usize> {
    let label = rel(root, file);
    let text = fs::read_to_string(file).with_context(|| label.clone())?;
    let dashboard: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{label}: not JSON"))?;
    let mut queries = Vec::new();
    collect_queries(&dashboard, "", &mut queries);
    let mut read = BTreeSet::new();
    for (panel, expr, uid) in &queries {
        for name in promql_metric_names(expr) {
            if !emitted.contains(&name) {
                p.push(format!(
                    "{label}: panel {panel:?} reads {name}, which no service emits (query: {expr})"
                ));
            }
            read.insert(name);
        }
        if let (Some(uid), Some(want)) = (uid, &compose.datasource_uid) {
            if !uid.starts_with('$') && uid != want {
                p.push(format!(
                    "{label}: panel {panel:?} uses data source {uid:?}, the provisioned one is {want:?}"
                ));
            }
        }
    }
    for name in REQUIRED_METRICS {
        if !read.contains(name) {
            p.push(format!("{label}: no panel shows {name}"));
        }
    }
    Ok(queries.len())
}

/// `(panel title, expr, data source uid)` of every Prometheus query, rows' panels included.
fn collect_queries(
    v: &serde_json::Value,
    panel: &str,
    out: &mut Vec<(String, String, Option<String>)>,
) {
    match v {
        serde_json::Value::Object(m) => {
            let title = m
                .get("title")
                .and_then(|t| t.as_str())
                .filter(|_| m.contains_key("type"))
                .unwrap_or(panel);
            if let Some(expr) = m.get("expr").and_then(|e| e.as_str()) {
                let uid = m
                    .get("datasource")
                    .and_then(|d| d.get("uid"))
                    .and_then(|u| u.as_str())
                    .map(str::to_string);
                out.push((panel.to_string(), expr.to_string(), uid));
            }
            for child in m.values() {
                collect_queries(child, title, out);
            }
        }
        serde_json::Value::Array(a) => {
            for child in a {
                collect_queries(child, panel, out);
            }
        }
        _ => {}
    }
}

// ------------------------------------------------------------------ ServiceMonitor

/// The ServiceMonitor has known fields only and scrapes each service's metrics port.
fn check_service_monitor(root: &Path, p: &mut Vec<String>) -> Result<()> {
    let path = root.join(SERVICE_MONITOR);
    if !path.is_file() {
        p.push(format!("{SERVICE_MONITOR} is missing"));
        return Ok(());
    }
    let docs = yaml_docs(&path)?;
    let [sm] = docs.as_slice() else {
        p.push(format!(
            "{SERVICE_MONITOR}: want one document, found {}",
            docs.len()
        ));
        return Ok(());
    };
    let who = SERVICE_MONITOR;
    if str_at(sm, &["apiVersion"]) != Some("monitoring.coreos.com/v1")
        || str_at(sm, &["kind"]) != Some("ServiceMonitor")
    {
        p.push(format!(
            "{who}: want apiVersion monitoring.coreos.com/v1, kind ServiceMonitor"
        ));
    }
    if str_at(sm, &["metadata", "name"]).is_none() {
        p.push(format!("{who}: no metadata.name"));
    }
    let spec = sm.get("spec").cloned().unwrap_or(Value::Null);
    unknown_fields(&spec, SPEC_FIELDS, &format!("{who}: spec"), p);
    let endpoints = seq_at(&spec, &["endpoints"]);
    if endpoints.is_empty() {
        p.push(format!("{who}: no spec.endpoints"));
    }
    for (i, e) in endpoints.iter().enumerate() {
        unknown_fields(
            e,
            ENDPOINT_FIELDS,
            &format!("{who}: spec.endpoints[{i}]"),
            p,
        );
    }

    // What k8s/ has: Services, Deployments and the common ConfigMap (BIND_ADDR).
    let mut objects: Vec<Value> = Vec::new();
    for file in k8s_manifests(root) {
        objects.extend(yaml_docs(&file)?);
    }
    let find = |kind: &str, name: &str| {
        objects.iter().find(|o| {
            str_at(o, &["kind"]) == Some(kind) && str_at(o, &["metadata", "name"]) == Some(name)
        })
    };
    let listen_port = objects
        .iter()
        .filter(|o| str_at(o, &["kind"]) == Some("ConfigMap"))
        .find_map(|o| str_at(o, &["data", "BIND_ADDR"]))
        .and_then(|a| host_and_port(a).1)
        .unwrap_or(8080);
    let selector = spec.get("selector").cloned().unwrap_or(Value::Null);
    let job_label = str_at(&spec, &["jobLabel"]);
    for app in APPS {
        let Some(service) = find("Service", app) else {
            p.push(format!("k8s/: no Service {app}"));
            continue;
        };
        let labels: BTreeMap<String, String> = service
            .get("metadata")
            .and_then(|m| m.get("labels"))
            .and_then(Value::as_mapping)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.as_str()?.to_string(), scalar(v)?)))
                    .collect()
            })
            .unwrap_or_default();
        if !selects(&selector, &labels) {
            p.push(format!(
                "{who}: spec.selector does not select the Service {app} (labels {labels:?})"
            ));
        }
        if let Some(job) = job_label {
            if labels.get(job).map(String::as_str) != Some(app) {
                p.push(format!(
                    "{who}: jobLabel {job} is not {app:?} on the Service {app}"
                ));
            }
        }
        for (i, e) in endpoints.iter().enumerate() {
            let path = str_at(e, &["path"]).unwrap_or("/metrics");
            if path != METRICS_PATH {
                p.push(format!(
                    "{who}: spec.endpoints[{i}] scrapes {path}, the services serve {METRICS_PATH}"
                ));
            }
            let Some(port_name) = str_at(e, &["port"]) else {
                p.push(format!(
                    "{who}: spec.endpoints[{i}] names no Service port (port:)"
                ));
                continue;
            };
            let port = seq_at(service, &["spec", "ports"])
                .iter()
                .find(|sp| str_at(sp, &["name"]) == Some(port_name));
            let Some(port) = port else {
                p.push(format!(
                    "{who}: the Service {app} has no port named {port_name}"
                ));
                continue;
            };
            let target = port
                .get("targetPort")
                .or_else(|| port.get("port"))
                .and_then(scalar)
                .unwrap_or_default();
            let container_port = target.parse::<u16>().ok().or_else(|| {
                let deployment = find("Deployment", app)?;
                seq_at(deployment, &["spec", "template", "spec", "containers"])
                    .iter()
                    .flat_map(|c| seq_at(c, &["ports"]))
                    .find(|cp| str_at(cp, &["name"]) == Some(target.as_str()))
                    .and_then(|cp| at(cp, &["containerPort"]))
                    .and_then(Value::as_u64)
                    .and_then(|n| u16::try_from(n).ok())
            });
            if container_port != Some(listen_port) {
                p.push(format!(
                    "{who}: port {port_name} of the Service {app} reaches container port {container_port:?}, the service listens on {listen_port} (BIND_ADDR)"
                ));
            }
        }
    }
    Ok(())
}

/// Fields of `v` (a mapping) not in `known`.
fn unknown_fields(v: &Value, known: &[&str], at: &str, p: &mut Vec<String>) {
    for key in v.as_mapping().into_iter().flat_map(|m| m.keys()) {
        let key = key.as_str().unwrap_or_default();
        if !known.contains(&key) {
            p.push(format!(
                "{at}.{key}: not a field this check knows of the ServiceMonitor schema"
            ));
        }
    }
}

/// Whether a label selector (`matchLabels`, `matchExpressions`) selects these labels. An empty
/// selector selects everything, as in Kubernetes.
fn selects(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = selector
        .get("matchLabels")
        .and_then(Value::as_mapping)
        .into_iter()
        .flatten()
        .all(|(k, v)| k.as_str().and_then(|k| labels.get(k)) == scalar(v).as_ref());
    let by_expressions = seq_at(selector, &["matchExpressions"]).iter().all(|e| {
        let key = str_at(e, &["key"]).unwrap_or_default();
        let values: Vec<String> = seq_at(e, &["values"]).iter().filter_map(scalar).collect();
        let value = labels.get(key);
        match str_at(e, &["operator"]) {
            Some("In") => value.is_some_and(|v| values.contains(v)),
            Some("NotIn") => value.is_none_or(|v| !values.contains(v)),
            Some("Exists") => value.is_some(),
            Some("DoesNotExist") => value.is_none(),
            _ => false,
        }
    });
    by_labels && by_expressions
}

fn rel(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(expr: &str) -> Vec<String> {
        promql_metric_names(expr).into_iter().collect()
    }

    #[test]
    fn promql_names_skip_functions_labels_and_ranges() {
        assert_eq!(
            names("histogram_quantile(0.95, sum by (job, route, le) (rate(http_request_duration_seconds_bucket{status=~\"5..\", route!=\"x{y}\"}[$__rate_interval])))"),
            ["http_request_duration_seconds_bucket"]
        );
        assert_eq!(
            names("sum without(instance) (increase(a_total[5m] offset 1h)) / on(job) group_left(route) b_total > bool 0.5e3"),
            ["a_total", "b_total"]
        );
        assert_eq!(
            names("sum(rate(x:recorded:rate5m[${__range}]))"),
            ["x:recorded:rate5m"]
        );
        assert!(names("vector(1) + time()").is_empty());
    }

    #[test]
    fn recorded_metrics_are_found_with_their_kind() {
        let src = "metrics::counter!(\"a_total\", \"k\" => v).increment(1);\n\
                   histogram!(\n    \"lat_seconds\",\n).record(x);\n\
                   describe_counter!(\"not_a_recording\", \"help\");\n\
                   gauge!(NAME_CONST).set(1.0);";
        assert_eq!(
            recorded_metrics(src),
            [
                ("counter", "a_total".to_string()),
                ("histogram", "lat_seconds".to_string())
            ]
        );
    }

    #[test]
    fn label_selectors_select_like_kubernetes() {
        let labels: BTreeMap<String, String> =
            [("app.kubernetes.io/name".to_string(), "stock".to_string())].into();
        let sel: Value = serde_yaml_ng::from_str(
            "matchExpressions:\n  - {key: app.kubernetes.io/name, operator: In, values: [stock, order]}\n",
        )
        .unwrap();
        assert!(selects(&sel, &labels));
        let sel: Value =
            serde_yaml_ng::from_str("matchLabels: {app.kubernetes.io/name: payment}\n").unwrap();
        assert!(!selects(&sel, &labels));
        assert!(selects(&Value::Null, &labels));
    }

    /// A copy of what the step reads, from this repository.
    fn copy_repo(to: &Path) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = vec![root.join("docker-compose.yml"), root.join("Dockerfile")];
        for dir in ["deploy", "env", "k8s"]
            .into_iter()
            .map(|d| root.join(d))
            .chain(METRIC_CRATES.map(|c| root.join(c).join("src")))
        {
            files.extend(files_under(&dir, &|_| true));
        }
        for f in files {
            let dest = to.join(f.strip_prefix(&root).unwrap());
            fs::create_dir_all(dest.parent().unwrap()).unwrap();
            fs::copy(&f, &dest).unwrap();
        }
    }

    fn edit(file: &Path, from: &str, to: &str) {
        let text = fs::read_to_string(file).unwrap();
        assert!(text.contains(from), "{} has no {from:?}", file.display());
        fs::write(file, text.replacen(from, to, 1)).unwrap();
    }

    #[test]
    fn the_repository_passes_and_broken_copies_fail() {
        let scratch = super::super::shared::Scratch::new("monitoring").unwrap();
        let dir = scratch.path();
        copy_repo(dir);
        check_monitoring(dir).unwrap();

        let dashboard = dir.join("deploy/monitoring/grafana/dashboards/fleet.json");
        edit(
            &dashboard,
            "rate(saga_outcomes_total",
            "rate(saga_outcome_total",
        );
        let prometheus = dir.join("deploy/monitoring/prometheus/prometheus.yml");
        edit(&prometheus, "port: 8080", "port: 8081");
        let monitor = dir.join(SERVICE_MONITOR);
        edit(&monitor, "port: http", "port: metrics");
        let err = format!("{:#}", check_monitoring(dir).unwrap_err());
        for want in [
            "reads saga_outcome_total, which no service emits",
            "no panel shows saga_outcomes_total",
            "no scrape job for stock:8080",
            "the Service order has no port named metrics",
        ] {
            assert!(err.contains(want), "{want:?} not in:\n{err}");
        }
    }

    #[test]
    fn addresses_split_into_host_and_port() {
        assert_eq!(
            host_and_port("http://prometheus:9090/x"),
            ("prometheus".into(), Some(9090))
        );
        assert_eq!(
            host_and_port("0.0.0.0:8080"),
            ("0.0.0.0".into(), Some(8080))
        );
        assert_eq!(host_and_port("stock"), ("stock".into(), None));
    }
}
