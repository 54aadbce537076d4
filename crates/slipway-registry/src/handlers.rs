//! The `/v2` handlers.

use std::collections::HashMap;
use std::io::SeekFrom;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use slipway_core::{Digest, Reference, RepoName, media};
use slipway_store::{StoreError, UploadWriter};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use crate::error::{Code, RegistryError, Result, range_header};
use crate::route::{self, Route};
use crate::{Action, Registry};

const API_VERSION: &str = "registry/2.0";

/// The principal making a request, put in its extensions by the caller's
/// authentication layer; carried into [`crate::RegistryEvent`]s.
#[derive(Debug, Clone)]
pub struct Caller(pub String);

/// Limits `/v2/_catalog` to the repositories a caller may see, when its
/// authentication layer puts one in the request's extensions.
#[derive(Clone)]
pub struct CatalogFilter(pub std::sync::Arc<dyn Fn(&str) -> bool + Send + Sync>);

/// Marks a response with the route it served, for request metrics.
#[derive(Debug, Clone, Copy)]
pub struct RouteLabel(pub &'static str);

pub(crate) fn router(registry: Registry) -> Router {
    // A fallback rather than `/v2/{*rest}` routes: the path must reach the parser
    // byte for byte (the route matcher treats `//` leniently).
    Router::new().fallback(dispatch).with_state(registry)
}

async fn dispatch(State(reg): State<Registry>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let rest = match path.strip_prefix("/v2/") {
        Some(rest) => rest,
        None if path == "/v2" => "",
        None => {
            return RegistryError::new(
                Code::Unsupported,
                format!("no route for {} {path}", req.method()),
            )
            .with_status(StatusCode::NOT_FOUND)
            .into_response();
        }
    };
    let (label, mut resp) = match route::parse(rest) {
        Ok(route) => {
            let label = route.label();
            let resp = match handle(&reg, route, req).await {
                Ok(r) => r,
                Err(e) => e.into_response(),
            };
            (label, resp)
        }
        Err(e) => (
            "unknown",
            unknown_reference(req.method(), rest, e).into_response(),
        ),
    };
    resp.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static(API_VERSION),
    );
    resp.extensions_mut().insert(RouteLabel(label));
    resp
}

/// A manifest that cannot exist (its reference is not a valid tag or digest) is
/// one that is not in the repository: reads and deletes answer 404
/// `MANIFEST_UNKNOWN`, as the distribution spec does for a missing manifest. A
/// push keeps the 400: there the client is told what is wrong with its input.
fn unknown_reference(method: &Method, rest: &str, e: RegistryError) -> RegistryError {
    let reads = matches!(*method, Method::GET | Method::HEAD | Method::DELETE);
    let segs: Vec<&str> = rest.split('/').collect();
    let is_manifest = segs.len() >= 3
        && segs[segs.len() - 2] == "manifests"
        && segs[..segs.len() - 2].join("/").parse::<RepoName>().is_ok();
    if reads && is_manifest && matches!(e.code, Code::TagInvalid | Code::DigestInvalid) {
        return RegistryError::new(
            Code::ManifestUnknown,
            format!(
                "manifest {:?} is not known in this repository ({})",
                segs[segs.len() - 1],
                e.message
            ),
        );
    }
    e
}

fn not_allowed(method: &Method, allow: &'static str) -> RegistryError {
    RegistryError::new(
        Code::Unsupported,
        format!("method {method} is not allowed here (allowed: {allow})"),
    )
    .with_status(StatusCode::METHOD_NOT_ALLOWED)
    .with_header(header::ALLOW, allow)
}

