//! One-off commands to a Redis or Sentinel on 127.0.0.1, through redis-rs' blocking client.
//!
//! The kit talks to Redis and Sentinel only to check on them (PING, INFO, ROLE, SENTINEL ...),
//! one short command at a time from plain threads, so it uses the same crate as the services
//! without their async pool: a connection per question, with timeouts so a stalled node (a
//! SIGSTOPped master, a partitioned port) fails the question instead of hanging the caller.

use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use redis::{ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, Value};

/// How long [`query`] waits to connect and for the answer.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// Connects to `port`, with `timeout` for the connect and for every later read and write;
/// authenticates when a password is given.
pub fn connect(port: u16, password: Option<&str>, timeout: Duration) -> Result<redis::Connection> {
    // A one-off question sends nothing but itself (and AUTH): no `CLIENT SETINFO`.
    let mut settings = RedisConnectionInfo::default().set_skip_set_lib_name();
    if let Some(pw) = password {
        settings = settings.set_password(pw);
    }
    let info = ConnectionAddr::Tcp("127.0.0.1".into(), port)
        .into_connection_info()?
        .set_redis_settings(settings);
    let conn = redis::Client::open(info)?
        .get_connection_with_timeout(timeout)
        .with_context(|| format!("cannot connect to 127.0.0.1:{port}"))?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    Ok(conn)
}

/// Sends one command on `conn` and reads its reply; a Redis error reply is an `Err` that
/// names the command and carries Redis' code (`NOREPLICAS ...`).
pub fn command(conn: &mut redis::Connection, args: &[&str]) -> Result<Value> {
    let mut cmd = redis::Cmd::new();
    for a in args {
        cmd.arg(*a);
    }
    cmd.query(conn)
        .map_err(|e| anyhow!("{}: {e}", args.first().copied().unwrap_or("")))
}

/// One command on a fresh connection (two-second timeouts).
pub fn query(port: u16, password: Option<&str>, args: &[&str]) -> Result<Value> {
    command(&mut connect(port, password, QUERY_TIMEOUT)?, args)
}

/// The reply as text, for simple and bulk strings (and `OK`).
pub fn text(reply: &Value) -> Option<String> {
    match reply {
        Value::SimpleString(s) => Some(s.clone()),
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::Okay => Some("OK".into()),
        _ => None,
    }
}

/// The elements of an array reply (empty for anything else).
pub fn items(reply: &Value) -> &[Value] {
    match reply {
        Value::Array(v) => v,
        _ => &[],
    }
}

/// The current role of a Redis process: `master`, `slave` or `sentinel` (first element of ROLE).
pub fn role(port: u16, password: Option<&str>) -> Result<String> {
    items(&query(port, password, &["ROLE"])?)
        .first()
        .and_then(text)
        .ok_or_else(|| anyhow!("unexpected ROLE reply"))
}

/// `INFO <section>` as text.
pub fn info(port: u16, password: Option<&str>, section: &str) -> Result<String> {
    text(&query(port, password, &["INFO", section])?)
        .ok_or_else(|| anyhow!("unexpected INFO reply"))
}

/// The value of `field` in INFO text (`field:value` lines).
pub fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == field).then(|| v.trim())
    })
}

/// A flat `[k1, v1, k2, v2, ...]` reply (SENTINEL MASTER, CONFIG GET) as pairs.
pub fn pairs(reply: &Value) -> Vec<(String, String)> {
    items(reply)
        .chunks(2)
        .filter_map(|kv| Some((text(kv.first()?)?, text(kv.get(1)?)?)))
        .collect()
}

/// The port in a `SENTINEL get-master-addr-by-name` reply (`[ip, port]`, nil when unknown).
pub fn master_addr_port(reply: &Value) -> Option<u16> {
    text(items(reply).get(1)?)?.parse().ok()
}

/// The port of `store`'s master according to the Sentinel on `sentinel_port` (`None` when it
/// does not answer or does not know).
pub fn sentinel_master(sentinel_port: u16, store: &str) -> Option<u16> {
    let reply = query(
        sentinel_port,
        None,
        &["SENTINEL", "get-master-addr-by-name", store],
    );
    master_addr_port(&reply.ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn texts_and_items() {
        assert_eq!(text(&Value::SimpleString("PONG".into())).unwrap(), "PONG");
        assert_eq!(text(&Value::Okay).unwrap(), "OK");
        assert_eq!(text(&bulk("a\r\nb")).unwrap(), "a\r\nb");
        assert_eq!(text(&Value::Int(3)), None);
        assert!(items(&Value::Nil).is_empty());
        let role = Value::Array(vec![bulk("slave"), bulk("127.0.0.1"), Value::Int(6400)]);
        assert_eq!(text(&items(&role)[0]).as_deref(), Some("slave"));
    }

    #[test]
    fn info_fields_pairs_and_master_addresses() {
        let info = "# Replication\r\nrole:slave\r\nmaster_link_status:up\r\n";
        assert_eq!(info_field(info, "master_link_status"), Some("up"));
        assert_eq!(info_field(info, "nope"), None);
        let reply = Value::Array(vec![
            bulk("name"),
            bulk("order"),
            bulk("flags"),
            bulk("master"),
        ]);
        assert_eq!(
            pairs(&reply),
            vec![
                ("name".to_string(), "order".to_string()),
                ("flags".to_string(), "master".to_string())
            ]
        );
        let addr = Value::Array(vec![bulk("127.0.0.1"), bulk("6400")]);
        assert_eq!(master_addr_port(&addr), Some(6400));
        assert_eq!(master_addr_port(&Value::Nil), None);
    }
}
