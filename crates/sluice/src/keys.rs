//! `sluice keys`: issues and manages virtual keys straight in the store (no server needed).
//! Running gateways on the same store pick the changes up within a second.

use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sluice_core::keys::{
    Budget, KeyRejection, KeySpec, KeyStore, Owner, Role, VirtualKey, generate,
};
use sluice_core::price::format_usd;

use crate::display::{clean, clip};

#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Issue a key. It is printed once: the store keeps only its hash.
    Create(Box<CreateArgs>),
    /// Every key, newest first, revoked ones included (never a key itself).
    List {
        /// Print the keys as JSON: `{"object": "list", "data": [...]}`, as `GET /api/keys`.
        #[arg(long)]
        json: bool,
    },
    /// One key's details.
    Show {
        /// The key's id (the 16 hex characters after `sk-sluice-`; the whole key works too).
        id: String,
        /// Print the key as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key: it stops working for good.
    Revoke {
        /// The key's id.
        id: String,
        /// Print the revoked key as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Give a key a new secret (same id, owner and limits); the old one stops working.
    Rotate {
        /// The key's id.
        id: String,
        /// Print the key, with its new secret, as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// What the key is for (shown in listings).
    #[arg(long)]
    pub name: String,
    /// The user the key belongs to.
    #[arg(long)]
    pub user: Option<String>,
    /// The team the key belongs to.
    #[arg(long)]
    pub team: Option<String>,
    /// The project the key belongs to.
    #[arg(long)]
    pub project: Option<String>,
    /// Models the key may use, comma-separated (default: every model).
    #[arg(long, value_delimiter = ',', value_name = "MODEL,…")]
    pub models: Vec<String>,
    /// Requests per minute.
    #[arg(long, value_name = "N")]
    pub rpm: Option<u64>,
    /// Tokens per minute.
    #[arg(long, value_name = "N")]
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    #[arg(long, value_name = "N")]
    pub max_parallel: Option<u32>,
    /// Spend per day, in USD.
    #[arg(long, value_name = "USD", allow_negative_numbers = true)]
    pub budget_daily: Option<f64>,
    /// Spend per month, in USD.
    #[arg(long, value_name = "USD", allow_negative_numbers = true)]
    pub budget_monthly: Option<f64>,
    /// Spend in all, in USD.
    #[arg(long, value_name = "USD", allow_negative_numbers = true)]
    pub budget_total: Option<f64>,
    /// When the key stops working: a duration from now (30s, 15m, 12h, 30d) or an RFC 3339 time.
    #[arg(long, value_name = "30d|RFC3339", allow_hyphen_values = true)]
    pub expires: Option<String>,
    /// A JSON object kept with the key.
    #[arg(long, value_name = "JSON")]
    pub metadata: Option<String>,
    /// An admin-API role: admin, developer or viewer (none: a client key for /v1 only).
    #[arg(long, value_name = "ROLE")]
    pub role: Option<String>,
    /// Print the key and its details as JSON.
    #[arg(long)]
    pub json: bool,
}

const CREATE_HINT: &str = "hint: `sluice keys create --help` describes the flags";
const LIST_HINT: &str =
    "hint: `sluice keys list` shows every key's id (same directory and config, or --store)";

/// `--expires`: an RFC 3339 time, or a duration from `now` (`30s`, `15m`, `12h`, `30d`).
pub fn parse_expires(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    sluice_server::admin::parse_time_or_duration(s, now, true, "30d (s, m, h or d)")
}

/// The key a `create` command line asks for.
fn spec(args: &CreateArgs, now: DateTime<Utc>) -> anyhow::Result<KeySpec> {
    let expires_at = match &args.expires {
        None => None,
        Some(s) => {
            Some(parse_expires(s, now).map_err(|e| anyhow!("--expires {e}\n{CREATE_HINT}"))?)
        }
    };
    let metadata = match &args.metadata {
        None => Value::Null,
        Some(s) => serde_json::from_str(s)
            .map_err(|e| anyhow!("--metadata is not valid JSON: {e}\n{CREATE_HINT}"))?,
    };
    Ok(KeySpec {
        name: args.name.clone(),
        owner: Owner {
            user: args.user.clone(),
            team: args.team.clone(),
            project: args.project.clone(),
        },
        models: args.models.iter().map(|m| m.trim().to_string()).collect(),
        rpm: args.rpm,
        tpm: args.tpm,
        max_parallel: args.max_parallel,
        budget: Budget {
            daily_usd: args.budget_daily,
            monthly_usd: args.budget_monthly,
            total_usd: args.budget_total,
        },
        expires_at,
        metadata,
        role: match args.role.as_deref() {
            None => None,
            Some(r) => Some(Role::parse(r).ok_or_else(|| {
                anyhow::anyhow!("--role: `{r}` is not one of admin, developer, viewer")
            })?),
        },
    })
}

fn print_json(v: &Value) {
    outln!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

fn owner_text(o: &Owner) -> String {
    let parts: Vec<String> = [
        ("user", &o.user),
        ("team", &o.team),
        ("project", &o.project),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
    .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

fn models_text(k: &VirtualKey) -> String {
    if k.models.is_empty() {
        "*".into()
    } else {
        k.models.join(",")
    }
}

fn limits_text(k: &VirtualKey) -> String {
    let mut parts = Vec::new();
    if let Some(v) = k.rpm {
        parts.push(format!("rpm={v}"));
    }
    if let Some(v) = k.tpm {
        parts.push(format!("tpm={v}"));
    }
    if let Some(v) = k.max_parallel {
        parts.push(format!("parallel={v}"));
    }
    if let Some(v) = k.budget.daily_usd {
        parts.push(format!("{}/day", format_usd(v)));
    }
    if let Some(v) = k.budget.monthly_usd {
        parts.push(format!("{}/month", format_usd(v)));
    }
    if let Some(v) = k.budget.total_usd {
        parts.push(format!("{} total", format_usd(v)));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

fn short_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M").to_string()
}

fn long_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn print_table(keys: &[VirtualKey], now: DateTime<Utc>) {
    const HEAD: [&str; 9] = [
        "ID", "NAME", "ROLE", "OWNER", "MODELS", "LIMITS", "EXPIRES", "STATUS", "CREATED",
    ];
    let rows: Vec<[String; 9]> = keys
        .iter()
        .map(|k| {
            [
                k.id.clone(),
                clip(&k.name, 32),
                role_text(k).into(),
                clip(&owner_text(&k.owner), 40),
                clip(&models_text(k), 40),
                limits_text(k),
                k.expires_at.map_or_else(|| "never".into(), short_time),
                k.status(now).into(),
                short_time(k.created_at),
            ]
        })
        .collect();
    let mut widths = HEAD.map(crate::display::width);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(crate::display::width(cell));
        }
    }
    let line = |cells: &[String]| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(cell);
                out.push_str(&" ".repeat(w - crate::display::width(cell) + 2));
            }
        }
        outln!("{}", out.trim_end());
    };
    line(&HEAD.map(String::from));
    for row in &rows {
        line(row);
    }
}

/// A key's admin-API role, or `client` for a key without one.
fn role_text(k: &VirtualKey) -> &'static str {
    k.role.map_or("client", Role::as_str)
}

