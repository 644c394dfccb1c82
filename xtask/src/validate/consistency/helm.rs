//! The services' env in `k8s/` against the charts configured in `helm-config/`.
//!
//! Redis (one Bitnami release per store) and RabbitMQ are installed by Helm from
//! `helm-config/*-values.yaml`, which the service manifests cannot refer to: they repeat
//! the host names, ports, Sentinel master sets, user names and Secret keys those files
//! choose. This module reads the values files and checks that every repeat agrees, so a
//! renamed release or a changed port fails here instead of in a pod that cannot connect.
//! It also keeps two RabbitMQ settings the chart's defaults get wrong for this fleet
//! ([`check_rabbitmq_node_settings`]) and the image placeholders of the Deployments that
//! the deploy scripts replace with the build's tag ([`check_image_placeholders`]).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Result};
use serde_yaml_ng::Value;
use xtask::yaml::{at, scalar, seq_at, str_at};

use super::container_env::ContainerEnv;
use super::{data_keys, host_port, short_host, url_user, yaml_docs, Object, Problems};
use crate::validate::shared::{files_under, is_yaml};

/// One Bitnami Redis release described by `helm-config/redis-<store>-values.yaml`.
#[derive(Debug)]
struct RedisRelease {
    file: String,
    fullname: String,
    master_set: String,
}

/// The Secret, Redis and RabbitMQ settings of the three services agree with the values
/// files; every problem is added to `p`, a values file that cannot be read is an error.
pub(super) fn check_k8s_against_helm(
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
    for (label, doc) in values_files(root, &helm, |name| name.starts_with("redis-"))? {
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
    check_rabbitmq_node_settings(root, &rabbit, rabbit_nodes, p)?;
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

        // The stock and payment services, as the order service calls them.
        for var in ["STOCK_URL", "PAYMENT_URL"] {
            if let Some(url) = literal(var) {
                let (host, port) = host_port(&url, 80);
                let ok = services.get(short_host(&host)).is_some_and(|s| {
                    seq_at(&s.doc, &["spec", "ports"])
                        .iter()
                        .any(|sp| sp.get("port").and_then(scalar) == Some(port.to_string()))
                });
                p.check(ok, || {
                    format!("{who}: {var} {url} is no Service port in k8s/")
                });
            }
        }
    }
    check_image_placeholders(objects, p);
    Ok(())
}

/// RabbitMQ settings of the Bitnami chart (values.yaml of the pinned 16.0.x) whose defaults
/// misbehave on a real cluster: `memoryHighWatermark` is off, so with a memory limit a
/// backlog gets the node OOM-killed instead of blocking publishers (with `type: relative`
/// the chart applies `value` to `resources.limits.memory`); `podManagementPolicy` is
/// OrderedReady, with which a cluster stopped ungracefully may never start again. The
/// values overriding rabbitmq-values.yaml (`rabbitmq-*-values.yaml`) must not undo either.
fn check_rabbitmq_node_settings(
    root: &Path,
    rabbit: &Value,
    nodes: u64,
    p: &mut Problems,
) -> Result<()> {
    let base = "helm-config/rabbitmq-values.yaml";
    if str_at(rabbit, &["resources", "limits", "memory"]).is_some() {
        let enabled = at(rabbit, &["memoryHighWatermark", "enabled"]).and_then(Value::as_bool);
        let kind = str_at(rabbit, &["memoryHighWatermark", "type"]).unwrap_or("relative");
        let value = at(rabbit, &["memoryHighWatermark", "value"]).and_then(Value::as_f64);
        let relative_ok = kind == "relative" && value.is_some_and(|v| v > 0.0 && v < 1.0);
        p.check(enabled == Some(true) && (relative_ok || kind == "absolute"), || {
            format!(
                "{base}: resources.limits.memory is set, so memoryHighWatermark must be enabled (type relative, value in (0, 1): a share of the limit)"
            )
        });
    }
    if nodes > 1 {
        p.check(
            str_at(rabbit, &["podManagementPolicy"]) == Some("Parallel"),
            || format!("{base}: {nodes} nodes need podManagementPolicy: Parallel (with OrderedReady a cluster stopped ungracefully may never start again)"),
        );
    }
    let helm = root.join("helm-config");
    for (label, doc) in values_files(root, &helm, |name| {
        name.starts_with("rabbitmq-") && name != "rabbitmq-values.yaml"
    })? {
        let watermark_off =
            at(&doc, &["memoryHighWatermark", "enabled"]).and_then(Value::as_bool) == Some(false);
        let policy = str_at(&doc, &["podManagementPolicy"]);
        p.check(!watermark_off && policy.is_none_or(|v| v == "Parallel"), || {
            format!("{label}: must not turn off memoryHighWatermark or set podManagementPolicy other than Parallel (see {base})")
        });
    }
    Ok(())
}

