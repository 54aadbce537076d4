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

    /// The server's `host:port`, as used in image references.
    pub fn host(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    async fn send(
        &self,
        method: http::Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<http::Response<hyper::body::Incoming>> {
        let req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(http::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))?;
        self.client.request(req).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach slipway at {}: {e}; is `slipway serve` running?",
                self.base
            )
        })
    }

    /// The JSON answer (`null` for an empty body), or an error carrying the
    /// server's message (admin API or OCI error JSON).
    async fn answer(
        resp: http::Response<hyper::body::Incoming>,
    ) -> anyhow::Result<serde_json::Value> {
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let json: serde_json::Value =
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        if !status.is_success() {
            let msg = json["error"]["message"]
                .as_str()
                .or_else(|| json["errors"][0]["message"].as_str())
                .map_or_else(|| status.to_string(), str::to_owned);
            anyhow::bail!("{msg}");
        }
        Ok(json)
    }

    /// Sends a JSON request (or none) and returns the JSON answer.
    pub async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let bytes = body
            .map(serde_json::to_vec)
            .transpose()?
            .unwrap_or_default();
        Self::answer(self.send(method, path, "application/json", bytes).await?).await
    }

    /// Sends raw bytes (e.g. a TOML spec) and returns the JSON answer.
    pub async fn call_raw(
        &self,
        method: http::Method,
        path: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<serde_json::Value> {
        Self::answer(self.send(method, path, "application/toml", body).await?).await
    }

    /// POSTs to `path` with no body and returns the JSON answer.
    pub async fn post_json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        self.call(http::Method::POST, path, None).await
    }

    /// Streams a response body to `out` as it arrives (for `logs -f`, `events -f`).
    pub async fn stream_to(
        &self,
        path: &str,
        out: &mut (dyn std::io::Write + Send),
    ) -> anyhow::Result<()> {
        let resp = self
            .send(http::Method::GET, path, "application/json", Vec::new())
            .await?;
        if !resp.status().is_success() {
            Self::answer(resp).await?;
            return Ok(());
        }
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                out.write_all(&data)?;
                out.flush()?;
            }
        }
        Ok(())
    }
}