fn print_details(k: &VirtualKey, now: DateTime<Utc>) {
    let budget = |v: Option<f64>| v.map_or_else(|| "none".into(), format_usd);
    let limit = |v: Option<u64>| v.map_or_else(|| "none".into(), |v| v.to_string());
    let fields: Vec<(&str, String)> = vec![
        ("id", k.id.clone()),
        ("name", k.name.clone()),
        ("status", k.status(now).into()),
        ("role", role_text(k).into()),
        (
            "created by",
            k.created_by.clone().unwrap_or_else(|| "-".into()),
        ),
        ("owner", owner_text(&k.owner)),
        (
            "models",
            if k.models.is_empty() {
                "* (every model)".into()
            } else {
                k.models.join(", ")
            },
        ),
        ("rpm", limit(k.rpm)),
        ("tpm", limit(k.tpm)),
        ("max parallel", limit(k.max_parallel.map(u64::from))),
        ("budget daily", budget(k.budget.daily_usd)),
        ("budget monthly", budget(k.budget.monthly_usd)),
        ("budget total", budget(k.budget.total_usd)),
        (
            "expires",
            k.expires_at.map_or_else(|| "never".into(), long_time),
        ),
        (
            "metadata",
            if k.metadata.is_null() {
                "-".into()
            } else {
                k.metadata.to_string()
            },
        ),
        ("created", long_time(k.created_at)),
        ("updated", long_time(k.updated_at)),
        (
            "revoked",
            k.revoked_at.map_or_else(|| "-".into(), long_time),
        ),
    ];
    for (name, value) in fields {
        outln!("{:<16}{}", format!("{name}:"), clean(&value));
    }
}

