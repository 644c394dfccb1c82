//! Process kit: start and stop real Redis, Sentinel and RabbitMQ processes on 127.0.0.1.
//!
//! The `xtask` binary uses it to run the local fleet, and the services' integration tests use
//! it as a dev-dependency to get real stores and a real broker instead of mocks. Everything is
//! plain blocking std code (threads, `TcpStream`, `Command`), so it works the same from `main`,
//! from `#[test]` and from `#[tokio::test]` (where a start-up of a few hundred milliseconds on
//! the runtime thread is acceptable for a test).
//!
//! Ownership rule: a value returned by a `start` function owns its process and stops it when
//! dropped. Call `disarm()` to hand the process over (the launcher records it in a state file
//! and stops it later by pid).
//!
//! ```no_run
//! use xtask::{free_port, RedisServer, ScratchDir, Sentinel};
//!
//! let dir = ScratchDir::new("example").unwrap(); // declared first: dropped (removed) last
//! // A node of a replicated set: as a master it refuses writes until a replica is online.
//! let master = RedisServer::start_in_set(dir.path(), free_port(), None, None).unwrap();
//! let replica = RedisServer::start_in_set(dir.path(), free_port(), Some(master.port()), None).unwrap();
//! let sentinel =
//!     Sentinel::start(dir.path(), free_port(), &[("data", master.port())], 1, 1000, 3000).unwrap();
//! ```

pub mod dlq;
pub mod envfile;
pub mod faultproxy;
pub mod gateway;
pub mod install;
pub mod net;
pub mod proc;
pub mod rabbit;
pub mod redis;
pub mod resp;
pub mod respawn;
pub mod sagas;
pub mod scratch;
pub mod sentinel;
pub mod supervisor;
pub mod yaml;

pub use faultproxy::FaultProxy;
pub use install::{ensure_installed, find_binary};
pub use net::{free_port, http_get, port_is_free, wait_http_ok};
pub use rabbit::RabbitNode;
pub use redis::RedisServer;
pub use scratch::ScratchDir;
pub use sentinel::{Sentinel, SentinelSet};
