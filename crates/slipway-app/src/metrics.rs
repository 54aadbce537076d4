//! `/metrics`: one prometheus-client registry (prefix `slipway_`) holding the
//! daemon's counters, the registry's, and collectors that read the store's size
//! and every ingress's per-revision traffic at scrape time. Rendered in the
//! OpenMetrics text format, which Prometheus scrapes natively.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use slipway_registry::RegistryMetrics;

/// The labels of `slipway_http_requests_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: &'static str,
    method: String,
    status: u16,
}

/// Process-wide counters that are not the registry's own.
#[derive(Debug, Default)]
pub struct AppMetrics {
    requests: Family<HttpLabels, Counter>,
    pub gc_runs: Counter,
    pub gc_freed_bytes: Counter,
    pub webhook_failures: Counter,
    pub webhook_deliveries: Counter,
}

/// The media type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl AppMetrics {
    /// Counts one answered HTTP request.
    pub fn record(&self, route: &'static str, method: &str, status: u16) {
        self.requests
            .get_or_create(&HttpLabels {
                route,
                method: method.to_owned(),
                status,
            })
            .inc();
    }

    /// The one registry `/metrics` renders: these counters, the registry's,
    /// the store's size and the services' traffic.
    pub(crate) fn registry(
        &self,
        registry: &RegistryMetrics,
        store: Arc<slipway_store::Store>,
        services: Arc<crate::services::Services>,
    ) -> Registry {
        let mut r = Registry::with_prefix("slipway");
        r.register(
            "http_requests",
            "HTTP requests by route, method and status",
            self.requests.clone(),
        );
        r.register("gc_runs", "Garbage collection runs", self.gc_runs.clone());
        r.register(
            "gc_freed_bytes",
            "Bytes freed by garbage collection",
            self.gc_freed_bytes.clone(),
        );
        r.register(
            "webhook_deliveries",
            "Webhook events delivered",
            self.webhook_deliveries.clone(),
        );
        r.register(
            "webhook_failures",
            "Webhook events dropped after all attempts",
            self.webhook_failures.clone(),
        );
        registry.register(&mut r);
        r.register_collector(Box::new(StoreSize(store)));
        r.register_collector(Box::new(ProxyTraffic(services)));
        r
    }
}

/// Renders `registry` as OpenMetrics text.
pub(crate) fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::error!("cannot render the metrics: {e}");
    }
    out
}

/// `slipway_registry_stored_bytes`, read at scrape time.
struct StoreSize(Arc<slipway_store::Store>);

impl std::fmt::Debug for StoreSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreSize")
    }
}

impl Collector for StoreSize {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let gauge = ConstGauge::new(i64::try_from(self.0.stored_bytes()).unwrap_or(i64::MAX));
        let metric = encoder.encode_descriptor(
            "registry_stored",
            "Bytes of committed blobs, stored once each",
            Some(&Unit::Bytes),
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}

/// Each ingress's per-revision requests, errors, retries and latency, read at
/// scrape time from one snapshot so the families agree with each other.
struct ProxyTraffic(Arc<crate::services::Services>);

impl std::fmt::Debug for ProxyTraffic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProxyTraffic")
    }
}

impl Collector for ProxyTraffic {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let stats = self.0.proxy_stats();
        for (name, help, value) in [
            (
                "proxy_requests",
                "Requests through a service's proxy, by revision",
                (|st| st.requests) as fn(&slipway_proxy::Stats) -> u64,
            ),
            (
                "proxy_errors",
                "5xx answers and failed requests, by revision (attempts retried elsewhere included)",
                |st| st.errors,
            ),
            (
                "proxy_retries",
                "Requests sent again to another instance after one of this revision failed them",
                |st| st.retries,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (service, revision, st) in &stats {
                let labels = [
                    ("service", service.clone()),
                    ("revision", revision.to_string()),
                ];
                ConstCounter::new(value(st)).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "proxy_request_duration",
            "Latency through the proxy, by revision",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (service, revision, st) in &stats {
            let labels = [
                ("service", service.clone()),
                ("revision", revision.to_string()),
            ];
            #[expect(clippy::cast_precision_loss, reason = "bucket bounds in ms")]
            let buckets: Vec<(f64, u64)> = slipway_proxy::BUCKETS_MS
                .iter()
                .zip(st.buckets)
                .map(|(le, n)| {
                    let le = if *le == u64::MAX {
                        f64::MAX
                    } else {
                        *le as f64 / 1000.0
                    };
                    (le, n)
                })
                .collect();
            #[expect(clippy::cast_precision_loss, reason = "a sum of latencies")]
            let sum = st.latency_sum_us as f64 / 1e6;
            family
                .encode_family(&labels)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    sum,
                    st.requests,
                    &buckets,
                    None,
                )?;
        }
        Ok(())
    }
}
