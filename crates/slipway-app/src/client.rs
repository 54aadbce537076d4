//! A small typed client for the admin API, used by the CLI.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The default server URL when neither `--server` nor `SLIPWAY_SERVER` is given.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:5000";

/// Talks to a running `slipway serve`.
pub struct AdminClient {
    base: String,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl AdminClient {
    /// A client for `base`, e.g. `http://127.0.0.1:5000`.
    pub fn new(base: &str) -> anyhow::Result<Self> {
        if !base.starts_with("http://") {
            anyhow::bail!(
                "server URL {base:?} must start with http:// (set --server or SLIPWAY_SERVER)"
            );
        }
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// POSTs to `path` and returns the JSON body, or an error naming the status.
    pub async fn post_json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{path}", self.base);
        let req = http::Request::post(&url).body(Full::new(Bytes::new()))?;
        let resp = self.client.request(req).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach slipway at {}: {e}; is `slipway serve` running?",
                self.base
            )
        })?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        let json: serde_json::Value =
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        if !status.is_success() {
            let msg = json["errors"][0]["message"].as_str().unwrap_or("no detail");
            anyhow::bail!("{url} answered {status}: {msg}");
        }
        Ok(json)
    }
}
