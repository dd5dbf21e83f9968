//! `pillion-proxy`: configuration → runtime → run.

use pillion_proxy::{app, config, logging};

// mimalloc: measured faster than glibc malloc on the request path (see docs/performance.md),
// and it returns memory to the OS more eagerly, which keeps an idle sidecar small.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

fn main() -> ExitCode {
    disable_transparent_huge_pages();
    let config = config::Config::from_env_or_exit();
    let log = logging::LogLevel::init(&config.log, config.log_format);

    // One worker is the usual sidecar size: the proxy shares the pod's CPU with the app, and a
    // single-threaded runtime avoids cross-thread wakeups on the data path.
    let runtime = if config.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.worker_threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pillion-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(app::run(config, log)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ (app::AppError::RouteFile(_) | app::AppError::Identity(_))) => {
            eprintln!("pillion-proxy: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("pillion-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A sidecar's memory is mostly small per-connection state; transparent huge pages would round
/// the allocator's arenas up to 2 MiB pages and triple the idle RSS for nothing.
fn disable_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integer arguments, touches no memory of ours, and
    // only changes how the kernel backs this process's future page faults.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::debug!("could not disable transparent huge pages");
    }
}
