//! Logging: a `tracing` subscriber writing plain or JSON lines to stderr, with a filter that the
//! admin server can replace at run time (`PUT /log-level`) without restarting the proxy.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, Registry, fmt, layer::SubscriberExt, reload, util::SubscriberInitExt};

use crate::config::LogFormat;

/// Handle on the live log filter.
#[derive(Clone)]
pub struct LogLevel(reload::Handle<EnvFilter, Registry>);

impl LogLevel {
    /// Installs the global subscriber. `filter` was validated by the config already.
    pub fn init(filter: &str, format: LogFormat) -> Self {
        let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
        let (filter, handle) = reload::Layer::new(filter);
        // Colours only for a person at a terminal, never into log files.
        let ansi = std::io::stderr().is_terminal();
        let (plain, json) = match format {
            LogFormat::Plain => (Some(fmt::layer().with_ansi(ansi).with_writer(std::io::stderr)), None),
            LogFormat::Json => (None, Some(fmt::layer().json().with_writer(std::io::stderr))),
        };
        tracing_subscriber::registry()
            .with(filter)
            .with(plain)
            .with(json)
            .init();
        LogLevel(handle)
    }

    pub fn current(&self) -> String {
        self.0.with_current(|f| f.to_string()).unwrap_or_default()
    }

    /// Replaces the filter; a filter that does not parse leaves the current one in force.
    pub fn set(&self, filter: &str) -> Result<(), String> {
        let filter = EnvFilter::try_new(filter.trim()).map_err(|e| format!("invalid log filter: {e}"))?;
        self.0.reload(filter).map_err(|e| e.to_string())
    }
}
