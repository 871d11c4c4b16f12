//! `sluice.toml`: the raw schema, its layers, and the validated [`Config`].
//!
//! Layers, later wins: built-in defaults → the file → `SLUICE__SECTION__KEY` environment
//! variables → command-line flags. Every table rejects unknown keys; every error names the key
//! path. Validation resolves every reference once (models → providers → secrets) and builds the
//! running providers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;
use sluice_core::price::PriceTable;
use sluice_core::provider::ChatProvider;
use sluice_gateway::router::{DeploymentState, build_group};
use sluice_gateway::{ModelConfig, Router};
use sluice_providers::ProviderConfig;
use sluice_server::ServerConfig;
use sluice_store::StoreConfig;

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
    #[serde(default)]
    pub models: BTreeMap<String, ModelConfig>,
    /// Rate limits per user, per model and global (each key's own are on the key).
    #[serde(default)]
    pub limits: sluice_gateway::limits::LimitsConfig,
    /// Spend limits per user and team (each key's own are on the key).
    #[serde(default)]
    pub budgets: sluice_gateway::budget::BudgetsConfig,
    /// The exact response cache.
    #[serde(default)]
    pub cache: sluice_gateway::cache::CacheConfig,
    /// Shared state for replicas (Redis).
    #[serde(default)]
    pub state: sluice_gateway::state::StateConfig,
}

/// The configuration Sluice uses when there is no file: the embedded SQLite store and the local
/// models found in the models directory — `smollm2-135m` (chat, SmolLM2-135M-Instruct GGUF) and
/// `minilm-l6` (embeddings, all-MiniLM-L6-v2), installed by `sluice models pull`. When neither is
/// installed, the only model is `mock-echo`, served by the mock provider (a test double that
/// echoes the last user message), and `sluice serve` says so.
pub fn embedded_default(models_dir: &Path) -> String {
    let mut out = String::new();
    let chat = models_dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let embed = models_dir.join("all-MiniLM-L6-v2");
    // A configuration names its files in UTF-8: a directory whose path is not cannot be named.
    let nameable = models_dir.to_str().is_some();
    if nameable && chat.is_file() {
        out.push_str(&format!(
            "[providers.local-chat]\ntype = \"local\"\npath = {}\n\n[models.\"smollm2-135m\"]\ndeployments = [{{ provider = \"local-chat\", model = \"smollm2-135m\" }}]\n\n",
            toml_string(&chat)
        ));
    }
    if nameable && embed.join("model.safetensors").is_file() {
        out.push_str(&format!(
            "[providers.local-embed]\ntype = \"local\"\npath = {}\n\n[models.\"minilm-l6\"]\ndeployments = [{{ provider = \"local-embed\", model = \"minilm-l6\" }}]\n\n",
            toml_string(&embed)
        ));
    }
    if out.is_empty() {
        out.push_str(MOCK_FALLBACK);
    }
    out
}

/// The embedded default when no local model is installed.
pub const MOCK_FALLBACK: &str = r#"
[providers.mock]
type = "mock"

[models."mock-echo"]
deployments = [{ provider = "mock", model = "mock-echo" }]
"#;

fn toml_string(p: &Path) -> String {
    toml::Value::String(p.display().to_string()).to_string()
}

/// Where the configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    EmbeddedDefault,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::EmbeddedDefault => f.write_str("the embedded default (no config file)"),
        }
    }
}

/// Picks the file: `--config`, else `SLUICE_CONFIG`, else `./sluice.toml` if present, else the
/// embedded default.
pub fn locate(flag: Option<&Path>) -> Source {
    if let Some(p) = flag {
        return Source::File(p.to_path_buf());
    }
    // Any path, UTF-8 or not (one that is not was taken for unset).
    if let Some(p) = std::env::var_os("SLUICE_CONFIG")
        && !p.is_empty()
    {
        return Source::File(PathBuf::from(p));
    }
    let local = PathBuf::from("sluice.toml");
    if local.is_file() {
        return Source::File(local);
    }
    Source::EmbeddedDefault
}

/// Overrides from command-line flags.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub store_url: Option<String>,
}

