//! The virtual-key checks every backend must pass (run through `checks`, like the others).

use std::sync::Arc;

use chrono::{DateTime, SubsecRound, TimeDelta, Utc};
use serde_json::json;
use sluice_core::keys::{
    Budget, KEY_PREFIX, KeySpec, KeyStore, Owner, VirtualKey, generate, hash_key,
};
use sluice_core::record::{LogStore, RecordQuery, RecordStatus};

use crate::backend::{Kind, TestDb};
use crate::fixtures::{assert_same_record, full_record, ids, now_us, record};

/// A key with every field set, awkward values included, written at `at`.
fn full_key(at: DateTime<Utc>) -> VirtualKey {
    let k = generate(None).expect("generate a key");
    VirtualKey {
        id: k.id,
        name: "CI bot — ünïcødé 🚀 \"quoted\" 'x' %_\nsecond line".into(),
        hash: k.hash,
        owner: Owner {
            user: Some("user-42".into()),
            team: Some("search ü".into()),
            project: Some("proj\"ect\\".into()),
        },
        models: vec!["gpt-4o-mini".into(), "claude 3.5 ✨".into(), "a,b".into()],
        rpm: Some(i64::MAX as u64),
        tpm: Some(1),
        max_parallel: Some(u32::MAX),
        budget: Budget {
            daily_usd: Some(0.1),
            monthly_usd: Some(0.000_000_001_234_567_89),
            total_usd: Some(12_345_678.901_234_5),
        },
        expires_at: Some(at + TimeDelta::days(30) + TimeDelta::microseconds(7)),
        metadata: json!({
            "tenant": "acme",
            "empty": {},
            "nested": {"list": [1, 2.5, "three", null, true], "deep": {"x": "ünï"}},
            "big": 9_007_199_254_740_993_u64,
            "quote\"key": "value with \\ backslash",
        }),
        created_at: at,
        updated_at: at,
        revoked_at: None,
        role: Some(sluice_core::keys::Role::Developer),
        created_by: Some("key:0123456789abcdef".into()),
    }
}

/// A key with every optional field empty, written at `at`.
fn minimal_key(at: DateTime<Utc>) -> VirtualKey {
    let k = generate(None).expect("generate a key");
    VirtualKey {
        id: k.id,
        name: "m".into(),
        hash: k.hash,
        owner: Owner::default(),
        models: Vec::new(),
        rpm: None,
        tpm: None,
        max_parallel: None,
        budget: Budget::default(),
        expires_at: None,
        metadata: serde_json::Value::Null,
        created_at: at,
        updated_at: at,
        revoked_at: None,
        role: None,
        created_by: None,
    }
}

/// Asserts `got == want` field by field (so a failure names the field), then as a whole.
fn assert_same_key(got: &VirtualKey, want: &VirtualKey) {
    macro_rules! fields {
        ($($f:ident),* $(,)?) => {
            $(
                assert_eq!(got.$f, want.$f, "field `{}` of key {}", stringify!($f), want.id);
            )*
        };
    }
    fields!(
        id,
        name,
        hash,
        owner,
        models,
        rpm,
        tpm,
        max_parallel,
        budget,
        expires_at,
        metadata,
        created_at,
        updated_at,
        revoked_at,
        role,
        created_by,
    );
    assert_eq!(got, want);
}

async fn insert_key(store: &Arc<dyn KeyStore>, k: &VirtualKey) {
    store
        .insert_key(k)
        .await
        .unwrap_or_else(|e| panic!("insert_key({}): {e}", k.id));
}

async fn get_key(store: &Arc<dyn KeyStore>, id: &str) -> Option<VirtualKey> {
    store
        .get_key(id)
        .await
        .unwrap_or_else(|e| panic!("get_key({id}): {e}"))
}

async fn changed_ids(store: &Arc<dyn KeyStore>, since: DateTime<Utc>) -> Vec<String> {
    let mut got: Vec<String> = store
        .keys_changed_since(since)
        .await
        .unwrap_or_else(|e| panic!("keys_changed_since({since}): {e}"))
        .into_iter()
        .map(|k| k.id)
        .collect();
    got.sort();
    got
}

