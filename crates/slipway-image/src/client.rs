//! A small async OCI distribution client (plain HTTP), enough to push packed images
//! and to pull images from another registry.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use slipway_core::Digest;
use tokio::io::AsyncWriteExt;

type Body = BoxBody<Bytes, std::io::Error>;

/// Why a registry call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The registry could not be reached.
    #[error("cannot reach registry {base}: {message}")]
    Unreachable {
        /// Registry URL.
        base: String,
        /// Cause.
        message: String,
    },
    /// The registry answered with an error.
    #[error("{method} {url} answered {status}: {message}")]
    Status {
        /// Request method.
        method: String,
        /// Request URL.
        url: String,
        /// HTTP status.
        status: StatusCode,
        /// The OCI error message, if any.
        message: String,
    },
    /// Local I/O failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The registry sent something unexpected.
    #[error("registry protocol error: {0}")]
    Protocol(String),
}

/// A client for one registry.
#[derive(Clone)]
pub struct RegistryClient {
    base: String,
    client: Client<HttpConnector, Body>,
    token: Option<String>,
}

/// Called with the number of bytes sent so far.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// A whole response body.
async fn read_body(resp: http::Response<hyper::body::Incoming>) -> Result<Bytes, ClientError> {
    Ok(resp
        .into_body()
        .collect()
        .await
        .map_err(|e| ClientError::Protocol(e.to_string()))?
        .to_bytes())
}

/// The strings of a JSON array (empty for anything else).
fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn full(b: Bytes) -> Body {
    Full::new(b).map_err(|never| match never {}).boxed()
}

impl RegistryClient {
    /// A client for `host[:port]` over plain HTTP.
    pub fn new(host: &str) -> Self {
        let base = if host.starts_with("http://") {
            host.trim_end_matches('/').to_owned()
        } else {
            format!("http://{host}")
        };
        Self {
            base,
            client: Client::builder(TokioExecutor::new()).build_http(),
            token: None,
        }
    }

