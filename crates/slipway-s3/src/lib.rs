//! Committed registry blobs in S3-compatible object storage: [`S3Blobs`]
//! implements the store's `BlobBackend` over the `object_store` crate.
//!
//! Objects are named `<prefix>blobs/<alg>/<first two hex>/<hex>`, as on disk. A
//! blob is put whole by digest, after the store verified it, so two replicas
//! committing the same digest write the same bytes and S3's atomic object puts
//! never expose a mix; anything larger than one part goes up as a multipart
//! upload of 8 MiB parts. Throttling (`SlowDown`, 503) and transient failures are
//! retried with exponential backoff by `object_store`; what still fails is
//! `StoreError::Unavailable` (a 503 to clients), never a 500.
//!
//! Upload sessions whose metadata is shared (several replicas) keep each chunk
//! as an object `<prefix>uploads/<session>/<part>`; finishing copies a single
//! part to the blob's name on the server (`CopyObject`), or streams the parts
//! into one multipart upload, then deletes the parts. With local metadata,
//! sessions stage on the local disk and only the finished blob goes up.
//!
//! The store's methods are blocking; this backend runs its requests on the
//! runtime it was given, from the store's blocking threads.

use std::io::{self, Read as _};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::BoxStream;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload, WriteMultipart};
use slipway_core::Digest;
use slipway_store::{BlobBackend, BlobRead, Result, StoreError};
use tokio::runtime::Handle;

/// Blobs up to this size are put in one request; larger ones in parts of it.
const PART: usize = 8 << 20;

/// Where the bucket is.
#[derive(Debug, Clone, Default)]
pub struct S3Config {
    /// `http(s)://host:port` of an S3-compatible server; `None` for AWS.
    pub endpoint: Option<String>,
    /// The bucket.
    pub bucket: String,
    /// The region (`us-east-1` when the server does not care).
    pub region: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// Prepended to every object name, e.g. `registry/`.
    pub prefix: String,
    /// Answer blob GETs with a presigned URL valid this long (off: `None`).
    pub redirect: Option<Duration>,
}

/// Committed blobs in a bucket.
#[derive(Debug)]
pub struct S3Blobs {
    store: Arc<dyn ObjectStore>,
    /// The same client, for presigning, when redirects are on.
    signer: Option<(Arc<object_store::aws::AmazonS3>, Duration)>,
    prefix: String,
    rt: Handle,
}

fn unavailable(what: &str, e: &object_store::Error) -> StoreError {
    StoreError::Unavailable(format!("object storage: {what}: {e}"))
}

impl S3Blobs {
    /// A backend for `cfg`, whose requests run on `rt`.
    pub fn new(cfg: &S3Config, rt: Handle) -> std::result::Result<Self, String> {
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_access_key_id(&cfg.access_key_id)
            .with_secret_access_key(&cfg.secret_access_key)
            .with_retry(object_store::RetryConfig {
                backoff: object_store::BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(5),
                    base: 2.0,
                },
                max_retries: 8,
                retry_timeout: Duration::from_secs(60),
            });
        if let Some(endpoint) = &cfg.endpoint {
            b = b
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        let store = Arc::new(b.build().map_err(|e| format!("object storage: {e}"))?);
        Ok(Self {
            signer: cfg.redirect.map(|d| (store.clone(), d)),
            store,
            prefix: cfg.prefix.clone(),
            rt,
        })
    }

    fn key(&self, digest: &Digest) -> Key {
        let hex = digest.hex();
        Key::from(format!(
            "{}blobs/{}/{}/{hex}",
            self.prefix,
            digest.algorithm().as_str(),
            &hex[..2]
        ))
    }

    fn part_key(&self, upload: &uuid::Uuid, name: &str) -> Result<Key> {
        if !slipway_store::blobs::valid_part_name(name) {
            return Err(StoreError::Db(format!("invalid upload part name {name:?}")));
        }
        Ok(Key::from(format!("{}uploads/{upload}/{name}", self.prefix)))
    }