async fn handle(reg: &Registry, route: Route, req: Request) -> Result<Response> {
    let method = req.method().clone();
    let query = parse_query(req.uri().query());
    match (route, method) {
        (Route::Base, Method::GET | Method::HEAD) => {
            Ok((StatusCode::OK, axum::Json(serde_json::json!({}))).into_response())
        }
        (Route::Base, m) => Err(not_allowed(&m, "GET, HEAD")),
        (Route::Catalog, Method::GET) => {
            let filter = req.extensions().get::<CatalogFilter>().cloned();
            catalog(reg, &query, filter).await
        }
        (Route::Catalog, m) => Err(not_allowed(&m, "GET")),
        (Route::Tags(repo), Method::GET) => tags(reg, repo, &query).await,
        (Route::Tags(_), m) => Err(not_allowed(&m, "GET")),
        (Route::Manifest(repo, r), Method::GET) => get_manifest(reg, repo, r, true).await,
        (Route::Manifest(repo, r), Method::HEAD) => get_manifest(reg, repo, r, false).await,
        (Route::Manifest(repo, r), Method::PUT) => put_manifest(reg, repo, r, req).await,
        (Route::Manifest(repo, r), Method::DELETE) => {
            let caller = req.extensions().get::<Caller>().map(|c| c.0.clone());
            delete_manifest(reg, repo, r, caller).await
        }
        (Route::Manifest(..), m) => Err(not_allowed(&m, "GET, HEAD, PUT, DELETE")),
        (Route::Blob(repo, d), Method::GET) => {
            // A plain HTTP/1 connection can take the bytes by sendfile.
            let slot = (req.version() <= http::Version::HTTP_11)
                .then(|| {
                    req.extensions()
                        .get::<crate::zerocopy::SendfileSlot>()
                        .cloned()
                })
                .flatten();
            get_blob(reg, repo, d, req.headers(), Some(slot)).await
        }
        (Route::Blob(repo, d), Method::HEAD) => get_blob(reg, repo, d, req.headers(), None).await,
        (Route::Blob(repo, d), Method::DELETE) => {
            blocking(reg, move |s| s.delete_blob(&repo, &d)).await?;
            Ok(StatusCode::ACCEPTED.into_response())
        }
        (Route::Blob(..), m) => Err(not_allowed(&m, "GET, HEAD, DELETE")),
        (Route::UploadStart(repo), Method::POST) => start_upload(reg, repo, &query, req).await,
        (Route::UploadStart(_), m) => Err(not_allowed(&m, "POST")),
        (Route::Upload(repo, id), Method::GET) => {
            let (r, i) = (repo.clone(), id.clone());
            let offset = blocking(reg, move |s| s.upload_offset(&r, &i)).await?;
            Ok(upload_accepted(StatusCode::NO_CONTENT, &repo, &id, offset))
        }
        (Route::Upload(repo, id), Method::PATCH) => patch_upload(reg, repo, id, req).await,
        (Route::Upload(repo, id), Method::PUT) => finish_upload(reg, repo, id, &query, req).await,
        (Route::Upload(repo, id), Method::DELETE) => {
            blocking(reg, move |s| s.cancel_upload(&repo, &id)).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        (Route::Upload(..), m) => Err(not_allowed(&m, "GET, PATCH, PUT, DELETE")),
        (Route::Referrers(repo, d), Method::GET) => referrers(reg, repo, d, &query).await,
        (Route::Referrers(..), m) => Err(not_allowed(&m, "GET")),
    }
}

/// Runs a blocking store call off the async workers.
async fn blocking<T, F>(reg: &Registry, f: F) -> Result<T>
where
    F: FnOnce(&slipway_store::Store) -> std::result::Result<T, StoreError> + Send + 'static,
    T: Send + 'static,
{
    let store = reg.store.clone();
    match tokio::task::spawn_blocking(move || f(&store)).await {
        Ok(r) => r.map_err(RegistryError::from),
        Err(e) => Err(RegistryError::new(
            Code::Unknown,
            format!("store task failed: {e}"),
        )),
    }
}

fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    slipway_core::form::pairs(q.unwrap_or(""))
        .into_iter()
        .collect()
}

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn page_size(query: &HashMap<String, String>) -> Result<Option<usize>> {
    query
        .get("n")
        .map(|n| {
            n.parse::<usize>().map_err(|_| {
                RegistryError::new(
                    Code::PaginationNumberInvalid,
                    format!("n={n:?} is not a non-negative integer"),
                )
            })
        })
        .transpose()
}

