//! Configuration from environment variables.
//!
//! Every variable any service reads is declared once in [`ENV_VARS`], with its
//! default and the services that read it. The README table and the deploy
//! drift test (`common/tests/env_drift.rs`) are both checked against this
//! list, so a variable cannot be added here without being documented and set
//! in the deployments.

use std::time::Duration;

use crate::redis_store::RedisTarget;

/// Which service a variable belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Stock,
    Payment,
    Order,
}

impl Service {
    pub const ALL: &'static [Service] = &[Service::Stock, Service::Payment, Service::Order];

    pub fn name(self) -> &'static str {
        match self {
            Service::Stock => "stock",
            Service::Payment => "payment",
            Service::Order => "order",
        }
    }
}

/// One environment variable a service reads.
#[derive(Debug)]
pub struct EnvVar {
    pub name: &'static str,
    /// `None` means "no default": see `required`.
    pub default: Option<&'static str>,
    /// A deployment must set it (the default only suits a laptop, or there is none).
    pub required: bool,
    pub services: &'static [Service],
    pub help: &'static str,
}

use Service::*;

/// The complete list of variables the services read.
pub const ENV_VARS: &[EnvVar] = &[
    EnvVar {
        name: "BIND_ADDR",
        default: Some("127.0.0.1:8080"),
        required: true,
        services: Service::ALL,
        help: "address the HTTP server listens on",
    },
    EnvVar {
        name: "INSTANCE_ID",
        default: None,
        required: false,
        services: Service::ALL,
        help: "name of this instance in logs and queue names (default: <service>-<pid>-<random>)",
    },
    EnvVar {
        name: "REDIS_SENTINELS",
        default: None,
        required: false,
        services: Service::ALL,
        help: "comma-separated Sentinel addresses host:port; the master is found through them (set this or REDIS_URL)",
    },
    EnvVar {
        name: "REDIS_MASTER_NAME",
        default: None,
        required: false,
        services: Service::ALL,
        help: "Sentinel master name of the service's own store (default: the service name)",
    },
    EnvVar {
        name: "REDIS_URL",
        default: None,
        required: false,
        services: Service::ALL,
        help: "redis://host:port/db of a single Redis, used instead of Sentinel",
    },
    EnvVar {
        name: "REDIS_PASSWORD",
        default: None,
        required: false,
        services: Service::ALL,
        help: "password of the Redis data nodes (Sentinel mode)",
    },
    EnvVar {
        name: "REDIS_SENTINEL_PASSWORD",
        default: None,
        required: false,
        services: Service::ALL,
        help: "password of the Sentinels themselves, when they have one",
    },
    EnvVar {
        name: "REDIS_WAIT_TIMEOUT_MS",
        default: Some("500"),
        required: false,
        services: Service::ALL,
        help: "how long a write waits for its healthy replicas to confirm it (WAIT <n> <ms>, n = the replicas online with a recent ACK, at least 1; at most 2000) before it counts as not confirmed (retried, then 503); Sentinel stores only",
    },
    EnvVar {
        name: "SAGA_REDIS_MASTER_NAME",
        default: Some("saga"),
        required: false,
        services: &[Order],
        help: "Sentinel master name of the saga store",
    },
    EnvVar {
        name: "SAGA_REDIS_URL",
        default: None,
        required: false,
        services: &[Order],
        help: "redis:// URL of a single Redis for the saga store, used instead of Sentinel",
    },
    EnvVar {
        name: "AMQP_URL",
        default: Some("amqp://guest:guest@127.0.0.1:5672/%2f"),
        required: true,
        services: Service::ALL,
        help: "RabbitMQ connection URL",
    },
    EnvVar {
        name: "AMQP_QUEUE_TYPE",
        default: Some("classic"),
        required: false,
        services: Service::ALL,
        help: "type of the durable command queues: classic or quorum",
    },
    EnvVar {
        name: "AMQP_PREFETCH",
        default: Some("256"),
        required: false,
        services: Service::ALL,
        help: "unacknowledged messages a consumer may hold",
    },
    EnvVar {
        name: "TOKIO_WORKER_THREADS",
        default: None,
        required: false,
        services: Service::ALL,
        help: "worker threads of the async runtime, read by tokio itself (default: one per core; the local fleet sets 1: six services share two cores)",
    },
    EnvVar {
        name: "STOCK_URL",
        default: Some("http://127.0.0.1:8000/stock"),
        required: true,
        services: &[Order],
        help: "base URL of the stock service's HTTP API (price look-ups for addItem)",
    },
    EnvVar {
        name: "PAYMENT_URL",
        default: Some("http://127.0.0.1:8000/payment"),
        required: true,
        services: &[Order],
        help: "base URL of the payment service's HTTP API (user look-ups for create)",
    },
    EnvVar {
        name: "STEP_TIMEOUT_MS",
        default: Some("10000"),
        required: false,
        services: &[Order],
        help: "how long a saga waits for a participant's reply before counting the step as failed (1 to 40000); time the broker is away does not count: after a lost connection the command is sent again and the wait starts over (at most twice)",
    },
    EnvVar {
        name: "CHECKOUT_TIMEOUT_MS",
        default: Some("30000"),
        required: false,
        services: &[Order],
        help: "how long a checkout request waits for its saga's answer before answering 503 (the saga goes on; retrying with the same Idempotency-Key waits for it); must stay below the gateway's read timeout (60 s)",
    },
    EnvVar {
        name: "SAGA_STEPS",
        default: Some("adaptive"),
        required: false,
        services: &[Order],
        help: "adaptive: reserve and charge at once, unless another running checkout of the instance reserves one of the same items or stock refused one of them in the last 5 s (then in sequence); sequential: charge only after the reservation succeeded (fewer messages when stock runs out); parallel: always at once (one round trip less)",
    },
    EnvVar {
        name: "SAGA_LEASE_MS",
        default: Some("3000"),
        required: false,
        services: &[Order],
        help: "lease of a saga's owner (at least 300); an expired lease lets another instance recover the saga",
    },
    EnvVar {
        name: "LOG_FORMAT",
        default: Some("text"),
        required: false,
        services: Service::ALL,
        help: "text or json",
    },
    EnvVar {
        name: "OTEL_EXPORTER_OTLP_ENDPOINT",
        default: None,
        required: false,
        services: Service::ALL,
        help: "OTLP/HTTP collector base URL (e.g. http://otel-collector:4318): traces are exported there when set, not at all otherwise",
    },
    EnvVar {
        name: "OTEL_SERVICE_NAME",
        default: None,
        required: false,
        services: Service::ALL,
        help: "service name in exported traces (default: stock, payment or order)",
    },
    EnvVar {
        name: "RUST_LOG",
        default: Some("info"),
        required: false,
        services: Service::ALL,
        help: "tracing filter, e.g. info or order=debug,info",
    },
];

