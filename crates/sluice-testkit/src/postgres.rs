//! A throwaway PostgreSQL server for tests, started from the locally installed
//! binaries and removed on drop.
//!
//! [`TempPostgres::start`] runs `initdb` into a fresh temporary directory,
//! picks a free port and starts the server with `pg_ctl` (trust
//! authentication, TCP on `127.0.0.1` only, the unix socket inside the temp
//! directory, `fsync=off`). PostgreSQL refuses to run as root, so when the
//! tests run as root the server commands go through
//! `runuser -u postgres --` and the directory is handed to the `postgres` user.
//!
//! The binaries are looked up on `PATH`, in `/usr/local/bin` and in
//! `/usr/lib/postgresql/*/bin` (newest version first); see [`find_tool`].

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Where to look besides `PATH`.
const EXTRA_DIRS: &[&str] = &["/usr/local/bin", "/usr/bin"];
const VERSIONED_ROOT: &str = "/usr/lib/postgresql";
const INSTALL_HINT: &str = "install the PostgreSQL server binaries (Debian/Ubuntu: \
     `apt-get install postgresql`; Fedora/RHEL: `dnf install postgresql-server`; \
     macOS: `brew install postgresql`) or put their directory on PATH";

/// A running throwaway PostgreSQL server. Stopped (`pg_ctl -m immediate stop`)
/// and deleted when dropped.
#[derive(Debug)]
pub struct TempPostgres {
    dir: tempfile::TempDir,
    port: u16,
    pg_ctl: PathBuf,
    psql: PathBuf,
    as_postgres_user: bool,
}

/// The programs a [`TempPostgres`] needs.
struct Tools {
    initdb: PathBuf,
    pg_ctl: PathBuf,
    psql: PathBuf,
    /// `Some(runuser)` when running as root.
    runuser: Option<PathBuf>,
}

fn is_executable(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        path.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }
    #[cfg(not(unix))]
    {
        path.is_file()
    }
}