fn paged(
    items: Vec<String>,
    n: Option<usize>,
    link_base: &str,
    key: &str,
    extra: serde_json::Value,
) -> Response {
    let mut items = items;
    let mut link = None;
    if let Some(n) = n
        && items.len() > n
    {
        items.truncate(n);
        if let Some(last) = items.last() {
            link = Some(format!("<{link_base}?n={n}&last={last}>; rel=\"next\""));
        }
    }
    let mut body = extra;
    body[key] = serde_json::json!(items);
    let mut resp = axum::Json(body).into_response();
    if let Some(l) = link {
        resp.headers_mut().insert(header::LINK, hv(&l));
    }
    resp
}

async fn catalog(
    reg: &Registry,
    query: &HashMap<String, String>,
    filter: Option<CatalogFilter>,
) -> Result<Response> {
    let n = page_size(query)?;
    let last = query.get("last").cloned();
    let repos = blocking(reg, move |s| match filter {
        None => s.list_repos(last.as_deref(), n.map(|n| n + 1)),
        Some(CatalogFilter(keep)) => {
            let mut all = s.list_repos(last.as_deref(), None)?;
            all.retain(|r| keep(r));
            if let Some(n) = n {
                all.truncate(n + 1);
            }
            Ok(all)
        }
    })
    .await?;
    Ok(paged(
        repos,
        n,
        "/v2/_catalog",
        "repositories",
        serde_json::json!({}),
    ))
}

async fn tags(reg: &Registry, repo: RepoName, query: &HashMap<String, String>) -> Result<Response> {
    let n = page_size(query)?;
    let last = query.get("last").cloned();
    let r = repo.clone();
    let tags = blocking(reg, move |s| {
        s.list_tags(&r, last.as_deref(), n.map(|n| n + 1))
    })
    .await?;
    Ok(paged(
        tags,
        n,
        &format!("/v2/{repo}/tags/list"),
        "tags",
        serde_json::json!({ "name": repo.as_str() }),
    ))
}

async fn get_manifest(
    reg: &Registry,
    repo: RepoName,
    r: Reference,
    with_body: bool,
) -> Result<Response> {
    let (meta, bytes) = if with_body {
        let (m, b) = blocking(reg, move |s| s.get_manifest(&repo, &r)).await?;
        (m, Some(b))
    } else {
        (
            blocking(reg, move |s| s.stat_manifest(&repo, &r)).await?,
            None,
        )
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, hv(&meta.media_type));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(meta.size));
    headers.insert("docker-content-digest", hv(&meta.digest.to_string()));
    headers.insert(header::ETAG, hv(&format!("\"{}\"", meta.digest)));
    match bytes {
        Some(b) => {
            reg.metrics.bytes_out.inc_by(b.len() as u64);
            Ok((StatusCode::OK, headers, b).into_response())
        }
        None => Ok((StatusCode::OK, headers).into_response()),
    }
}

