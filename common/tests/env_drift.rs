//! The deployments set exactly what the services read.
//!
//! Parses `docker-compose.yml` (with the `env/*.env` files its services load) and the
//! manifests under `k8s/`, and checks them against `common::config::ENV_VARS`:
//!
//! - every variable set for the stock, payment and order containers is declared there for
//!   that service (the Redis, Sentinel, RabbitMQ and nginx containers are not checked);
//! - every `required` variable of a service is set for it, in compose and in k8s;
//! - REDIS_SENTINELS or REDIS_URL is set for each service;
//! - the compose AMQP_URL carries the user and password the RabbitMQ container is given.
//!
//! In k8s, a variable that only exists to be expanded into another one (`$(NAME)` in a
//! value of the same container, e.g. AMQP_PASSWORD inside AMQP_URL) is allowed.
//! A failure names the variable, the service and the file.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use common::config::{EnvVar, Service, ENV_VARS};
use serde::Deserialize;
use serde_yaml_ng::Value;
use xtask::yaml::{at, scalar, seq_at, str_at};

/// One variable as a deployment sets it for one service.
#[derive(Debug, Clone)]
struct Setting {
    /// The literal value, when the deployment gives one (not for secrets and field refs).
    value: Option<String>,
    /// Where it is set, e.g. `env/order.env` or `k8s/order.yaml (ConfigMap order-config)`.
    source: String,
}

/// Variables set for one service by one deployment.
#[derive(Debug, Default)]
struct ServiceEnv {
    vars: BTreeMap<String, Setting>,
    /// Names that only feed `$(NAME)` expansions of other variables (k8s).
    expansion_only: BTreeSet<String>,
    /// The file that defines the service (compose file or manifest).
    defined_in: String,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("common lives inside the workspace")
        .to_path_buf()
}

fn service_by_name(name: &str) -> Option<Service> {
    Service::ALL.iter().copied().find(|s| s.name() == name)
}

fn declared(name: &str) -> Option<&'static EnvVar> {
    ENV_VARS.iter().find(|v| v.name == name)
}

// ------------------------------------------------------------------------------ parsing