    /// Sends `Authorization: Bearer TOKEN` (a Slipway API or login token) with
    /// every request.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// The registry's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Body,
    ) -> Result<http::Response<hyper::body::Incoming>, ClientError> {
        let mut b = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        if let Some(t) = &self.token {
            b = b.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = b
            .body(body)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.client
            .request(req)
            .await
            .map_err(|e| ClientError::Unreachable {
                base: self.base.clone(),
                message: e.to_string(),
            })
    }

    async fn check(
        method: &Method,
        url: &str,
        resp: http::Response<hyper::body::Incoming>,
        ok: &[StatusCode],
    ) -> Result<http::Response<hyper::body::Incoming>, ClientError> {
        if ok.contains(&resp.status()) {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|j| j["errors"][0]["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
        Err(ClientError::Status {
            method: method.to_string(),
            url: url.to_owned(),
            status,
            message,
        })
    }

    /// Whether `repo` has the blob.
    pub async fn blob_exists(&self, repo: &str, digest: &Digest) -> Result<bool, ClientError> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.base);
        let resp = self
            .send(Method::HEAD, &url, &[], full(Bytes::new()))
            .await?;
        match resp.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Self::check(&Method::HEAD, &url, resp, &[])
                .await
                .map(|_| false),
        }
    }

    /// Tries a cross-repository mount; returns whether it happened.
    pub async fn mount_blob(
        &self,
        repo: &str,
        from: &str,
        digest: &Digest,
    ) -> Result<bool, ClientError> {
        let url = format!(
            "{}/v2/{repo}/blobs/uploads/?mount={digest}&from={from}",
            self.base
        );
        let resp = self
            .send(Method::POST, &url, &[], full(Bytes::new()))
            .await?;
        Ok(resp.status() == StatusCode::CREATED)
    }

    /// Uploads a blob from a file: a session, then one streamed PUT.
    pub async fn push_blob_file(
        &self,
        repo: &str,
        digest: &Digest,
        path: &Path,
        progress: Option<Progress>,
    ) -> Result<(), ClientError> {
        let url = format!("{}/v2/{repo}/blobs/uploads/", self.base);
        let resp = self
            .send(Method::POST, &url, &[], full(Bytes::new()))
            .await?;
        let resp = Self::check(&Method::POST, &url, resp, &[StatusCode::ACCEPTED]).await?;
        let put = self.upload_url(&resp, digest)?;
        let file = tokio::fs::File::open(path).await?;
        let len = file.metadata().await?.len();
        let mut sent = 0u64;
        let stream =
            tokio_util::io::ReaderStream::with_capacity(file, 256 << 10).map(move |chunk| {
                if let (Ok(c), Some(p)) = (&chunk, &progress) {
                    sent += c.len() as u64;
                    p(sent);
                }
                chunk.map(Frame::data)
            });
        let body = BodyExt::boxed(StreamBody::new(stream));
        let len_s = len.to_string();
        let resp = self
            .send(
                Method::PUT,
                &put,
                &[
                    ("content-type", "application/octet-stream"),
                    ("content-length", &len_s),
                ],
                body,
            )
            .await?;
        Self::check(&Method::PUT, &put, resp, &[StatusCode::CREATED])
            .await
            .map(|_| ())
    }

    /// Uploads a small blob from memory.
    pub async fn push_blob_bytes(&self, repo: &str, data: Bytes) -> Result<Digest, ClientError> {
        let digest = Digest::sha256_of(&data);
        if self.blob_exists(repo, &digest).await? {
            return Ok(digest);
        }
        // A session, then one PUT: every registry supports this (single-POST
        // monolithic uploads are optional in the spec, and Distribution lacks them).
        let url = format!("{}/v2/{repo}/blobs/uploads/", self.base);
        let resp = self
            .send(Method::POST, &url, &[], full(Bytes::new()))
            .await?;
        let resp = Self::check(&Method::POST, &url, resp, &[StatusCode::ACCEPTED]).await?;
        let put = self.upload_url(&resp, &digest)?;
        let resp = self
            .send(
                Method::PUT,
                &put,
                &[("content-type", "application/octet-stream")],
                full(data),
            )
            .await?;
        Self::check(&Method::PUT, &put, resp, &[StatusCode::CREATED]).await?;
        Ok(digest)
    }

    /// The URL to PUT a session's bytes to, from its `Location`, with `digest=`.
    fn upload_url(
        &self,
        resp: &http::Response<hyper::body::Incoming>,
        digest: &Digest,
    ) -> Result<String, ClientError> {
        let loc = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ClientError::Protocol("upload session without Location".into()))?;
        let mut put = if loc.starts_with('/') {
            format!("{}{loc}", self.base)
        } else {
            loc.to_owned()
        };
        put.push(if put.contains('?') { '&' } else { '?' });
        put.push_str(&format!("digest={digest}"));
        Ok(put)
    }

    /// Puts a manifest; returns its digest as the registry reports it.
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: Bytes,
    ) -> Result<Digest, ClientError> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base);
        let local = Digest::sha256_of(&body);
        let resp = self
            .send(
                Method::PUT,
                &url,
                &[("content-type", media_type)],
                full(body),
            )
            .await?;
        let resp = Self::check(&Method::PUT, &url, resp, &[StatusCode::CREATED]).await?;
        Ok(resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(local))
    }

    /// Fetches a manifest: (media type, bytes).
    pub async fn get_manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<(String, Bytes), ClientError> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base);
        let accept = [
            slipway_core::media::OCI_MANIFEST,
            slipway_core::media::OCI_INDEX,
            slipway_core::media::DOCKER_MANIFEST,
            slipway_core::media::DOCKER_MANIFEST_LIST,
        ]
        .join(", ");
        let resp = self
            .send(
                Method::GET,
                &url,
                &[("accept", &accept)],
                full(Bytes::new()),
            )
            .await?;
        let resp = Self::check(&Method::GET, &url, resp, &[StatusCode::OK]).await?;
        let mt = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = read_body(resp).await?;
        Ok((mt, body))
    }

    /// Fetches a small blob into memory.
    pub async fn get_blob(&self, repo: &str, digest: &Digest) -> Result<Bytes, ClientError> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.base);
        let resp = self
            .send(Method::GET, &url, &[], full(Bytes::new()))
            .await?;
        let resp = Self::check(&Method::GET, &url, resp, &[StatusCode::OK]).await?;
        read_body(resp).await
    }

    /// Streams a blob into a file.
    pub async fn get_blob_to_file(
        &self,
        repo: &str,
        digest: &Digest,
        path: &Path,
    ) -> Result<u64, ClientError> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.base);
        let resp = self
            .send(Method::GET, &url, &[], full(Bytes::new()))
            .await?;
        let resp = Self::check(&Method::GET, &url, resp, &[StatusCode::OK]).await?;
        let mut body = resp.into_body();
        let mut f = tokio::fs::File::create(path).await?;
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::Protocol(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                f.write_all(&data).await?;
                n += data.len() as u64;
            }
        }
        f.flush().await?;
        Ok(n)
    }

    /// Lists repositories.
    pub async fn catalog(&self) -> Result<Vec<String>, ClientError> {
        let j = self.get_json(&format!("{}/v2/_catalog", self.base)).await?;
        Ok(strings(&j["repositories"]))
    }

    /// Lists a repository's tags.
    pub async fn tags(&self, repo: &str) -> Result<Vec<String>, ClientError> {
        let j = self
            .get_json(&format!("{}/v2/{repo}/tags/list", self.base))
            .await?;
        Ok(strings(&j["tags"]))
    }

    async fn get_json(&self, url: &str) -> Result<serde_json::Value, ClientError> {
        let resp = self.send(Method::GET, url, &[], full(Bytes::new())).await?;
        let resp = Self::check(&Method::GET, url, resp, &[StatusCode::OK]).await?;
        let body = read_body(resp).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Protocol(e.to_string()))
    }
}
