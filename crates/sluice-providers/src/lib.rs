//! Sluice's providers, one module each: [`openai`] (OpenAI and every OpenAI-compatible server,
//! plus Azure OpenAI), [`anthropic`], [`gemini`], [`local`] (models running in-process on the
//! CPU), and [`mock`], a deterministic test double.
//!
//! A provider is configured by one [`ProviderConfig`] variant (`type = "…"` in `sluice.toml`) and
//! built into an `Arc<dyn ChatProvider>` by [`ProviderConfig::build`]. Adding a provider is one
//! module, one variant and one line in `build`.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use sluice_core::provider::ChatProvider;

pub mod anthropic;
pub mod gemini;
pub mod http;
pub mod local;
pub mod mock;
pub mod openai;
pub mod sse;

/// A request that could not be translated for a provider: unsupported (422) or malformed (400).
pub(crate) fn translate_error(e: sluice_types::TranslateError) -> sluice_core::ProviderError {
    match e.1 {
        sluice_types::TranslateKind::Unsupported => sluice_core::ProviderError::Unsupported(e.0),
        sluice_types::TranslateKind::Invalid => sluice_core::ProviderError::Invalid(e.0),
    }
}

/// One `[providers.NAME]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ProviderConfig {
    Openai(openai::OpenAiConfig),
    Azure(openai::AzureConfig),
    Anthropic(anthropic::AnthropicConfig),
    Gemini(gemini::GeminiConfig),
    Local(local::LocalConfig),
    Mock(mock::MockConfig),
}

impl ProviderConfig {
    /// The provider type name.
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderConfig::Openai(_) => "openai",
            ProviderConfig::Azure(_) => "azure",
            ProviderConfig::Anthropic(_) => "anthropic",
            ProviderConfig::Gemini(_) => "gemini",
            ProviderConfig::Local(_) => "local",
            ProviderConfig::Mock(_) => "mock",
        }
    }

    /// Builds the running provider. Errors name the offending key relative to the table.
    pub fn build(&self) -> Result<Arc<dyn ChatProvider>, String> {
        Ok(match self {
            ProviderConfig::Openai(c) => Arc::new(openai::OpenAi::new(c)?),
            ProviderConfig::Azure(c) => Arc::new(openai::OpenAi::azure(c)?),
            ProviderConfig::Anthropic(c) => Arc::new(anthropic::Anthropic::new(c)?),
            ProviderConfig::Gemini(c) => Arc::new(gemini::Gemini::new(c)?),
            ProviderConfig::Local(c) => local::build(c)?,
            ProviderConfig::Mock(c) => Arc::new(mock::Mock::new(c)?),
        })
    }
}

/// A base URL without its trailing slash, checked to be http(s).
pub(crate) fn base_url(url: &str) -> Result<&str, String> {
    let base = url.trim_end_matches('/');
    if base.contains(['?', '#']) {
        // The paths Sluice appends would land inside the query.
        Err(format!(
            "base_url: `{base}` has a query or fragment; give the API root alone (a key goes in api_key or headers)"
        ))
    } else if base.starts_with("http://") || base.starts_with("https://") {
        // The paths Sluice appends make no URL of a root that is none. (Checked by hand: a
        // host in another script, or a space in the path, is taken by the HTTP client.)
        let rest = base.split_once("://").map_or("", |(_, r)| r);
        let authority = rest.split('/').next().unwrap_or("");
        let host = authority.rsplit('@').next().unwrap_or("");
        let host = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => host.split(':').next().unwrap_or(""),
        };
        if host.is_empty() {
            Err(format!(
                "base_url: `{url}` has no host; give the API root, for example http://localhost:8000/v1"
            ))
        } else if authority
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            Err(format!(
                "base_url: `{url}` is not a URL (a space or control character in its host)"
            ))
        } else {
            Ok(base)
        }
    } else if url.starts_with("http://") || url.starts_with("https://") {
        Err(format!(
            "base_url: `{url}` has no host; give the API root, for example http://localhost:8000/v1"
        ))
    } else {
        Err(format!(
            "base_url: `{base}` must start with http:// or https://"
        ))
    }
}

/// Configured extra headers as a header map.
pub(crate) fn header_map(headers: &BTreeMap<String, String>) -> Result<::http::HeaderMap, String> {
    let mut map = ::http::HeaderMap::new();
    for (k, v) in headers {
        let name = ::http::HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| format!("headers: `{k}` is not a valid header name"))?;
        let value = ::http::HeaderValue::from_str(v)
            .map_err(|_| format!("headers.{k}: not a valid header value"))?;
        map.insert(name, value);
    }
    Ok(map)
}

/// A secret header value (an API key), marked sensitive so that it never shows in debug output.
pub(crate) fn secret_header(value: &str) -> Result<::http::HeaderValue, String> {
    let mut v = ::http::HeaderValue::from_str(value)
        .map_err(|_| "api_key: contains characters not allowed in an HTTP header".to_string())?;
    v.set_sensitive(true);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::base_url;

    #[test]
    fn base_urls_need_a_scheme_and_a_host() {
        for ok in [
            "http://localhost:11434",
            "http://localhost:8000/v1/",
            "https://api.openai.com/v1",
            "http://[::1]:8000/v1",
            "http://user@host:80/v1",
            "https://bücher.example/v1",
            "http://host/a path/v1",
        ] {
            assert!(base_url(ok).is_ok(), "{ok}");
        }
        for (bad, says) in [
            ("http://", "has no host"),
            ("https:///v1", "has no host"),
            ("http://:8000/v1", "has no host"),
            ("http://[]/v1", "has no host"),
            ("http://exa mple.com/v1", "is not a URL"),
            ("localhost:8000", "must start with"),
            ("http://h/v1?x=1", "query"),
        ] {
            let e = base_url(bad).unwrap_err();
            assert!(e.contains(says) && e.contains(bad), "{bad}: {e}");
        }
    }
}