/// A configuration value that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name}: {reason}")]
    Invalid { name: &'static str, reason: String },
    #[error("set REDIS_SENTINELS (with a master name) or REDIS_URL")]
    NoRedis,
}

fn declared(name: &str) -> &'static EnvVar {
    ENV_VARS
        .iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("{name} is not declared in ENV_VARS"))
}

/// The raw value of a declared variable, or its default.
pub fn var(name: &'static str) -> Option<String> {
    let spec = declared(name);
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => Some(v.trim().to_string()),
        _ => spec.default.map(str::to_string),
    }
}

fn parsed<T: std::str::FromStr>(name: &'static str) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    let raw = var(name).ok_or(ConfigError::Invalid {
        name,
        reason: "missing".into(),
    })?;
    raw.parse().map_err(|e: T::Err| ConfigError::Invalid {
        name,
        reason: format!("{raw:?}: {e}"),
    })
}

fn millis(name: &'static str) -> Result<Duration, ConfigError> {
    parsed::<u64>(name).map(Duration::from_millis)
}

/// Type of the durable queues the services declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    Classic,
    Quorum,
}

/// Settings shared by the three services.
#[derive(Debug, Clone)]
pub struct Settings {
    pub service: Service,
    pub bind_addr: String,
    pub instance_id: String,
    pub redis: RedisTarget,
    pub wait_timeout: Duration,
    pub amqp_url: String,
    pub queue_type: QueueType,
    pub prefetch: u16,
}

