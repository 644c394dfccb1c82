//! Idempotency keys: every POST is applied at most once per key, and a
//! repeat gets the first answer back.
//!
//! Why it exists: a client (or the gateway, or a store retry after an I/O
//! error on EXEC) may send the same write twice without knowing whether the
//! first one ran. The first run records its answer under the key *in the same
//! MULTI/EXEC as the change*, and every run reads that record inside the
//! same WATCH first, so "applied, then the reply was lost" and "retried on
//! another instance" both end with one change and one answer.
//!
//! Where the key comes from:
//! - the client's `Idempotency-Key` header (1-128 printable ASCII), kept for
//!   [`CLIENT_TTL`] as the contract promises. The gateways pass it on as the
//!   client sent it, so an empty or blank one is refused (400) like any other
//!   bad key;
//! - the gateway stamps a key of its own on every request, in a header of its
//!   own ([`GATEWAY_HEADER`], which it overwrites if a client sent one); it is
//!   used when the client sent no `Idempotency-Key` at all. Such keys only
//!   serve the gateway's own retry on another instance, so they live
//!   [`SHORT_TTL`]. (A separate header, because nginx cannot tell an empty
//!   header from a missing one: stamping into `Idempotency-Key` itself turned
//!   a client's empty key into a fresh key on every retry.)
//! - a request that reaches a service directly without a key gets a random
//!   one, which only serves the service's own retries ([`SHORT_TTL`]).
//!
//! The key is scoped by the request path inside the service, so the same
//! key on two different endpoints names two different requests.
//!
//! Every answer decided from the stored state is recorded: a success, or a
//! refusal (not enough stock, unknown id, an order under checkout), so a
//! repeat gets exactly the first answer whatever happened since. Bad input is
//! refused before any store is touched, and a 503 means the outcome is not
//! known yet: neither is recorded. (A 503 for a write no replica confirmed
//! may leave its answer recorded on the master; the retry returns that answer
//! once a replica has it too.)

use std::future::Future;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ApiError;
use crate::redis_store::{Conn, Store, StoreError, Tx};

/// The request header a client sets.
pub const HEADER: &str = "idempotency-key";
/// The key every gateway stamps on every request (nginx's `$request_id`).
pub const GATEWAY_HEADER: &str = "idempotency-gateway-key";
/// How long a client's key is remembered (API.md: 24 hours).
pub const CLIENT_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long a generated key is remembered: far beyond any retry of one request.
pub const SHORT_TTL: Duration = Duration::from_secs(600);

/// The idempotency key of one request, scoped to its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdemKey {
    key: String,
    path: String,
    ttl: Duration,
}

impl IdemKey {
    /// A key the client chose: validated, remembered for [`CLIENT_TTL`].
    pub fn from_client(key: &str, path: &str) -> Result<Self, ApiError> {
        let printable = |b: u8| (0x20..0x7f).contains(&b);
        if key.is_empty() || key.len() > 128 || !key.bytes().all(printable) {
            return Err(ApiError::BadRequest(
                "Idempotency-Key must be 1 to 128 printable ASCII characters".into(),
            ));
        }
        Ok(Self {
            key: key.to_string(),
            path: path.to_string(),
            ttl: CLIENT_TTL,
        })
    }

    /// A key only the gateway or this service will ever repeat.
    pub fn generated(key: &str, path: &str) -> Self {
        Self {
            key: key.to_string(),
            path: path.to_string(),
            ttl: SHORT_TTL,
        }
    }

    /// A fresh random key (a request without one; internal work).
    pub fn random(path: &str) -> Self {
        Self::generated(&uuid::Uuid::new_v4().simple().to_string(), path)
    }

    /// The Redis key its answer is recorded under.
    pub fn redis_key(&self) -> String {
        format!("idem:{}:{}", self.path, self.key)
    }

    pub fn ttl_secs(&self) -> u64 {
        self.ttl.as_secs()
    }

    /// Adds "record `answer` under this key" to a MULTI/EXEC pipeline.
    pub fn record(&self, writes: &mut redis::Pipeline, answer: &Answer) {
        writes
            .set_ex(self.redis_key(), answer.encode(), self.ttl_secs())
            .ignore();
    }

