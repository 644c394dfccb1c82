//! The local fleet's topology: which processes, on which ports, with which environment.
//!
//! Kept apart from the code that starts things so the plan can be read (and unit-tested) in one
//! place. The ports are fixed rather than random because people, the Python tests and the
//! chaos tooling all address the fleet by them; they avoid the machine's own Redis (6379) and
//! RabbitMQ (5672, 25672, 15672).

use std::path::{Path, PathBuf};

/// Redis sets: (store = Sentinel master name, ports of its three nodes). The first node starts
/// as the master, the other two as its replicas: one lost node still leaves a master and a
/// replica, so writes stay acknowledged (a master refuses writes with no replica connected).
pub const STORES: [(&str, [u16; NODES_PER_STORE]); 4] = [
    ("order", [6400, 6410, 6420]),
    ("stock", [6401, 6411, 6421]),
    ("payment", [6402, 6412, 6422]),
    ("saga", [6403, 6413, 6423]),
];
/// A master and two replicas per store.
pub const NODES_PER_STORE: usize = 3;

/// Three Sentinels shared by all four sets; quorum 2 of 3 survives the loss of one.
pub const SENTINEL_PORTS: [u16; 3] = [26400, 26401, 26402];
pub const QUORUM: u32 = 2;
/// As compose and the Helm values (`env/sentinel.env`): a master is down after 2 s without
/// answering. 1 s (what NOTES.md measured, writes back about 2 s after a master's death) is
/// Sentinel's own ping period: under chaos load a freshly promoted master was marked down
/// and failed over again a second later, which is how a lagging replica got promoted.
pub const DOWN_AFTER_MS: u64 = 2000;
pub const FAILOVER_TIMEOUT_MS: u64 = 3000;

pub const BROKER_NODE: &str = "fleet@localhost";
pub const AMQP_PORT: u16 = 5673;
pub const DIST_PORT: u16 = 25673;

pub const DEFAULT_GATEWAY_PORT: u16 = 8000;

/// Services and their two instances' ports.
pub const SERVICES: [(&str, [u16; 2]); 3] = [
    ("stock", [8101, 8102]),
    ("payment", [8201, 8202]),
    ("order", [8301, 8302]),
];

pub fn amqp_url() -> String {
    format!("amqp://guest:guest@127.0.0.1:{AMQP_PORT}/%2f")
}

pub fn sentinel_list() -> String {
    SENTINEL_PORTS
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Where the fleet keeps its state and logs.
pub fn fleet_dir(root: &Path) -> PathBuf {
    root.join("target").join("fleet")
}

/// A Redis data node's directory (config, AOF, log) inside the fleet directory; a restart
/// starts the node again on it.
pub fn redis_dir(fleet: &Path, name: &str) -> PathBuf {
    fleet.join("redis").join(name)
}

/// A Sentinel's directory (its rewritten config, log) inside the fleet directory.
pub fn sentinel_dir(fleet: &Path, name: &str) -> PathBuf {
    fleet.join("sentinel").join(name)
}

/// Where cargo puts release binaries (honours CARGO_TARGET_DIR like cargo does).
pub fn release_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir).join("release"),
        None => root.join("target").join("release"),
    }
}

/// One instance of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub service: &'static str,
    /// `<service>-<n>`, n from 1; also its INSTANCE_ID.
    pub name: String,
    pub port: u16,
}

impl Instance {
    /// The role name `ps` reports: `stock-service` etc.
    pub fn role(&self) -> String {
        format!("{}-service", self.service)
    }
}

pub fn instances() -> Vec<Instance> {
    SERVICES
        .iter()
        .flat_map(|(service, ports)| {
            ports.iter().enumerate().map(move |(i, &port)| Instance {
                service,
                name: format!("{service}-{}", i + 1),
                port,
            })
        })
        .collect()
}

/// The instances' own base URLs, comma-separated (the Python suite's SERVICE_URLS, for the
/// operational endpoints the gateway does not route).
pub fn service_urls() -> String {
    instances()
        .iter()
        .map(|i| format!("http://127.0.0.1:{}", i.port))
        .collect::<Vec<_>>()
        .join(",")
}

