//! The environment each service container gets in `k8s/`, as Kubernetes will build it.
//!
//! A missing ConfigMap or Secret key is only noticed when a pod fails to start, and a
//! `$(NAME)` reference to a variable set later in the list is silently left as text. So
//! the env of every container is resolved here (ConfigMaps inlined, Secret keys checked,
//! `$(NAME)` order checked), and the result ([`ContainerEnv`]) is what [`super::helm`]
//! compares with the charts.

use std::collections::BTreeMap;

use serde_yaml_ng::Value;
use xtask::yaml::{at, scalar, seq_at, str_at};

use super::{data_keys, find, Object, Problems};

/// The environment of one service container, as Kubernetes will build it.
#[derive(Default, Debug)]
pub(super) struct ContainerEnv {
    /// Deployment name.
    pub(super) deployment: String,
    pub(super) file: String,
    /// Literal values (from `value` or a ConfigMap); `None` for secrets and field refs.
    pub(super) vars: BTreeMap<String, Option<String>>,
    /// (variable, secret, key) of every secretKeyRef.
    pub(super) secret_refs: Vec<(String, String, String)>,
}

/// The environment of every container of every Deployment, with ConfigMaps resolved.
pub(super) fn container_envs(objects: &[Object], p: &mut Problems) -> Vec<ContainerEnv> {
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
pub(super) fn dollar_refs(value: &str) -> Vec<String> {
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