    /// Like [`IdemKey::record`], but an answer recorded first stays (`SET ... NX`).
    pub fn record_if_none(&self, writes: &mut redis::Pipeline, answer: &Answer) {
        writes
            .cmd("SET")
            .arg(self.redis_key())
            .arg(answer.encode())
            .arg("EX")
            .arg(self.ttl_secs())
            .arg("NX")
            .ignore();
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IdemKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let path = parts.uri.path().to_string();
        let text = |value: &axum::http::HeaderValue| {
            value
                .to_str()
                .map(str::to_string)
                .map_err(|_| ApiError::BadRequest("Idempotency-Key must be printable ASCII".into()))
        };
        if let Some(value) = parts.headers.get(HEADER) {
            // Present, even empty: the client's, validated as it was sent.
            return IdemKey::from_client(&text(value)?, &path);
        }
        match parts.headers.get(GATEWAY_HEADER) {
            // nginx's $request_id: 32 hex digits; still validated like any key.
            Some(value) => IdemKey::from_client(&text(value)?, &path)
                .map(|k| IdemKey::generated(&k.key, &path)),
            None => Ok(IdemKey::random(&path)),
        }
    }
}

/// A final answer to a request: what is recorded under its key and replayed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Answer {
    pub fn ok(body: Value) -> Self {
        Answer { status: 200, body }
    }

    /// The recorded form of a refusal.
    pub fn refusal(error: &ApiError) -> Self {
        Answer {
            status: error.status().as_u16(),
            body: serde_json::json!({ "error": error.to_string() }),
        }
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("answers serialize")
    }

    pub fn decode(text: &str) -> Option<Answer> {
        serde_json::from_str(text).ok()
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK);
        (status, Json(self.body)).into_response()
    }
}

/// The recorded answer under an idempotency key, read on a watched connection.
async fn replay(conn: &mut Conn, idem_key: &str) -> Result<Option<Answer>, StoreError> {
    let raw: Option<String> = redis::cmd("GET")
        .arg(idem_key)
        .query_async(conn)
        .await
        .map_err(StoreError::Redis)?;
    decode_recorded(idem_key, raw)
}

fn decode_recorded(idem_key: &str, raw: Option<String>) -> Result<Option<Answer>, StoreError> {
    raw.map(|text| {
        Answer::decode(&text).ok_or_else(|| StoreError::corrupt(idem_key, "not an answer"))
    })
    .transpose()
}

/// The first answer recorded under `idem`, if the request already ran. A
/// recorded answer is confirmed on a replica before it is returned: the first
/// run may have failed for want of one (a 503), and its replay must not
/// acknowledge what only the master holds.
pub async fn recorded(store: &Store, idem: &IdemKey) -> Result<Option<Answer>, StoreError> {
    let idem_key = idem.redis_key();
    let raw: Option<String> = store
        .query_confirmed(redis::cmd("GET").arg(&idem_key), Option::is_some)
        .await?;
    decode_recorded(&idem_key, raw)
}

/// The one idempotent write: WATCHes `keys` and the key's record; a repeat
/// gets the recorded answer; otherwise `decide` reads the watched keys and
/// returns the writes and the answer, and the answer is recorded in the same
/// MULTI/EXEC as the writes. A retry after an EXEC whose reply was lost finds
/// the record, so nothing applies twice. Either way the answer is returned
/// only once a replica has it (a replay too: see [`Tx::Abort`]); otherwise the
/// call fails with [`StoreError::NotDurable`] and the client's retry is safe.
pub async fn transact_once<F, Fut>(
    store: &Store,
    idem: &IdemKey,
    keys: &[String],
    decide: F,
) -> Result<Answer, ApiError>
where
    F: Fn(Conn) -> Fut,
    Fut: Future<Output = (Conn, Result<(redis::Pipeline, Answer), StoreError>)>,
{
    let idem_key = idem.redis_key();
    let mut watched = keys.to_vec();
    watched.push(idem_key.clone());
    let (idem_key, decide) = (&idem_key, &decide);
    let answer = store
        .transact(&watched, |mut conn| async move {
            match replay(&mut conn, idem_key).await {
                Err(e) => return (conn, Err(e)),
                Ok(Some(first)) => return (conn, Ok(Tx::Abort(first))),
                Ok(None) => {}
            }
            let (conn, decided) = decide(conn).await;
            let decision = decided.map(|(mut writes, answer)| {
                idem.record(&mut writes, &answer);
                Tx::Commit(writes, answer)
            });
            (conn, decision)
        })
        .await?;
    Ok(answer)
}

/// Writes `make`'s pipeline and records its answer under `idem`, once: a
/// repeat returns the first answer (creation endpoints).
pub async fn once(
    store: &Store,
    idem: &IdemKey,
    make: impl Fn() -> (redis::Pipeline, Answer),
) -> Result<Answer, ApiError> {
    let make = &make;
    transact_once(store, idem, &[], |conn| async move { (conn, Ok(make())) }).await
}

