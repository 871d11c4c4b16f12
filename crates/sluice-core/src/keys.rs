//! Virtual keys: the API keys Sluice issues to its clients.
//!
//! A key is `sk-sluice-<id>-<secret>`: `id` (16 lowercase hex characters) names the stored key
//! and may be shown anywhere; `secret` (43 base64url characters, 256 random bits) is never
//! stored. The store keeps the SHA-256 of the whole key, and a presented key is checked by
//! comparing digests in constant time after looking its id up. A fast hash is the right one here:
//! the secret is random, so there is nothing to guess that a slow hash would protect.

use async_trait::async_trait;
use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::record::StoreError;

/// What every virtual key starts with.
pub const KEY_PREFIX: &str = "sk-sluice-";

/// Who a key belongs to, for attribution, team budgets and usage by team. Unknown fields are
/// refused: a misspelt `team` would leave the key outside its team's budget.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Owner {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
}

/// What a key may do on the admin API (`/api`). A key without a role is a client key: `/v1`
/// only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything.
    Admin,
    /// Reads everything; creates keys, and rotates and revokes the keys it created.
    Developer,
    /// Reads everything, changes nothing.
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Developer => "developer",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "developer" => Some(Role::Developer),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

/// Who did something on the admin API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// `admin-key` (SLUICE_ADMIN_KEY), `local` (an open loopback gateway), or `key:ID`.
    pub name: String,
    pub role: Role,
}

/// One admin action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: String,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub role: String,
    /// What was done, e.g. `keys.create`, `keys.revoke`, `config.reload`, or `denied`.
    pub action: String,
    /// What it was done to (a key id, …).
    pub target: Option<String>,
    /// `ok`, or why it failed.
    pub outcome: String,
    pub detail: Value,
}

impl AuditEntry {
    /// An entry made now, with a fresh id.
    pub fn new(
        actor: &str,
        role: &str,
        action: &str,
        target: Option<&str>,
        outcome: &str,
        detail: Value,
    ) -> Self {
        AuditEntry {
            id: sluice_types::ids::new_request_id().hyphenated().to_string(),
            at: Utc::now(),
            actor: actor.to_string(),
            role: role.to_string(),
            action: action.to_string(),
            target: target.map(str::to_string),
            outcome: outcome.to_string(),
            detail,
        }
    }
}

/// Where admin actions are kept.
#[async_trait]
pub trait AuditStore: Send + Sync + 'static {
    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError>;
    /// Newest first.
    async fn list_audit(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError>;
}

/// Spend limits in USD; `None` is no limit. Unknown fields are refused: a misspelt limit would
/// otherwise leave no limit at all.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_usd: Option<f64>,
}

/// A stored virtual key (never its secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VirtualKey {
    pub id: String,
    pub name: String,
    /// The SHA-256 of the whole key, lowercase hex. Not serialized to clients.
    #[serde(skip)]
    pub hash: String,
    #[serde(default)]
    pub owner: Owner,
    /// Models the key may use; empty means every model.
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<u32>,
    #[serde(default)]
    pub budget: Budget,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub metadata: Value,
    pub created_at: DateTime<Utc>,
    /// Changes with every write (creation, rotation, revocation): what replicas poll for.
    pub updated_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
    /// Its admin-API role, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// Who created it (an [`Actor`] name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
}

/// Why a presented key is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRejection {
    Unknown,
    /// The key exists, but this is not its secret (a typo, or the key was rotated).
    NotItsSecret,
    Revoked,
    Expired,
}

impl KeyRejection {
    /// The message for the 401.
    pub fn message(self) -> &'static str {
        match self {
            KeyRejection::Unknown => {
                "invalid API key: no such Sluice key (check for a typo, or create one with `sluice keys create`)"
            }
            KeyRejection::NotItsSecret => {
                "invalid API key: this key's id exists but its secret does not match (a typo, or the key was rotated: the new secret was shown once, when it was)"
            }
            KeyRejection::Revoked => {
                "this API key has been revoked; ask the gateway's operator for a new one"
            }
            KeyRejection::Expired => {
                "this API key has expired; ask the gateway's operator for a new one"
            }
        }
    }
}

impl VirtualKey {
    /// `active`, `revoked` or `expired` at `now`.
    pub fn status(&self, now: DateTime<Utc>) -> &'static str {
        match self.check(now) {
            Ok(()) => "active",
            Err(KeyRejection::Revoked) => "revoked",
            Err(KeyRejection::Expired) => "expired",
            Err(KeyRejection::Unknown | KeyRejection::NotItsSecret) => "unknown",
        }
    }

    /// The key as the API and the CLI show it: its fields (never its hash) and its `status`.
    pub fn to_json(&self, now: DateTime<Utc>) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = v.as_object_mut() {
            map.insert("status".into(), self.status(now).into());
        }
        v
    }

    /// Whether the key may be used now. A revocation is in force as soon as it is seen, whatever
    /// the clock of the replica that wrote it (revocations are never dated ahead).
    pub fn check(&self, now: DateTime<Utc>) -> Result<(), KeyRejection> {
        if self.revoked_at.is_some() {
            return Err(KeyRejection::Revoked);
        }
        if self.expires_at.is_some_and(|t| t <= now) {
            return Err(KeyRejection::Expired);
        }
        Ok(())
    }

    /// Whether the key may use `model`.
    pub fn allows_model(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }

    /// Whether `presented` is this key (constant time in the digest comparison).
    pub fn matches(&self, presented: &str) -> bool {
        constant_time_eq(hash_key(presented).as_bytes(), self.hash.as_bytes())
    }
}

