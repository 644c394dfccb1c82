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

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::config::ENV_VARS;
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