async fn put_manifest(
    reg: &Registry,
    repo: RepoName,
    r: Reference,
    req: Request,
) -> Result<Response> {
    let caller = req.extensions().get::<Caller>().map(|c| c.0.clone());
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let limit = reg.config.max_manifest_bytes;
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        && len > limit
    {
        return Err(too_large(limit));
    }
    let body = axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|e| {
            if std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            {
                too_large(limit)
            } else {
                RegistryError::new(
                    Code::ManifestInvalid,
                    format!("could not read manifest body: {e}"),
                )
            }
        })?;
    reg.metrics.bytes_in.inc_by(body.len() as u64);
    let rr = repo.clone();
    let put = blocking(reg, move |s| {
        s.put_manifest(&rr, &r, &body, content_type.as_deref())
    })
    .await?;
    let digest = put.digest.to_string();
    let mut headers = HeaderMap::new();
    headers.insert(
        header::LOCATION,
        hv(&format!("/v2/{repo}/manifests/{digest}")),
    );
    headers.insert("docker-content-digest", hv(&digest));
    if let Some(subject) = &put.subject {
        headers.insert("oci-subject", hv(&subject.to_string()));
    }
    reg.publish(
        Action::Push,
        repo.as_str(),
        put.tag.map(|t| t.to_string()),
        digest,
        put.media_type,
        caller,
    );
    Ok((StatusCode::CREATED, headers).into_response())
}

fn too_large(limit: usize) -> RegistryError {
    RegistryError::new(
        Code::ManifestInvalid,
        format!("manifest is larger than the {limit}-byte limit"),
    )
    .with_status(StatusCode::PAYLOAD_TOO_LARGE)
}

async fn delete_manifest(
    reg: &Registry,
    repo: RepoName,
    r: Reference,
    caller: Option<String>,
) -> Result<Response> {
    let rr = repo.clone();
    match r {
        Reference::Digest(d) => {
            let (meta, tags) = blocking(reg, move |s| s.delete_manifest(&rr, &d)).await?;
            reg.publish(
                Action::Delete,
                repo.as_str(),
                None,
                meta.digest.to_string(),
                meta.media_type.clone(),
                caller.clone(),
            );
            for t in tags {
                reg.publish(
                    Action::Delete,
                    repo.as_str(),
                    Some(t.to_string()),
                    meta.digest.to_string(),
                    meta.media_type.clone(),
                    caller.clone(),
                );
            }
        }
        Reference::Tag(t) => {
            let tt = t.clone();
            let (digest, media_type) = blocking(reg, move |s| {
                let meta = s.stat_manifest(&rr, &Reference::Tag(tt.clone()))?;
                s.delete_tag(&rr, &tt)?;
                Ok((meta.digest, meta.media_type))
            })
            .await?;
            reg.publish(
                Action::Delete,
                repo.as_str(),
                Some(t.to_string()),
                digest.to_string(),
                media_type,
                caller,
            );
        }
    }
    Ok(StatusCode::ACCEPTED.into_response())
}

/// A single `bytes=` range, resolved against `size`: `Ok(None)` means the whole blob.
fn parse_range(h: Option<&HeaderValue>, size: u64) -> std::result::Result<Option<(u64, u64)>, ()> {
    let Some(h) = h else { return Ok(None) };
    let s = h.to_str().map_err(|_| ())?.trim();
    let spec = s.strip_prefix("bytes=").ok_or(())?;
    if spec.contains(',') {
        return Err(()); // multiple ranges are not supported
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().map_err(|_| ())?;
            if n == 0 || size == 0 {
                return Err(());
            }
            (size.saturating_sub(n), size - 1)
        }
        (a, "") => (a.parse().map_err(|_| ())?, size.saturating_sub(1)),
        (a, b) => {
            let (a, b): (u64, u64) = (a.parse().map_err(|_| ())?, b.parse().map_err(|_| ())?);
            (a, b.min(size.saturating_sub(1)))
        }
    };
    if start >= size || start > end {
        return Err(());
    }
    Ok(Some((start, end)))
}

/// Bodies at least this large go by sendfile when the connection allows.
const SENDFILE_MIN: u64 = 64 << 10;