/// Reads and layers the raw configuration.
pub fn load_raw(source: &Source, overrides: &Overrides) -> Result<RawConfig, String> {
    let mut fig = Figment::new();
    match source {
        Source::File(p) => {
            if !p.is_file() {
                let what = if p.is_dir() {
                    "is a directory, not a file"
                } else {
                    "does not exist"
                };
                let from_env =
                    std::env::var_os("SLUICE_CONFIG").is_some_and(|v| v == p.as_os_str());
                let hint = if from_env {
                    "unset SLUICE_CONFIG to use ./sluice.toml or the embedded default"
                } else {
                    "run without --config to use the embedded default"
                };
                return Err(format!(
                    "config file `{}` {what} (hint: {hint})",
                    p.display()
                ));
            }
            // What the TOML reader would say without the file's name or a hint.
            let bytes = std::fs::read(p)
                .map_err(|e| format!("cannot read config file `{}`: {e}", p.display()))?;
            if let Err(e) = std::str::from_utf8(&bytes) {
                let at = e.valid_up_to();
                let line = bytes[..at].iter().filter(|b| **b == b'\n').count() + 1;
                return Err(format!(
                    "config file `{}` is not UTF-8 text (line {line}, byte {} of the file) (hint: save it as UTF-8)",
                    p.display(),
                    at + 1
                ));
            }
            fig = fig.merge(Toml::file_exact(p));
        }
        Source::EmbeddedDefault => {
            fig = fig.merge(Toml::string(&embedded_default(&crate::models::models_dir(
                None,
            ))))
        }
    }
    fig = fig.merge(Env::prefixed("SLUICE__").split("__"));
    if let Some(l) = &overrides.listen {
        fig = fig.merge(("server.listen", l.as_str()));
    }
    if let Some(u) = &overrides.store_url {
        fig = fig.merge(("store.url", u.as_str()));
    }
    fig.extract::<RawConfig>()
        .map_err(|e| figment_message(with_provider_paths(&fig, e)))
}

/// Errors inside a `[providers.NAME]` table come out of its `type`-tagged enum without the key
/// they are about (`providers.p: invalid type…`): each such table is read again as the type it
/// names, which finds the key (`providers.p.api_key: invalid type…`).
fn with_provider_paths(fig: &Figment, err: figment::Error) -> figment::Error {
    use sluice_providers::{anthropic, gemini, local, mock, openai};
    let mut out: Option<figment::Error> = None;
    for e in err {
        let better = match e.path.as_slice() {
            [providers, name] if providers == "providers" && !name.contains('.') => {
                let table = fig.focus(&format!("providers.{name}"));
                let kind: Option<String> = table.extract_inner("type").ok();
                let found = match kind.as_deref() {
                    Some("openai") => table.extract::<SkipType<openai::OpenAiConfig>>().err(),
                    Some("azure") => table.extract::<SkipType<openai::AzureConfig>>().err(),
                    Some("anthropic") => table
                        .extract::<SkipType<anthropic::AnthropicConfig>>()
                        .err(),
                    Some("gemini") => table.extract::<SkipType<gemini::GeminiConfig>>().err(),
                    Some("local") => table.extract::<SkipType<local::LocalConfig>>().err(),
                    Some("mock") => table.extract::<SkipType<mock::MockConfig>>().err(),
                    _ => None,
                };
                found.map(|mut f| {
                    f.path.splice(0..0, [providers.clone(), name.clone()]);
                    f
                })
            }
            _ => None,
        };
        let e = better.unwrap_or(e);
        out = Some(match out {
            None => e,
            Some(prev) => prev.chain(e),
        });
    }
    out.unwrap_or_else(|| figment::Error::from("invalid configuration".to_string()))
}

/// Deserializes `T` from a table, leaving out its `type` key (which the tagged enum reads).
struct SkipType<T>(#[allow(dead_code)] T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for SkipType<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(skip_type::Table(d)).map(SkipType)
    }
}

mod skip_type {
    use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

    /// A deserializer of a table whose `type` key is skipped.
    pub struct Table<D>(pub D);

    impl<'de, D: Deserializer<'de>> Deserializer<'de> for Table<D> {
        type Error = D::Error;

        fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
            self.0.deserialize_map(Skip(v))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
            identifier ignored_any
        }
    }

    struct Skip<V>(V);

    impl<'de, V: Visitor<'de>> Visitor<'de> for Skip<V> {
        type Value = V::Value;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            self.0.expecting(f)
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
            self.0.visit_map(Entries(map))
        }
    }

    struct Entries<A>(A);

    impl<'de, A: MapAccess<'de>> MapAccess<'de> for Entries<A> {
        type Error = A::Error;

        fn next_key_seed<K: DeserializeSeed<'de>>(
            &mut self,
            seed: K,
        ) -> Result<Option<K::Value>, A::Error> {
            let mut seed = Some(seed);
            loop {
                match self.0.next_key_seed(Key(&mut seed))? {
                    None => return Ok(None),
                    Some(Some(k)) => return Ok(Some(k)),
                    // `type`: skip its value.
                    Some(None) => {
                        self.0.next_value::<IgnoredAny>()?;
                    }
                }
            }
        }

        fn next_value_seed<S: DeserializeSeed<'de>>(
            &mut self,
            seed: S,
        ) -> Result<S::Value, A::Error> {
            self.0.next_value_seed(seed)
        }
    }

    /// A key: `None` for `type`, else what the table's own seed makes of it.
    struct Key<'a, K>(&'a mut Option<K>);

    impl<'de, K: DeserializeSeed<'de>> DeserializeSeed<'de> for Key<'_, K> {
        type Value = Option<K::Value>;

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            use serde::de::IntoDeserializer;
            let name = String::deserialize(d)?;
            if name == "type" {
                return Ok(None);
            }
            let Some(seed) = self.0.take() else {
                return Err(de::Error::custom("a key was read twice"));
            };
            seed.deserialize(name.into_deserializer()).map(Some)
        }
    }

    use serde::Deserialize;
}

