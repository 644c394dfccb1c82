//! The load engines: how requests are sent and timed.
//!
//! - **Closed loop** ([`closed`]): N connections, each sending its next request as soon as the
//!   previous one was answered. It finds the throughput the fleet sustains; its latencies are
//!   those of a client that waits its turn, so queueing in front of the fleet is not visible.
//! - **Open loop** ([`open`]): requests are due at a fixed rate whatever the fleet does, and a
//!   request's latency runs from the moment it was *due*, not from when it was sent: if the
//!   fleet (or this generator) falls behind, the wait shows up in the figures instead of being
//!   hidden ("coordinated omission"). A cap on requests in flight keeps a stalled fleet from
//!   drawing unbounded connections; waiting for the cap is part of the latency too.
//! - **Burst** ([`burst`]): a fixed list, every request at once (the consistency scenario).
//!
//! Requests come from a [`Source`], which says what to send next and `None` when it has
//! nothing more (a fresh-order range used up): a run never sends an order twice.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::time::{sleep_until, timeout_at, Instant};

use super::stats::{merge_into, Class, Tallies};
use crate::interrupt;

/// Longer than the gateway's own read timeout (60 s): the gateway, not the client, says when
/// a request took too long, so an error here means a connection that broke.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(75);
/// How often a long run prints a progress line.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
}

/// One request of a load: a label for the report (`checkout`, `find order`, ...) and a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Req {
    pub label: &'static str,
    pub method: Method,
    pub path: String,
}

impl Req {
    pub fn get(label: &'static str, path: String) -> Req {
        Req {
            label,
            method: Method::Get,
            path,
        }
    }

    pub fn post(label: &'static str, path: String) -> Req {
        Req {
            label,
            method: Method::Post,
            path,
        }
    }
}

/// What to send next; `None` ends the run (nothing fresh left).
pub type Source = Arc<dyn Fn() -> Option<Req> + Send + Sync>;

/// The gateway, with one pooled keep-alive client. Every POST carries an `Idempotency-Key`
/// of its own (API.md); the bench never retries, so no key is ever sent twice.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    run: String,
    seq: Arc<AtomicU64>,
}

