//! `cargo xtask sagas`: the sagas an operator looks at, and the two things an operator can do.
//!
//! ```text
//! cargo xtask sagas [list]       pending sagas, then those needing attention, oldest first
//! cargo xtask sagas show <id>    one saga: state, steps with outcomes and times, owner, why
//! cargo xtask sagas retry <id>   run recovery on it now (after the cause was fixed)
//! cargo xtask sagas abort <id>   fence its order and compensate (never a committed saga)
//! ```
//! It speaks to the order service's operator routes (`/ops/sagas...`, on each instance, never
//! through the gateway; see `order/src/ops.rs`), so the rules are the service's own: retry and
//! abort decide on the order first, exactly as recovery does, and never decide twice. The
//! first order instance that answers is used (`--url` names one).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub const USAGE: &str = "\
  sagas [list] [--url URL]
                 pending sagas and those needing attention, oldest first (from the saga store,
                 through an order instance's operator routes)
  sagas show|retry|abort <saga_id> [--url URL]
                 one saga; retry runs recovery on it now; abort fences its order and
                 compensates (a committed saga cannot be aborted)
";

/// What an operator asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    List,
    Show(String),
    Retry(String),
    Abort(String),
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        // A retry or abort waits for the compensations (a few step timeouts at worst).
        .timeout(Duration::from_secs(120))
        .build()
        .expect("an HTTP client")
}

/// Sends `request` to the order instance at `base` (`http://host:port`); the JSON answer.
/// A refusal (4xx, 5xx) is an error carrying the service's reason.
pub async fn send(base: &str, request: &Request) -> Result<Value> {
    let http = client();
    let base = base.trim_end_matches('/');
    let call = match request {
        Request::List => http.get(format!("{base}/ops/sagas")),
        Request::Show(id) => http.get(format!("{base}/ops/sagas/{id}")),
        Request::Retry(id) => http.post(format!("{base}/ops/sagas/{id}/retry")),
        Request::Abort(id) => http.post(format!("{base}/ops/sagas/{id}/abort")),
    };
    let response = call
        .send()
        .await
        .with_context(|| format!("order instance at {base}"))?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let why = body["error"].as_str().unwrap_or("no reason given");
        bail!("{status}: {why}");
    }
    Ok(body)
}

fn ms_ago(now_ms: u64, at: &Value) -> String {
    match at.as_u64() {
        Some(at) => format!("{}s ago", now_ms.saturating_sub(at) / 1000),
        None => "-".into(),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One saga, in full.
pub fn render_one(saga: &Value) -> String {
    let now = now_ms();
    let text = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let mut out = format!(
        "saga {}  order {}\n  state {}{}  owner {}  lease {}  attempts {}\n  created {}  decided {}  finished {}\n",
        text(&saga["saga_id"]),
        text(&saga["order_id"]),
        text(&saga["state"]),
        if saga["finished"] == true { " (finished)" } else { " (not finished)" },
        text(&saga["owner"]),
        text(&saga["lease"]),
        saga["attempts"],
        ms_ago(now, &saga["created_ms"]),
        ms_ago(now, &saga["decided_ms"]),
        ms_ago(now, &saga["finished_ms"]),
    );
    if let Some(reason) = saga["reason"].as_str() {
        out.push_str(&format!("  ended: {reason}\n"));
    }
    if let Some(why) = saga["attention"].as_str() {
        out.push_str(&format!("  needs attention: {why}\n"));
    }
    for step in saga["steps"].as_array().into_iter().flatten() {
        let took = match (step["started_ms"].as_u64(), step["ended_ms"].as_u64()) {
            (Some(a), Some(b)) => format!("{} ms", b.saturating_sub(a)),
            _ => "-".into(),
        };
        out.push_str(&format!(
            "  {:<8} {:<9} {:>9}  {}{}\n",
            text(&step["step"]),
            text(&step["outcome"]),
            took,
            ms_ago(now, &step["ended_ms"]),
            step["reason"]
                .as_str()
                .map(|r| format!("  ({r})"))
                .unwrap_or_default(),
        ));
    }
    if saga["retained"] == false {
        out.push_str("  (its record has expired: only the order's own state is known)\n");
    }
    out
}

/// The list answer (`{"pending": [...], "attention": [...]}`) as a table per state.
pub fn render_list(list: &Value) -> String {
    let now = now_ms();
    let mut out = String::new();
    for (title, key) in [("pending", "pending"), ("needing attention", "attention")] {
        let sagas = list[key].as_array().cloned().unwrap_or_default();
        out.push_str(&format!("{} saga(s) {title}\n", sagas.len()));
        for s in &sagas {
            let why = s["attention"]
                .as_str()
                .or(s["reason"].as_str())
                .unwrap_or("");
            out.push_str(&format!(
                "  {}  {:<15} order {:<36} {:>10}  attempts {:<3} owner {:<20} {}\n",
                s["saga_id"].as_str().unwrap_or("-"),
                s["state"].as_str().unwrap_or("-"),
                s["order_id"].as_str().unwrap_or("-"),
                ms_ago(now, &s["created_ms"]),
                s["attempts"],
                s["lease"].as_str().or(s["owner"].as_str()).unwrap_or("-"),
                why,
            ));
        }
    }
    out
}

/// A parsed `cargo xtask sagas ...` command line: the request and `--url`.
pub fn parse(args: &[String]) -> Result<(Request, Option<String>)> {
    let mut url = None;
    let mut words = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--url" => url = Some(it.next().context("--url needs a value")?.clone()),
            other => words.push(other),
        }
    }
    let request = match words.as_slice() {
        [] | ["list"] => Request::List,
        ["show", id] => Request::Show(id.to_string()),
        ["retry", id] => Request::Retry(id.to_string()),
        ["abort", id] => Request::Abort(id.to_string()),
        _ => bail!("usage:\n{USAGE}"),
    };
    Ok((request, url))
}

/// Runs `cargo xtask sagas ...` against `--url` or the first of `instances` that answers.
pub async fn cli(args: &[String], instances: &[String]) -> Result<()> {
    let (request, url) = parse(args)?;
    let candidates: Vec<String> = match url {
        Some(url) => vec![url],
        None => instances.to_vec(),
    };
    let mut last = None;
    for base in &candidates {
        match send(base, &request).await {
            Ok(answer) => {
                match request {
                    Request::List => print!("{}", render_list(&answer)),
                    _ => print!("{}", render_one(&answer)),
                }
                return Ok(());
            }
            // Unreachable: try the next instance. A refusal is the answer.
            Err(e) if e.chain().any(|c| c.is::<reqwest::Error>()) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no order instance to ask")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn command_lines() {
        assert_eq!(parse(&[]).unwrap().0, Request::List);
        assert_eq!(
            parse(&args(&["abort", "x", "--url", "http://h:1"])).unwrap(),
            (Request::Abort("x".into()), Some("http://h:1".into()))
        );
        assert_eq!(
            parse(&args(&["retry", "y"])).unwrap().0,
            Request::Retry("y".into())
        );
        assert!(parse(&args(&["retry"])).is_err());
        assert!(parse(&args(&["bogus"])).is_err());
    }
}
