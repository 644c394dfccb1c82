//! The OpenAPI document of the gateway API (`common::openapi`).
//!
//! - `the_checked_in_document_is_the_generated_one`: `gateway/openapi.json` (linked from the
//!   README) is exactly the union of the three services' parts as the code generates them.
//!   After a change to a route, rewrite it with
//!   `UPDATE_OPENAPI=1 cargo test -p order --test openapi checked_in`.
//! - `schemathesis_finds_nothing_through_the_gateway`: two instances of each service behind
//!   the real nginx gateway, on a real Redis and RabbitMQ; each serves its part at
//!   `/<prefix>/openapi.json` and it is the generated one; then schemathesis (PyPI,
//!   `test/requirements.txt`) runs every operation of the gateway's document with generated
//!   valid and invalid requests and checks: no 5xx, every status code, content type, header
//!   and body as documented, and nothing written by a refused request (the custom check in
//!   `test/schemathesis_hooks.py`, which watches the stores' keyspace notifications).
//!
//! `SCHEMATHESIS_SEED` (default fixed) and `SCHEMATHESIS_MAX_EXAMPLES` pass through. Needs
//! `python3` with `test/requirements.txt`, nginx, redis-server and RabbitMQ (or
//! `TEST_AMQP_URL`): without them the test fails, it never skips.

use std::process::Command;
use std::time::Instant;

use serde_json::Value;
use xtask::{free_port, RedisServer, ScratchDir};

mod support;
use support::{gateway_fleet, repo_root, test_broker, InstanceLinks, Options};

/// Generated requests per operation in the fuzzing phase (schemathesis adds its coverage
/// phase's boundary and invalid cases on top).
const MAX_EXAMPLES: &str = "300";
/// A fixed seed: the same run every time unless `SCHEMATHESIS_SEED` says otherwise.
const SEED: &str = "20260511";
/// Fewer refused requests than this and the nothing-written check proved little.
const MIN_REFUSED: u64 = 1000;

fn generated() -> String {
    let doc = common::openapi::gateway([
        stock::openapi::document(),
        payment::openapi::document(),
        order::openapi::document(),
    ]);
    doc.to_pretty_json().unwrap() + "\n"
}

#[test]
fn the_checked_in_document_is_the_generated_one() {
    let path = repo_root().join("gateway").join("openapi.json");
    let generated = generated();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "{} is not the document the code generates: rewrite it with \
         `UPDATE_OPENAPI=1 cargo test -p order --test openapi checked_in` and commit it",
        path.display()
    );
}

/// Fails (never skips) when the Python side is missing, naming the fix.
fn require_python_packages() {
    let probe = Command::new("python3")
        .args([
            "-c",
            "import schemathesis, redis; print(schemathesis.__version__)",
        ])
        .output()
        .expect("python3 is not installed: it runs schemathesis (this test does not skip)");
    assert!(
        probe.status.success(),
        "schemathesis or redis (Python) is missing: `python3 -m pip install -r \
         test/requirements.txt` (cargo xtask test does it first); this test does not skip.\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    println!(
        "schemathesis {}",
        String::from_utf8_lossy(&probe.stdout).trim()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schemathesis_finds_nothing_through_the_gateway() {
    require_python_packages();
    let broker = test_broker("openapi@localhost");
    let dir = ScratchDir::new("openapi").unwrap();
    let redis = RedisServer::start(dir.path().join("redis"), free_port(), None, None)
        .expect("start redis-server (apt-get install redis-server)");
    let redis_base = format!("redis://127.0.0.1:{}", redis.port());
    let fleet = gateway_fleet(dir.path(), 2, &Options::default(), |_| InstanceLinks {
        redis: redis_base.clone(),
        amqp: broker.url.clone(),
    })
    .await;

    // Each service serves its part, through the gateway, as the code generates it.
    let http = reqwest::Client::new();
    let parts = [
        ("stock", stock::openapi::document()),
        ("payment", payment::openapi::document()),
        ("orders", order::openapi::document()),
    ];
    for (prefix, generated) in &parts {
        let url = format!("{}/{prefix}/openapi.json", fleet.url);
        let response = http.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 200, "GET {url}");
        let served: Value = response.json().await.unwrap();
        assert_eq!(
            served,
            serde_json::to_value(generated).unwrap(),
            "{url} is not the generated part"
        );
        assert_eq!(served["openapi"], "3.1.0");
    }
    let document = dir.path().join("openapi.json");
    std::fs::write(&document, generated()).unwrap();

    let report = dir.path().join("nothing-written.json");
    let seed = std::env::var("SCHEMATHESIS_SEED").unwrap_or_else(|_| SEED.into());
    let examples =
        std::env::var("SCHEMATHESIS_MAX_EXAMPLES").unwrap_or_else(|_| MAX_EXAMPLES.into());
    let checks = [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "nothing_written_by_a_refused_request",
    ]
    .join(",");
    let mut run = Command::new("python3");
    run.current_dir(dir.path())
        .args(["-m", "schemathesis.cli", "run"])
        .arg(&document)
        .args(["--url", &fleet.url])
        // One request at a time: the nothing-written check attributes writes to a request.
        .args(["--workers", "1"])
        .args(["--seed", &seed])
        .args(["--max-examples", &examples])
        .args(["--checks", &checks])
        .args(["--phases", "examples,coverage,fuzzing,stateful"])
        .args(["--generation-database", "none"])
        .args(["--request-timeout", "30"])
        .arg("--no-color")
        .env(
            "SCHEMATHESIS_HOOKS",
            repo_root().join("test").join("schemathesis_hooks.py"),
        )
        .env("NOTHING_WRITTEN_REDIS", &redis_base)
        .env("NOTHING_WRITTEN_DBS", "1,2,3")
        .env("NOTHING_WRITTEN_REPORT", &report);
    let started = Instant::now();
    let output = tokio::task::spawn_blocking(move || run.output())
        .await
        .unwrap()
        .expect("run python3 -m schemathesis.cli");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    println!("schemathesis ran {:.0} s", started.elapsed().as_secs_f64());
    assert!(
        output.status.success(),
        "schemathesis found problems (seed {seed}; the output is above): {}",
        output.status
    );

    let counts: Value = serde_json::from_str(
        &std::fs::read_to_string(&report).expect("the nothing-written check wrote its report"),
    )
    .unwrap();
    println!("requests by operation and status, and the nothing-written check: {counts:#}");
    assert_eq!(counts["violations"], 0);
    let refused = counts["refused"].as_u64().unwrap();
    assert!(
        refused >= MIN_REFUSED,
        "only {refused} refused requests were checked for writes: the run proved little"
    );
}