/// A blob's headers and, for a GET (`body` is `Some`), its bytes: by sendfile
/// through the connection's slot when there is one, else streamed.
async fn get_blob(
    reg: &Registry,
    repo: RepoName,
    digest: Digest,
    req_headers: &HeaderMap,
    body: Option<Option<crate::zerocopy::SendfileSlot>>,
) -> Result<Response> {
    let d = digest.clone();
    let size = blocking(reg, move |s| s.stat_blob(&repo, &d)).await?;
    let mut headers = HeaderMap::new();
    headers.insert("docker-content-digest", hv(&digest.to_string()));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::ETAG, hv(&format!("\"{digest}\"")));
    let range = match parse_range(req_headers.get(header::RANGE), size) {
        Ok(r) => r,
        Err(()) => {
            return Err(RegistryError::new(
                Code::BlobUnknown,
                format!("range not satisfiable for a blob of {size} bytes"),
            )
            .with_status(StatusCode::RANGE_NOT_SATISFIABLE)
            .with_header(header::CONTENT_RANGE, &format!("bytes */{size}")));
        }
    };
    let (status, start, len) = match range {
        Some((a, b)) => {
            headers.insert(header::CONTENT_RANGE, hv(&format!("bytes {a}-{b}/{size}")));
            (StatusCode::PARTIAL_CONTENT, a, b - a + 1)
        }
        None => (StatusCode::OK, 0, size),
    };
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    let Some(slot) = body else {
        return Ok((status, headers).into_response());
    };
    let d = digest.clone();
    if let Some(url) = blocking(reg, move |s| s.blob_redirect(&d)).await? {
        // Object storage serves the bytes (and any Range) itself.
        let mut h = HeaderMap::new();
        h.insert("docker-content-digest", hv(&digest.to_string()));
        h.insert(header::LOCATION, hv(&url));
        return Ok((StatusCode::TEMPORARY_REDIRECT, h).into_response());
    }
    let d = digest.clone();
    let mut file = match blocking(reg, move |s| s.open_blob(&d)).await? {
        slipway_store::BlobRead::File(f) => f,
        slipway_store::BlobRead::Stream(r) => {
            reg.metrics.bytes_out.inc_by(len);
            return Ok((status, headers, reader_body(r, start, len)).into_response());
        }
    };
    if let Some(slot) = slot.filter(|_| len >= SENDFILE_MIN) {
        match slot.body(file, start, len) {
            Ok(chunks) => {
                reg.metrics.bytes_out.inc_by(len);
                reg.metrics.bytes_out_zero_copy.inc_by(len);
                let stream = futures_util::stream::iter(chunks.map(Ok::<_, std::io::Error>));
                return Ok((status, headers, Body::from_stream(stream)).into_response());
            }
            Err(back) => file = back,
        }
    }
    let mut file = tokio::fs::File::from_std(file);
    if start > 0 {
        file.seek(SeekFrom::Start(start))
            .await
            .map_err(|e| RegistryError::from(StoreError::io("seek blob", e)))?;
    }
    reg.metrics.bytes_out.inc_by(len);
    let stream = ReaderStream::with_capacity(file.take(len), 256 << 10);
    Ok((status, headers, Body::from_stream(stream)).into_response())
}

/// `len` bytes from `start` of a blocking reader, read on a blocking thread and
/// handed over a few chunks at a time.
fn reader_body(mut r: Box<dyn std::io::Read + Send>, start: u64, len: u64) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        let skipped = std::io::copy(
            &mut std::io::Read::take(&mut r, start),
            &mut std::io::sink(),
        );
        if let Err(e) = skipped {
            let _ = tx.blocking_send(Err(e));
            return;
        }
        let mut left = len;
        while left > 0 {
            let mut buf = vec![0u8; usize::try_from(left.min(256 << 10)).unwrap_or(256 << 10)];
            match std::io::Read::read(&mut r, &mut buf) {
                Ok(0) => {
                    let _ = tx.blocking_send(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the blob ended early",
                    )));
                    return;
                }
                Ok(n) => {
                    buf.truncate(n);
                    left -= n as u64;
                    if tx.blocking_send(Ok(bytes::Bytes::from(buf))).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

fn upload_accepted(status: StatusCode, repo: &RepoName, id: &str, offset: u64) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::LOCATION,
        hv(&format!("/v2/{repo}/blobs/uploads/{id}")),
    );
    headers.insert(header::RANGE, hv(&range_header(offset)));
    headers.insert("docker-upload-uuid", hv(id));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    (status, headers).into_response()
}