/// What a new key carries (the body of `POST /api/keys`, the flags of `sluice keys create`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    pub name: String,
    #[serde(default)]
    pub owner: Owner,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub rpm: Option<u64>,
    #[serde(default)]
    pub tpm: Option<u64>,
    #[serde(default)]
    pub max_parallel: Option<u32>,
    #[serde(default)]
    pub budget: Budget,
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub metadata: Value,
    /// An admin-API role (`admin`, `developer`, `viewer`); none for a client key.
    #[serde(default)]
    pub role: Option<Role>,
}

impl KeySpec {
    /// Checks the spec; errors name the field.
    pub fn validate(&self, now: DateTime<Utc>) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("name: must not be empty".into());
        }
        if self.name.chars().count() > 200 {
            return Err("name: at most 200 characters".into());
        }
        for (field, value) in [
            ("owner.user", &self.owner.user),
            ("owner.team", &self.owner.team),
            ("owner.project", &self.owner.project),
        ] {
            if value.as_ref().is_some_and(|v| v.len() > 256) {
                return Err(format!("{field}: at most 256 bytes"));
            }
        }
        if self.models.iter().any(|m| m.trim().is_empty()) {
            return Err("models: names must not be empty".into());
        }
        for (k, zero) in [
            ("rpm", self.rpm == Some(0)),
            ("tpm", self.tpm == Some(0)),
            ("max_parallel", self.max_parallel == Some(0)),
        ] {
            if zero {
                return Err(format!(
                    "{k}: a limit must be at least 1 (leave it out for none)"
                ));
            }
        }
        // Stores keep limits as signed 64-bit integers.
        for (k, v) in [("rpm", self.rpm), ("tpm", self.tpm)] {
            if let Some(v) = v
                && v > i64::MAX as u64
            {
                return Err(format!("{k}: at most {} (got {v})", i64::MAX));
            }
        }
        for (k, v) in [
            ("budget.daily_usd", self.budget.daily_usd),
            ("budget.monthly_usd", self.budget.monthly_usd),
            ("budget.total_usd", self.budget.total_usd),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v >= 0.0)
            {
                return Err(format!(
                    "{k}: must be a non-negative number of USD, got {v}"
                ));
            }
        }
        if let Some(t) = self.expires_at
            && t <= now
        {
            return Err(format!(
                "expires_at: {} is in the past",
                t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ));
        }
        if !(self.metadata.is_null() || self.metadata.is_object()) {
            return Err("metadata: must be a JSON object".into());
        }
        Ok(())
    }

    /// Makes the key: what to store, and the key itself (to show once).
    pub fn issue(self, now: DateTime<Utc>) -> Result<(VirtualKey, String), String> {
        self.validate(now)?;
        let NewKey { id, key, hash } = generate(None)?;
        Ok((
            VirtualKey {
                id,
                name: self.name.trim().to_string(),
                hash,
                owner: self.owner,
                models: self.models,
                rpm: self.rpm,
                tpm: self.tpm,
                max_parallel: self.max_parallel,
                budget: self.budget,
                expires_at: self.expires_at,
                metadata: self.metadata,
                created_at: now,
                updated_at: now,
                revoked_at: None,
                role: self.role,
                created_by: None,
            },
            key,
        ))
    }
}

/// A new key: the secret to hand out once, and the id and hash to store.
#[derive(Debug)]
pub struct NewKey {
    pub id: String,
    /// The whole key, shown once.
    pub key: String,
    pub hash: String,
}

/// Makes a key with fresh randomness from the operating system; `id` keeps an existing key's
/// id (rotation).
pub fn generate(id: Option<&str>) -> Result<NewKey, String> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| format!("no randomness from the OS: {e}"))?;
    let id = match id {
        Some(i) => i.to_string(),
        None => {
            let mut raw = [0u8; 8];
            getrandom::fill(&mut raw).map_err(|e| format!("no randomness from the OS: {e}"))?;
            raw.iter().map(|b| format!("{b:02x}")).collect()
        }
    };
    let key = format!(
        "{KEY_PREFIX}{id}-{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    );
    let hash = hash_key(&key);
    Ok(NewKey { id, key, hash })
}

/// The id part of a presented key, when it has the shape of a Sluice key.
pub fn key_id(presented: &str) -> Option<&str> {
    let rest = presented.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('-')?;
    (id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) && !secret.is_empty())
        .then_some(id)
}