impl Client {
    pub fn new(base: &str) -> Result<Client> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .build()?;
        let run = format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        Ok(Client {
            http,
            base: base.trim_end_matches('/').to_string(),
            run,
            seq: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let url = format!("{}{path}", self.base);
        match method {
            Method::Get => self.http.get(url),
            Method::Post => {
                let n = self.seq.fetch_add(1, Ordering::Relaxed);
                self.http
                    .post(url)
                    .header("Idempotency-Key", format!("bench-{}-{n}", self.run))
            }
        }
    }

    /// Sends `req` and reads the whole answer (so the connection can be reused).
    pub async fn send(&self, req: &Req) -> Class {
        match self.request(req.method, &req.path).send().await {
            Ok(resp) => {
                let class = Class::of_status(resp.status().as_u16());
                match resp.bytes().await {
                    Ok(_) => class,
                    Err(_) => Class::Error,
                }
            }
            Err(_) => Class::Error,
        }
    }

    /// For set-up steps: the status and the JSON body (a non-JSON body as a string).
    pub async fn call(&self, method: Method, path: &str) -> Result<(u16, Value)> {
        let resp = self
            .request(method, path)
            .send()
            .await
            .with_context(|| format!("{method:?} {path}"))?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await?;
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok((status, body))
    }

    /// A set-up call that must answer 2xx.
    pub async fn must(&self, method: Method, path: &str) -> Result<Value> {
        let (status, body) = self.call(method, path).await?;
        if !(200..300).contains(&status) {
            anyhow::bail!("{method:?} {path}: {status} {body}");
        }
        Ok(body)
    }
}

/// What one measured window collected.
#[derive(Debug, Clone)]
pub struct Window {
    pub tallies: Tallies,
    /// From the first send to the last answer.
    pub seconds: f64,
    /// The source ran dry before the time was up.
    pub exhausted: bool,
    /// Open loop: requests that were due within the duration but never sent (the fleet held
    /// every slot until the end). They are not in the percentiles; the report says how many.
    pub unsent: u64,
}

/// Counters the progress lines read while a run goes on.
#[derive(Default)]
struct Live {
    answered: AtomicU64,
    not_ok: AtomicU64,
    in_flight: AtomicU64,
}

impl Live {
    fn note(&self, class: Class) {
        self.answered.fetch_add(1, Ordering::Relaxed);
        if class != Class::Ok {
            self.not_ok.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn progress(live: Arc<Live>, name: String, start: Instant) {
    let mut last = 0;
    let mut tick = tokio::time::interval_at(start + PROGRESS_EVERY, PROGRESS_EVERY);
    loop {
        tick.tick().await;
        let answered = live.answered.load(Ordering::Relaxed);
        println!(
            "  [{:>6.1}s] {name}: {answered} answered, {:.0}/s over the last {} s, {} not 2xx, {} in flight",
            start.elapsed().as_secs_f64(),
            (answered - last) as f64 / PROGRESS_EVERY.as_secs_f64(),
            PROGRESS_EVERY.as_secs(),
            live.not_ok.load(Ordering::Relaxed),
            live.in_flight.load(Ordering::Relaxed),
        );
        last = answered;
    }
}

/// `connections` senders, each one request at a time, for `duration` (or until the source
/// runs dry or Ctrl-C).
pub async fn closed(
    client: &Client,
    source: Source,
    connections: usize,
    duration: Duration,
    name: &str,
) -> Window {
    let live = Arc::new(Live::default());
    let exhausted = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let deadline = start + duration;
    let ticker = tokio::spawn(progress(live.clone(), name.to_string(), start));
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            let (client, source, live, exhausted) = (
                client.clone(),
                source.clone(),
                live.clone(),
                exhausted.clone(),
            );
            tokio::spawn(async move {
                let mut mine = Tallies::new();
                while Instant::now() < deadline && !interrupt::requested() {
                    let Some(req) = source() else {
                        exhausted.store(true, Ordering::Relaxed);
                        break;
                    };
                    live.in_flight.fetch_add(1, Ordering::Relaxed);
                    let sent = Instant::now();
                    let class = client.send(&req).await;
                    mine.entry(req.label)
                        .or_default()
                        .record(sent.elapsed(), class);
                    live.in_flight.fetch_sub(1, Ordering::Relaxed);
                    live.note(class);
                }
                mine
            })
        })
        .collect();
    let mut tallies = Tallies::new();
    for w in workers {
        if let Ok(mine) = w.await {
            merge_into(&mut tallies, &mine);
        }
    }
    ticker.abort();
    Window {
        tallies,
        seconds: start.elapsed().as_secs_f64(),
        exhausted: exhausted.load(Ordering::Relaxed),
        unsent: 0,
    }
}

/// How many requests are due within `duration` at `rate` per second.
pub fn arrivals(rate: f64, duration: Duration) -> u64 {
    (rate * duration.as_secs_f64()).floor().max(0.0) as u64
}

/// When request `i` (from 0) is due, after the start of an open-loop run at `rate` per second.
/// Computed from `i`, not by adding up intervals, so rounding never drifts the schedule.
pub fn due_after_start(i: u64, rate: f64) -> Duration {
    Duration::from_secs_f64(i as f64 / rate)
}

/// `rate` requests per second for `duration`, at most `max_in_flight` at once; latency from
/// each request's due time.
pub async fn open(
    client: &Client,
    source: Source,
    rate: f64,
    duration: Duration,
    max_in_flight: usize,
    name: &str,
) -> Window {
    let live = Arc::new(Live::default());
    let tallies = Arc::new(Mutex::new(Tallies::new()));
    let slots = Arc::new(Semaphore::new(max_in_flight));
    let due_total = arrivals(rate, duration);
    let start = Instant::now();
    let deadline = start + duration;
    let ticker = tokio::spawn(progress(live.clone(), name.to_string(), start));
    let mut sent = 0;
    let mut exhausted = false;
    for i in 0..due_total {
        let due = start + due_after_start(i, rate);
        sleep_until(due).await;
        if interrupt::requested() {
            break;
        }
        let Ok(Ok(slot)) = timeout_at(deadline, slots.clone().acquire_owned()).await else {
            break;
        };
        let Some(req) = source() else {
            exhausted = true;
            break;
        };
        sent += 1;
        let (client, live, tallies) = (client.clone(), live.clone(), tallies.clone());
        live.in_flight.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let class = client.send(&req).await;
            let latency = due.elapsed();
            tallies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(req.label)
                .or_default()
                .record(latency, class);
            live.in_flight.fetch_sub(1, Ordering::Relaxed);
            live.note(class);
            drop(slot);
        });
    }
    // Every slot back: every request answered (or timed out).
    let _all = slots.acquire_many(max_in_flight as u32).await;
    ticker.abort();
    let tallies = tallies.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Window {
        tallies,
        seconds: start.elapsed().as_secs_f64(),
        exhausted,
        unsent: due_total - sent,
    }
}

