//! `cargo xtask dlq`: the broker's dead-letter queue (`dead-letters`), listed, requeued, dropped.
//!
//! ```text
//! cargo xtask dlq [list] [--queue Q]          every dead letter: id, reason, original queue,
//!                                             saga ids, attempts, first and last seen
//! cargo xtask dlq requeue <id>|--all [--queue Q]
//!                                             back to its original queue, attempts reset
//! cargo xtask dlq drop <id>|--all [--queue Q] gone for good
//! ```
//! `--queue Q` keeps to the dead letters that came from queue `Q`; `--amqp URL` names another
//! broker than the fleet's.
//!
//! How it reads a queue without losing anything: one pass takes every message with
//! `basic.get` and holds it unacknowledged until the pass ends; a message that is kept is then
//! given back (`nack`, requeue). Nothing is lost if this process dies half-way (the broker
//! requeues what a closed channel held) and no message is seen twice in one pass. The price:
//! while a pass runs, the held messages are invisible to anyone else reading the queue (nobody
//! consumes it but this command), and each given-back message is marked `redelivered`; a
//! classic queue puts it back where it was, so the order does not change.
//!
//! The participants' own dead letters (see `common/src/participant.rs`) carry headers
//! (`x-reason`, `x-original-queue`, `x-saga-ids`, `x-attempts`, `x-first-seen-ms`,
//! `x-last-seen-ms`) and a `message_id`, which is their id here. Those the broker dead-letters
//! itself (a quorum queue's delivery limit, or a rejected poison message when its dead letter
//! could not be published) carry the broker's `x-first-death-*` and `x-death` headers instead;
//! their id is a hash of body and headers (stable from one listing to the next).
//!
//! Requeue publishes the same body, with the same `reply_to`, to the original queue, without
//! the dead-letter headers (so the participant counts its attempts from 0 again), waits for the
//! broker's confirm (mandatory: a queue that no longer exists is an error, and the letter is
//! kept), and only then acknowledges the dead letter. If this process dies between the two, the
//! letter is still there and a second requeue sends the command twice: harmless, participants
//! apply each saga step once (its outcome is recorded beside its effect).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use anyhow::{anyhow, bail, Context, Result};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

/// The dead-letter queue's name (`common::broker::DEAD_LETTER_QUEUE`).
pub const DEAD_LETTER_QUEUE: &str = "dead-letters";

pub const USAGE: &str = "\
  dlq [list] [--queue Q] [--amqp URL]
                 the broker's dead letters: id, reason, original queue, saga ids, attempts,
                 first and last seen (only those from queue Q with --queue)
  dlq requeue <id>|--all [--queue Q] [--amqp URL]
                 send dead letters back to their original queue, attempts reset
  dlq drop <id>|--all [--queue Q] [--amqp URL]
                 delete dead letters
";

/// One dead letter, as far as its headers tell.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub id: String,
    pub reason: String,
    pub original_queue: Option<String>,
    pub saga_ids: Vec<String>,
    pub attempts: Option<i64>,
    pub first_seen_ms: Option<i64>,
    pub last_seen_ms: Option<i64>,
    pub reply_to: Option<String>,
    pub body: Vec<u8>,
}

/// Which dead letters an action takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pick {
    All,
    Id(String),
}

/// What to do with the picked dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Requeue,
    Drop,
}

/// What becomes of one message in a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Keep,
    Requeue,
    Drop,
}

/// Every dead letter (from `queue` only, when given), oldest first; nothing is taken away.
pub async fn list(amqp: &str, queue: Option<&str>) -> Result<Vec<DeadLetter>> {
    let seen = pass(amqp, |_| Fate::Keep).await?;
    Ok(seen
        .into_iter()
        .map(|(letter, _)| letter)
        .filter(|l| from_queue(l, queue))
        .collect())
}

/// Requeues or drops the picked dead letters (from `queue` only, when given); returns them.
/// Picking an id that is not there is an error.
pub async fn act(
    amqp: &str,
    pick: &Pick,
    action: Action,
    queue: Option<&str>,
) -> Result<Vec<DeadLetter>> {
    let fate = match action {
        Action::Requeue => Fate::Requeue,
        Action::Drop => Fate::Drop,
    };
    let seen = pass(amqp, |letter| {
        let picked = match pick {
            Pick::All => true,
            Pick::Id(id) => letter.id == *id,
        };
        if picked && from_queue(letter, queue) {
            fate
        } else {
            Fate::Keep
        }
    })
    .await?;
    let done: Vec<DeadLetter> = seen
        .into_iter()
        .filter(|(_, f)| *f == fate)
        .map(|(l, _)| l)
        .collect();
    if let (Pick::Id(id), true) = (pick, done.is_empty()) {
        bail!("no dead letter {id} (see `cargo xtask dlq list`)");
    }
    Ok(done)
}

fn from_queue(letter: &DeadLetter, queue: Option<&str>) -> bool {
    queue.is_none() || letter.original_queue.as_deref() == queue
}