impl Settings {
    pub fn from_env(service: Service) -> Result<Self, ConfigError> {
        let instance_id = var("INSTANCE_ID").unwrap_or_else(|| {
            format!(
                "{}-{}-{:012x}",
                service.name(),
                std::process::id(),
                rand::random::<u64>() & 0xffff_ffff_ffff
            )
        });
        let queue_type = match var("AMQP_QUEUE_TYPE").as_deref() {
            Some("quorum") => QueueType::Quorum,
            Some("classic") | None => QueueType::Classic,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    name: "AMQP_QUEUE_TYPE",
                    reason: format!("{other:?} is neither classic nor quorum"),
                })
            }
        };
        let master = var("REDIS_MASTER_NAME").unwrap_or_else(|| service.name().to_string());
        Ok(Self {
            service,
            bind_addr: var("BIND_ADDR").expect("has a default"),
            instance_id,
            redis: redis_target("REDIS_URL", &master)?,
            wait_timeout: wait_timeout(millis("REDIS_WAIT_TIMEOUT_MS")?)?,
            amqp_url: var("AMQP_URL").expect("has a default"),
            queue_type,
            prefetch: parsed("AMQP_PREFETCH")?,
        })
    }
}

/// Where a store lives: a URL of its own, or a master name behind the shared Sentinels.
pub fn redis_target(url_var: &'static str, master_name: &str) -> Result<RedisTarget, ConfigError> {
    if let Some(url) = var(url_var) {
        return Ok(RedisTarget::Direct { url });
    }
    let sentinels: Vec<String> = var("REDIS_SENTINELS")
        .ok_or(ConfigError::NoRedis)?
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if sentinels.is_empty() {
        return Err(ConfigError::NoRedis);
    }
    Ok(RedisTarget::Sentinel {
        sentinels,
        master_name: master_name.to_string(),
        password: var("REDIS_PASSWORD"),
        sentinel_password: var("REDIS_SENTINEL_PASSWORD"),
    })
}

/// How the orchestrator sends a saga's two steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOrder {
    /// Reserve and charge at once.
    Parallel,
    /// Charge only once the reservation held.
    Sequential,
    /// At once, unless another running saga of the instance reserves one of the
    /// same items or stock refused one of them lately (then stock may run out: in
    /// sequence).
    Adaptive,
}

/// Settings only the order service reads.
#[derive(Debug, Clone)]
pub struct OrderSettings {
    pub saga_redis: RedisTarget,
    pub step_order: StepOrder,
    pub stock_url: String,
    pub payment_url: String,
    pub step_timeout: Duration,
    pub checkout_timeout: Duration,
    pub saga_lease: Duration,
}

/// Shorter leases would be renewed more often than a store round trip allows.
pub const MIN_SAGA_LEASE: Duration = Duration::from_millis(300);

impl OrderSettings {
    pub fn from_env() -> Result<Self, ConfigError> {
        let saga_master = var("SAGA_REDIS_MASTER_NAME").expect("has a default");
        Ok(Self {
            saga_redis: redis_target("SAGA_REDIS_URL", &saga_master)?,
            step_order: match var("SAGA_STEPS").as_deref() {
                Some("adaptive") | None => StepOrder::Adaptive,
                Some("sequential") => StepOrder::Sequential,
                Some("parallel") => StepOrder::Parallel,
                Some(other) => {
                    return Err(ConfigError::Invalid {
                        name: "SAGA_STEPS",
                        reason: format!("{other:?} is none of adaptive, parallel, sequential"),
                    })
                }
            },
            stock_url: var("STOCK_URL")
                .expect("has a default")
                .trim_end_matches('/')
                .to_string(),
            payment_url: var("PAYMENT_URL")
                .expect("has a default")
                .trim_end_matches('/')
                .to_string(),
            step_timeout: step_timeout(millis("STEP_TIMEOUT_MS")?)?,
            checkout_timeout: millis("CHECKOUT_TIMEOUT_MS")?,
            saga_lease: lease(millis("SAGA_LEASE_MS")?)?,
        })
    }
}