/// The deploy scripts (render_manifests in helm-config/deploy-common.sh) apply k8s/ with
/// each service's image replaced by the one built from the work tree, tagged by commit, so
/// that a new build rolls out; they find the image by its placeholder `fleet/<service>:latest`.
fn check_image_placeholders(objects: &[Object], p: &mut Problems) {
    for d in objects.iter().filter(|o| {
        o.kind == "Deployment" && ["stock", "payment", "order"].contains(&o.name.as_str())
    }) {
        let placeholder = format!("fleet/{}:latest", d.name);
        let images: Vec<&str> = seq_at(&d.doc, &["spec", "template", "spec", "containers"])
            .iter()
            .filter_map(|c| str_at(c, &["image"]))
            .collect();
        p.check(images.contains(&placeholder.as_str()), || {
            format!(
                "{}: Deployment {}: images {images:?}, but the deploy scripts (render_manifests in helm-config/deploy-common.sh) replace the placeholder {placeholder} with the build's tag",
                d.file, d.name
            )
        });
    }
}

/// The YAML files under `helm` whose file name `keep` accepts, as (path from the root, first
/// document).
fn values_files(
    root: &Path,
    helm: &Path,
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<(String, Value)>> {
    files_under(helm, &|f| {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        keep(name) && is_yaml(f)
    })
    .into_iter()
    .map(|file| {
        let doc = yaml_docs(&file)?.into_iter().next().unwrap_or(Value::Null);
        let label = file
            .strip_prefix(root)
            .unwrap_or(&file)
            .display()
            .to_string();
        Ok((label, doc))
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::consistency::yaml_docs_str;

    fn rabbit_problems(yaml: &str) -> Vec<String> {
        let doc = yaml_docs_str(yaml).unwrap().remove(0);
        let nodes = at(&doc, &["replicaCount"])
            .and_then(Value::as_u64)
            .unwrap_or(1);
        let mut p = Problems::default();
        // No helm-config/ there: no override files.
        check_rabbitmq_node_settings(Path::new("/nonexistent"), &doc, nodes, &mut p).unwrap();
        p.0
    }

    #[test]
    fn rabbitmq_blocks_publishers_and_restarts_in_parallel() {
        let good = "replicaCount: 3\npodManagementPolicy: Parallel\n\
                    resources: {limits: {memory: 1Gi}}\n\
                    memoryHighWatermark: {enabled: true, type: relative, value: 0.5}\n";
        assert_eq!(rabbit_problems(good), Vec::<String>::new());
        let off = good.replace("enabled: true", "enabled: false");
        assert!(rabbit_problems(&off)[0].contains("memoryHighWatermark must be enabled"));
        let too_high = good.replace("value: 0.5", "value: 1.5");
        assert_eq!(rabbit_problems(&too_high).len(), 1);
        let ordered = good.replace("Parallel", "OrderedReady");
        assert!(rabbit_problems(&ordered)[0].contains("podManagementPolicy: Parallel"));
        assert_eq!(
            rabbit_problems("replicaCount: 1\n"),
            Vec::<String>::new(),
            "one node without a limit needs neither"
        );
    }
}
