//! The store suite: one set of checks ([`checks`]), run against every backend: a SQLite file, an
//! in-memory SQLite database and PostgreSQL (a throwaway server, see [`backend`]). Each check is
//! its own test per backend, e.g. `sqlite::listing` and `postgres::listing`.
//!
//! PostgreSQL tests are skipped with a message when the server binaries are missing, unless
//! `SLUICE_REQUIRE_PG=1`.

mod backend;
mod checks;
mod fixtures;
mod writer;

/// `store_suite!(module, setup, [checks…])`: a `#[tokio::test]` per check in `mod module`, each on
/// a fresh database from `setup` (which returns `None` to skip).
macro_rules! store_suite {
    ($module:ident, $setup:path, [$($check:ident),* $(,)?]) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    let Some(db) = $setup(stringify!($check)) else {
                        return;
                    };
                    crate::checks::$check(&db).await;
                }
            )*
        }
    };
}

/// Every check, for a backend whose `open`s share one database.
macro_rules! full_suite {
    ($module:ident, $setup:path) => {
        store_suite!(
            $module,
            $setup,
            [
                round_trip,
                idempotent_insert,
                listing,
                get_unknown,
                largest_batch,
                writer_batches,
                writer_drain_with_live_sender,
                reopen,
                concurrent_open,
            ]
        );
    };
}

full_suite!(sqlite, crate::backend::sqlite_file);
full_suite!(postgres, crate::backend::postgres);
// `sqlite::memory:` is one database per pool: every check but concurrent opening.
store_suite!(
    sqlite_memory,
    crate::backend::sqlite_memory,
    [
        round_trip,
        idempotent_insert,
        listing,
        get_unknown,
        largest_batch,
        writer_batches,
        writer_drain_with_live_sender,
        reopen,
    ]
);
