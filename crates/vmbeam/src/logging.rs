//! The log of `vmbeam run` (tracing): timestamped lines on stderr or in
//! `--log-file`, at `info` by default, `debug` with `-v`, `trace` with
//! `-vv`; `RUST_LOG` (tracing-subscriber's filter syntax) overrides both.
//! Client commands log only warnings, so their output stays what they print.

use std::io::IsTerminal;
use std::path::Path;

use tracing_subscriber::EnvFilter;

/// Errors of setting up the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log file cannot be opened.
    #[error("cannot open log file {path}: {source}")]
    Open {
        /// Path.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
}

/// Installs the global subscriber. `server`: `vmbeam run` (info by
/// default) rather than a client (warnings only).
pub fn init(verbose: u8, server: bool, file: Option<&Path>) -> Result<(), LogError> {
    let level = match (server, verbose) {
        (false, 0) => "warn",
        (true, 0) => "info",
        (_, 1) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let res = match file {
        Some(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| LogError::Open {
                    path: p.display().to_string(),
                    source,
                })?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(f))
                .try_init()
        }
        None => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .try_init(),
    };
    // Already installed (a second call in one process) is not an error.
    let _ = res;
    Ok(())
}
