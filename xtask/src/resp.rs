//! A minimal RESP2 client over `std::net::TcpStream`.
//!
//! The kit talks to Redis and Sentinel only to check on them (PING, INFO, ROLE, SENTINEL ...).
//! A hundred lines of protocol keep the redis crate, and its async runtime choice, out of a crate
//! that the services' tests link next to their own redis-rs version.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    /// `None` is the nil bulk string.
    Bulk(Option<Vec<u8>>),
    /// `None` is the nil array.
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The reply as text, for simple and bulk strings.
    pub fn as_text(&self) -> Option<String> {
        match self {
            Reply::Simple(s) => Some(s.clone()),
            Reply::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }

    /// The elements of an array reply (empty for anything else).
    pub fn items(&self) -> &[Reply] {
        match self {
            Reply::Array(Some(v)) => v,
            _ => &[],
        }
    }
}

/// A connection to a Redis or Sentinel on 127.0.0.1.
pub struct Connection {
    reader: BufReader<TcpStream>,
}

impl Connection {
    /// Connects, with `timeout` for the connect and for every later read and write; sends AUTH
    /// when a password is given.
    pub fn connect(port: u16, password: Option<&str>, timeout: Duration) -> Result<Self> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let stream = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("cannot connect to 127.0.0.1:{port}"))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        let mut conn = Connection {
            reader: BufReader::new(stream),
        };
        if let Some(pw) = password {
            conn.command(&["AUTH", pw])?;
        }
        Ok(conn)
    }

    /// Sends one command and reads its reply; a Redis error reply becomes an `Err`.
    pub fn command(&mut self, args: &[&str]) -> Result<Reply> {
        self.reader.get_mut().write_all(&encode(args))?;
        match read_reply(&mut self.reader)? {
            Reply::Error(e) => bail!("{}: {e}", args.first().copied().unwrap_or("")),
            r => Ok(r),
        }
    }
}

/// The command as a RESP array of bulk strings.
pub fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads one reply (recursively for arrays).
pub fn read_reply(r: &mut impl BufRead) -> Result<Reply> {
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line)?;
    if !line.ends_with(b"\r\n") {
        bail!("connection closed or truncated reply");
    }
    line.truncate(line.len() - 2);
    let (kind, rest) = line
        .split_first()
        .ok_or_else(|| anyhow!("empty reply line"))?;
    let text = String::from_utf8_lossy(rest).into_owned();
    let number = || -> Result<i64> {
        text.parse()
            .with_context(|| format!("bad number in reply: {text:?}"))
    };
    Ok(match kind {
        b'+' => Reply::Simple(text),
        b'-' => Reply::Error(text),
        b':' => Reply::Int(number()?),
        b'$' => match number()? {
            -1 => Reply::Bulk(None),
            n if n >= 0 => {
                let mut buf = vec![0; n as usize + 2];
                r.read_exact(&mut buf)?;
                buf.truncate(n as usize);
                Reply::Bulk(Some(buf))
            }
            n => bail!("bad bulk length {n}"),
        },
        b'*' => match number()? {
            -1 => Reply::Array(None),
            n if n >= 0 => {
                Reply::Array(Some((0..n).map(|_| read_reply(r)).collect::<Result<_>>()?))
            }
            n => bail!("bad array length {n}"),
        },
        other => bail!("unknown reply type {:?}", *other as char),
    })
}

/// One command on a fresh connection (two-second timeouts).
pub fn query(port: u16, password: Option<&str>, args: &[&str]) -> Result<Reply> {
    Connection::connect(port, password, Duration::from_secs(2))?.command(args)
}

/// The current role of a Redis process: `master`, `slave` or `sentinel` (first element of ROLE).
pub fn role(port: u16, password: Option<&str>) -> Result<String> {
    query(port, password, &["ROLE"])?
        .items()
        .first()
        .and_then(Reply::as_text)
        .ok_or_else(|| anyhow!("unexpected ROLE reply"))
}

/// `INFO <section>` as text.
pub fn info(port: u16, password: Option<&str>, section: &str) -> Result<String> {
    query(port, password, &["INFO", section])?
        .as_text()
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
pub fn pairs(reply: &Reply) -> Vec<(String, String)> {
    reply
        .items()
        .chunks(2)
        .filter_map(|kv| Some((kv.first()?.as_text()?, kv.get(1)?.as_text()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<Reply> {
        read_reply(&mut BufReader::new(bytes))
    }

    #[test]
    fn commands_are_encoded_as_bulk_arrays() {
        assert_eq!(
            encode(&["SET", "k", ""]),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n"
        );
    }

    #[test]
    fn every_reply_type_parses() {
        assert_eq!(parse(b"+PONG\r\n").unwrap(), Reply::Simple("PONG".into()));
        assert_eq!(
            parse(b"-READONLY no\r\n").unwrap(),
            Reply::Error("READONLY no".into())
        );
        assert_eq!(parse(b":-3\r\n").unwrap(), Reply::Int(-3));
        assert_eq!(parse(b"$-1\r\n").unwrap(), Reply::Bulk(None));
        assert_eq!(
            parse(b"$4\r\na\r\nb\r\n").unwrap(),
            Reply::Bulk(Some(b"a\r\nb".to_vec()))
        );
        assert_eq!(parse(b"*-1\r\n").unwrap(), Reply::Array(None));
        let role = parse(b"*3\r\n$5\r\nslave\r\n$9\r\n127.0.0.1\r\n:6400\r\n").unwrap();
        assert_eq!(role.items()[0].as_text().as_deref(), Some("slave"));
        assert_eq!(role.items()[2], Reply::Int(6400));
    }

    #[test]
    fn truncated_replies_are_errors() {
        assert!(parse(b"+PONG").is_err());
        assert!(parse(b"$5\r\nab\r\n").is_err());
        assert!(parse(b"*2\r\n:1\r\n").is_err());
        assert!(parse(b"?x\r\n").is_err());
    }

    #[test]
    fn info_fields_and_pairs() {
        let info = "# Replication\r\nrole:slave\r\nmaster_link_status:up\r\n";
        assert_eq!(info_field(info, "master_link_status"), Some("up"));
        assert_eq!(info_field(info, "nope"), None);
        let reply =
            parse(b"*4\r\n$4\r\nname\r\n$5\r\norder\r\n$5\r\nflags\r\n$6\r\nmaster\r\n").unwrap();
        assert_eq!(
            pairs(&reply),
            vec![
                ("name".to_string(), "order".to_string()),
                ("flags".to_string(), "master".to_string())
            ]
        );
    }
}