/// One pass over the queue: takes every message, decides its fate, carries it out; returns
/// every letter with what was done to it.
async fn pass(
    amqp: &str,
    mut decide: impl FnMut(&DeadLetter) -> Fate,
) -> Result<Vec<(DeadLetter, Fate)>> {
    let connection = Connection::connect(amqp, ConnectionProperties::default())
        .await
        .with_context(|| format!("connect to the broker at {amqp}"))?;
    let result = async {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        // Passive: the services declare it (with their queue type); this only looks.
        channel
            .queue_declare(
                ShortString::from(DEAD_LETTER_QUEUE),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| {
                format!("no queue {DEAD_LETTER_QUEUE} (no service has connected to this broker)")
            })?;
        let mut held = Vec::new();
        while let Some(message) = channel
            .basic_get(
                ShortString::from(DEAD_LETTER_QUEUE),
                BasicGetOptions { no_ack: false },
            )
            .await?
        {
            held.push(message.delivery);
        }
        let mut seen = Vec::with_capacity(held.len());
        for delivery in held {
            let letter = read(&delivery);
            let mut fate = decide(&letter);
            if fate == Fate::Requeue {
                if let Err(e) = requeue(&channel, &letter).await {
                    eprintln!("xtask: dead letter {} kept: {e:#}", letter.id);
                    fate = Fate::Keep;
                }
            }
            match fate {
                Fate::Keep => {
                    let requeue = BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    };
                    delivery.nack(requeue).await?;
                }
                Fate::Requeue | Fate::Drop => {
                    delivery.ack(BasicAckOptions::default()).await?;
                }
            }
            seen.push((letter, fate));
        }
        channel.close(200, ShortString::from("done")).await?;
        Ok::<_, anyhow::Error>(seen)
    }
    .await;
    let _ = connection.close(200, ShortString::from("done")).await;
    result
}

/// Publishes the letter's command to its original queue, confirmed and routed.
async fn requeue(channel: &Channel, letter: &DeadLetter) -> Result<()> {
    let queue = letter
        .original_queue
        .as_deref()
        .ok_or_else(|| anyhow!("it does not say which queue it came from"))?;
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"));
    if let Some(reply_to) = &letter.reply_to {
        properties = properties.with_reply_to(ShortString::from(reply_to.as_str()));
    }
    let confirm = channel
        .basic_publish(
            ShortString::from(""),
            ShortString::from(queue),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &letter.body,
            properties,
        )
        .await?
        .await?;
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_)) => {
            bail!("queue {queue} does not exist (the broker returned it)")
        }
        Confirmation::Nack(_) => bail!("the broker refused it (nack)"),
    }
}

fn header<'a>(headers: &'a Option<FieldTable>, name: &str) -> Option<&'a AMQPValue> {
    headers.as_ref()?.inner().get(&ShortString::from(name))
}

fn text(value: Option<&AMQPValue>) -> Option<String> {
    match value? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

fn int(value: Option<&AMQPValue>) -> Option<i64> {
    match value? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::Timestamp(s) => i64::try_from(*s).ok().map(|s| s * 1000),
        _ => None,
    }
}

/// The broker's own record of a dead-lettering (`x-death`, latest first): its time.
fn death_time_ms(headers: &Option<FieldTable>) -> Option<i64> {
    match header(headers, "x-death")? {
        AMQPValue::FieldArray(deaths) => deaths.as_slice().iter().find_map(|d| match d {
            AMQPValue::FieldTable(t) => int(t.inner().get(&ShortString::from("time"))),
            _ => None,
        }),
        _ => None,
    }
}