fn yaml_docs(text: &str, file: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|de| {
            let mut v = Value::deserialize(de).unwrap_or_else(|e| panic!("{file}: {e}"));
            v.apply_merge().unwrap_or_else(|e| panic!("{file}: {e}"));
            v
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The environment of the stock, payment and order services of a compose file.
/// `read` gives the text of a file relative to the repository (env files).
fn compose_envs(
    compose_text: &str,
    compose_label: &str,
    read: &dyn Fn(&str) -> Option<String>,
) -> (BTreeMap<&'static str, ServiceEnv>, Vec<String>) {
    let mut problems = Vec::new();
    let mut envs = BTreeMap::new();
    let doc = yaml_docs(compose_text, compose_label)
        .into_iter()
        .next()
        .unwrap_or(Value::Null);
    let Some(services) = doc.get("services").and_then(Value::as_mapping) else {
        problems.push(format!("{compose_label}: no services"));
        return (envs, problems);
    };
    for (name, svc) in services {
        let Some(service) = name.as_str().and_then(service_by_name) else {
            continue; // Redis, Sentinel, RabbitMQ, nginx: not ours to check
        };
        let mut env = ServiceEnv {
            defined_in: compose_label.to_string(),
            ..Default::default()
        };
        let env_files = xtask::envfile::compose_env_files(svc);
        for file in env_files {
            let file = file.trim_start_matches("./").to_string();
            match read(&file) {
                Some(text) => {
                    for (k, v) in xtask::envfile::parse(&text) {
                        env.vars.insert(
                            k,
                            Setting {
                                value: Some(v),
                                source: file.clone(),
                            },
                        );
                    }
                }
                None => problems.push(format!(
                    "{compose_label}: service {} loads env_file {file}, which does not exist",
                    service.name()
                )),
            }
        }
        // `environment:` wins over env files, as in compose.
        match svc.get("environment") {
            Some(Value::Mapping(m)) => {
                for (k, v) in m {
                    if let Some(k) = k.as_str() {
                        env.vars.insert(
                            k.to_string(),
                            Setting {
                                value: scalar(v),
                                source: compose_label.to_string(),
                            },
                        );
                    }
                }
            }
            Some(Value::Sequence(items)) => {
                for item in items.iter().filter_map(Value::as_str) {
                    let (k, v) = match item.split_once('=') {
                        Some((k, v)) => (k, Some(v.to_string())),
                        None => (item, None),
                    };
                    env.vars.insert(
                        k.to_string(),
                        Setting {
                            value: v,
                            source: compose_label.to_string(),
                        },
                    );
                }
            }
            _ => {}
        }
        envs.insert(service.name(), env);
    }
    (envs, problems)
}

/// A Kubernetes object with the file it came from.
struct Object {
    file: String,
    doc: Value,
}

impl Object {
    fn kind(&self) -> &str {
        str_at(&self.doc, &["kind"]).unwrap_or_default()
    }
    fn name(&self) -> &str {
        str_at(&self.doc, &["metadata", "name"]).unwrap_or_default()
    }
}

/// The environment of the stock, payment and order Deployments (their main container).
fn k8s_envs(objects: &[Object]) -> (BTreeMap<&'static str, ServiceEnv>, Vec<String>) {
    let mut problems = Vec::new();
    let mut envs = BTreeMap::new();
    let find = |kind: &str, name: &str| {
        objects
            .iter()
            .find(|o| o.kind() == kind && o.name() == name)
    };
    for d in objects.iter().filter(|o| o.kind() == "Deployment") {
        let Some(service) = service_by_name(d.name()) else {
            continue;
        };
        let containers = seq_at(&d.doc, &["spec", "template", "spec", "containers"]);
        let Some(c) = containers
            .iter()
            .find(|c| str_at(c, &["name"]) == Some(d.name()))
            .or_else(|| containers.first())
        else {
            problems.push(format!(
                "{}: Deployment {} has no container",
                d.file,
                d.name()
            ));
            continue;
        };
        let mut env = ServiceEnv {
            defined_in: d.file.clone(),
            ..Default::default()
        };
        for from in seq_at(c, &["envFrom"]) {
            for (kind, key) in [("ConfigMap", "configMapRef"), ("Secret", "secretRef")] {
                let Some(name) = str_at(from, &[key, "name"]) else {
                    continue;
                };
                let Some(source) = find(kind, name) else {
                    problems.push(format!(
                        "{}: Deployment {} loads {kind} {name}, which is not in k8s/",
                        d.file,
                        d.name()
                    ));
                    continue;
                };
                let prefix = str_at(from, &["prefix"]).unwrap_or_default();
                for field in ["data", "stringData"] {
                    if let Some(data) = source.doc.get(field).and_then(Value::as_mapping) {
                        for (k, v) in data {
                            if let Some(k) = k.as_str() {
                                env.vars.insert(
                                    format!("{prefix}{k}"),
                                    Setting {
                                        value: if kind == "ConfigMap" { scalar(v) } else { None },
                                        source: format!("{} ({kind} {name})", source.file),
                                    },
                                );
                            }
                        }
                    }
                }
            }
        }
        let mut referenced = BTreeSet::new();
        for e in seq_at(c, &["env"]) {
            let Some(name) = str_at(e, &["name"]) else {
                continue;
            };
            let value = e.get("value").and_then(scalar);
            if let Some(v) = &value {
                let mut rest = v.as_str();
                while let Some(i) = rest.find("$(") {
                    let after = &rest[i + 2..];
                    let Some(j) = after.find(')') else { break };
                    referenced.insert(after[..j].to_string());
                    rest = &after[j + 1..];
                }
            }
            env.vars.insert(
                name.to_string(),
                Setting {
                    value,
                    source: d.file.clone(),
                },
            );
        }
        env.expansion_only = referenced
            .into_iter()
            .filter(|r| declared(r).is_none())
            .collect();
        envs.insert(service.name(), env);
    }
    (envs, problems)
}

fn load_k8s(dir: &Path, root: &Path) -> Vec<Object> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml") | Some("yml")
            ) {
                files.push(path);
            }
        }
    }
    files.sort();
    files
        .into_iter()
        .flat_map(|path| {
            let label = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .display()
                .to_string();
            let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{label}: {e}"));
            yaml_docs(&text, &label)
                .into_iter()
                .map(move |doc| Object {
                    file: label.clone(),
                    doc,
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

// ------------------------------------------------------------------------------ checks

/// Problems of the environments one deployment (`what`: "compose" or "k8s") gives.
fn check_envs(what: &str, envs: &BTreeMap<&'static str, ServiceEnv>) -> Vec<String> {
    let mut problems = Vec::new();
    for &service in Service::ALL {
        let name = service.name();
        let Some(env) = envs.get(name) else {
            problems.push(format!("{what}: no {name} service is deployed"));
            continue;
        };
        for (var, setting) in &env.vars {
            match declared(var) {
                None if env.expansion_only.contains(var) => {}
                None => problems.push(format!(
                    "{what}: {var} is set for {name} in {}, but it is not in common::config::ENV_VARS \
                     (declare it there, or remove it from the deployment)",
                    setting.source
                )),
                Some(v) if !v.services.contains(&service) => problems.push(format!(
                    "{what}: {var} is set for {name} in {}, but ENV_VARS declares it only for {}",
                    setting.source,
                    v.services.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
                )),
                Some(_) => {}
            }
        }
        for v in ENV_VARS
            .iter()
            .filter(|v| v.required && v.services.contains(&service))
        {
            let set = env
                .vars
                .get(v.name)
                .is_some_and(|s| s.value.as_deref().is_none_or(|x| !x.trim().is_empty()));
            if !set {
                problems.push(format!(
                    "{what}: required variable {} is not set for {name} (service defined in {})",
                    v.name, env.defined_in
                ));
            }
        }
        if !env.vars.contains_key("REDIS_SENTINELS") && !env.vars.contains_key("REDIS_URL") {
            problems.push(format!(
                "{what}: neither REDIS_SENTINELS nor REDIS_URL is set for {name} (service defined in {})",
                env.defined_in
            ));
        }
    }
    problems
}

fn fail_on(problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "deployment settings drifted from common::config::ENV_VARS:\n  {}",
        problems.join("\n  ")
    );
}

fn read_repo_file(rel: &str) -> Option<String> {
    fs::read_to_string(repo().join(rel)).ok()
}

fn repo_compose_envs() -> (BTreeMap<&'static str, ServiceEnv>, Vec<String>) {
    let text = read_repo_file("docker-compose.yml").expect("docker-compose.yml is missing");
    compose_envs(&text, "docker-compose.yml", &read_repo_file)
}

#[test]
fn compose_sets_exactly_the_declared_variables() {
    let (envs, mut problems) = repo_compose_envs();
    problems.extend(check_envs("compose", &envs));
    fail_on(problems);
}

#[test]
fn k8s_sets_exactly_the_declared_variables() {
    let root = repo();
    let objects = load_k8s(&root.join("k8s"), &root);
    let (envs, mut problems) = k8s_envs(&objects);
    problems.extend(check_envs("k8s", &envs));
    fail_on(problems);
}

/// The password of the broker is written twice in env/ (the container's and the URL the
/// services use): they must agree.
#[test]
fn compose_broker_credentials_agree() {
    let text = read_repo_file("docker-compose.yml").expect("docker-compose.yml is missing");
    let doc = yaml_docs(&text, "docker-compose.yml").remove(0);
    let Some(rabbit) = at(&doc, &["services", "rabbitmq"]) else {
        return; // no broker container in compose: nothing to compare
    };
    let mut broker = BTreeMap::new();
    for file in seq_at(rabbit, &["env_file"])
        .iter()
        .filter_map(Value::as_str)
    {
        let text = read_repo_file(file).unwrap_or_else(|| panic!("{file} is missing"));
        broker.extend(xtask::envfile::parse(&text));
    }
    if let Some(m) = rabbit.get("environment").and_then(Value::as_mapping) {
        for (k, v) in m {
            if let (Some(k), Some(v)) = (k.as_str(), scalar(v)) {
                broker.insert(k.to_string(), v);
            }
        }
    }
    let user = broker
        .get("RABBITMQ_DEFAULT_USER")
        .cloned()
        .unwrap_or("guest".into());
    let pass = broker
        .get("RABBITMQ_DEFAULT_PASS")
        .cloned()
        .unwrap_or("guest".into());
    let (envs, _) = repo_compose_envs();
    let mut problems = Vec::new();
    for (service, env) in &envs {
        let Some(setting) = env.vars.get("AMQP_URL") else {
            continue;
        };
        let url = setting.value.clone().unwrap_or_default();
        let userinfo = url
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('@'))
            .map(|(u, _)| u.to_string())
            .unwrap_or_default();
        if userinfo != format!("{user}:{pass}") {
            problems.push(format!(
                "compose: AMQP_URL for {} ({}) does not carry RABBITMQ_DEFAULT_USER/RABBITMQ_DEFAULT_PASS of the rabbitmq service",
                service, setting.source
            ));
        }
    }
    fail_on(problems);
}

/// The checks themselves catch what they are for.
#[test]
fn drift_is_detected() {
    let compose = "\
x-app: &app
  env_file: [env/app.env]
services:
  stock:
    <<: *app
    environment:
      NOT_A_SETTING: '1'
      STOCK_URL: http://x
  payment:
    <<: *app
  order:
    env_file: env/missing.env
  redis:
    environment:
      ANYTHING: goes
";
    let read = |f: &str| {
        (f == "env/app.env").then(|| "BIND_ADDR=0.0.0.0:8080\nAMQP_URL=amqp://x\n".to_string())
    };
    let (envs, mut problems) = compose_envs(compose, "compose.yml", &read);
    problems.extend(check_envs("compose", &envs));
    let all = problems.join("\n");
    assert!(
        all.contains("NOT_A_SETTING is set for stock in compose.yml"),
        "{all}"
    );
    assert!(
        all.contains(
            "STOCK_URL is set for stock in compose.yml, but ENV_VARS declares it only for order"
        ),
        "{all}"
    );
    assert!(all.contains("env_file env/missing.env"), "{all}");
    assert!(
        all.contains("required variable BIND_ADDR is not set for order"),
        "{all}"
    );
    assert!(
        all.contains("required variable STOCK_URL is not set for order"),
        "{all}"
    );
    assert!(
        all.contains("neither REDIS_SENTINELS nor REDIS_URL is set for payment"),
        "{all}"
    );
    assert!(
        !all.contains("ANYTHING"),
        "infrastructure containers are not checked: {all}"
    );

    let manifest = "\
kind: ConfigMap
metadata: {name: c}
data: {BIND_ADDR: '0.0.0.0:8080', REDIS_URL: 'redis://r:6379'}
---
kind: Deployment
metadata: {name: payment}
spec:
  template:
    spec:
      containers:
        - name: payment
          envFrom: [{configMapRef: {name: c}}]
          env:
            - {name: HELPER, valueFrom: {secretKeyRef: {name: s, key: k}}}
            - {name: AMQP_URL, value: 'amqp://u:$(HELPER)@b:5672/%2f'}
            - {name: STRAY, value: x}
";
    let objects: Vec<Object> = yaml_docs(manifest, "m.yaml")
        .into_iter()
        .map(|doc| Object {
            file: "m.yaml".into(),
            doc,
        })
        .collect();
    let (envs, _) = k8s_envs(&objects);
    let all = check_envs("k8s", &envs).join("\n");
    assert!(all.contains("STRAY is set for payment in m.yaml"), "{all}");
    assert!(
        !all.contains("HELPER"),
        "an expansion-only helper is allowed: {all}"
    );
    assert!(
        !all.contains("for payment (service"),
        "payment has what it needs: {all}"
    );
    assert!(all.contains("no stock service is deployed"), "{all}");
}
