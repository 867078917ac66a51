//! Logging: text or JSON to stderr, with a filter that `/logging?level=` on the admin endpoint can change while
//! the proxy runs (for example `debug`, or `info,trellis_data_plane::proxy::inbound=debug`). Access logs are events with
//! target `access`: `access=off` silences them.

use std::sync::OnceLock;

use parking_lot::Mutex;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::LogFormat;

struct Control {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

static CONTROL: OnceLock<Control> = OnceLock::new();

/// Installs the process-wide subscriber; the initial filter is `RUST_LOG`, else `info`.
pub fn init(format: LogFormat) {
    let initial = std::env::var("RUST_LOG").ok().filter(|s| EnvFilter::try_new(s).is_ok()).unwrap_or("info".into());
    let (filter, handle) = reload::Layer::new(EnvFilter::new(&initial));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let output = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let output = match format {
        LogFormat::Text => output.boxed(),
        LogFormat::Json => output.json().boxed(),
    };
    tracing_subscriber::registry().with(filter).with(output).init();
    let _ = CONTROL.set(Control { handle, current: Mutex::new(initial) });
}

/// The filter in force (None before [`init`]).
pub fn level() -> Option<String> {
    Some(CONTROL.get()?.current.lock().clone())
}

/// Replaces the filter; an invalid directive is an error and changes nothing.
pub fn set_level(spec: &str) -> Result<(), String> {
    let control = CONTROL.get().ok_or("logging is not initialised")?;
    let filter = EnvFilter::try_new(spec).map_err(|e| format!("invalid level {spec:?}: {e}"))?;
    control.handle.reload(filter).map_err(|e| e.to_string())?;
    *control.current.lock() = spec.to_owned();
    Ok(())
}
