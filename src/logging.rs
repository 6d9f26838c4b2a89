//! Logging setup: text on a terminal, JSON lines otherwise (for log collectors), or to a file.

use std::io::IsTerminal;
use std::path::Path;

use tracing_subscriber::EnvFilter;

fn filter(default: &str) -> EnvFilter {
    EnvFilter::try_from_env("MEDFED_LOG").unwrap_or_else(|_| EnvFilter::new(default))
}

/// Logs to stderr; `format` is "text", "json" or "auto"; `level` unless `MEDFED_LOG` is set.
pub fn init_stderr(format: &str, level: &str) {
    let json = match format {
        "json" => true,
        "text" => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(level))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Logs to a file (text), for runs whose terminal shows progress instead.
pub fn init_file(path: &Path, level: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        medfed_infra::files::create_private_dir(dir)?;
    }
    let file = medfed_infra::files::private_file_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    tracing_subscriber::fmt()
        .with_env_filter(filter(level))
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .init();
    Ok(())
}
