//! Secret references.
//!
//! A secret in configuration is written `env::NAME` (read from the environment) or `file::PATH`
//! (the file's contents, trimmed). A plain string is taken literally, for local development. The
//! resolved value never appears in `Debug` or `Display` output.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// A resolved secret value that does not print.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A reference to a secret as written in configuration, not yet resolved.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretRef(String);

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.starts_with("env::") || self.0.starts_with("file::") {
            write!(f, "SecretRef({})", self.0)
        } else {
            f.write_str("SecretRef(<literal>)")
        }
    }
}

impl<'de> Deserialize<'de> for SecretRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = SecretRef;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string (a secret, `env::VAR` or `file::PATH`)")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SecretRef, E> {
                Ok(SecretRef(v.to_string()))
            }

            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<SecretRef, E> {
                Ok(SecretRef(v))
            }

            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<SecretRef, E> {
                Err(E::custom(NOT_TEXT))
            }

            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<SecretRef, E> {
                Err(E::custom(NOT_TEXT))
            }

            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<SecretRef, E> {
                Err(E::custom(NOT_TEXT))
            }

            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<SecretRef, E> {
                Err(E::custom(NOT_TEXT))
            }
        }
        d.deserialize_any(Text)
    }
}

/// A secret written as a number (in a `SLUICE__…` variable, digits are read as one).
const NOT_TEXT: &str = "a secret must be a string, and this one was read as a number or boolean; \
    quote it (in a SLUICE__ variable: SLUICE__…='\"12345\"') or use `env::VAR`";

impl SecretRef {
    pub fn literal(value: impl Into<String>) -> Self {
        SecretRef(value.into())
    }

    /// Resolves the reference: reads the environment variable or the file it names.
    pub fn resolve(&self) -> Result<Secret, String> {
        if let Some(name) = self.0.strip_prefix("env::") {
            match std::env::var(name) {
                Ok(v) if !v.is_empty() => Ok(Secret(v)),
                Ok(_) => Err(format!("environment variable `{name}` is empty")),
                Err(_) => Err(format!(
                    "environment variable `{name}` is not set (export it, or change the reference)"
                )),
            }
        } else if let Some(path) = self.0.strip_prefix("file::") {
            std::fs::read_to_string(path)
                .map(|s| Secret(s.trim().to_string()))
                .map_err(|e| format!("cannot read secret file `{path}`: {e}"))
        } else {
            Ok(Secret(self.0.clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = SecretRef::literal("sk-very-secret").resolve().unwrap();
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert!(!format!("{:?}", SecretRef::literal("sk-very-secret")).contains("sk-"));
    }

    #[test]
    fn missing_env_is_a_clear_error() {
        let err = SecretRef("env::SLUICE_TEST_DEFINITELY_UNSET".into())
            .resolve()
            .unwrap_err();
        assert!(err.contains("SLUICE_TEST_DEFINITELY_UNSET"), "{err}");
    }
}