    fn reader(&self, key: &Key) -> object_store::Result<BlobRead> {
        let r = self.rt.block_on(self.store.get(key))?;
        Ok(BlobRead::Stream(Box::new(ObjectReader {
            stream: r.into_stream(),
            buf: Bytes::new(),
            rt: self.rt.clone(),
        })))
    }

    /// Streams the parts, in order, into one object `key`.
    fn join_parts(&self, parts: &[Key], key: &Key) -> Result<()> {
        let upload = self
            .rt
            .block_on(self.store.put_multipart(key))
            .map_err(|e| unavailable("start a multipart upload", &e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        for part in parts {
            let mut stream = match self.rt.block_on(self.store.get(part)) {
                Ok(r) => r.into_stream(),
                Err(e) => {
                    let _ = self.rt.block_on(writer.abort());
                    return Err(unavailable("get an upload part", &e));
                }
            };
            while let Some(chunk) = self.rt.block_on(stream.next()) {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = self.rt.block_on(writer.abort());
                        return Err(unavailable("read an upload part", &e));
                    }
                };
                if let Err(e) = self.rt.block_on(writer.wait_for_capacity(4)) {
                    return Err(unavailable("upload a part", &e));
                }
                let _in_runtime = self.rt.enter();
                writer.put(chunk);
            }
        }
        self.rt
            .block_on(writer.finish())
            .map(|_| ())
            .map_err(|e| unavailable("complete a multipart upload", &e))
    }

    /// Whether the blob is there.
    fn exists(&self, key: &Key) -> Result<bool> {
        match self.rt.block_on(self.store.head(key)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(unavailable("head", &e)),
        }
    }

    /// Puts the file at `path` as `key`: whole, or in parts.
    fn put_file(&self, path: &Path, key: &Key) -> Result<()> {
        let io_err = |e| StoreError::io("read the staged blob", e);
        let mut f = std::fs::File::open(path).map_err(io_err)?;
        let size = f.metadata().map_err(io_err)?.len();
        if size <= PART as u64 {
            let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            f.read_to_end(&mut data).map_err(io_err)?;
            return self
                .rt
                .block_on(self.store.put(key, PutPayload::from(data)))
                .map(|_| ())
                .map_err(|e| unavailable("put", &e));
        }
        let upload = self
            .rt
            .block_on(self.store.put_multipart(key))
            .map_err(|e| unavailable("start a multipart upload", &e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match f.read(&mut buf) {
                Ok(n) => n,
                Err(e) => {
                    let _ = self.rt.block_on(writer.abort());
                    return Err(io_err(e));
                }
            };
            if n == 0 {
                break;
            }
            // Waits while too many parts are in flight.
            if let Err(e) = self.rt.block_on(writer.wait_for_capacity(4)) {
                return Err(unavailable("upload a part", &e));
            }
            // A full part is sent by a task of the runtime.
            let _in_runtime = self.rt.enter();
            writer.write(&buf[..n]);
        }
        self.rt
            .block_on(writer.finish())
            .map(|_| ())
            .map_err(|e| unavailable("complete a multipart upload", &e))
    }
}

impl BlobBackend for S3Blobs {
    fn commit(&self, staged: &Path, digest: &Digest) -> Result<()> {
        let key = self.key(digest);
        let result = if self.exists(&key)? {
            Ok(())
        } else {
            self.put_file(staged, &key)
        };
        if result.is_ok() {
            let _ = std::fs::remove_file(staged);
        }
        result
    }

    fn write_whole(&self, digest: &Digest, data: &[u8]) -> Result<()> {
        let key = self.key(digest);
        if self.exists(&key)? {
            return Ok(());
        }
        self.rt
            .block_on(self.store.put(&key, PutPayload::from(data.to_vec())))
            .map(|_| ())
            .map_err(|e| unavailable("put", &e))
    }

