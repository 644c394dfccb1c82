//! Step `consistency`: the names, ports and keys that several deployment files must share.
//!
//! The other steps check each file on its own; a file can pass all of them and still break
//! a deploy, because it names a Service, a Secret key, a Sentinel master or a port that
//! another file spells differently. Those cross-references are checked here, by reading the
//! files as YAML (no Helm, no cluster), one module for each thing cross-checked:
//!
//! | module            | checks                                                           |
//! |-------------------|------------------------------------------------------------------|
//! | [`k8s_refs`]      | within `k8s/`: selectors, Service ports, Ingress, PDB, HPA targets |
//! | [`container_env`] | the services' env in `k8s/`: ConfigMap and Secret references       |
//! | [`helm`]          | that env against the Redis and RabbitMQ charts in `helm-config/`;  |
//! |                   | RabbitMQ's memory watermark and pod management; the image          |
//! |                   | placeholders the deploy scripts replace                            |
//! | [`compose_setup`] | `docker-compose.yml`: services, health checks, env files, hosts    |
//! | [`gateway`]       | the compose gateway routes and retries what the fleet needs        |
//!
//! Every check adds to one [`Problems`] list instead of stopping at the first, so one run
//! reports everything that disagrees.

mod compose_setup;
mod container_env;
mod gateway;
mod helm;
mod k8s_refs;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_yaml_ng::Value;
use xtask::yaml::str_at;

use super::shared::k8s_manifests;
use compose_setup::check_compose_setup;
use container_env::container_envs;
use gateway::check_gateway_routes;
use helm::check_k8s_against_helm;
use k8s_refs::check_k8s_references;

/// Runs every cross-check. The env of the k8s containers is built once, with the problems of
/// its references, and then compared with the charts.
pub(super) fn check_consistency(root: &Path) -> Result<String> {
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

/// Every YAML document of a file, with `<<` merge keys applied (docker-compose.yml shares
/// settings between services with them).
pub(super) fn yaml_docs(path: &Path) -> Result<Vec<Value>> {
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

/// A parsed Kubernetes object, with the file it came from for the messages.
struct Object {
    file: String,
    kind: String,
    name: String,
    doc: Value,
}

/// Every object of every manifest under `k8s/`.
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

/// The object of that kind and name, if `k8s/` has one.
fn find<'a>(objects: &'a [Object], kind: &str, name: &str) -> Option<&'a Object> {
    objects.iter().find(|o| o.kind == kind && o.name == name)
}

/// The keys of a ConfigMap or Secret, whether given as `data` or `stringData`.
fn data_keys(o: &Object) -> BTreeSet<String> {
    ["data", "stringData"]
        .iter()
        .filter_map(|k| o.doc.get(*k).and_then(Value::as_mapping))
        .flat_map(|m| m.keys().filter_map(Value::as_str).map(str::to_string))
        .collect()
}

// Addresses as the env vars of both k8s/ and compose write them; shared by `helm` and
// `compose_setup`.

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

#[cfg(test)]
mod tests {
    use super::*;
    use container_env::dollar_refs;
    use xtask::yaml::at;

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

    // A minimal fleet shared by the tests of `k8s_refs` and `container_env`, which is why
    // those tests live here: one Deployment reading a ConfigMap and a Secret, one Service.

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
}
