//! Starts a throwaway PostgreSQL, creates a database and queries it with psql.
//!
//! Skipped (with a message) when the PostgreSQL binaries are missing, unless
//! `SLUICE_REQUIRE_PG=1`, which turns a missing server into a failure.

use std::net::TcpStream;
use std::process::Command;

use sluice_testkit::postgres::{TempPostgres, find_tool, postgres_available};

fn should_run() -> bool {
    if postgres_available() {
        return true;
    }
    if std::env::var("SLUICE_REQUIRE_PG").is_ok_and(|v| v == "1") {
        // Fall through so that start() reports exactly what is missing.
        return true;
    }
    eprintln!(
        "skipping TempPostgres test: PostgreSQL binaries (initdb, pg_ctl, psql) are not \
         available; set SLUICE_REQUIRE_PG=1 to make this a failure"
    );
    false
}

#[test]
fn temp_postgres_creates_a_database_and_answers_select_1() {
    if !should_run() {
        return;
    }
    let pg = TempPostgres::start().unwrap_or_else(|e| panic!("TempPostgres::start: {e}"));
    let port = pg.port();
    assert_eq!(
        pg.url(),
        format!("postgres://postgres@127.0.0.1:{port}/postgres")
    );

    let url = pg
        .create_database("sluice_testkit_check")
        .unwrap_or_else(|e| panic!("create_database: {e}"));
    assert_eq!(
        url,
        format!("postgres://postgres@127.0.0.1:{port}/sluice_testkit_check")
    );
    assert!(pg.create_database("bad name; drop").is_err());

    let psql = find_tool("psql").expect("psql");
    let out = Command::new(psql)
        .arg(&url)
        .args(["-X", "-t", "-A", "-c", "select 1"])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    assert_eq!(
        pg.psql("sluice_testkit_check", "select current_database()")
            .unwrap()
            .trim(),
        "sluice_testkit_check"
    );

    let dir = pg.dir().to_path_buf();
    drop(pg);
    assert!(!dir.exists(), "temp dir should be removed on drop");
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "server should be stopped on drop"
    );
}

#[test]
fn two_servers_run_side_by_side() {
    if !should_run() {
        return;
    }
    let a = TempPostgres::start().unwrap_or_else(|e| panic!("{e}"));
    let b = TempPostgres::start().unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(a.port(), b.port());
    assert_eq!(a.psql("postgres", "select 1").unwrap().trim(), "1");
    assert_eq!(b.psql("postgres", "select 2").unwrap().trim(), "2");
}
