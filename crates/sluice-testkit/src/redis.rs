//! A throwaway Redis server for tests, started from the locally installed
//! `redis-server` and killed on drop.
//!
//! [`TempRedis::start`] picks a free port and runs `redis-server` on
//! `127.0.0.1` only, without persistence (`--save "" --appendonly no`), its
//! working directory and log in a fresh temporary directory. It returns once
//! the server answers `PING` over TCP. [`TempRedis::stop`] and
//! [`TempRedis::restart`] (on the same port) let tests exercise what happens
//! while Redis is unreachable and after it comes back.
//!
//! The binary is looked up on `PATH`, in `/usr/bin` and in `/usr/local/bin`.
//! This module speaks just enough of the protocol to send `PING`; it does not
//! depend on a Redis client.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where to look besides `PATH`.
const EXTRA_DIRS: &[&str] = &["/usr/bin", "/usr/local/bin"];
const INSTALL_HINT: &str = "install Redis (Debian/Ubuntu: `apt-get install redis-server`; \
     Fedora/RHEL: `dnf install redis`; macOS: `brew install redis`) or put the directory of \
     `redis-server` on PATH";
/// How long a freshly started server has to answer `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running throwaway Redis server. Killed when dropped; its temporary
/// directory is deleted.
#[derive(Debug)]
pub struct TempRedis {
    dir: tempfile::TempDir,
    port: u16,
    binary: PathBuf,
    child: Option<Child>,
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

/// Finds `redis-server` on `PATH`, in `/usr/bin` or in `/usr/local/bin`.
pub fn find_redis_server() -> Option<PathBuf> {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join("redis-server"))
        .find(|p| is_executable(p))
}

/// Whether [`TempRedis::start`] can find `redis-server`.
pub fn redis_available() -> bool {
    find_redis_server().is_some()
}

fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("cannot bind 127.0.0.1:0 to pick a port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("cannot read the picked port: {e}"))
}

/// Sends `PING` to `127.0.0.1:port` and says whether the answer was `+PONG`.
fn pong(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let timeout = Some(Duration::from_millis(500));
    if stream.set_read_timeout(timeout).is_err()
        || stream.set_write_timeout(timeout).is_err()
        || stream.write_all(b"PING\r\n").is_err()
    {
        return false;
    }
    let mut answer = [0u8; 7];
    stream.read_exact(&mut answer).is_ok() && &answer == b"+PONG\r\n"
}

impl TempRedis {
    /// Starts a server on a free port of `127.0.0.1` and waits until it
    /// answers `PING`.
    ///
    /// The error says that `redis-server` is missing (and how to install it),
    /// or why the server did not come up, with its log.
    pub fn start() -> Result<TempRedis, String> {
        let binary = find_redis_server().ok_or_else(|| {
            format!(
                "redis-server not found (looked on PATH, in /usr/bin and /usr/local/bin); \
                 {INSTALL_HINT}"
            )
        })?;
        let dir = tempfile::Builder::new()
            .prefix("sluice-redis-")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        let mut redis = TempRedis {
            dir,
            port: 0,
            binary,
            child: None,
        };
        let mut last_error = String::new();
        for _attempt in 0..3 {
            redis.port = free_port()?;
            match redis.spawn() {
                Ok(()) => return Ok(redis),
                // Someone else took the port between picking and binding: retry.
                Err(e) if e.contains("already in use") => last_error = e,
                Err(e) => return Err(e),
            }
        }
        Err(last_error)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Runs the server on `self.port` and waits for `PING`.
    fn spawn(&mut self) -> Result<(), String> {
        let log = self.log_path();
        let stderr_path = self.dir.path().join("stderr.log");
        let stderr_file = std::fs::File::create(&stderr_path)
            .map_err(|e| format!("cannot create {}: {e}", stderr_path.display()))?;
        let mut child = Command::new(&self.binary)
            .arg("--port")
            .arg(self.port.to_string())
            .args([
                "--bind",
                "127.0.0.1",
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr_file)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if pong(self.port) {
                self.child = Some(child);
                return Ok(());
            }
            let exited = child
                .try_wait()
                .map_err(|e| format!("cannot check on redis-server (port {}): {e}", self.port))?;
            if let Some(status) = exited {
                let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                let server_log = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!(
                    "redis-server on port {} exited ({status}) before answering PING\n\
                     stderr:\n{}\nserver log:\n{server_log}",
                    self.port,
                    stderr.trim()
                ));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                let server_log = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!(
                    "redis-server on port {} did not answer PING within {:?}\nserver log:\n{server_log}",
                    self.port, READY_TIMEOUT
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's TCP port on 127.0.0.1 (the same after [`restart`](Self::restart)).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The temporary directory (working directory, `redis.log` and `stderr.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the server process is running (not stopped, not exited).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills the server and waits for it to exit; the data is gone. Does
    /// nothing when it is already stopped.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server if it runs, then starts an empty one on the same
    /// port and waits until it answers `PING`.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop();
        // The port was just freed; in the rare case that the kernel still
        // holds it, try again for a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) if e.contains("already in use") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for TempRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_answers_stops_and_restarts_on_the_same_port() {
        if !redis_available() {
            eprintln!("skipping: redis-server is not installed; {INSTALL_HINT}");
            return;
        }
        let mut redis = TempRedis::start().expect("redis-server starts");
        let port = redis.port();
        assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}"));
        assert!(redis.is_running());
        assert!(pong(port), "a started server answers PING");

        redis.stop();
        assert!(!redis.is_running());
        assert!(!pong(port), "a stopped server does not answer");
        // Stopping twice is harmless.
        redis.stop();

        redis.restart().expect("restarts");
        assert_eq!(redis.port(), port);
        assert!(pong(port), "the restarted server answers on the same port");

        drop(redis);
        assert!(!pong(port), "dropping kills the server");
    }

    #[test]
    fn two_servers_get_different_ports() {
        if !redis_available() {
            eprintln!("skipping: redis-server is not installed");
            return;
        }
        let a = TempRedis::start().expect("first");
        let b = TempRedis::start().expect("second");
        assert_ne!(a.port(), b.port());
        assert!(pong(a.port()) && pong(b.port()));
    }
}