/// One line per figment error, each with its key path and where the value came from (the file,
/// or the `SLUICE__…` variable).
fn figment_message(err: figment::Error) -> String {
    err.into_iter()
        .map(|e| {
            let path = key_path(&e.path);
            let kind = describe_kind(&e.kind);
            let origin = match e.metadata.as_ref() {
                // The file as it was named (figment shows it relative to the working directory,
                // while later checks show it as given).
                Some(m) if m.source.is_some() => match m.source.as_ref() {
                    Some(figment::Source::File(p)) => format!(" (in {})", p.display()),
                    Some(s) => format!(" (in {s})"),
                    None => String::new(),
                },
                Some(m) if m.name.contains("environment variable") && !e.path.is_empty() => {
                    format!(" (from {})", env_variables(&e.path))
                }
                _ => String::new(),
            };
            if path.is_empty() {
                format!("{kind}{origin}")
            } else {
                format!("{path}: {kind}{origin}")
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A key path as the file would write it and later checks name it: `models.a.deployments[0]`.
/// A number is a position in a list only under a key that holds a list (a model may be named
/// `2024`).
fn key_path(path: &[String]) -> String {
    const LISTS: [&str; 11] = [
        "deployments",
        "tiers",
        "examples",
        "tags",
        "cors_origins",
        "rate_limited",
        "context_window_exceeded",
        "content_policy",
        "server_error",
        "timeout",
        "default",
    ];
    let mut out = String::new();
    let mut after: Option<&str> = None;
    for key in path {
        let index = !key.is_empty()
            && key.bytes().all(|b| b.is_ascii_digit())
            && after.is_some_and(|a| LISTS.contains(&a));
        after = Some(key.as_str());
        if index {
            out.push('[');
            out.push_str(key);
            out.push(']');
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(key);
        }
    }
    out
}

/// The `SLUICE__…` variables an error at `path` came from: the one set for that key, or those
/// set below it (an unknown table `SLUICE__SERVR__LISTEN` makes is reported at `servr`).
fn env_variables(path: &[String]) -> String {
    let var: Vec<String> = path.iter().map(|k| k.to_ascii_uppercase()).collect();
    let var = format!("SLUICE__{}", var.join("__"));
    let below = format!("{var}__");
    let mut set: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| {
            let upper = k.to_ascii_uppercase();
            upper == var || upper.starts_with(&below)
        })
        .collect();
    set.sort();
    match set.as_slice() {
        [one] => format!("the environment variable {one}"),
        [] => format!("the environment variable {var}"),
        many => format!("the environment variables {}", many.join(", ")),
    }
}

/// A figment error's kind in one line, in the file's terms (keys and tables, not Rust types).
fn describe_kind(kind: &figment::error::Kind) -> String {
    use figment::error::Kind;
    let one_of = |names: &[&str]| {
        if names.is_empty() {
            "none are allowed here".to_string()
        } else {
            let names: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
            format!("expected one of {}", names.join(", "))
        }
    };
    match kind {
        Kind::UnknownField(found, expected) => {
            format!("unknown key `{found}`; {}", one_of(expected))
        }
        Kind::UnknownVariant(found, expected) => {
            format!("unknown value `{found}`; {}", one_of(expected))
        }
        Kind::InvalidType(actual, expected) => {
            format!(
                "invalid type: found {actual}, expected {}",
                plain_type(expected)
            )
        }
        Kind::InvalidValue(actual, expected) => {
            format!(
                "invalid value: found {actual}, expected {}",
                plain_type(expected)
            )
        }
        Kind::MissingField(name) => format!("missing key `{name}`"),
        // Parse errors (TOML's carry a source snippet over several lines): one line, without the
        // snippet.
        other => other
            .to_string()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('|') && !is_snippet_line(l))
            .collect::<Vec<_>>()
            .join(": "),
    }
}

/// `1 | [server` or `|        ^`: a line of a parse error's source snippet.
fn is_snippet_line(line: &str) -> bool {
    let digits = line.bytes().take_while(u8::is_ascii_digit).count();
    digits > 0 && line[digits..].trim_start().starts_with('|')
}

/// Serde's name for an expected type, as a reader of the file would say it.
fn plain_type(expected: &str) -> String {
    match expected {
        e if e.starts_with("struct ") || e == "a map" => "a table".into(),
        "usize" | "u8" | "u16" | "u32" | "u64" => "a whole number of 0 or more".into(),
        "isize" | "i8" | "i16" | "i32" | "i64" => "a whole number".into(),
        "f32" | "f64" => "a number".into(),
        e if e.starts_with("a sequence") => "a list".into(),
        e => e.to_string(),
    }
}

/// A validation error of a configuration read from a file names the file, as parse errors do.
pub fn in_source(message: String, source: &Source, overrides: &Overrides) -> String {
    // The key the message is about, and where its value came from: a flag, a variable, the file.
    let key = message.split(':').next().unwrap_or_default();
    let flag = match key {
        "server.listen" if overrides.listen.is_some() => Some("--listen"),
        k if k.starts_with("store.url") && overrides.store_url.is_some() => Some("--store"),
        _ => None,
    };
    if let Some(flag) = flag {
        return format!("{message} (from {flag})");
    }
    if !key.is_empty() && !key.contains([' ', '[']) {
        let var = format!("SLUICE__{}", key.replace('.', "__").to_uppercase());
        if std::env::var_os(&var).is_some() {
            return format!("{message} (from the environment variable {var})");
        }
    }
    match source {
        Source::File(p) => format!("{message} (in {})", p.display()),
        Source::EmbeddedDefault => message,
    }
}

/// The validated configuration: every reference resolved, every provider built.
pub struct Config {
    pub source: Source,
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub state: sluice_gateway::state::StateConfig,
    pub router: Router,
    pub provider_kinds: BTreeMap<String, &'static str>,
    /// The built providers with their configuration, so a reload can keep the expensive ones.
    pub providers: BuiltProviders,
}

/// Built providers by name, each with the fingerprint of the configuration it was built from.
pub type BuiltProviders = BTreeMap<String, (String, Arc<dyn ChatProvider>)>;

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("source", &self.source)
            .field("server", &self.server)
            .field("store", &self.store)
            .field("router", &self.router)
            .finish()
    }
}

impl Config {
    /// Validates a raw configuration. Errors name the key path.
    pub fn from_raw(source: Source, raw: RawConfig) -> Result<Config, String> {
        Config::from_raw_reusing(source, raw, None)
    }

