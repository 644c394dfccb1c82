//! `docker-compose.yml` against itself and the files it names.
//!
//! The compose spec (step `compose`) says nothing of whether a `depends_on` names a real
//! service, an `env_file` or a mounted directory exists, or a host in a URL is a compose
//! service. This module checks those, and the rules of the fleet's compose setup: every
//! service has a health check and is waited for with `service_healthy`, the three services
//! run at least two replicas, and each one's Redis masters are watched by the Sentinels.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use anyhow::Result;
use serde_yaml_ng::Value;
use xtask::yaml::{at, scalar, seq_at, str_at};

use super::{host_port, yaml_docs, Problems};
use crate::validate::shared::compose_file;

/// An env file's variables by name.
fn parse_env_file_map(text: &str) -> BTreeMap<String, String> {
    xtask::envfile::parse(text).into_iter().collect()
}

/// Checks every service of `docker-compose.yml`, then what the three services point at.
pub(super) fn check_compose_setup(root: &Path, p: &mut Problems) -> Result<()> {
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
        for f in xtask::envfile::compose_env_files(svc) {
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
        for var in ["STOCK_URL", "PAYMENT_URL"] {
            if let Some(url) = vars.get(var) {
                let (host, _) = host_port(url, 80);
                p.check(names.contains(&host), || {
                    format!("{who}: {var} host {host} is no compose service")
                });
            }
        }
    }
    Ok(())
}

/// The fleet's own services; the other compose services are stores, broker and gateway.
fn name_is_app(name: &str) -> bool {
    ["stock", "payment", "order"].contains(&name)
}
