//! `pillion-proxy`: configuration → runtime → run.

use pillion_proxy::{app, config, logging};

// mimalloc: measured faster than glibc malloc on the request path (see docs/performance.md),
// and it returns memory to the OS more eagerly, which keeps an idle sidecar small (the
// `allocator` module says how it is called). Built with
// `no_thp`: it would otherwise ask for transparent huge pages for its arenas, and a sidecar's
// memory is small per-connection state that 2 MiB pages would round up (4 MiB of a 10 MiB
// idle RSS was one such page pair).
#[global_allocator]
static ALLOCATOR: pillion_proxy::allocator::MiMalloc = pillion_proxy::allocator::MiMalloc;

use std::process::ExitCode;

fn main() -> ExitCode {
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