    fn read_whole(&self, digest: &Digest) -> Result<Vec<u8>> {
        let key = self.key(digest);
        let got = self.rt.block_on(async {
            let r = self.store.get(&key).await?;
            r.bytes().await
        });
        match got {
            Ok(b) => Ok(b.to_vec()),
            Err(object_store::Error::NotFound { .. }) => {
                Err(StoreError::BlobUnknown(digest.clone()))
            }
            Err(e) => Err(unavailable("get", &e)),
        }
    }

    fn open_blob(&self, digest: &Digest) -> Result<BlobRead> {
        let key = self.key(digest);
        match self.reader(&key) {
            Ok(r) => Ok(r),
            Err(object_store::Error::NotFound { .. }) => {
                Err(StoreError::BlobUnknown(digest.clone()))
            }
            Err(e) => Err(unavailable("get", &e)),
        }
    }

    fn remove(&self, digest: &Digest) -> Result<()> {
        match self.rt.block_on(self.store.delete(&self.key(digest))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(unavailable("delete", &e)),
        }
    }

    fn redirect_url(&self, digest: &Digest) -> Result<Option<String>> {
        use object_store::signer::Signer as _;
        let Some((signer, ttl)) = &self.signer else {
            return Ok(None);
        };
        self.rt
            .block_on(signer.signed_url(http::Method::GET, &self.key(digest), *ttl))
            .map(|u| Some(u.to_string()))
            .map_err(|e| unavailable("presign", &e))
    }

    fn put_part(&self, upload: &uuid::Uuid, name: &str, staged: &Path) -> Result<()> {
        let key = self.part_key(upload, name)?;
        self.put_file(staged, &key)?;
        let _ = std::fs::remove_file(staged);
        Ok(())
    }

    fn open_part(&self, upload: &uuid::Uuid, name: &str) -> Result<BlobRead> {
        let key = self.part_key(upload, name)?;
        self.reader(&key)
            .map_err(|e| unavailable("get an upload part", &e))
    }

    fn commit_parts(&self, upload: &uuid::Uuid, parts: &[String], digest: &Digest) -> Result<()> {
        let key = self.key(digest);
        if self.exists(&key)? {
            return Ok(());
        }
        let parts: Vec<Key> = parts
            .iter()
            .map(|p| self.part_key(upload, p))
            .collect::<Result<_>>()?;
        if let [only] = parts.as_slice()
            && self.rt.block_on(self.store.copy(only, &key)).is_ok()
        {
            return Ok(());
        }
        // Several parts (or a copy the server refused, e.g. over 5 GiB).
        self.join_parts(&parts, &key)
    }

    fn remove_parts(&self, upload: &uuid::Uuid, parts: &[String]) -> Result<()> {
        let mut keys: Vec<Key> = parts
            .iter()
            .map(|p| self.part_key(upload, p))
            .collect::<Result<_>>()?;
        // Also parts no record names: a chunk whose replica died between
        // putting it and recording it. One session's prefix, never the bucket.
        let prefix = Key::from(format!("{}uploads/{upload}/", self.prefix));
        let listed: Vec<Key> = self.rt.block_on(async {
            self.store
                .list(Some(&prefix))
                .filter_map(|m| async move { m.ok().map(|m| m.location) })
                .collect()
                .await
        });
        keys.extend(
            listed
                .into_iter()
                .filter(|k| !keys.contains(k))
                .collect::<Vec<_>>(),
        );
        for key in keys {
            match self.rt.block_on(self.store.delete(&key)) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(unavailable("delete an upload part", &e)),
            }
        }
        Ok(())
    }
}

/// An object's body as a blocking reader.
struct ObjectReader {
    stream: BoxStream<'static, object_store::Result<Bytes>>,
    buf: Bytes,
    rt: Handle,
}

impl io::Read for ObjectReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.buf.is_empty() {
            match self.rt.block_on(self.stream.next()) {
                None => return Ok(0),
                Some(Ok(b)) => self.buf = b,
                Some(Err(e)) => return Err(io::Error::other(e)),
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf.split_to(n));
        Ok(n)
    }
}