/// How long a claim of [`once_after`] lasts unless renewed: the work renews it every
/// [`CLAIM_RENEW`] while it runs, so a claim outlives its holder (an instance that died, a
/// request dropped when its client hung up) by at most this much.
const CLAIM_TTL: Duration = Duration::from_secs(10);
const CLAIM_RENEW: Duration = Duration::from_secs(3);
/// How long a repeat waits for the running first request's answer before it answers 503.
/// Longer than [`CLAIM_TTL`], so a repeat outlasts the claim of a holder that is gone and
/// runs the work itself; below the gateway's read timeout (60 s), so the 503 reaches the
/// client.
const CLAIM_WAIT: Duration = Duration::from_secs(25);
const CLAIM_POLL: Duration = Duration::from_millis(100);

/// Renews a claim only while it is still ours (it may have lapsed and been taken).
const RENEW_IF_OURS: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";
/// Releases a claim only while it is still ours.
const RELEASE_IF_OURS: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

/// What [`once_after`] found under the key.
enum Claim {
    Answered(Answer),
    /// Another request with this key is running the work.
    Running,
    /// This request holds the claim (taken now, or by an earlier try of the same call whose
    /// EXEC applied but whose reply was lost).
    Ours,
}

/// For work too large for one MULTI/EXEC (`batch_init`): the first answer if the key was
/// seen; else the key is claimed (a record of its own, `claim:<record key>`, holding a token
/// of this call, renewed while the work runs), the work runs, and its answer is recorded as
/// the claim is released. A repeat that arrives while the first runs (a client's retry after
/// its own timeout, the gateway's retry on another instance) waits for the first's answer
/// instead of running the work a second time; it takes the key over once the claim lapses
/// (its holder is gone), and answers 503 if neither happens within [`CLAIM_WAIT`]. Not
/// atomic: a holder that dies mid-work leaves what it wrote, and the retry runs the work
/// again, which is why only overwriting work may use it.
pub async fn once_after(
    store: &Store,
    idem: &IdemKey,
    work: impl Future<Output = Result<Answer, ApiError>>,
) -> Result<Answer, ApiError> {
    let idem_key = idem.redis_key();
    // Client keys may hold ':' but every record key starts with "idem:": no key a client
    // chooses names a claim.
    let claim_key = format!("claim:{idem_key}");
    let token = uuid::Uuid::new_v4().simple().to_string();
    let deadline = tokio::time::Instant::now() + CLAIM_WAIT;
    loop {
        match claim(store, &idem_key, &claim_key, &token).await? {
            Claim::Answered(first) => return Ok(first),
            Claim::Ours => return run_claimed(store, idem, &claim_key, &token, work).await,
            Claim::Running => {}
        }
        // Cheap looks (no WAIT) until the claim goes: the first answer was recorded, or
        // the holder failed or is gone; the next round of `claim` tells which.
        loop {
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::Unavailable(
                    "a request with this Idempotency-Key is still being applied; \
                     retry with the same key"
                        .into(),
                ));
            }
            tokio::time::sleep(CLAIM_POLL).await;
            let held: bool = store.query(redis::cmd("EXISTS").arg(&claim_key)).await?;
            if !held {
                break;
            }
        }
    }
}

/// Looks at the key's record and claim, and claims the key with `token` when neither is
/// there. A claim that already holds `token` is ours: `transact` runs this again when a
/// try's outcome is unknown (a lost EXEC reply, a WAIT no replica confirmed).
async fn claim(
    store: &Store,
    idem_key: &str,
    claim_key: &str,
    token: &str,
) -> Result<Claim, StoreError> {
    let watched = [idem_key.to_string(), claim_key.to_string()];
    store
        .transact(&watched, |mut conn| async move {
            match replay(&mut conn, idem_key).await {
                Err(e) => return (conn, Err(e)),
                Ok(Some(first)) => return (conn, Ok(Tx::Abort(Claim::Answered(first)))),
                Ok(None) => {}
            }
            let holder: Result<Option<String>, _> = redis::cmd("GET")
                .arg(claim_key)
                .query_async(&mut conn)
                .await
                .map_err(StoreError::Redis);
            let decision = holder.map(|holder| match holder {
                Some(held) if held == token => Tx::Abort(Claim::Ours),
                Some(_) => Tx::Abort(Claim::Running),
                None => {
                    let mut writes = redis::pipe();
                    writes
                        .set(claim_key, token)
                        .arg("PX")
                        .arg(CLAIM_TTL.as_millis() as u64);
                    Tx::Commit(writes, Claim::Ours)
                }
            });
            (conn, decision)
        })
        .await
}