/// The SQLite file a URL names, when it does not exist yet.
pub(crate) fn missing_sqlite_file(url: &str) -> Option<String> {
    if url.contains(":memory:") || url.contains("mode=memory") {
        return None;
    }
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = path.split('?').next().unwrap_or(path);
    (!std::path::Path::new(path).exists()).then(|| path.to_string())
}

async fn open(url: &str) -> anyhow::Result<Arc<dyn KeyStore>> {
    Ok(open_with_audit(url).await?.0)
}

async fn open_with_audit(
    url: &str,
) -> anyhow::Result<(Arc<dyn KeyStore>, Arc<dyn sluice_core::keys::AuditStore>)> {
    let stores = sluice_store::open_all(url, 2)
        .await
        .with_context(|| format!("opening the store at {}", crate::display::redact_url(url)))?;
    Ok((stores.keys, stores.audit))
}

/// Records a key change made from the command line in the audit log, as the API's are (actor
/// `cli`: whoever can run the command on the store is its admin).
async fn audit(
    log: &dyn sluice_core::keys::AuditStore,
    action: &str,
    target: &str,
    detail: Value,
) -> anyhow::Result<()> {
    // The change is made and its secret shown whatever happens here: a failure to record it
    // is a warning, not a failed command (the key would be lost with its secret).
    record(log, action, target, "ok", detail).await;
    Ok(())
}

/// Records a key change refused from the command line (a key that is gone, revoked or expired),
/// as the API records its failed writes: action `failed`, the command as its target, why as its
/// outcome.
async fn audit_failure(log: &dyn sluice_core::keys::AuditStore, command: &str, outcome: &str) {
    record(log, "failed", command, outcome, Value::Null).await;
}

/// Appends an audit entry by `cli`; a failure to write it is a warning.
async fn record(
    log: &dyn sluice_core::keys::AuditStore,
    action: &str,
    target: &str,
    outcome: &str,
    detail: Value,
) {
    let entry =
        sluice_core::keys::AuditEntry::new("cli", "admin", action, Some(target), outcome, detail);
    if let Err(e) = log.append_audit(&entry).await {
        errln!("warning: the change could not be recorded in the audit log: {e}");
    }
}

/// The error for a key that does not exist (or cannot be rotated or revoked), and why, for the
/// audit log: `not_found`, `revoked`, `conflict` (it changed meanwhile) or `store_error`.
async fn not_usable(store: &dyn KeyStore, id: &str, doing: &str) -> (&'static str, anyhow::Error) {
    match store.get_key(id).await {
        Ok(Some(k)) if k.revoked_at.is_some() => (
            "revoked",
            anyhow!(
                "key `{id}` ({}) was revoked at {}\nhint: a revoked key stays revoked; issue a new one with `sluice keys create --name NAME`",
                clean(&k.name),
                k.revoked_at.map(long_time).unwrap_or_default()
            ),
        ),
        Ok(Some(k)) => (
            "conflict",
            anyhow!(
                "key `{id}` ({}) could not be {doing}: it changed while this command ran\nhint: try again; `sluice keys show {id}` shows its state",
                clean(&k.name)
            ),
        ),
        Ok(None) => ("not_found", anyhow!("no key `{id}`\n{LIST_HINT}")),
        Err(e) => (
            "store_error",
            anyhow!(e).context(format!("reading key `{id}`")),
        ),
    }
}

