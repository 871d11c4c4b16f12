//! Test kit for Sluice. It is a dev-dependency only and never ships in a binary.
//!
//! It offers three things:
//!
//! * [`fixtures`]: recorded provider responses (OpenAI, Anthropic, Gemini) in
//!   each provider's exact wire format, JSON bodies and SSE stream bodies,
//!   compiled in with `include_str!`.
//! * [`MockUpstream`]: an in-process axum server on `127.0.0.1:0` that speaks
//!   the OpenAI, Azure OpenAI, Anthropic and Gemini wire protocols, answers
//!   from the fixtures, records every request ([`CapturedRequest`]) and lets a
//!   test pick special behaviour through the requested model name:
//!   * `echo` answers with the text of the last user message (streamed one
//!     word per chunk);
//!   * `slow-stream` streams 40 chunks 50 ms apart (for cancellation tests,
//!     see [`MockUpstream::cancelled_streams`]);
//!   * `fault-*` names inject errors, hangs, garbage and broken streams; see
//!     [`models`] for the full list.
//! * [`postgres::TempPostgres`]: a throwaway PostgreSQL server started from the
//!   locally installed binaries (`initdb`, `pg_ctl`), removed on drop.
//! * [`partition::Partition`]: a TCP proxy a test can cut and mend, for network
//!   partitions between Sluice and a server.
//!
//! ```no_run
//! # async fn demo() {
//! let upstream = sluice_testkit::MockUpstream::start().await;
//! let base = upstream.base_url(); // "http://127.0.0.1:PORT"
//! // ... point a provider at `base`, send requests ...
//! let seen = upstream.requests();
//! # let _ = (base, seen);
//! # }
//! ```

pub mod fixtures;
mod mock;
pub mod partition;
pub mod postgres;
pub mod redis;

pub use mock::{CapturedRequest, MockUpstream, models};
pub use postgres::{TempPostgres, postgres_available};