/// Every port the fleet listens on, with what uses it (for the "already in use" check).
pub fn all_ports(gateway_port: u16) -> Vec<(u16, String)> {
    let mut ports = Vec::new();
    for (store, nodes) in STORES {
        for (i, port) in nodes.into_iter().enumerate() {
            let role = if i == 0 { "master" } else { "replica" };
            ports.push((
                port,
                format!("{store} Redis {role} ({store}-redis-{})", i + 1),
            ));
        }
    }
    for p in SENTINEL_PORTS {
        ports.push((p, "Sentinel".to_string()));
    }
    ports.push((AMQP_PORT, "RabbitMQ AMQP".to_string()));
    ports.push((DIST_PORT, "RabbitMQ distribution".to_string()));
    for i in instances() {
        ports.push((i.port, i.name.clone()));
    }
    ports.push((gateway_port, "nginx gateway".to_string()));
    ports
}

/// What the launcher does with one of the services' variables (`common::config::ENV_VARS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvAction {
    Set(String),
    /// Removed from the child's environment: a value in the caller's shell (say a REDIS_URL
    /// left from another experiment) would silently point the fleet elsewhere.
    Remove,
    /// Left as the caller has it (tuning knobs worth changing for an experiment), else the
    /// service's default applies.
    PassThrough,
}

