//! Counters the registry keeps, as prometheus-client metrics; `slipway-app`
//! registers them in its one metrics registry.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Upper bounds of the upload duration buckets, in seconds.
pub const BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

/// Registry-level counters.
#[derive(Debug)]
pub struct RegistryMetrics {
    /// Blob and manifest bytes received.
    pub bytes_in: Counter,
    /// Blob and manifest bytes sent.
    pub bytes_out: Counter,
    /// Of those, blob bytes sent by `sendfile` (no copy through user space).
    pub bytes_out_zero_copy: Counter,
    /// Duration of blob upload requests (POST, PATCH, PUT with a body), seconds.
    pub upload_duration: Histogram,
}

impl Default for RegistryMetrics {
    fn default() -> Self {
        Self {
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            bytes_out_zero_copy: Counter::default(),
            upload_duration: Histogram::new(BUCKETS),
        }
    }
}

impl RegistryMetrics {
    /// Registers these metrics (under `registry_…`) in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "registry_bytes_received",
            "Blob and manifest bytes received",
            self.bytes_in.clone(),
        );
        registry.register(
            "registry_bytes_sent",
            "Blob and manifest bytes sent",
            self.bytes_out.clone(),
        );
        registry.register(
            "registry_bytes_sent_zero_copy",
            "Blob bytes sent straight from the file by sendfile",
            self.bytes_out_zero_copy.clone(),
        );
        registry.register_with_unit(
            "registry_upload_request_duration",
            "Duration of blob upload requests",
            Unit::Seconds,
            self.upload_duration.clone(),
        );
    }
}