fn sorted(ids: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// Keys with every field set and with every optional field empty, revoked and not, come back
/// equal from `get_key` and `list_keys` (and after reopening, where the database is shared).
pub async fn keys_round_trip(db: &TestDb) {
    let (_, store) = db.open_both().await;
    let at = now_us();
    let full = full_key(at);
    let minimal = minimal_key(at - TimeDelta::seconds(1));
    let revoked = VirtualKey {
        revoked_at: Some(at + TimeDelta::microseconds(1)),
        updated_at: at + TimeDelta::microseconds(1),
        ..full_key(at - TimeDelta::seconds(2))
    };
    // A whole second, no fraction: stored without one on SQLite.
    let whole = minimal_key(at.trunc_subsecs(0) - TimeDelta::seconds(3));
    let all = [&full, &minimal, &revoked, &whole];
    for k in all {
        insert_key(&store, k).await;
    }
    for want in all {
        let got = get_key(&store, &want.id)
            .await
            .unwrap_or_else(|| panic!("key {} not found", want.id));
        assert_same_key(&got, want);
    }
    let listed = store.list_keys().await.expect("list_keys");
    assert_eq!(listed.len(), all.len());
    for got in &listed {
        let want = all
            .iter()
            .find(|w| w.id == got.id)
            .unwrap_or_else(|| panic!("list_keys returned unknown id {}", got.id));
        assert_same_key(got, want);
    }
    // Unknown ids.
    assert!(get_key(&store, "0000000000000000").await.is_none());
    assert!(get_key(&store, "").await.is_none());
    assert!(get_key(&store, "' OR 1=1 --").await.is_none());
    // The same id twice is refused: a key is never silently replaced.
    assert!(
        store.insert_key(&full).await.is_err(),
        "inserting an existing id must fail"
    );
    assert_same_key(&get_key(&store, &full.id).await.expect("full key"), &full);

    if db.shared_between_opens() {
        drop(store);
        let (_, again) = db.open_both().await;
        for want in all {
            assert_same_key(
                &get_key(&again, &want.id).await.expect("key after reopen"),
                want,
            );
        }
    }
}

/// `list_keys`: every key, revoked ones included, newest first.
pub async fn keys_listing(db: &TestDb) {
    let (_, store) = db.open_both().await;
    assert!(store.list_keys().await.expect("list_keys").is_empty());
    let base = now_us().trunc_subsecs(0);
    // Oldest first; offsets that mix whole seconds, milliseconds and microseconds.
    let offsets = [
        TimeDelta::zero(),
        TimeDelta::microseconds(1),
        TimeDelta::milliseconds(1),
        TimeDelta::milliseconds(1) + TimeDelta::microseconds(1),
        TimeDelta::seconds(1),
        TimeDelta::seconds(59),
        TimeDelta::minutes(61),
        TimeDelta::days(400),
    ];
    let keys: Vec<VirtualKey> = offsets.iter().map(|d| minimal_key(base + *d)).collect();
    // Inserted out of order: the order must come from created_at.
    for i in [3, 7, 0, 5, 1, 6, 2, 4] {
        insert_key(&store, &keys[i]).await;
    }
    assert!(
        store
            .revoke_key(&keys[2].id, base + TimeDelta::days(500))
            .await
            .expect("revoke_key")
    );
    let listed: Vec<String> = store
        .list_keys()
        .await
        .expect("list_keys")
        .into_iter()
        .map(|k| k.id)
        .collect();
    let want: Vec<String> = keys.iter().rev().map(|k| k.id.clone()).collect();
    assert_eq!(listed, want, "newest first, the revoked key included");
}

/// `keys_changed_since`: exactly the keys written at or after the time; rotation and revocation
/// count as writes.
pub async fn keys_changed_since(db: &TestDb) {
    let (_, store) = db.open_both().await;
    let base = now_us().trunc_subsecs(0);
    let at = |d: TimeDelta| base + d;
    let old = minimal_key(at(-TimeDelta::seconds(10)));
    let exact = minimal_key(at(TimeDelta::zero()));
    let micro = minimal_key(at(TimeDelta::microseconds(1)));
    let milli = full_key(at(TimeDelta::milliseconds(1)));
    for k in [&old, &exact, &micro, &milli] {
        insert_key(&store, k).await;
    }
    let all = sorted(&[&old.id, &exact.id, &micro.id, &milli.id]);
    assert!(
        changed_ids(&store, at(TimeDelta::seconds(1)))
            .await
            .is_empty()
    );
    assert_eq!(changed_ids(&store, at(-TimeDelta::hours(1))).await, all);
    assert_eq!(
        changed_ids(&store, at(-TimeDelta::seconds(10))).await,
        all,
        "at a key's time includes it"
    );
    assert_eq!(
        changed_ids(&store, at(TimeDelta::zero())).await,
        sorted(&[&exact.id, &micro.id, &milli.id])
    );
    assert_eq!(
        changed_ids(&store, at(TimeDelta::microseconds(1))).await,
        sorted(&[&micro.id, &milli.id])
    );
    assert_eq!(
        changed_ids(&store, at(TimeDelta::microseconds(2))).await,
        sorted(&[&milli.id])
    );
    assert_eq!(
        changed_ids(&store, at(TimeDelta::milliseconds(1))).await,
        sorted(&[&milli.id])
    );
    assert!(
        changed_ids(
            &store,
            at(TimeDelta::milliseconds(1) + TimeDelta::microseconds(1))
        )
        .await
        .is_empty()
    );

    // A rotation is a write.
    let rotated = generate(Some(&old.id)).expect("generate");
    assert!(
        store
            .rotate_key(&old.id, &rotated.hash, at(TimeDelta::seconds(2)))
            .await
            .expect("rotate_key")
    );
    assert_eq!(
        changed_ids(&store, at(TimeDelta::seconds(2))).await,
        sorted(&[&old.id])
    );
    // So is a revocation.
    assert!(
        store
            .revoke_key(&exact.id, at(TimeDelta::seconds(3)))
            .await
            .expect("revoke_key")
    );
    assert_eq!(
        changed_ids(&store, at(TimeDelta::seconds(2))).await,
        sorted(&[&old.id, &exact.id])
    );
    assert_eq!(
        changed_ids(&store, at(TimeDelta::seconds(3))).await,
        sorted(&[&exact.id])
    );
    assert!(
        changed_ids(
            &store,
            at(TimeDelta::seconds(3) + TimeDelta::microseconds(1))
        )
        .await
        .is_empty()
    );
    // A refused write (revoking again, rotating a revoked key) is not one.
    assert!(
        !store
            .revoke_key(&exact.id, at(TimeDelta::seconds(4)))
            .await
            .expect("revoke_key")
    );
    assert!(
        !store
            .rotate_key(&exact.id, &rotated.hash, at(TimeDelta::seconds(4)))
            .await
            .expect("rotate_key")
    );
    assert!(
        changed_ids(&store, at(TimeDelta::seconds(4)))
            .await
            .is_empty()
    );
    // What comes back is the key as it is now.
    let changed = store
        .keys_changed_since(at(TimeDelta::seconds(2)))
        .await
        .expect("keys_changed_since");
    for k in &changed {
        assert_same_key(k, &get_key(&store, &k.id).await.expect("changed key"));
    }
}

/// `rotate_key` replaces the hash of an active key, and of nothing else.
pub async fn keys_rotate(db: &TestDb) {
    let (_, store) = db.open_both().await;
    let at = now_us();
    let key = full_key(at);
    let other = minimal_key(at);
    insert_key(&store, &key).await;
    insert_key(&store, &other).await;

    let fresh = generate(Some(&key.id)).expect("generate");
    let later = at + TimeDelta::seconds(1);
    assert!(
        store
            .rotate_key(&key.id, &fresh.hash, later)
            .await
            .expect("rotate_key")
    );
    let got = get_key(&store, &key.id).await.expect("rotated key");
    let want = VirtualKey {
        hash: fresh.hash.clone(),
        updated_at: later,
        ..key.clone()
    };
    assert_same_key(&got, &want);
    assert!(got.matches(&fresh.key));
    assert!(!got.matches(&format!("{KEY_PREFIX}{}-old", key.id)));
    assert_same_key(
        &get_key(&store, &other.id).await.expect("other key"),
        &other,
    );

    // Unknown ids: nothing changes.
    for id in ["0000000000000000", "", "' OR 1=1 --"] {
        assert!(
            !store
                .rotate_key(id, &fresh.hash, later)
                .await
                .expect("rotate_key"),
            "rotate_key({id:?})"
        );
    }
    assert_same_key(
        &get_key(&store, &other.id).await.expect("other key"),
        &other,
    );

    // A revoked key keeps its hash.
    let revoked_at = later + TimeDelta::seconds(1);
    assert!(
        store
            .revoke_key(&key.id, revoked_at)
            .await
            .expect("revoke_key")
    );
    let again = generate(Some(&key.id)).expect("generate");
    assert!(
        !store
            .rotate_key(&key.id, &again.hash, revoked_at + TimeDelta::seconds(1))
            .await
            .expect("rotate_key")
    );
    let got = get_key(&store, &key.id).await.expect("revoked key");
    assert_eq!(got.hash, fresh.hash, "a revoked key is not rotated");
    assert_eq!(got.updated_at, revoked_at);
}

/// `revoke_key`: `true` once, then `false`; unknown ids are `false`.
pub async fn keys_revoke(db: &TestDb) {
    let (_, store) = db.open_both().await;
    let at = now_us();
    let key = full_key(at);
    let other = minimal_key(at);
    insert_key(&store, &key).await;
    insert_key(&store, &other).await;
    let revoked_at = at + TimeDelta::milliseconds(1500);
    assert!(
        store
            .revoke_key(&key.id, revoked_at)
            .await
            .expect("revoke_key")
    );
    let want = VirtualKey {
        revoked_at: Some(revoked_at),
        updated_at: revoked_at,
        ..key.clone()
    };
    let got = get_key(&store, &key.id).await.expect("revoked key");
    assert_same_key(&got, &want);
    assert!(got.check(revoked_at).is_err());
    assert!(
        !store
            .revoke_key(&key.id, revoked_at + TimeDelta::seconds(1))
            .await
            .expect("revoke_key")
    );
    assert_same_key(&get_key(&store, &key.id).await.expect("revoked key"), &want);
    // No such keys, a NUL among them (PostgreSQL refused it: 503 instead of 404).
    for id in ["0000000000000000", "", "' OR 1=1 --", "a\0b"] {
        assert!(
            !store.revoke_key(id, revoked_at).await.expect("revoke_key"),
            "revoke_key({id:?})"
        );
        assert!(
            store.get_key(id).await.expect("get_key").is_none(),
            "get_key({id:?})"
        );
    }
    assert_same_key(
        &get_key(&store, &other.id).await.expect("other key"),
        &other,
    );
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Only a key's hash is stored, never the key or its secret.
pub async fn keys_secret_not_stored(db: &TestDb) {
    let (_, store) = db.open_both().await;
    let now = now_us();
    let (key, presented) = KeySpec {
        name: "secret".into(),
        metadata: json!({"note": "nothing to see"}),
        ..KeySpec::default()
    }
    .issue(now)
    .expect("issue a key");
    insert_key(&store, &key).await;
    let rotated = generate(Some(&key.id)).expect("generate");
    assert!(
        store
            .rotate_key(&key.id, &rotated.hash, now + TimeDelta::seconds(1))
            .await
            .expect("rotate_key")
    );
    let secrets: Vec<String> = [&presented, &rotated.key]
        .iter()
        .map(|k| {
            k.strip_prefix(&format!("{KEY_PREFIX}{}-", key.id))
                .expect("a key is sk-sluice-ID-SECRET")
                .to_string()
        })
        .collect();
    assert_eq!(hash_key(&rotated.key), rotated.hash);
    let got = get_key(&store, &key.id).await.expect("stored key");
    assert_eq!(got.hash, rotated.hash);
    assert!(got.matches(&rotated.key) && !got.matches(&presented));

    let dump: Vec<u8> = match db.kind {
        // Everything SQLite wrote: the database file and its write-ahead log (the store is still
        // open, so nothing has been checkpointed away).
        Kind::SqliteFile => {
            let path = db.sqlite_path().expect("a SQLite file");
            let mut bytes = std::fs::read(&path).expect("read the database file");
            for suffix in ["-wal", "-journal"] {
                let mut p = path.clone().into_os_string();
                p.push(suffix);
                if let Ok(b) = std::fs::read(&p) {
                    bytes.extend(b);
                }
            }
            bytes
        }
        Kind::Postgres => {
            let pool = sqlx::PgPool::connect(&db.url)
                .await
                .expect("connect to PostgreSQL");
            let rows: Vec<String> =
                sqlx::query_scalar("SELECT row_to_json(k)::text FROM api_keys k")
                    .fetch_all(&pool)
                    .await
                    .expect("select api_keys");
            pool.close().await;
            assert_eq!(rows.len(), 1, "{rows:?}");
            rows.join("\n").into_bytes()
        }
        // Only the store's own connection sees this database: checked through the store above.
        Kind::SqliteMemory => return,
    };
    assert!(
        contains(&dump, rotated.hash.as_bytes()),
        "the dump holds the stored hash (else this check looks in the wrong place)"
    );
    assert!(contains(&dump, key.id.as_bytes()));
    for (i, secret) in secrets.iter().enumerate() {
        assert!(
            !contains(&dump, secret.as_bytes()),
            "secret #{i} is in the database"
        );
    }
    for k in [&presented, &rotated.key] {
        assert!(
            !contains(&dump, k.as_bytes()),
            "a whole key is in the database"
        );
    }
}

/// A record's `key_id` is stored, and `RecordQuery::key` lists only that key's requests.
pub async fn keys_request_filter(db: &TestDb) {
    let (log, _) = db.open_both().await;
    let store: &Arc<dyn LogStore> = &log;
    let (a, b) = ("aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb");
    let mut records = Vec::new();
    for i in 0..12 {
        let mut r = record(
            "m",
            Some(if i % 2 == 0 { "ann" } else { "bob" }),
            RecordStatus::Ok,
        );
        r.key_id = match i % 3 {
            0 => Some(a.to_string()),
            1 => Some(b.to_string()),
            _ => None,
        };
        records.push(r);
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let full = full_record();
    store.insert_batch(&records).await.expect("insert_batch");
    store
        .insert_batch(std::slice::from_ref(&full))
        .await
        .expect("insert_batch");
    assert_same_record(
        &store.get(full.id).await.expect("get").expect("full record"),
        &full,
    );
    for want in &records {
        let got = store.get(want.id).await.expect("get").expect("record");
        assert_same_record(&got, want);
    }
    let q = |key: Option<&str>, user: Option<&str>| RecordQuery {
        key: key.map(str::to_string),
        user: user.map(str::to_string),
        limit: 1000,
        ..RecordQuery::default()
    };
    let expect = |keep: &dyn Fn(&sluice_core::record::RequestRecord) -> bool| -> Vec<_> {
        records
            .iter()
            .rev()
            .filter(|r| keep(r))
            .map(|r| r.id)
            .collect()
    };
    let got = store.list(&q(Some(a), None)).await.expect("list");
    assert_eq!(ids(&got), expect(&|r| r.key_id.as_deref() == Some(a)));
    assert_eq!(got.len(), 4);
    let got = store.list(&q(Some(b), Some("bob"))).await.expect("list");
    assert_eq!(
        ids(&got),
        expect(&|r| r.key_id.as_deref() == Some(b) && r.user.as_deref() == Some("bob"))
    );
    assert_eq!(got.len(), 2);
    let got = store
        .list(&q(full.key_id.as_deref(), None))
        .await
        .expect("list");
    assert_eq!(ids(&got), vec![full.id]);
    for unknown in ["cccccccccccccccc", "", "' OR 1=1 --"] {
        assert!(
            store
                .list(&q(Some(unknown), None))
                .await
                .expect("list")
                .is_empty(),
            "key {unknown:?}"
        );
    }
    assert_eq!(
        store.list(&q(None, None)).await.expect("list").len(),
        13,
        "no key filter: every record"
    );
}

/// The audit log keeps every entry exactly and lists the newest first, bounded by the limit.
pub async fn audit_round_trip(db: &TestDb) {
    let stores = sluice_store::open_all(&db.url, 4)
        .await
        .unwrap_or_else(|e| panic!("open_all({}): {e}", db.url));
    let at = now_us();
    let entries: Vec<sluice_core::keys::AuditEntry> = (0..3)
        .map(|i| sluice_core::keys::AuditEntry {
            id: uuid::Uuid::now_v7().hyphenated().to_string(),
            at: at + TimeDelta::milliseconds(i),
            actor: if i == 0 {
                "admin-key".into()
            } else {
                "key:0123456789abcdef".into()
            },
            role: "admin".into(),
            action: "keys.create".into(),
            target: (i != 2).then(|| format!("target-{i} ünï")),
            outcome: "ok".into(),
            detail: json!({"n": i, "name": "a \"quoted\" name"}),
        })
        .collect();
    for e in &entries {
        stores.audit.append_audit(e).await.expect("append_audit");
    }
    // Written again (a retry after a lost answer): kept once.
    stores
        .audit
        .append_audit(&entries[1])
        .await
        .expect("append_audit again");
    let got = stores.audit.list_audit(10).await.expect("list_audit");
    let want: Vec<_> = entries.iter().rev().cloned().collect();
    assert_eq!(got, want, "newest first, every field kept");
    assert_eq!(
        stores.audit.list_audit(2).await.expect("list_audit").len(),
        2
    );
}