/// The decision for every variable the services read. A unit test checks this list against
/// common/src/config.rs, so a new variable there must be classified here.
pub fn env_plan(instance: &Instance, gateway_port: u16) -> Vec<(&'static str, EnvAction)> {
    use EnvAction::*;
    let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_string());
    vec![
        ("BIND_ADDR", Set(format!("127.0.0.1:{}", instance.port))),
        ("INSTANCE_ID", Set(instance.name.clone())),
        ("REDIS_SENTINELS", Set(sentinel_list())),
        ("REDIS_MASTER_NAME", Set(instance.service.to_string())),
        ("SAGA_REDIS_MASTER_NAME", Set("saga".to_string())),
        ("AMQP_URL", Set(amqp_url())),
        (
            "STOCK_URL",
            Set(format!("http://127.0.0.1:{gateway_port}/stock")),
        ),
        (
            "PAYMENT_URL",
            Set(format!("http://127.0.0.1:{gateway_port}/payment")),
        ),
        ("RUST_LOG", Set(rust_log)),
        ("REDIS_URL", Remove),
        ("SAGA_REDIS_URL", Remove),
        ("REDIS_PASSWORD", Remove),
        ("REDIS_SENTINEL_PASSWORD", Remove),
        ("REDIS_WAIT_TIMEOUT_MS", PassThrough),
        ("AMQP_QUEUE_TYPE", PassThrough),
        ("AMQP_PREFETCH", PassThrough),
        // Six services on two cores: one worker each saves the wake-ups of work moving
        // between threads (BENCHMARKS.md: ~4 % less CPU per checkout, +8-10 % checkouts/s).
        ("TOKIO_WORKER_THREADS", Set("1".to_string())),
        ("STEP_TIMEOUT_MS", PassThrough),
        ("CHECKOUT_TIMEOUT_MS", PassThrough),
        ("SAGA_STEPS", PassThrough),
        ("SAGA_LEASE_MS", PassThrough),
        ("LOG_FORMAT", PassThrough),
        // Tracing export: off unless the caller points the fleet at a collector.
        ("OTEL_EXPORTER_OTLP_ENDPOINT", PassThrough),
        // One name per service, whatever the caller's shell says.
        ("OTEL_SERVICE_NAME", Set(instance.service.to_string())),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_and_avoid_the_machines_own_services() {
        let ports = all_ports(DEFAULT_GATEWAY_PORT);
        let mut numbers: Vec<u16> = ports.iter().map(|(p, _)| *p).collect();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), ports.len(), "a port is used twice");
        for taken in [6379, 5672, 25672, 15672, 4369] {
            assert!(!numbers.contains(&taken), "{taken} belongs to the machine");
        }
    }

    #[test]
    fn every_store_is_a_master_and_two_replicas() {
        let ports = all_ports(DEFAULT_GATEWAY_PORT);
        for (store, _) in STORES {
            let nodes: Vec<&String> = ports
                .iter()
                .map(|(_, what)| what)
                .filter(|w| w.starts_with(&format!("{store} Redis ")))
                .collect();
            assert_eq!(nodes.len(), 3, "{store}: {nodes:?}");
            assert_eq!(nodes.iter().filter(|w| w.contains("master")).count(), 1);
        }
        assert_eq!(QUORUM, 2);
        assert_eq!(SENTINEL_PORTS.len(), 3);
    }

    #[test]
    fn two_instances_per_service() {
        let names: Vec<String> = instances().into_iter().map(|i| i.name).collect();
        assert_eq!(
            names,
            [
                "stock-1",
                "stock-2",
                "payment-1",
                "payment-2",
                "order-1",
                "order-2"
            ]
        );
        assert_eq!(instances()[4].role(), "order-service");
        assert!(service_urls().starts_with("http://127.0.0.1:8101,http://127.0.0.1:8102,"));
    }

    #[test]
    fn order_instances_get_the_saga_store_and_the_gateway() {
        let order = instances()
            .into_iter()
            .find(|i| i.service == "order")
            .unwrap();
        let plan = env_plan(&order, 8000);
        let get = |k: &str| plan.iter().find(|(n, _)| *n == k).map(|(_, a)| a.clone());
        assert_eq!(
            get("REDIS_MASTER_NAME"),
            Some(EnvAction::Set("order".into()))
        );
        assert_eq!(
            get("SAGA_REDIS_MASTER_NAME"),
            Some(EnvAction::Set("saga".into()))
        );
        assert_eq!(
            get("REDIS_SENTINELS"),
            Some(EnvAction::Set(
                "127.0.0.1:26400,127.0.0.1:26401,127.0.0.1:26402".into()
            ))
        );
        assert_eq!(
            get("STOCK_URL"),
            Some(EnvAction::Set("http://127.0.0.1:8000/stock".into()))
        );
        assert_eq!(
            get("PAYMENT_URL"),
            Some(EnvAction::Set("http://127.0.0.1:8000/payment".into()))
        );
        assert_eq!(
            get("AMQP_URL"),
            Some(EnvAction::Set(
                "amqp://guest:guest@127.0.0.1:5673/%2f".into()
            ))
        );
    }

    /// Every variable declared in common::config::ENV_VARS has a decision in `env_plan`, and
    /// `env_plan` names no variable the services do not read. Read from the source file, since
    /// xtask must not depend on the services' crates.
    #[test]
    fn env_plan_matches_the_services_declared_variables() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../common/src/config.rs");
        let Ok(src) = std::fs::read_to_string(&path) else {
            eprintln!("{} not found; skipping", path.display());
            return;
        };
        let declared = declared_env_vars(&src);
        assert!(
            !declared.is_empty(),
            "no ENV_VARS found in {}",
            path.display()
        );
        let plan = env_plan(&instances()[0], DEFAULT_GATEWAY_PORT);
        let planned: Vec<&str> = plan.iter().map(|(n, _)| *n).collect();
        for name in &declared {
            assert!(
                planned.contains(&name.as_str()),
                "{name} is read by the services but xtask/src/fleet.rs env_plan does not say \
                 what the fleet does with it"
            );
        }
        for name in planned {
            assert!(
                declared.iter().any(|d| d == name),
                "{name} is in env_plan but not in common::config::ENV_VARS"
            );
        }
    }

    /// The `name: "X"` entries inside the `ENV_VARS` array of config.rs.
    fn declared_env_vars(src: &str) -> Vec<String> {
        let Some(start) = src.find("pub const ENV_VARS") else {
            return Vec::new();
        };
        let body = &src[start..];
        let body = &body[..body.find("\n];").unwrap_or(body.len())];
        body.lines()
            .filter_map(|l| l.trim().strip_prefix("name: \""))
            .filter_map(|rest| rest.split('"').next())
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn env_var_extraction() {
        let src = "pub const ENV_VARS: &[EnvVar] = &[\n    EnvVar {\n        name: \"A\",\n    },\n    EnvVar { \n        name: \"B\",\n    },\n];\nfn x() { let name: \"C\"; }";
        assert_eq!(declared_env_vars(src), vec!["A", "B"]);
    }
}