/// Finds a PostgreSQL program (`initdb`, `pg_ctl`, `psql`, ...) on `PATH`, in
/// `/usr/local/bin`, `/usr/bin`, or the newest `/usr/lib/postgresql/*/bin`.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let extra = EXTRA_DIRS.iter().map(PathBuf::from);
    if let Some(found) = path_dirs
        .into_iter()
        .chain(extra)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
    {
        return Some(found);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(VERSIONED_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let file_name = entry.file_name();
            let version_text = file_name.to_str()?;
            let major: String = version_text
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            Some((major.parse().ok()?, entry.path().join("bin").join(name)))
        })
        .collect();
    versions.sort_by_key(|v| std::cmp::Reverse(v.0));
    versions
        .into_iter()
        .map(|(_, p)| p)
        .find(|p| is_executable(p))
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn postgres_user_exists() -> bool {
    Command::new("id")
        .args(["-u", "postgres"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn missing(name: &str) -> String {
    format!(
        "{name} not found (looked on PATH, in /usr/local/bin, /usr/bin and \
         {VERSIONED_ROOT}/*/bin); {INSTALL_HINT}"
    )
}

fn tools() -> Result<Tools, String> {
    let initdb = find_tool("initdb").ok_or_else(|| missing("initdb"))?;
    let pg_ctl = find_tool("pg_ctl").ok_or_else(|| missing("pg_ctl"))?;
    let psql = find_tool("psql").ok_or_else(|| {
        format!(
            "{} (the client is in the `postgresql-client` package on Debian/Ubuntu)",
            missing("psql")
        )
    })?;
    let runuser = if running_as_root() {
        let runuser = find_tool("runuser")
            .or_else(|| {
                ["/usr/sbin/runuser", "/sbin/runuser"]
                    .into_iter()
                    .map(PathBuf::from)
                    .find(|p| is_executable(p))
            })
            .ok_or_else(|| {
                "running as root: PostgreSQL refuses to run as root and `runuser` (from \
                 util-linux) is needed to run it as the `postgres` user, but it was not found; \
                 install util-linux or run the tests as an unprivileged user"
                    .to_owned()
            })?;
        if !postgres_user_exists() {
            return Err(
                "running as root: PostgreSQL refuses to run as root, and there is no \
                 `postgres` user to run it as; create one with \
                 `useradd --system --user-group --no-create-home postgres` (installing the \
                 `postgresql` package also creates it) or run the tests as an unprivileged user"
                    .to_owned(),
            );
        }
        Some(runuser)
    } else {
        None
    };
    Ok(Tools {
        initdb,
        pg_ctl,
        psql,
        runuser,
    })
}

/// Whether [`TempPostgres::start`] has what it needs: `initdb`, `pg_ctl` and
/// `psql`, plus `runuser` and a `postgres` user when running as root.
pub fn postgres_available() -> bool {
    tools().is_ok()
}

fn describe(output: &Output) -> String {
    let mut text = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !stdout.trim().is_empty() {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(stdout.trim());
    }
    format!("{} ({text})", output.status)
}

/// A command for a server program, through `runuser -u postgres --` when root.
fn server_command(runuser: Option<&Path>, program: &Path, cwd: &Path) -> Command {
    let mut cmd = match runuser {
        Some(runuser) => {
            let mut cmd = Command::new(runuser);
            cmd.args(["-u", "postgres", "--"]).arg(program);
            cmd
        }
        None => Command::new(program),
    };
    cmd.current_dir(cwd).stdin(Stdio::null());
    cmd
}

fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("cannot bind 127.0.0.1:0 to pick a port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("cannot read the picked port: {e}"))
}

impl TempPostgres {
    /// Creates a fresh cluster in a temporary directory and starts it.
    ///
    /// The error says what is missing (and how to install it) or which
    /// command failed with its output.
    pub fn start() -> Result<TempPostgres, String> {
        let tools = tools()?;
        let as_root = tools.runuser.is_some();
        let dir = if as_root {
            // The postgres user must be able to reach the directory, so keep
            // it directly under /tmp rather than under a private TMPDIR.
            tempfile::Builder::new()
                .prefix("sluice-pg-")
                .tempdir_in("/tmp")
        } else {
            tempfile::Builder::new().prefix("sluice-pg-").tempdir()
        }
        .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        let root = dir.path().to_path_buf();
        if as_root {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))
                    .map_err(|e| format!("cannot chmod {}: {e}", root.display()))?;
            }
            let out = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&root)
                .output()
                .map_err(|e| format!("cannot run chown: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "chown -R postgres:postgres {} failed: {}",
                    root.display(),
                    describe(&out)
                ));
            }
        }
        let runuser = tools.runuser.as_deref();
        let data = root.join("data");

        let out = server_command(runuser, &tools.initdb, &root)
            .arg("-D")
            .arg(&data)
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .map_err(|e| format!("cannot run {}: {e}", tools.initdb.display()))?;
        if !out.status.success() {
            return Err(format!("initdb failed: {}", describe(&out)));
        }

        let log = root.join("log");
        let mut last_error = String::new();
        for _attempt in 0..3 {
            let port = free_port()?;
            let options = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
                 -c synchronous_commit=off -c full_page_writes=off",
                root.display()
            );
            let out = server_command(runuser, &tools.pg_ctl, &root)
                .arg("-D")
                .arg(&data)
                .arg("-o")
                .arg(&options)
                .arg("-l")
                .arg(&log)
                .args(["-w", "start"])
                .output()
                .map_err(|e| format!("cannot run {}: {e}", tools.pg_ctl.display()))?;
            if out.status.success() {
                return Ok(TempPostgres {
                    dir,
                    port,
                    pg_ctl: tools.pg_ctl,
                    psql: tools.psql,
                    as_postgres_user: as_root,
                });
            }
            let server_log = std::fs::read_to_string(&log).unwrap_or_default();
            last_error = format!(
                "pg_ctl start failed: {}\nserver log:\n{server_log}",
                describe(&out)
            );
            // Someone else took the port between picking and binding: retry.
            if !server_log.contains("already in use") {
                break;
            }
        }
        Err(last_error)
    }

    /// The server's TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temporary directory (data directory, log, unix socket).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// The URL of database `name` on this server.
    pub fn url_for(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Runs `sql` with `psql` against database `database`, returning the
    /// unaligned, tuples-only output.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(&self.psql)
            .arg(self.url_for(database))
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.psql.display()))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("psql `{sql}` failed: {}", describe(&out)))
        }
    }

    /// Creates database `name` (ASCII letters, digits and `_`, at most 63
    /// characters) and returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String, String> {
        let valid = !name.is_empty()
            && name.len() <= 63
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(format!(
                "invalid database name {name:?}: use 1 to 63 ASCII letters, digits or `_`"
            ));
        }
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""))?;
        Ok(self.url_for(name))
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let runuser = if self.as_postgres_user {
            find_tool("runuser").or_else(|| Some(PathBuf::from("/usr/sbin/runuser")))
        } else {
            None
        };
        let _ = server_command(runuser.as_deref(), &self.pg_ctl, self.dir.path())
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
