//! The store suite: one set of checks ([`checks`]), run against every backend: a SQLite file, an
//! in-memory SQLite database and PostgreSQL (a throwaway server, see [`backend`]). Each check is
//! its own test per backend, e.g. `sqlite::listing` and `postgres::listing`; [`writer`] holds the
//! backend-independent writer tests; [`keys`] holds the checks of the key store; [`usage`] those of
//! spend, usage reports and the cache.
//!
//! PostgreSQL tests are skipped with a message when the server binaries are missing, unless
//! `SLUICE_REQUIRE_PG=1`, which makes that a failure.

mod backend;
mod checks;
mod fixtures;
mod keys;
mod usage;
mod writer;

/// `store_suite!(module, setup, [checks…])`: a `#[tokio::test]` per check in `mod module`, each on
/// a fresh database from `setup` (which returns `None` to skip). A check may carry attributes
/// (`#[ignore = "…"]`) for that backend.
macro_rules! store_suite {
    ($module:ident, $setup:path, [$($(#[$attr:meta])* $check:ident),* $(,)?]) => {
        mod $module {
            $(
                $(#[$attr])*
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

store_suite!(
    sqlite,
    crate::backend::sqlite_file,
    [
        round_trip,
        idempotent_insert,
        listing,
        finished_since,
        get_unknown,
        nul_characters,
        default_batch,
        uneven_batch,
        largest_batch,
        writer_batches,
        writer_drain_with_live_sender,
        refused_records,
        reopen,
        keys_round_trip,
        keys_listing,
        keys_changed_since,
        keys_rotate,
        keys_revoke,
        keys_secret_not_stored,
        keys_request_filter,
        audit_round_trip,
        usage_record_fields,
        usage_spend,
        long_values_and_keyless_teams,
        usage_grouped,
        usage_totals,
        cache_entries,
        concurrent_open,
    ]
);

store_suite!(
    postgres,
    crate::backend::postgres,
    [
        round_trip,
        idempotent_insert,
        listing,
        finished_since,
        get_unknown,
        nul_characters,
        default_batch,
        uneven_batch,
        largest_batch,
        writer_batches,
        writer_drain_with_live_sender,
        refused_records,
        reopen,
        keys_round_trip,
        keys_listing,
        keys_changed_since,
        keys_rotate,
        keys_revoke,
        keys_secret_not_stored,
        keys_request_filter,
        audit_round_trip,
        usage_record_fields,
        usage_spend,
        long_values_and_keyless_teams,
        usage_grouped,
        usage_totals,
        cache_entries,
        concurrent_open,
    ]
);

// `sqlite::memory:` is one database per pool: every check but concurrent opening.
store_suite!(
    sqlite_memory,
    crate::backend::sqlite_memory,
    [
        round_trip,
        idempotent_insert,
        listing,
        finished_since,
        get_unknown,
        nul_characters,
        default_batch,
        uneven_batch,
        largest_batch,
        writer_batches,
        writer_drain_with_live_sender,
        refused_records,
        reopen,
        keys_round_trip,
        keys_listing,
        keys_changed_since,
        keys_rotate,
        keys_revoke,
        keys_secret_not_stored,
        keys_request_filter,
        audit_round_trip,
        usage_record_fields,
        usage_spend,
        long_values_and_keyless_teams,
        usage_grouped,
        usage_totals,
        cache_entries,
    ]
);
