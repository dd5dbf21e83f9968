//! Ctrl-C, and cleaning up when the normal path cannot.
//!
//! SIGINT, SIGTERM and SIGHUP get a handler that only counts them (an atomic increment is all a
//! signal handler may safely do); a watcher thread reads the count. The first signal asks the
//! demo to stop: it checks [`interrupted`] between steps and while it waits, and its guards
//! then stop everything in order. A second signal means "now": the emergency cleanup runs and
//! the process exits 130. The proxies and the control plane run in process groups of their
//! own, so a Ctrl-C in the terminal reaches only the demo, which stops them itself; handlers
//! are reset by `exec`, so children keep the default dispositions.
//!
//! Why not the `ctrlc` crate: it is the same design (a handler that notifies a thread) behind a
//! dependency, for a few lines of libc, which the harness already uses. Blocking the signals
//! and taking them with `sigwait` would be neater, but a blocked mask is inherited by every
//! child, and the proxies would then never see the SIGTERM that stops them.
//!
//! The emergency cleanup (SIGKILL to our children, `ip netns delete` of our namespaces) also runs
//! from the panic hook in builds that abort on panic: the workspace's release profile sets
//! `panic = "abort"`, so there a panic would skip every guard.

use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Signals received so far.
static RECEIVED: AtomicU32 = AtomicU32::new(0);

/// What the emergency cleanup removes.
static CREATED: Mutex<Created> = Mutex::new(Created {
    pids: Vec::new(),
    namespaces: Vec::new(),
    files: None,
});

struct Created {
    pids: Vec<u32>,
    namespaces: Vec<String>,
    /// The work directory: left in place, and named, so its logs can be read.
    files: Option<std::path::PathBuf>,
}

/// Installs the handlers, the watcher thread and (where panics abort) the panic hook.
pub fn install() -> Result<(), String> {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: `action` is fully initialised (zeroed, then the handler, an empty mask and
        // SA_RESTART so interrupted system calls resume); the handler only touches an atomic,
        // which is async-signal-safe.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = count_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            action.sa_flags = libc::SA_RESTART;
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(format!(
                "installing a signal handler: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(watch)
        .map_err(|e| format!("starting the signal thread: {e}"))?;

    if cfg!(panic = "abort") {
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default_hook(info);
            emergency_cleanup();
        }));
    }
    Ok(())
}

extern "C" fn count_signal(_signal: libc::c_int) {
    RECEIVED.fetch_add(1, Ordering::SeqCst);
}

/// Tells the user what the first signal does, and acts on the second.
fn watch() {
    let mut told = false;
    loop {
        match RECEIVED.load(Ordering::SeqCst) {
            0 => {}
            1 if !told => {
                told = true;
                eprintln!("\npillion-demo: stopping and cleaning up (press Ctrl-C again to force)");
            }
            1 => {}
            _ => {
                eprintln!("\npillion-demo: second signal: killing everything now");
                emergency_cleanup();
                std::process::exit(130);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a stop was asked for.
pub fn interrupted() -> bool {
    RECEIVED.load(Ordering::SeqCst) > 0
}

/// Remembers a child process for the emergency cleanup.
pub fn track_pid(pid: u32) {
    if let Ok(mut created) = CREATED.lock() {
        created.pids.push(pid);
    }
}

/// Remembers a namespace for the emergency cleanup.
pub fn track_netns(name: &str) {
    if let Ok(mut created) = CREATED.lock() {
        created.namespaces.push(name.to_owned());
    }
}

/// Remembers the work directory, to name it after an emergency cleanup.
pub fn track_files(dir: &std::path::Path) {
    if let Ok(mut created) = CREATED.lock() {
        created.files = Some(dir.to_owned());
    }
}

/// Forgets everything: the guards have cleaned up (or are about to), and a PID we reaped may
/// belong to someone else later.
pub fn forget_all() {
    if let Ok(mut created) = CREATED.lock() {
        created.pids.clear();
        created.namespaces.clear();
        created.files = None;
    }
}

/// Kills our children and deletes our namespaces, without waiting on any lock that a
/// panicking thread may hold.
pub fn emergency_cleanup() {
    let Ok(mut created) = CREATED.try_lock() else {
        return;
    };
    for pid in created.pids.drain(..) {
        if let Ok(pid) = libc::pid_t::try_from(pid) {
            // SAFETY: kill has no memory-safety preconditions. These are our own children,
            // never reaped on this path (the guards that reap them have not run).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    for ns in created.namespaces.drain(..).rev() {
        let _ = Command::new("ip").args(["netns", "delete", &ns]).output();
    }
    if let Some(dir) = created.files.take() {
        eprintln!(
            "pillion-demo: processes killed, namespaces deleted; files and logs left in {}",
            dir.display()
        );
    }
}