fn blob_created(repo: &RepoName, digest: &Digest) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(header::LOCATION, hv(&format!("/v2/{repo}/blobs/{digest}")));
    headers.insert("docker-content-digest", hv(&digest.to_string()));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    (StatusCode::CREATED, headers).into_response()
}

fn query_digest(query: &HashMap<String, String>) -> Result<Option<Digest>> {
    query
        .get("digest")
        .map(|d| d.parse().map_err(RegistryError::from))
        .transpose()
}

async fn start_upload(
    reg: &Registry,
    repo: RepoName,
    query: &HashMap<String, String>,
    req: Request,
) -> Result<Response> {
    if let Some(mount) = query.get("mount") {
        let digest: Digest = mount.parse()?;
        // A bad or unknown `from` is not an error: the spec says to fall back to an upload.
        if let Some(from) = query.get("from").and_then(|f| f.parse::<RepoName>().ok()) {
            let (to, d) = (repo.clone(), digest.clone());
            if blocking(reg, move |s| s.mount_blob(&from, &to, &d)).await? {
                return Ok(blob_created(&repo, &digest));
            }
        }
    }
    let digest = query_digest(query)?;
    let r = repo.clone();
    let id = blocking(reg, move |s| s.start_upload(&r))
        .await?
        .to_string();
    let Some(digest) = digest else {
        return Ok(upload_accepted(StatusCode::ACCEPTED, &repo, &id, 0));
    };
    // Monolithic upload: the whole blob is in this request.
    let started = tokio::time::Instant::now();
    let (r, i) = (repo.clone(), id.clone());
    let writer = blocking(reg, move |s| s.upload_writer(&r, &i, Some(0))).await?;
    let (writer, res) = stream_body(reg, writer, req.into_body(), None).await;
    if let Err(e) = res {
        drop(writer);
        let (r, i) = (repo.clone(), id.clone());
        let _ = blocking(reg, move |s| s.cancel_upload(&r, &i)).await;
        return Err(e);
    }
    let (r, d) = (repo.clone(), digest.clone());
    blocking(reg, move |s| s.finish_upload(&r, writer, &d)).await?;
    reg.metrics
        .upload_duration
        .observe(started.elapsed().as_secs_f64());
    Ok(blob_created(&repo, &digest))
}

/// Parses `Content-Range: <start>-<end>` (also accepting a `bytes ` prefix).
fn content_range(h: &HeaderMap) -> Result<Option<(u64, u64)>> {
    let Some(v) = h.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let bad = || {
        RegistryError::new(
            Code::BlobUploadInvalid,
            "Content-Range must be <start>-<end>",
        )
        .with_status(StatusCode::RANGE_NOT_SATISFIABLE)
    };
    let s = v.to_str().map_err(|_| bad())?.trim();
    let s = s.strip_prefix("bytes ").unwrap_or(s);
    let s = s.split('/').next().unwrap_or(s);
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b): (u64, u64) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
    if b < a {
        return Err(bad());
    }
    Ok(Some((a, b)))
}