    /// Validates a raw configuration; with `previous`, local providers whose configuration did
    /// not change are kept (a model is not loaded twice), other providers are rebuilt (secrets
    /// are read again), and unchanged deployments keep their live state (breakers, latency,
    /// capacity, in-flight calls).
    pub fn from_raw_reusing(
        source: Source,
        raw: RawConfig,
        previous: Option<(&BuiltProviders, &Router)>,
    ) -> Result<Config, String> {
        raw.server.addr().map_err(|e| format!("server.{e}"))?;
        raw.server.cors().map_err(|e| format!("server.{e}"))?;
        if raw.server.max_body_bytes < 1024 {
            return Err("server.max_body_bytes: must be at least 1024".into());
        }
        if raw.server.idle_timeout_secs == 0 {
            return Err(
                "server.idle_timeout_secs: must be at least 1 (seconds a connection may wait for a request's head)"
                    .into(),
            );
        }
        if raw.server.client_stall_secs == 0 {
            return Err(
                "server.client_stall_secs: must be at least 1 (seconds a client may leave an answer unread)"
                    .into(),
            );
        }
        if raw
            .server
            .connection_threads
            .is_some_and(|n| n > sluice_server::MAX_CONNECTION_THREADS)
        {
            return Err(format!(
                "server.connection_threads: at most {} (leave it out for one per CPU, or 0 to serve connections on the shared runtime)",
                sluice_server::MAX_CONNECTION_THREADS
            ));
        }
        raw.store.validate().map_err(|e| format!("store.{e}"))?;
        let mut built = BuiltProviders::new();
        let mut kinds = BTreeMap::new();
        for (name, p) in &raw.providers {
            printable_name("providers", name)?;
            let fingerprint = format!("{p:?}");
            let reused = previous
                .and_then(|(prev, _)| prev.get(name))
                .filter(|(f, _)| *f == fingerprint && p.kind() == "local")
                .map(|(_, provider)| provider.clone());
            let provider = match reused {
                Some(p) => p,
                None => p.build().map_err(|e| format!("providers.{name}.{e}"))?,
            };
            kinds.insert(name.clone(), p.kind());
            built.insert(name.clone(), (fingerprint, provider));
        }
        let prices = PriceTable::builtin();
        let mut groups = Vec::new();
        for (model, mc) in &raw.models {
            printable_name("models", model)?;
            let mut deps = Vec::new();
            for (i, d) in mc.deployments.iter().enumerate() {
                let key = format!("models.{model}.deployments[{i}]");
                let (_, provider) = built.get(&d.provider).ok_or_else(|| {
                    format!(
                        "{key}.provider: no provider `{}`; configured providers: {}",
                        d.provider,
                        if built.is_empty() {
                            "(none)".to_string()
                        } else {
                            built.keys().cloned().collect::<Vec<_>>().join(", ")
                        }
                    )
                })?;
                if d.model.trim().is_empty() {
                    return Err(format!("{key}.model: must not be empty"));
                }
                let price = d.price(prices).map_err(|e| format!("{key}.{e}"))?;
                if d.adapter.is_some()
                    && !matches!(kinds.get(&d.provider), Some(&"openai" | &"mock"))
                {
                    return Err(format!(
                        "{key}.adapter: LoRA adapters are served by OpenAI-compatible (vLLM-style) upstreams; provider `{}` is type `{}`",
                        d.provider,
                        kinds.get(&d.provider).copied().unwrap_or("?")
                    ));
                }
                let dep = d.build(Arc::clone(provider), price);
                // The same deployment (provider, model, id, adapter; its weight, tags, prices
                // and capacity figures may change) of an unchanged provider, with the same
                // breaker and health checks, keeps what it has learnt: breaker, latency,
                // capacity windows, cool-down, in-flight calls. (A provider is rebuilt even when unchanged, so that
                // a rotated key file is read again.)
                let provider_unchanged = previous
                    .and_then(|(prev, _)| prev.get(&d.provider))
                    .zip(built.get(&d.provider))
                    .is_some_and(|((old, _), (new, _))| old == new);
                let old = previous
                    .and_then(|(_, router)| router.find_state(model, &dep.fingerprint))
                    .filter(|old| {
                        provider_unchanged
                            && old.breaker_config() == &mc.circuit_breaker
                            && previous
                                .and_then(|(_, r)| r.group(model))
                                .is_some_and(|g| g.health_check == mc.health_check)
                    });
                let state = match old {
                    Some(old)
                        if Arc::ptr_eq(&old.dep.provider, provider)
                            && old.dep.config == dep.config =>
                    {
                        old
                    }
                    Some(old) => Arc::new(DeploymentState::carry_over(&old, dep)),
                    None => Arc::new(DeploymentState::new(dep, mc.circuit_breaker.clone())),
                };
                deps.push(state);
            }
            let group = build_group(model, mc, deps).map_err(|e| format!("models.{model}.{e}"))?;
            groups.push(group);
        }
        raw.limits.validate().map_err(|e| format!("limits.{e}"))?;
        for m in raw.limits.models.keys() {
            if !raw.models.contains_key(m) {
                return Err(format!(
                    "limits.models.{m}: no model `{m}`; configured models: {}",
                    if raw.models.is_empty() {
                        "(none)".to_string()
                    } else {
                        raw.models.keys().cloned().collect::<Vec<_>>().join(", ")
                    }
                ));
            }
        }
        raw.budgets.validate().map_err(|e| format!("budgets.{e}"))?;
        raw.cache.validate()?;
        raw.state.validate().map_err(|e| format!("state.{e}"))?;
        let mut router = Router::new(groups)?;
        // Taken whole: new capacity figures apply to the windows carried over.
        for name in router.names() {
            for d in router.group(name).map_or(&[][..], |g| &g.deployments[..]) {
                d.apply_capacity();
            }
        }
        router.limits = raw.limits.clone();
        router.budgets = raw.budgets.clone();
        router.cache = raw.cache.clone();
        Ok(Config {
            source,
            server: raw.server,
            store: raw.store,
            state: raw.state,
            router,
            provider_kinds: kinds,
            providers: built,
        })
    }

