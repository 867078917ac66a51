//! `proxy.yaml` as the proxy reads it at start: YAML, then every field's validation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(config) = trellis_data_plane::config::Config::parse(text) {
        for workload in &config.workloads {
            let _ = workload.to_proto();
        }
    }
});