/// The longest `REDIS_WAIT_TIMEOUT_MS`: a WAIT must answer well inside a
/// store command's own timeout (3 s), or a slow replica would be reported as
/// an unreachable master.
pub const MAX_WAIT_TIMEOUT: Duration = Duration::from_millis(2000);

fn wait_timeout(wait: Duration) -> Result<Duration, ConfigError> {
    if wait > MAX_WAIT_TIMEOUT {
        return Err(ConfigError::Invalid {
            name: "REDIS_WAIT_TIMEOUT_MS",
            reason: format!(
                "{} ms is too long (at most {} ms)",
                wait.as_millis(),
                MAX_WAIT_TIMEOUT.as_millis()
            ),
        });
    }
    Ok(wait)
}

/// The longest `STEP_TIMEOUT_MS`. A forward command may be applied for a
/// while after its saga was compensated (the order service bounds how long:
/// a few step timeouts); participants remember a compensation (the tombstone
/// that makes a late forward command a no-op) for
/// [`crate::counters::TOMBSTONE_TTL_SECS`], which must outlast that.
pub const MAX_STEP_TIMEOUT: Duration = Duration::from_secs(40);

/// How long past the end of its saga's last wait for it a forward command may
/// still be applied (queues, clocks): it expires then.
pub const COMMAND_GRACE: Duration = Duration::from_secs(30);

fn step_timeout(step: Duration) -> Result<Duration, ConfigError> {
    if step > MAX_STEP_TIMEOUT || step.is_zero() {
        return Err(ConfigError::Invalid {
            name: "STEP_TIMEOUT_MS",
            reason: format!(
                "{} ms is out of range (1 to {} ms)",
                step.as_millis(),
                MAX_STEP_TIMEOUT.as_millis()
            ),
        });
    }
    Ok(step)
}

fn lease(lease: Duration) -> Result<Duration, ConfigError> {
    if lease < MIN_SAGA_LEASE {
        return Err(ConfigError::Invalid {
            name: "SAGA_LEASE_MS",
            reason: format!(
                "{} ms is too short (at least {} ms)",
                lease.as_millis(),
                MIN_SAGA_LEASE.as_millis()
            ),
        });
    }
    Ok(lease)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_timeouts_a_tombstone_cannot_outlast_are_refused() {
        assert!(step_timeout(Duration::ZERO).is_err());
        assert!(step_timeout(MAX_STEP_TIMEOUT + Duration::from_millis(1)).is_err());
        assert_eq!(step_timeout(MAX_STEP_TIMEOUT).unwrap(), MAX_STEP_TIMEOUT);
        // How late a command may come, against the tombstones: order/src/saga.rs
        // `tombstones_outlive_every_late_forward_command`.
    }

    #[test]
    fn waits_longer_than_a_command_may_take_are_refused() {
        assert!(wait_timeout(Duration::from_secs(5)).is_err());
        assert_eq!(wait_timeout(MAX_WAIT_TIMEOUT).unwrap(), MAX_WAIT_TIMEOUT);
    }

    #[test]
    fn leases_too_short_to_renew_are_refused() {
        assert!(lease(Duration::from_millis(2)).is_err());
        assert!(lease(Duration::ZERO).is_err());
        assert_eq!(lease(MIN_SAGA_LEASE).unwrap(), MIN_SAGA_LEASE);
    }

    #[test]
    fn every_variable_is_declared_once() {
        let mut names: Vec<_> = ENV_VARS.iter().map(|v| v.name).collect();
        names.sort();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "a variable is declared twice");
    }

    #[test]
    fn defaults_parse() {
        for name in [
            "REDIS_WAIT_TIMEOUT_MS",
            "STEP_TIMEOUT_MS",
            "CHECKOUT_TIMEOUT_MS",
            "SAGA_LEASE_MS",
        ] {
            let d = declared(name).default.unwrap();
            assert!(d.parse::<u64>().is_ok(), "{name}");
        }
        assert!(declared("AMQP_PREFETCH")
            .default
            .unwrap()
            .parse::<u16>()
            .is_ok());
    }
}