    /// Loads, layers and validates.
    pub fn load(flag: Option<&Path>, overrides: &Overrides) -> Result<Config, String> {
        let source = locate(flag);
        let raw = load_raw(&source, overrides)?;
        Config::from_raw(source.clone(), raw).map_err(|e| in_source(e, &source, overrides))
    }
}

/// A configured name (of a model or a provider) is shown in banners, headers, errors and
/// reports: an empty one or one with control characters (which a terminal would act on) is
/// refused.
fn printable_name(table: &str, name: &str) -> Result<(), String> {
    if name.trim().is_empty() || name.chars().any(char::is_control) {
        return Err(format!(
            "{table}.\"{}\": a name must be printable text, without control characters (hint: rename the [{table}.\"…\"] table)",
            name.escape_debug()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<Config, String> {
        let raw: RawConfig = Figment::new()
            .merge(Toml::string(text))
            .extract()
            .map_err(figment_message)?;
        Config::from_raw(Source::EmbeddedDefault, raw)
    }

    fn raw(text: &str) -> RawConfig {
        Figment::new()
            .merge(Toml::string(text))
            .extract()
            .expect("valid configuration")
    }

    #[test]
    fn a_reload_keeps_the_live_state_of_unchanged_deployments() {
        use sluice_gateway::router::Pick;
        let with = |base: &str, extra: &str| {
            format!(
                r#"
                [providers.up]
                type = "openai"
                base_url = "{base}"
                api_key = "literal-key-for-test"
                [models.m]
                deployments = [{{ provider = "up", model = "x", {extra} }}]
                "#
            )
        };
        let text = |base: &str| with(base, "rpm = 1");
        let same = text("http://127.0.0.1:9/v1");
        let first = Config::from_raw(Source::EmbeddedDefault, raw(&same)).unwrap();
        let group = first.router.group("m").unwrap();
        let Pick::Go { in_flight, .. } = group.pick(std::time::Instant::now(), &[false], 0) else {
            panic!("an idle deployment is picked");
        };
        // Unchanged: the request counted against rpm and the call in flight carry over, though
        // the provider itself is rebuilt (so that a rotated key file is read again).
        let second = Config::from_raw_reusing(
            Source::EmbeddedDefault,
            raw(&same),
            Some((&first.providers, &first.router)),
        )
        .unwrap();
        let status = &second.router.status()[0];
        assert_eq!(status.in_flight, 1);
        assert_eq!(status.rpm.as_ref().map(|c| c.used), Some(1));
        assert!(matches!(
            second
                .router
                .group("m")
                .unwrap()
                .pick(std::time::Instant::now(), &[false], 0),
            Pick::Wait { .. }
        ));
        assert!(!Arc::ptr_eq(
            &group.deployments[0].dep.provider,
            &second.router.group("m").unwrap().deployments[0]
                .dep
                .provider
        ));
        // A new capacity figure, weight or price: still the same deployment, whose counts stay
        // (the request of this minute counts against the new rpm) and whose call is still in
        // flight; the new figures apply.
        let edited = Config::from_raw_reusing(
            Source::EmbeddedDefault,
            raw(&with(
                "http://127.0.0.1:9/v1",
                "rpm = 2, weight = 3, input_cost_per_mtok = 1.5",
            )),
            Some((&second.providers, &second.router)),
        )
        .unwrap();
        let status = &edited.router.status()[0];
        assert_eq!(status.in_flight, 1);
        assert_eq!(status.rpm.as_ref().map(|c| (c.used, c.limit)), Some((1, 2)));
        let dep = &edited.router.group("m").unwrap().deployments[0].dep;
        assert_eq!(dep.weight, 3.0);
        assert_eq!(dep.price.map(|p| p.input), Some(1.5));
        drop(in_flight);
        assert_eq!(edited.router.status()[0].in_flight, 0);
        // A reload refused for another reason leaves the running figures as they were.
        let refused =
            with("http://127.0.0.1:9/v1", "rpm = 50") + "\n[limits.models.nowhere]\nrpm = 1\n";
        assert!(
            Config::from_raw_reusing(
                Source::EmbeddedDefault,
                raw(&refused),
                Some((&edited.providers, &edited.router)),
            )
            .is_err()
        );
        assert_eq!(
            edited.router.status()[0].rpm.as_ref().map(|c| c.limit),
            Some(2)
        );
        // A changed provider starts afresh.
        let third = Config::from_raw_reusing(
            Source::EmbeddedDefault,
            raw(&text("http://127.0.0.1:10/v1")),
            Some((&edited.providers, &edited.router)),
        )
        .unwrap();
        assert_eq!(
            third.router.status()[0].rpm.as_ref().map(|c| c.used),
            Some(0)
        );
    }

    #[test]
    fn the_embedded_default_without_models_is_the_mock() {
        let dir = tempfile::tempdir().unwrap();
        let c = check(&embedded_default(dir.path())).unwrap();
        assert_eq!(c.router.names().collect::<Vec<_>>(), ["mock-echo"]);
        assert_eq!(c.server.listen, "127.0.0.1:4141");
        assert_eq!(c.store.url, "sqlite://./sluice-data/sluice.db");
    }

    #[test]
    fn the_issue_example_is_valid() {
        // SAFETY of the test: a variable name no other test uses.
        let text = r#"
            [server]
            listen = "127.0.0.1:4141"
            [store]
            url = "sqlite://./sluice-data/sluice.db"
            [providers.upstream]
            type = "openai"
            base_url = "http://127.0.0.1:18080/v1"
            api_key = "literal-key-for-test"
            [models."bench-model"]
            deployments = [{ provider = "upstream", model = "gpt-4o-mini" }]
        "#;
        let c = check(text).unwrap();
        let d = &c.router.group("bench-model").unwrap().deployments[0].dep;
        assert_eq!(d.model, "gpt-4o-mini");
        assert!(
            d.price.is_some(),
            "gpt-4o-mini is priced from the shipped table"
        );
    }

    #[test]
    fn connection_threads_default_to_one_per_cpu() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(check("").unwrap().server.connection_threads(), cpus);
        let c = check("[server]\nconnection_threads = 0\n").unwrap();
        assert_eq!(c.server.connection_threads(), 0);
        let c = check("[server]\nconnection_threads = 3\n").unwrap();
        assert_eq!(c.server.connection_threads(), 3);
        let e = check("[server]\nconnection_threads = 257\n").unwrap_err();
        assert!(
            e.starts_with("server.connection_threads: at most 256"),
            "{e}"
        );
        let e = check("[server]\nconnection_threads = -1\n").unwrap_err();
        assert!(e.contains("connection_threads"), "{e}");
    }

    #[test]
    fn unknown_keys_are_named_with_their_path() {
        let e = check("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n").unwrap_err();
        assert!(e.contains("server") && e.contains("lisen"), "{e}");
        let e = check("[providers.p]\ntype = \"openai\"\nbase_url = \"http://x\"\ntimeout = 3\n")
            .unwrap_err();
        assert!(e.contains("providers.p") && e.contains("timeout"), "{e}");
        let e = check("[providers.p]\ntype = \"cohere\"\n").unwrap_err();
        assert!(e.contains("providers.p") && e.contains("cohere"), "{e}");
        // A misspelt budget would otherwise be no budget at all.
        let e = check("[budgets]\nper_user = { daily = 5.0 }\n").unwrap_err();
        assert!(e.contains("budgets") && e.contains("daily"), "{e}");
        let e = check("[budgets.teams.search]\nmonthly_limit = 1000\n").unwrap_err();
        assert!(e.contains("monthly_limit"), "{e}");
        // Errors of a section name their key once.
        let e = check("[cache]\nttl_secs = 0\n").unwrap_err();
        assert!(e.starts_with("cache.ttl_secs:"), "{e}");
    }

    #[test]
    fn references_are_resolved_with_key_paths() {
        let e = check("[models.m]\ndeployments = [{ provider = \"nope\", model = \"x\" }]\n")
            .unwrap_err();
        assert!(
            e.starts_with("models.m.deployments[0].provider: no provider `nope`"),
            "{e}"
        );
        let e = check(
            "[providers.a]\ntype = \"anthropic\"\napi_key = \"env::SLUICE_TEST_UNSET_KEY_1\"\n",
        )
        .unwrap_err();
        assert!(e.starts_with("providers.a.api_key:"), "{e}");
        assert!(e.contains("SLUICE_TEST_UNSET_KEY_1"), "{e}");
        let e = check("[server]\nlisten = \"nowhere\"\n").unwrap_err();
        assert!(e.starts_with("server.listen"), "{e}");
    }

    #[test]
    fn settings_a_complexity_model_would_ignore_are_refused() {
        let base = "[providers.m]\ntype = \"mock\"\n[models.small]\ndeployments = [{ provider = \"m\", model = \"s\" }]\n[models.big]\ndeployments = [{ provider = \"m\", model = \"b\" }]\n";
        let auto = "[models.auto]\nstrategy = \"complexity\"\ncomplexity = { tiers = [{ name = \"s\", model = \"small\", max_score = 0.5 }, { name = \"b\", model = \"big\" }] }\n";
        check(&format!("{base}{auto}")).expect("a plain complexity model");
        let e = check(&format!(
            "{base}{auto}fallbacks = {{ default = [\"big\"] }}\n"
        ))
        .unwrap_err();
        assert!(e.starts_with("models.auto.fallbacks:"), "{e}");
        let e = check(&format!("{base}{auto}timeouts = {{ total_secs = 20 }}\n")).unwrap_err();
        assert!(e.starts_with("models.auto.timeouts:"), "{e}");
        let e = check(&format!(
            "{base}{auto}[models.chat]\ndeployments = [{{ provider = \"m\", model = \"c\" }}]\nfallbacks = {{ default = [\"auto\"] }}\n"
        ))
        .unwrap_err();
        assert!(e.starts_with("models.chat.fallbacks.default:"), "{e}");
    }

    #[test]
    fn price_overrides_apply() {
        let c = check(
            "[providers.m]\ntype = \"mock\"\n[models.x]\ndeployments = [{ provider = \"m\", model = \"gpt-4o\", output_cost_per_mtok = 1.0 }]\n",
        )
        .unwrap();
        let p = c.router.group("x").unwrap().deployments[0]
            .dep
            .price
            .unwrap();
        assert_eq!(p.output, 1.0);
        assert_eq!(p.input, 2.5);
        assert_eq!(p.cached_input, Some(1.25));
    }

    /// A new input price carries the table's cache prices along in proportion, unless they are
    /// given (gpt-4o at $1.00 input read its cache at the table's $1.25, dearer than input).
    #[test]
    fn an_input_price_override_scales_the_cache_prices() {
        let price = |keys: &str, model: &str| {
            let c = check(&format!(
                "[providers.m]\ntype = \"mock\"\n[models.x]\ndeployments = [{{ provider = \"m\", model = \"{model}\", {keys} }}]\n"
            ))
            .unwrap();
            c.router.group("x").unwrap().deployments[0]
                .dep
                .price
                .unwrap()
        };
        let p = price("input_cost_per_mtok = 1.0", "gpt-4o");
        assert_eq!((p.input, p.cached_input), (1.0, Some(0.5)));
        let p = price(
            "input_cost_per_mtok = 1.0, cached_input_cost_per_mtok = 0.9",
            "gpt-4o",
        );
        assert_eq!(p.cached_input, Some(0.9));
        // Anthropic: reads at 10 % and writes at 125 % of input (one-hour writes, not in the
        // table, are twice the input price when charged).
        let p = price("input_cost_per_mtok = 2.0", "claude-3-5-haiku-20241022");
        let close = |a: Option<f64>, b: f64| (a.unwrap() - b).abs() < 1e-9;
        assert!(close(p.cached_input, 0.2), "{p:?}");
        assert!(close(p.cache_write_input, 2.5), "{p:?}");
        assert_eq!(p.cache_write_1h_input, None);
    }
}
