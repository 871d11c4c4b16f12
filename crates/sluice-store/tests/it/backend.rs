//! The backends the suite runs against: a SQLite file, an in-memory SQLite database and a real
//! PostgreSQL server.
//!
//! PostgreSQL: the tests of this binary share one throwaway server ([`TempPostgres`]) while any of
//! them is running, and each test gets a fresh database on it. The server is held through an
//! `Arc` by the tests using it and the static only keeps a `Weak`, so the server is stopped (by
//! `TempPostgres`'s `Drop`) as soon as the last test using it ends; statics are never dropped,
//! so a static `TempPostgres` would leave its processes running after `cargo test`. If the tests
//! happen not to overlap, a later test simply starts a new server (1–2 s).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use sluice_core::keys::KeyStore;
use sluice_core::record::LogStore;
use sluice_testkit::postgres::{TempPostgres, postgres_available};
use tempfile::TempDir;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    SqliteFile,
    SqliteMemory,
    Postgres,
}

/// One test's database.
pub struct TestDb {
    pub kind: Kind,
    pub url: String,
    /// Scratch space (the SQLite file, spill files).
    dir: TempDir,
    /// Keeps the shared server up while this test runs.
    _server: Option<Arc<TempPostgres>>,
}

impl TestDb {
    /// Opens (and migrates) the store at this test's URL.
    pub async fn open(&self) -> Arc<dyn LogStore> {
        sluice_store::open(&self.url, 4)
            .await
            .unwrap_or_else(|e| panic!("open({}): {e}", self.url))
    }

    /// Opens (and migrates) the store at this test's URL once, as both the request log and the
    /// key store (one database, also for `sqlite::memory:`).
    pub async fn open_both(&self) -> (Arc<dyn LogStore>, Arc<dyn KeyStore>) {
        sluice_store::open_stores(&self.url, 4)
            .await
            .unwrap_or_else(|e| panic!("open_stores({}): {e}", self.url))
    }

    /// Opens (and migrates) the store at this test's URL once, with every view of it.
    pub async fn open_all(&self) -> sluice_store::Stores {
        sluice_store::open_all(&self.url, 4)
            .await
            .unwrap_or_else(|e| panic!("open_all({}): {e}", self.url))
    }

    /// The database file of a SQLite-file test.
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        (self.kind == Kind::SqliteFile).then(|| self.dir.path().join("t.db"))
    }

    /// Whether two `open` calls on the URL see the same data (not so for `sqlite::memory:`).
    pub fn shared_between_opens(&self) -> bool {
        self.kind != Kind::SqliteMemory
    }

    pub fn spill_path(&self) -> PathBuf {
        self.dir.path().join("spill").join("requests.jsonl")
    }
}

fn scratch() -> TempDir {
    tempfile::Builder::new()
        .prefix("sluice-store-it-")
        .tempdir()
        .expect("create a temporary directory")
}

pub fn sqlite_file(_test: &str) -> Option<TestDb> {
    let dir = scratch();
    let url = format!("sqlite://{}/t.db", dir.path().display());
    Some(TestDb {
        kind: Kind::SqliteFile,
        url,
        dir,
        _server: None,
    })
}

pub fn sqlite_memory(_test: &str) -> Option<TestDb> {
    Some(TestDb {
        kind: Kind::SqliteMemory,
        url: "sqlite::memory:".to_owned(),
        dir: scratch(),
        _server: None,
    })
}

static SERVER: Mutex<Weak<TempPostgres>> = Mutex::new(Weak::new());
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// The server shared by the PostgreSQL tests running now, started if there is none.
fn shared_server() -> Arc<TempPostgres> {
    let mut slot = SERVER.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(server) = slot.upgrade() {
        return server;
    }
    let server = Arc::new(
        TempPostgres::start().unwrap_or_else(|e| panic!("cannot start TempPostgres: {e}")),
    );
    *slot = Arc::downgrade(&server);
    server
}

/// A fresh database on the shared server; `None` (after saying so) when PostgreSQL is not
/// installed, unless `SLUICE_REQUIRE_PG=1`, which makes that a failure.
pub fn postgres(test: &str) -> Option<TestDb> {
    if !postgres_available() {
        // start() says exactly what is missing.
        let reason = TempPostgres::start()
            .err()
            .unwrap_or_else(|| "postgres_available() is false".to_owned());
        if std::env::var("SLUICE_REQUIRE_PG").is_ok_and(|v| v == "1") {
            panic!("SLUICE_REQUIRE_PG=1 but PostgreSQL is not available: {reason}");
        }
        eprintln!(
            "skipping postgres::{test}: PostgreSQL is not available ({reason}); \
             set SLUICE_REQUIRE_PG=1 to make this a failure"
        );
        return None;
    }
    let server = shared_server();
    let n = NEXT_DB.fetch_add(1, Ordering::Relaxed);
    let name: String = format!("t{n}_{test}").chars().take(63).collect();
    let url = server
        .create_database(&name)
        .unwrap_or_else(|e| panic!("create_database({name}): {e}"));
    Some(TestDb {
        kind: Kind::Postgres,
        url,
        dir: scratch(),
        _server: Some(server),
    })
}