/// The saga ids in a command batch's body (`{"items": [{"saga_id": ...}, ...]}`).
fn sagas_in_body(body: &[u8]) -> Vec<String> {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Vec::new();
    };
    json["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i["saga_id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn read(delivery: &lapin::message::Delivery) -> DeadLetter {
    let p = &delivery.properties;
    let h = p.headers();
    let id = match p.message_id() {
        Some(id) => id.to_string(),
        None => {
            let mut hasher = DefaultHasher::new();
            delivery.data.hash(&mut hasher);
            format!("{h:?}").hash(&mut hasher);
            format!("h{:016x}", hasher.finish())
        }
    };
    let saga_ids = match text(header(h, "x-saga-ids")) {
        Some(ids) => ids.split(',').map(str::to_string).collect(),
        None => sagas_in_body(&delivery.data),
    };
    DeadLetter {
        id,
        reason: text(header(h, "x-reason"))
            .or_else(|| text(header(h, "x-first-death-reason")))
            .unwrap_or_else(|| "unknown".into()),
        original_queue: text(header(h, "x-original-queue"))
            .or_else(|| text(header(h, "x-first-death-queue"))),
        saga_ids,
        attempts: int(header(h, "x-attempts")).or_else(|| int(header(h, "x-delivery-count"))),
        first_seen_ms: int(header(h, "x-first-seen-ms")),
        last_seen_ms: int(header(h, "x-last-seen-ms")).or_else(|| death_time_ms(h)),
        reply_to: p.reply_to().as_ref().map(|r| r.to_string()),
        body: delivery.data.clone(),
    }
}

fn age(now_ms: i64, at: Option<i64>) -> String {
    match at {
        Some(at) => format!("{}s ago", (now_ms - at).max(0) / 1000),
        None => "-".into(),
    }
}

/// The letters as a table, with a count per reason.
pub fn render(letters: &[DeadLetter]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let mut out = format!(
        "{:<34} {:<14} {:<24} {:>8} {:>12} {:>12}  sagas\n",
        "id", "reason", "original queue", "attempts", "first seen", "last seen"
    );
    let mut by_reason = std::collections::BTreeMap::<&str, usize>::new();
    for l in letters {
        *by_reason.entry(l.reason.as_str()).or_default() += 1;
        out.push_str(&format!(
            "{:<34} {:<14} {:<24} {:>8} {:>12} {:>12}  {}\n",
            l.id,
            l.reason,
            l.original_queue.as_deref().unwrap_or("-"),
            l.attempts.map_or("-".into(), |a| a.to_string()),
            age(now, l.first_seen_ms),
            age(now, l.last_seen_ms),
            l.saga_ids.join(","),
        ));
    }
    let counts: Vec<String> = by_reason.iter().map(|(r, n)| format!("{r}: {n}")).collect();
    out.push_str(&format!(
        "{} dead letter(s){}{}\n",
        letters.len(),
        if counts.is_empty() { "" } else { "; " },
        counts.join(", ")
    ));
    out
}

/// A parsed `cargo xtask dlq ...` command line.
#[derive(Debug, PartialEq, Eq)]
pub struct Command {
    /// `None`: list.
    pub action: Option<(Action, Pick)>,
    pub queue: Option<String>,
    pub amqp: Option<String>,
}

pub fn parse(args: &[String]) -> Result<Command> {
    let mut command = Command {
        action: None,
        queue: None,
        amqp: None,
    };
    let mut words = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--queue" => command.queue = Some(it.next().context("--queue needs a value")?.clone()),
            "--amqp" => command.amqp = Some(it.next().context("--amqp needs a value")?.clone()),
            other => words.push(other),
        }
    }
    let pick = |rest: &[&str]| -> Result<Pick> {
        match rest {
            ["--all"] => Ok(Pick::All),
            [id] if !id.starts_with('-') => Ok(Pick::Id(id.to_string())),
            _ => bail!("name one dead letter by its id, or --all"),
        }
    };
    command.action = match words.as_slice() {
        [] | ["list"] => None,
        ["requeue", rest @ ..] => Some((Action::Requeue, pick(rest)?)),
        ["drop", rest @ ..] => Some((Action::Drop, pick(rest)?)),
        _ => bail!("usage:\n{USAGE}"),
    };
    Ok(command)
}

/// Runs `cargo xtask dlq ...`; `default_amqp` is the fleet's broker.
pub async fn cli(args: &[String], default_amqp: &str) -> Result<()> {
    let command = parse(args)?;
    let amqp = command.amqp.as_deref().unwrap_or(default_amqp);
    let queue = command.queue.as_deref();
    match &command.action {
        None => print!("{}", render(&list(amqp, queue).await?)),
        Some((action, pick)) => {
            let done = act(amqp, pick, *action, queue).await?;
            let verb = match action {
                Action::Requeue => "requeued",
                Action::Drop => "dropped",
            };
            for l in &done {
                println!(
                    "{verb} {} ({}, to {})",
                    l.id,
                    l.reason,
                    l.original_queue.as_deref().unwrap_or("-")
                );
            }
            println!("{} dead letter(s) {verb}", done.len());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn command_lines() {
        assert_eq!(parse(&[]).unwrap().action, None);
        assert_eq!(
            parse(&args(&["list", "--queue", "q"]))
                .unwrap()
                .queue
                .as_deref(),
            Some("q")
        );
        assert_eq!(
            parse(&args(&["requeue", "--all"])).unwrap().action,
            Some((Action::Requeue, Pick::All))
        );
        assert_eq!(
            parse(&args(&["drop", "abc"])).unwrap().action,
            Some((Action::Drop, Pick::Id("abc".into())))
        );
        assert!(parse(&args(&["drop"])).is_err());
        assert!(parse(&args(&["requeue", "a", "b"])).is_err());
        assert!(parse(&args(&["frob"])).is_err());
    }

    #[test]
    fn saga_ids_come_from_a_command_batch() {
        let body = br#"{"version":1,"items":[{"saga_id":"a"},{"saga_id":"b"}]}"#;
        assert_eq!(sagas_in_body(body), vec!["a", "b"]);
        assert!(sagas_in_body(b"not json").is_empty());
    }
}