async fn write_chunk(
    reg: &Registry,
    repo: &RepoName,
    id: &str,
    req: Request,
) -> Result<UploadWriter> {
    let range = content_range(req.headers())?;
    let (r, i) = (repo.clone(), id.to_owned());
    let writer = blocking(reg, move |s| s.upload_writer(&r, &i, range.map(|(a, _)| a))).await?;
    let limit = range.map(|(a, b)| b - a + 1);
    let start = writer.offset();
    let (writer, res) = stream_body(reg, writer, req.into_body(), limit).await;
    let short = limit.filter(|l| writer.offset() - start != *l);
    if res.is_ok() && short.is_none() {
        return Ok(writer);
    }
    // The session keeps what did arrive (a client that hung up resumes there).
    let got = writer.offset() - start;
    let kept = blocking(reg, move |s| s.end_chunk(writer)).await;
    res?;
    let offset = kept?;
    Err(RegistryError::new(
        Code::BlobUploadInvalid,
        format!(
            "Content-Range announced {} bytes but the body had {got}",
            short.unwrap_or_default()
        ),
    )
    .with_status(StatusCode::RANGE_NOT_SATISFIABLE)
    .with_header(header::RANGE, &range_header(offset)))
}

async fn patch_upload(
    reg: &Registry,
    repo: RepoName,
    id: String,
    req: Request,
) -> Result<Response> {
    let started = tokio::time::Instant::now();
    let writer = write_chunk(reg, &repo, &id, req).await?;
    let offset = blocking(reg, move |s| s.end_chunk(writer)).await?;
    reg.metrics
        .upload_duration
        .observe(started.elapsed().as_secs_f64());
    Ok(upload_accepted(StatusCode::ACCEPTED, &repo, &id, offset))
}

async fn finish_upload(
    reg: &Registry,
    repo: RepoName,
    id: String,
    query: &HashMap<String, String>,
    req: Request,
) -> Result<Response> {
    let Some(digest) = query_digest(query)? else {
        return Err(RegistryError::new(
            Code::DigestInvalid,
            "PUT to finish an upload needs ?digest=<digest>",
        ));
    };
    let started = tokio::time::Instant::now();
    let writer = write_chunk(reg, &repo, &id, req).await?;
    let (r, d) = (repo.clone(), digest.clone());
    blocking(reg, move |s| s.finish_upload(&r, writer, &d)).await?;
    reg.metrics
        .upload_duration
        .observe(started.elapsed().as_secs_f64());
    Ok(blob_created(&repo, &digest))
}