/// A key's field named in an error (as the API names it) as the flag of `keys create`.
fn as_flags(error: &str) -> String {
    const FLAGS: &[(&str, &str)] = &[
        ("budget.daily_usd:", "--budget-daily:"),
        ("budget.monthly_usd:", "--budget-monthly:"),
        ("budget.total_usd:", "--budget-total:"),
        ("max_parallel:", "--max-parallel:"),
        ("expires_at:", "--expires:"),
        ("rpm:", "--rpm:"),
        ("tpm:", "--tpm:"),
        ("models:", "--models:"),
        ("name:", "--name:"),
        ("metadata:", "--metadata:"),
        ("role:", "--role:"),
        ("owner.user:", "--user:"),
        ("owner.team:", "--team:"),
        ("owner.project:", "--project:"),
    ];
    FLAGS
        .iter()
        .find_map(|(field, flag)| {
            error
                .strip_prefix(field)
                .map(|rest| format!("{flag}{rest}"))
        })
        .unwrap_or_else(|| error.to_string())
}

/// A key given whole where its id is asked for (`sk-sluice-<id>-<secret>`) stands for its id:
/// the secret is never repeated in a message.
fn by_id(mut command: KeysCommand) -> anyhow::Result<KeysCommand> {
    if let KeysCommand::Show { id, .. }
    | KeysCommand::Revoke { id, .. }
    | KeysCommand::Rotate { id, .. } = &mut command
    {
        id_of(id)?;
    }
    Ok(command)
}

/// Replaces a whole key (`sk-sluice-<id>-<secret>`) by its id, in place (`keys show`, `logs
/// --key`, `usage --key`), and an id in capitals by the id; anything else is left as it is.
pub fn id_of(id: &mut String) -> anyhow::Result<()> {
    // Ids are lower-case hex; one copied in capitals is the same id.
    if id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        id.make_ascii_lowercase();
    }
    if id.starts_with(sluice_core::keys::KEY_PREFIX) {
        match sluice_core::keys::key_id(id) {
            Some(short) => *id = short.to_string(),
            None => bail!(
                "that is not the shape of a Sluice key (sk-sluice-<16 hex characters>-<secret>)\nhint: pass the key's id (the 16 hex characters after `sk-sluice-`); `sluice keys list` shows them"
            ),
        }
    }
    Ok(())
}