/// SHA-256 of a key, lowercase hex.
pub fn hash_key(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Compares secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Where keys are kept.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    async fn insert_key(&self, key: &VirtualKey) -> Result<(), StoreError>;
    async fn get_key(&self, id: &str) -> Result<Option<VirtualKey>, StoreError>;
    /// Every key, revoked ones included, newest first.
    async fn list_keys(&self) -> Result<Vec<VirtualKey>, StoreError>;
    /// Keys written at or after `since` (for replicas keeping a cache fresh).
    async fn keys_changed_since(&self, since: DateTime<Utc>)
    -> Result<Vec<VirtualKey>, StoreError>;
    /// Replaces a key's hash (rotation); `false` when there is no such active key.
    async fn rotate_key(&self, id: &str, hash: &str, at: DateTime<Utc>)
    -> Result<bool, StoreError>;
    /// Revokes a key; `false` when there is no such key or it was already revoked.
    async fn revoke_key(&self, id: &str, at: DateTime<Utc>) -> Result<bool, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_an_id_a_secret_and_only_their_hash_matches() {
        let k = generate(None).unwrap();
        assert!(k.key.starts_with(KEY_PREFIX));
        assert_eq!(key_id(&k.key), Some(k.id.as_str()));
        assert_eq!(k.hash.len(), 64);
        assert!(!k.hash.contains(&k.key[KEY_PREFIX.len()..]));
        let other = generate(None).unwrap();
        assert_ne!(k.key, other.key);
        assert_ne!(k.id, other.id);
        let now = Utc::now();
        let vk = VirtualKey {
            id: k.id.clone(),
            name: "t".into(),
            hash: k.hash.clone(),
            owner: Owner::default(),
            models: vec!["a".into()],
            rpm: None,
            tpm: None,
            max_parallel: None,
            budget: Budget::default(),
            expires_at: None,
            metadata: Value::Null,
            created_at: now,
            updated_at: now,
            revoked_at: None,
            role: None,
            created_by: None,
        };
        assert!(vk.matches(&k.key));
        assert!(!vk.matches(&other.key));
        assert!(vk.allows_model("a") && !vk.allows_model("b"));
        assert_eq!(vk.check(now), Ok(()));
        let expired = VirtualKey {
            expires_at: Some(now - chrono::Duration::seconds(1)),
            ..vk.clone()
        };
        assert_eq!(expired.check(now), Err(KeyRejection::Expired));
        let revoked = VirtualKey {
            revoked_at: Some(now),
            ..vk.clone()
        };
        assert_eq!(revoked.check(now), Err(KeyRejection::Revoked));
        // Revoked by a replica whose clock runs ahead: in force here at once.
        let ahead = VirtualKey {
            revoked_at: Some(now + chrono::Duration::minutes(2)),
            ..vk.clone()
        };
        assert_eq!(ahead.check(now), Err(KeyRejection::Revoked));
        // The hash never leaves through serialization.
        assert!(!serde_json::to_string(&vk).unwrap().contains(&vk.hash));
        // Rotation keeps the id, changes the secret.
        let r = generate(Some(&k.id)).unwrap();
        assert_eq!(r.id, k.id);
        assert_ne!(r.key, k.key);
    }

    /// A misspelt owner field is refused (it was dropped, and the key stood outside its team's
    /// budget).
    #[test]
    fn a_misspelt_owner_field_is_refused() {
        let e = serde_json::from_str::<KeySpec>(r#"{"name": "k", "owner": {"teams": "ml"}}"#)
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `teams`"), "{e}");
        let ok: KeySpec =
            serde_json::from_str(r#"{"name": "k", "owner": {"team": "ml", "user": "u"}}"#).unwrap();
        assert_eq!(ok.owner.team.as_deref(), Some("ml"));
    }

    #[test]
    fn limits_a_store_cannot_hold_are_refused() {
        let spec = |rpm: u64| KeySpec {
            name: "k".into(),
            rpm: Some(rpm),
            ..serde_json::from_str(r#"{"name": "k"}"#).unwrap()
        };
        let now = Utc::now();
        assert_eq!(spec(i64::MAX as u64).validate(now), Ok(()));
        let err = spec(u64::MAX).validate(now).unwrap_err();
        assert!(err.starts_with("rpm: at most 9223372036854775807"), "{err}");
        // A name's bound is in characters, as its message says.
        let named = |name: String| KeySpec {
            name,
            ..serde_json::from_str(r#"{"name": "k"}"#).unwrap()
        };
        assert_eq!(named("é".repeat(200)).validate(now), Ok(()));
        assert!(named("é".repeat(201)).validate(now).is_err());
    }

    #[test]
    fn only_well_formed_keys_have_an_id() {
        assert_eq!(
            key_id("sk-sluice-0123456789abcdef-secret"),
            Some("0123456789abcdef")
        );
        for bad in [
            "sk-sluice-0123456789abcdef-",
            "sk-sluice-0123-secret",
            "sk-other-0123456789abcdef-secret",
            "sk-sluice-0123456789abcdeg-secret",
            "",
        ] {
            assert_eq!(key_id(bad), None, "{bad}");
        }
    }
}