/// Streams a request body into an upload session on a blocking thread. Returns the
/// writer in every case so the session keeps exactly the bytes that were written.
async fn stream_body(
    reg: &Registry,
    writer: UploadWriter,
    body: Body,
    limit: Option<u64>,
) -> (UploadWriter, Result<()>) {
    // Chunks go to the writer in batches of what has already arrived (up to
    // 1 MiB), so a fast client costs one hand-off per batch, not per chunk.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Bytes>>(8);
    let task = tokio::task::spawn_blocking(move || {
        let mut w = writer;
        while let Some(batch) = rx.blocking_recv() {
            for chunk in batch {
                if let Err(e) = w.write(&chunk) {
                    return (w, Err(RegistryError::from(e)));
                }
            }
        }
        (w, Ok(()))
    });
    let mut batch: Vec<Bytes> = Vec::new();
    let mut batched = 0usize;
    let mut stream = body.into_data_stream();
    let mut total = 0u64;
    let mut res = Ok(());
    loop {
        // Wait for a chunk when the batch is empty; otherwise take only what has
        // already arrived, and hand the batch over when nothing has.
        let next = if batch.is_empty() {
            match tokio::time::timeout(crate::BODY_IDLE_TIMEOUT, stream.next()).await {
                Ok(next) => next,
                Err(_) => {
                    res = Err(
                        RegistryError::new(Code::BlobUploadInvalid, "request body stalled")
                            .with_status(StatusCode::REQUEST_TIMEOUT),
                    );
                    break;
                }
            }
        } else {
            match futures_util::FutureExt::now_or_never(stream.next()) {
                Some(next) => next,
                None => {
                    if tx.send(std::mem::take(&mut batch)).await.is_err() {
                        break; // the writer failed; its error is returned below
                    }
                    batched = 0;
                    continue;
                }
            }
        };
        let chunk = match next {
            Some(Ok(c)) => c,
            None => break,
            Some(Err(e)) => {
                res = Err(RegistryError::new(
                    Code::BlobUploadInvalid,
                    format!("request body ended early: {e}"),
                ));
                break;
            }
        };
        total += chunk.len() as u64;
        if limit.is_some_and(|l| total > l) {
            res = Err(RegistryError::new(
                Code::BlobUploadInvalid,
                "body is longer than its Content-Range",
            )
            .with_status(StatusCode::RANGE_NOT_SATISFIABLE));
            break;
        }
        reg.metrics.bytes_in.inc_by(chunk.len() as u64);
        batched += chunk.len();
        batch.push(chunk);
        if batched >= 1 << 20 {
            if tx.send(std::mem::take(&mut batch)).await.is_err() {
                break;
            }
            batched = 0;
        }
    }
    // The bytes received before the end (or an error) are written.
    if !batch.is_empty() {
        let _ = tx.send(batch).await;
    }
    drop(tx);
    match task.await {
        Ok((w, Err(e))) => (w, Err(e)),
        Ok((w, Ok(()))) => (w, res),
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

async fn referrers(
    reg: &Registry,
    repo: RepoName,
    subject: Digest,
    query: &HashMap<String, String>,
) -> Result<Response> {
    let filter = query.get("artifactType").cloned();
    let f = filter.clone();
    let list = blocking(reg, move |s| s.referrers(&repo, &subject, f.as_deref())).await?;
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": list,
    });
    let mut resp = axum::Json(body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(media::OCI_INDEX),
    );
    if filter.is_some() {
        resp.headers_mut().insert(
            "oci-filters-applied",
            HeaderValue::from_static("artifactType"),
        );
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect(body: Body) -> Result<Vec<u8>, String> {
        use http_body_util::BodyExt as _;
        body.collect()
            .await
            .map(|c| c.to_bytes().to_vec())
            .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn a_streamed_blob_body_serves_its_range_and_fails_if_the_blob_ends_early() {
        let data: Vec<u8> = (0..=255u8).cycle().take(600 << 10).collect();
        let whole = reader_body(
            Box::new(std::io::Cursor::new(data.clone())),
            0,
            data.len() as u64,
        );
        assert_eq!(collect(whole).await.expect("whole"), data);
        let part = reader_body(Box::new(std::io::Cursor::new(data.clone())), 1000, 300_000);
        assert_eq!(collect(part).await.expect("range"), &data[1000..301_000]);
        let short = reader_body(Box::new(std::io::Cursor::new(vec![1u8; 10])), 0, 20);
        assert!(
            collect(short).await.is_err(),
            "a short blob is an error, not a short body"
        );
    }

    #[test]
    fn byte_ranges_resolve_against_the_blob_size() {
        let r = |s: &str| parse_range(Some(&HeaderValue::from_str(s).expect("hv")), 100);
        assert_eq!(r("bytes=0-9"), Ok(Some((0, 9))));
        assert_eq!(r("bytes=90-"), Ok(Some((90, 99))));
        assert_eq!(r("bytes=-10"), Ok(Some((90, 99))));
        assert_eq!(r("bytes=50-1000"), Ok(Some((50, 99))));
        for bad in [
            "bytes=100-",
            "bytes=5-2",
            "bytes=a-b",
            "items=0-1",
            "bytes=0-1,3-4",
            "bytes=-0",
        ] {
            assert_eq!(r(bad), Err(()), "{bad}");
        }
        assert_eq!(parse_range(None, 100), Ok(None));
    }

    #[test]
    fn query_values_are_percent_decoded() {
        let q = parse_query(Some("digest=sha256%3Aab&from=a%2Fb&x"));
        assert_eq!(q["digest"], "sha256:ab");
        assert_eq!(q["from"], "a/b");
        assert_eq!(q["x"], "");
        assert!(parse_query(Some("d=%zz")).is_empty());
    }
}