/// `sluice keys …` on the store at `store_url`; `configured` are the models of the configuration
/// (`None` when it was not read: a `--store` given with a configuration that does not load)
/// (a key for a model none serves gets a warning).
pub async fn run(
    store_url: &str,
    configured: Option<&[String]>,
    command: KeysCommand,
) -> anyhow::Result<()> {
    let now = Utc::now();
    let command = by_id(command)?;
    sluice_store::check_url(store_url).map_err(anyhow::Error::msg)?;
    if matches!(command, KeysCommand::List { .. } | KeysCommand::Show { .. }) {
        crate::logs::refuse_foreign(store_url).await?;
    }
    if !matches!(command, KeysCommand::Create(_))
        && let Some(path) = missing_sqlite_file(store_url)
    {
        return match command {
            KeysCommand::List { json: true } => {
                print_json(&serde_json::json!({"object": "list", "data": []}));
                Ok(())
            }
            KeysCommand::List { json: false } => {
                outln!(
                    "no keys yet (no store at {path}); issue one with `sluice keys create --name NAME`"
                );
                Ok(())
            }
            KeysCommand::Show { id, .. }
            | KeysCommand::Revoke { id, .. }
            | KeysCommand::Rotate { id, .. } => Err(anyhow!(
                "no key `{id}`: there is no store at {path}\nhint: issue a key with `sluice keys create --name NAME` (same directory and config), or pass --store URL"
            )),
            KeysCommand::Create(_) => unreachable!("create is handled below"),
        };
    }
    match command {
        KeysCommand::Create(args) => {
            let spec = spec(&args, now)?;
            // The flags first: a warning about models is no use before an error about them.
            let (mut key, secret) = spec
                .issue(now)
                .map_err(|e| anyhow!("{}\n{CREATE_HINT}", as_flags(&e)))?;
            let checked = configured.is_some();
            let configured = configured.unwrap_or_default();
            let unknown: Vec<&str> = key
                .models
                .iter()
                .filter(|m| !configured.contains(m))
                .map(String::as_str)
                .collect();
            if checked && !unknown.is_empty() {
                errln!(
                    "warning: the configuration has no model {}; the key can use {} only once a configuration serves {} (configured: {})",
                    unknown
                        .iter()
                        .map(|m| format!("`{}`", clean(m)))
                        .collect::<Vec<_>>()
                        .join(", "),
                    if unknown.len() == 1 { "it" } else { "them" },
                    if unknown.len() == 1 { "it" } else { "them" },
                    if configured.is_empty() {
                        "none".to_string()
                    } else {
                        configured.join(", ")
                    }
                );
            }
            key.created_by = Some("cli".into());
            let (store, log) = open_with_audit(store_url).await?;
            // Running gateways poll for keys by the time they were written: the time now, after
            // the store was opened (and perhaps waited for), not when the command began.
            key.updated_at = Utc::now().max(key.updated_at);
            store
                .insert_key(&key)
                .await
                .context("storing the new key")?;
            audit(
                log.as_ref(),
                "keys.create",
                &key.id,
                serde_json::json!({"name": key.name, "role": key.role, "models": key.models}),
            )
            .await?;
            crate::output_at_stake(Some(format!(
                "key {} was created but its secret, shown only once, did not reach the output; revoke it with `sluice keys revoke {}` and create another",
                key.id, key.id
            )));
            if args.json {
                let mut v = key.to_json(now);
                v["key"] = Value::String(secret);
                print_json(&v);
                crate::output_at_stake(None);
            } else {
                outln!("Created key {} ({}):", key.id, clean(&key.name));
                outln!();
                outln!("    {secret}");
                // The secret is out; what follows is advice.
                crate::output_at_stake(None);
                outln!();
                outln!(
                    "This key will not be shown again: Sluice keeps only its hash, so copy it now."
                );
                outln!("Clients send it as `Authorization: Bearer <key>` (or `x-api-key: <key>`).");
            }
            crate::output_at_stake(None);
        }
        KeysCommand::List { json } => {
            let keys = open(store_url).await?.list_keys().await?;
            if json {
                // The shape of `GET /api/keys`.
                print_json(&serde_json::json!({
                    "object": "list",
                    "data": keys.iter().map(|k| k.to_json(now)).collect::<Vec<_>>(),
                }));
            } else if keys.is_empty() {
                outln!("no keys yet; issue one with `sluice keys create --name NAME`");
            } else {
                print_table(&keys, now);
            }
        }
        KeysCommand::Show { id, json } => {
            let Some(k) = open(store_url).await?.get_key(&id).await? else {
                bail!("no key `{id}`\n{LIST_HINT}");
            };
            if json {
                print_json(&k.to_json(now));
            } else {
                print_details(&k, now);
            }
        }
        KeysCommand::Revoke { id, json } => {
            let (store, log) = open_with_audit(store_url).await?;
            let now = Utc::now();
            if !store.revoke_key(&id, now).await? {
                let (why, e) = not_usable(store.as_ref(), &id, "revoked").await;
                audit_failure(log.as_ref(), &format!("keys revoke {id}"), why).await;
                return Err(e);
            }
            audit(log.as_ref(), "keys.revoke", &id, Value::Null).await?;
            let k = store
                .get_key(&id)
                .await?
                .with_context(|| format!("key `{id}` vanished after it was revoked"))?;
            if json {
                print_json(&k.to_json(now));
            } else {
                outln!(
                    "Revoked key {} ({}); it no longer works (running gateways stop accepting it within a second).",
                    k.id,
                    clean(&k.name)
                );
            }
        }
        KeysCommand::Rotate { id, json } => {
            let (store, log) = open_with_audit(store_url).await?;
            let now = Utc::now();
            let command = format!("keys rotate {id}");
            match store.get_key(&id).await? {
                None => {
                    audit_failure(log.as_ref(), &command, "not_found").await;
                    bail!("no key `{id}`\n{LIST_HINT}")
                }
                Some(k) if k.check(now) == Err(KeyRejection::Expired) => {
                    audit_failure(log.as_ref(), &command, "expired").await;
                    bail!(
                        "key `{id}` ({}) expired at {}; a rotated key keeps its expiry\nhint: issue a new key with `sluice keys create --name NAME`",
                        clean(&k.name),
                        k.expires_at.map(long_time).unwrap_or_default()
                    )
                }
                Some(_) => {}
            }
            let fresh = generate(Some(&id)).map_err(|e| anyhow!(e))?;
            if !store.rotate_key(&id, &fresh.hash, now).await? {
                let (why, e) = not_usable(store.as_ref(), &id, "rotated").await;
                audit_failure(log.as_ref(), &command, why).await;
                return Err(e);
            }
            audit(log.as_ref(), "keys.rotate", &id, Value::Null).await?;
            let k = store
                .get_key(&id)
                .await?
                .with_context(|| format!("key `{id}` vanished after it was rotated"))?;
            crate::output_at_stake(Some(format!(
                "key {} was rotated but its new secret, shown only once, did not reach the output; rotate it again with `sluice keys rotate {}`",
                k.id, k.id
            )));
            if json {
                let mut v = k.to_json(now);
                v["key"] = Value::String(fresh.key);
                print_json(&v);
                crate::output_at_stake(None);
            } else {
                outln!("Rotated key {} ({}); its new secret:", k.id, clean(&k.name));
                outln!();
                outln!("    {}", fresh.key);
                crate::output_at_stake(None);
                outln!();
                outln!(
                    "This key will not be shown again: Sluice keeps only its hash, so copy it now."
                );
                outln!(
                    "The old key no longer works (running gateways stop accepting it within a second)."
                );
            }
            crate::output_at_stake(None);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    #[test]
    fn expires_takes_a_duration_from_now_or_a_time() {
        let now = DateTime::parse_from_rfc3339("2025-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        for (s, secs) in [("30s", 30), ("15m", 900), ("2h", 7200), ("30d", 2_592_000)] {
            assert_eq!(
                parse_expires(s, now).unwrap(),
                now + TimeDelta::seconds(secs),
                "{s}"
            );
        }
        assert_eq!(
            parse_expires("2025-02-01T12:00:00+01:00", now).unwrap(),
            DateTime::parse_from_rfc3339("2025-02-01T11:00:00Z").unwrap()
        );
        for bad in ["", "d", "5w", "-5d", "soon", "99999999999999999999d"] {
            assert!(parse_expires(bad, now).is_err(), "{bad}");
        }
        assert!(parse_expires("9999999999999d", now).is_err());
    }

    #[test]
    fn a_whole_key_stands_for_its_id() {
        let (k, secret) = KeySpec {
            name: "n".into(),
            ..KeySpec::default()
        }
        .issue(Utc::now())
        .unwrap();
        let mut given = secret.clone();
        id_of(&mut given).unwrap();
        assert_eq!(given, k.id);
        let mut plain = k.id.clone();
        id_of(&mut plain).unwrap();
        assert_eq!(plain, k.id);
        // Copied in capitals: the same id.
        let mut upper = k.id.to_ascii_uppercase();
        id_of(&mut upper).unwrap();
        assert_eq!(upper, k.id);
        let mut bad = "sk-sluice-nothex".to_string();
        let e = id_of(&mut bad).unwrap_err().to_string();
        assert!(e.contains("not the shape") && !e.contains("nothex"), "{e}");
    }

    #[test]
    fn limits_and_owner_read_compactly() {
        let (k, _) = KeySpec {
            name: "n".into(),
            rpm: Some(60),
            budget: Budget {
                daily_usd: Some(5.0),
                total_usd: Some(12.5),
                ..Budget::default()
            },
            owner: Owner {
                team: Some("search".into()),
                ..Owner::default()
            },
            ..KeySpec::default()
        }
        .issue(Utc::now())
        .unwrap();
        assert_eq!(limits_text(&k), "rpm=60 $5/day $12.50 total");
        assert_eq!(owner_text(&k.owner), "team=search");
        assert_eq!(models_text(&k), "*");
        assert_eq!(owner_text(&Owner::default()), "-");
    }
}
