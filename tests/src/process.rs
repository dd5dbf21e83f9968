//! Child processes under test, as guards.
//!
//! A [`Process`] owns a spawned child whose stdout and stderr go to a log file. Dropping the guard
//! sends SIGKILL to that PID (if it is still running) and reaps it, so a failing test never leaves
//! a proxy behind; when the drop happens during a panic, the log is printed so the failure comes
//! with the binary's own account of what happened. [`Process::terminate`] is the polite path:
//! SIGTERM, then a bounded wait for the exit status.
//!
//! [`LogDir`] is a per-test temporary directory for those logs; it is kept (and its path printed)
//! when the test fails.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// A temporary directory for logs, removed on drop unless the test is failing (or [`LogDir::keep`]
/// was called).
#[derive(Debug)]
pub struct LogDir {
    path: PathBuf,
    keep: AtomicBool,
}

/// A running child process that is killed and reaped on drop.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: std::process::Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl LogDir {
    pub fn new(name: &str) -> LogDir {
        let id = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("pillion-e2e-{}-{id}-{name}", std::process::id()));
        LogDir::create(path).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A log directory at exactly `path` (created, mode 0755 so the proxy's UID can read the
    /// files put there for it).
    pub fn create(path: PathBuf) -> Result<LogDir, String> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&path).map_err(|e| format!("creating {}: {e}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("chmod {}: {e}", path.display()))?;
        Ok(LogDir {
            path,
            keep: AtomicBool::new(false),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the directory when the guard drops (e.g. after a failure reported without a panic).
    pub fn keep(&self) {
        self.keep.store(true, Ordering::Relaxed);
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("logs kept in {}", self.path.display());
        } else if self.keep.load(Ordering::Relaxed) {
            // The owner has said where the logs are.
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

impl Process {
    /// Spawns `cmd` with stdin closed and stdout + stderr appended to `<dir>/<name>.log`.
    pub fn spawn(name: &str, mut cmd: Command, dir: &LogDir) -> Process {
        let log = dir.path().join(format!("{name}.log"));
        let file = File::create(&log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let stderr = file.try_clone().expect("cloning a log file handle");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name} ({cmd:?}): {e}"));
        Process {
            name: name.to_owned(),
            child,
            log,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits at most `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        crate::poll_until(timeout, Duration::from_millis(20), || self.try_status())
    }

    /// Sends SIGTERM and waits at most `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        self.wait_timeout(timeout)
    }

    /// Sends `signal` to the process, unless it has already been reaped (its PID may be reused).
    pub fn signal(&mut self, signal: libc::c_int) {
        if let Err(e) = self.send(signal) {
            panic!("kill({}, {signal}): {e}", self.pid());
        }
    }

    fn send(&mut self, signal: libc::c_int) -> std::io::Result<()> {
        if self.try_status().is_some() {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(self.child.id()).expect("a PID fits in pid_t");
        // SAFETY: kill has no memory-safety preconditions; the PID is our own unreaped child, so
        // it cannot have been reused by another process.
        match unsafe { libc::kill(pid, signal) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    }

    /// Where the process's stdout and stderr go.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("<{e}>"))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            if let Err(e) = self.send(libc::SIGKILL) {
                eprintln!("warning: kill({}, SIGKILL): {e}", self.pid());
            }
            // SIGKILL cannot be ignored; the bound only guards against a stuck kernel.
            if self.wait_timeout(Duration::from_secs(10)).is_none() {
                eprintln!("warning: {} (pid {}) survived SIGKILL", self.name, self.pid());
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "----- {} (pid {}, {:?}) log {} -----\n{}\n----- end of {} log -----",
                self.name,
                self.child.id(),
                self.status,
                self.log.display(),
                self.log(),
                self.name
            );
        }
    }
}
