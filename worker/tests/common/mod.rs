//! Helpers shared by the worker's integration tests.

// Each test binary that includes this module uses a different subset of it.
#![allow(dead_code)]

use std::sync::OnceLock;

use metrics_exporter_prometheus::PrometheusHandle;

/// The process-wide Prometheus recorder (tests share it, so counts are checked as "at least").
pub fn metrics_text() -> String {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| fastfusion_worker::metrics::install_recorder().expect("recorder"))
        .render()
}

/// The value of `series` (name with labels, exactly as rendered), 0 when absent.
pub fn metric(series: &str) -> f64 {
    metrics_text()
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}