/// Every request of `reqs` at once; the window runs from the first send to the last answer.
pub async fn burst(client: &Client, reqs: Vec<Req>) -> Window {
    let start = Instant::now();
    let tasks: Vec<_> = reqs
        .into_iter()
        .map(|req| {
            let client = client.clone();
            tokio::spawn(async move {
                let sent = Instant::now();
                let class = client.send(&req).await;
                (req.label, sent.elapsed(), class)
            })
        })
        .collect();
    let mut tallies = Tallies::new();
    for t in tasks {
        if let Ok((label, latency, class)) = t.await {
            tallies.entry(label).or_default().record(latency, class);
        }
    }
    Window {
        tallies,
        seconds: start.elapsed().as_secs_f64(),
        exhausted: false,
        unsent: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_loop_schedule_is_even_and_does_not_drift() {
        assert_eq!(arrivals(2000.0, Duration::from_secs(60)), 120_000);
        assert_eq!(arrivals(2.5, Duration::from_secs(3)), 7);
        assert_eq!(arrivals(100.0, Duration::ZERO), 0);
        assert_eq!(due_after_start(0, 2000.0), Duration::ZERO);
        assert_eq!(due_after_start(1, 2000.0), Duration::from_micros(500));
        // The 120 000th request of a minute at 2000/s is due just before the minute ends,
        // to the microsecond: no accumulated rounding.
        let last = due_after_start(119_999, 2000.0);
        assert_eq!(last.as_micros(), 59_999_500);
        // Strictly increasing, evenly spaced.
        let gaps: Vec<u128> = (1..1000)
            .map(|i| (due_after_start(i, 3000.0) - due_after_start(i - 1, 3000.0)).as_nanos())
            .collect();
        assert!(
            gaps.iter().all(|&g| (333_332..=333_334).contains(&g)),
            "{gaps:?}"
        );
    }

    /// A fleet that answers nothing: a port with nobody listening. Every request of each
    /// engine is counted as an error, none is lost, and the open loop sends what was due.
    #[tokio::test]
    async fn engines_count_every_request_even_without_a_fleet() {
        let port = xtask::free_port();
        let client = Client::new(&format!("http://127.0.0.1:{port}")).unwrap();
        let left = Arc::new(AtomicU64::new(5));
        let source: Source = Arc::new(move || {
            let n = left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            n.ok()
                .map(|n| Req::post("checkout", format!("/orders/checkout/{n}")))
        });
        let w = closed(&client, source, 2, Duration::from_secs(5), "test").await;
        assert!(w.exhausted);
        assert_eq!(w.tallies["checkout"].errors, 5);

        let source: Source = Arc::new(|| Some(Req::get("find", "/stock/find/0".into())));
        let w = open(&client, source, 200.0, Duration::from_millis(100), 4, "t").await;
        let t = &w.tallies["find"];
        assert_eq!(t.count() + w.unsent, 20);
        assert!(t.errors > 0 && t.ok == 0);
        assert!(!w.exhausted);

        let reqs = vec![Req::get("a", "/x".into()), Req::get("b", "/y".into())];
        let w = burst(&client, reqs).await;
        assert_eq!(w.tallies.len(), 2);
    }
}
