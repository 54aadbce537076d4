//! Request counters and the Prometheus text rendering of `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use slipway_registry::RegistryMetrics;

/// Process-wide counters that are not the registry's own.
#[derive(Debug, Default)]
pub struct AppMetrics {
    requests: Mutex<BTreeMap<(&'static str, String, u16), u64>>,
    pub gc_runs: AtomicU64,
    pub gc_freed_bytes: AtomicU64,
    pub webhook_failures: AtomicU64,
    pub webhook_deliveries: AtomicU64,
}

impl AppMetrics {
    pub fn record(&self, route: &'static str, method: &str, status: u16) {
        let mut m = self
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *m.entry((route, method.to_owned(), status)).or_default() += 1;
    }

    pub fn render(&self, reg: &RegistryMetrics, stored_bytes: u64) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP slipway_http_requests_total HTTP requests by route, method and status.\n",
        );
        out.push_str("# TYPE slipway_http_requests_total counter\n");
        {
            let m = self
                .requests
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for ((route, method, status), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "slipway_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {n}"
                );
            }
        }
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            &mut out,
            "slipway_registry_bytes_received_total",
            "Blob and manifest bytes received.",
            reg.bytes_in.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "slipway_registry_bytes_sent_total",
            "Blob and manifest bytes sent.",
            reg.bytes_out.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "slipway_gc_runs_total",
            "Garbage collection runs.",
            self.gc_runs.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "slipway_gc_freed_bytes_total",
            "Bytes freed by garbage collection.",
            self.gc_freed_bytes.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "slipway_webhook_deliveries_total",
            "Webhook events delivered.",
            self.webhook_deliveries.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "slipway_webhook_failures_total",
            "Webhook events dropped after all attempts.",
            self.webhook_failures.load(Ordering::Relaxed),
        );
        out.push_str(
            "# HELP slipway_registry_stored_bytes Bytes of committed blobs, stored once each.\n",
        );
        out.push_str("# TYPE slipway_registry_stored_bytes gauge\n");
        let _ = writeln!(out, "slipway_registry_stored_bytes {stored_bytes}");
        out.push_str("# HELP slipway_registry_upload_request_duration_seconds Duration of blob upload requests.\n");
        out.push_str("# TYPE slipway_registry_upload_request_duration_seconds histogram\n");
        reg.upload_duration
            .render("slipway_registry_upload_request_duration_seconds", &mut out);
        out
    }
}
