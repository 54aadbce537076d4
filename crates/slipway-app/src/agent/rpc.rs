//! JSON over HTTP between control planes and node agents, authenticated by the
//! cluster's join token (`Authorization: Bearer …`) in both directions.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RpcError {
    /// Nothing answered (refused, timed out, reset): the peer may be down.
    #[error("{url}: unreachable: {message}")]
    Unreachable { url: String, message: String },
    /// It answered with an error.
    #[error("{url}: {status}: {message}")]
    Status {
        url: String,
        status: StatusCode,
        message: String,
    },
}

/// A client that carries the join token.
#[derive(Clone)]
pub(crate) struct Rpc {
    client: Client<HttpConnector, Full<Bytes>>,
    token: String,
}

impl Rpc {
    pub(crate) fn new(token: &str) -> Self {
        let mut connector = HttpConnector::new();
        // A node whose link is down drops SYNs: give up soon and call it unreachable.
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        connector.set_nodelay(true);
        Self {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
            token: token.to_owned(),
        }
    }

    /// Sends `body` (JSON) and reads the answer as JSON, within `timeout`.
    pub(crate) async fn call<R: DeserializeOwned>(
        &self,
        method: Method,
        url: &str,
        body: Option<&(impl Serialize + Sync)>,
        timeout: Duration,
    ) -> Result<R, RpcError> {
        let bytes = self.raw(method, url, body, timeout).await?;
        serde_json::from_slice(&bytes).map_err(|e| RpcError::Status {
            url: url.to_owned(),
            status: StatusCode::BAD_GATEWAY,
            message: format!("unreadable answer: {e}"),
        })
    }

    /// Sends `body` (JSON) and reads the whole answer, within `timeout`.
    pub(crate) async fn raw(
        &self,
        method: Method,
        url: &str,
        body: Option<&(impl Serialize + Sync)>,
        timeout: Duration,
    ) -> Result<Bytes, RpcError> {
        let unreachable = |message: String| RpcError::Unreachable {
            url: url.to_owned(),
            message,
        };
        let payload = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b).unwrap_or_default()),
            None => Bytes::new(),
        };
        let req = Request::builder()
            .method(method)
            .uri(url)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(payload))
            .map_err(|e| unreachable(e.to_string()))?;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| unreachable(format!("{e:?}")))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .to_bytes();
            Ok::<_, RpcError>((status, body))
        };
        let (status, body) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| unreachable(format!("no answer within {timeout:?}")))??;
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(300).collect());
            return Err(RpcError::Status {
                url: url.to_owned(),
                status,
                message,
            });
        }
        Ok(body)
    }
}

/// Whether `header` carries `Bearer <token>`.
pub(crate) fn bearer_is(headers: &http::HeaderMap, token: &str) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| slipway_auth::opaque::same_secret(given.trim(), token))
}