/// Runs `work` under this call's claim, renewing it until the answer is written (from the
/// start: taking the claim may have used much of its lifetime); records the answer, unless
/// one stands already, and releases the claim (if still ours) in one write. A run that
/// fails (bad input the work itself finds, or a 503) records nothing, as neither is ever
/// recorded, and releases the claim: the retry runs the work. A claim found lost (it lapsed
/// and a repeat took it) stops the work with a 503 rather than run it beside the repeat.
async fn run_claimed(
    store: &Store,
    idem: &IdemKey,
    claim_key: &str,
    token: &str,
    work: impl Future<Output = Result<Answer, ApiError>>,
) -> Result<Answer, ApiError> {
    // Set once the work is done: the write that records and releases is under way, so a
    // renewal that finds the claim gone found it released, not lost.
    let releasing = std::sync::atomic::AtomicBool::new(false);
    let held = async {
        loop {
            let renewed = store
                .query::<i64>(
                    redis::cmd("EVAL")
                        .arg(RENEW_IF_OURS)
                        .arg(1)
                        .arg(claim_key)
                        .arg(token)
                        .arg(CLAIM_TTL.as_millis() as u64),
                )
                .await;
            match renewed {
                Ok(1) => {}
                Ok(_) if releasing.load(std::sync::atomic::Ordering::SeqCst) => {
                    std::future::pending::<()>().await
                }
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "could not renew the claim of a running request")
                }
            }
            tokio::time::sleep(CLAIM_RENEW).await;
        }
    };
    let run = async {
        let done = work.await;
        releasing.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut writes = redis::pipe();
        if let Ok(answer) = &done {
            idem.record_if_none(&mut writes, answer);
        }
        writes
            .cmd("EVAL")
            .arg(RELEASE_IF_OURS)
            .arg(1)
            .arg(claim_key)
            .arg(token)
            .ignore();
        store.write(&writes).await?;
        done
    };
    tokio::select! {
        biased;
        done = run => done,
        () = held => {
            tracing::warn!(claim = claim_key, "the claim of a running request was lost; stopped");
            Err(ApiError::Unavailable(
                "this request lost its claim on its Idempotency-Key; retry with the same key"
                    .into(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_keys_are_validated() {
        assert!(IdemKey::from_client("abc-123", "/add/1/2").is_ok());
        assert!(IdemKey::from_client(&"k".repeat(128), "/p").is_ok());
        for bad in ["", "tab\there", "é", &"k".repeat(129)] {
            assert!(IdemKey::from_client(bad, "/p").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn keys_are_scoped_by_path_and_lifetime_by_origin() {
        let a = IdemKey::from_client("k", "/add/1/2").unwrap();
        let b = IdemKey::from_client("k", "/pay/1/2").unwrap();
        assert_ne!(a.redis_key(), b.redis_key());
        assert_eq!(a.ttl_secs(), CLIENT_TTL.as_secs());
        assert_eq!(IdemKey::random("/p").ttl_secs(), SHORT_TTL.as_secs());
    }

    /// The key a request with these headers gets (or its refusal).
    async fn extract(headers: &[(&str, &str)]) -> Result<IdemKey, ApiError> {
        let mut request = axum::http::Request::post("/add/1/2");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let (mut parts, ()) = request.body(()).unwrap().into_parts();
        IdemKey::from_request_parts(&mut parts, &()).await
    }

    #[tokio::test]
    async fn the_clients_key_wins_even_empty_and_the_gateways_serves_only_without_one() {
        let stamped = (GATEWAY_HEADER, "0123456789abcdef0123456789abcdef");
        let client = extract(&[(HEADER, "k1"), stamped]).await.unwrap();
        assert_eq!(client.redis_key(), "idem:/add/1/2:k1");
        assert_eq!(client.ttl_secs(), CLIENT_TTL.as_secs());
        // An empty key sent through a gateway is still the client's: refused. (A blank one
        // arrives empty: HTTP parsers strip the whitespace around a header value.)
        let refused = extract(&[(HEADER, ""), stamped]).await;
        assert!(
            matches!(refused, Err(ApiError::BadRequest(_))),
            "{refused:?}"
        );
        let gateway = extract(&[stamped]).await.unwrap();
        assert_eq!(
            gateway.redis_key(),
            "idem:/add/1/2:0123456789abcdef0123456789abcdef"
        );
        assert_eq!(gateway.ttl_secs(), SHORT_TTL.as_secs());
        assert!(extract(&[(GATEWAY_HEADER, "")]).await.is_err());
        let direct = extract(&[]).await.unwrap();
        assert_eq!(direct.ttl_secs(), SHORT_TTL.as_secs());
    }

    #[test]
    fn answers_round_trip() {
        let a = Answer::refusal(&ApiError::NotFound("item 7 not found".into()));
        assert_eq!(a.status, 404);
        assert_eq!(Answer::decode(&a.encode()), Some(a));
        assert!(Answer::ok(serde_json::json!({})).is_success());
    }
}
