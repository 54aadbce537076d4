//! Upload sessions: bytes hashed while they arrive, committed as a blob when (and
//! only when) the digest matches.
//!
//! Two ways to keep a session between requests:
//! - **local** (one machine): a staging file; the hash state lives in memory next
//!   to the byte count and is rebuilt by reading the file once after a restart.
//! - **shared** (the metadata is shared by several replicas): each chunk is kept
//!   as a part in the blob backend (object storage), and the session's record in
//!   the metadata holds the offset, the part names and the serialized hash state.
//!   A chunk counts once its record is swapped (compare-and-swap on the record
//!   read at its start), so any replica can take the next chunk or finish, and a
//!   replica killed mid-chunk loses only that chunk.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use slipway_core::{Algorithm, Digest, Hasher, RepoName};
use uuid::Uuid;

use crate::error::{Result, StoreError};
use crate::metadata::{from_json, to_json};
use crate::{Store, lock, now_ms};

/// In-memory state of a session between requests.
pub(crate) struct Live {
    /// `None` while a request has it checked out.
    hasher: Option<Hasher>,
    offset: u64,
}

#[derive(Clone, Serialize, Deserialize)]
struct UploadRecord {
    repo: String,
    started_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    shared: Option<SharedUpload>,
}

/// A shared session's state, in its record.
#[derive(Clone, Serialize, Deserialize)]
struct SharedUpload {
    offset: u64,
    /// Hex of [`Hasher::save`] after `offset` bytes.
    hash: String,
    /// Part names in order.
    parts: Vec<String>,
}

/// The chunk a writer of a shared session is receiving.
struct SharedChunk {
    /// Local spool file of this chunk.
    spool: std::path::PathBuf,
    /// The session's offset when the chunk started.
    start: u64,
    /// The record as read when the chunk started.
    raw: Vec<u8>,
    record: UploadRecord,
}

/// Appends bytes to one upload session. Returned to the store on drop, so a client
/// that disconnects mid-chunk leaves a session that resumes at the last byte written.
pub struct UploadWriter {
    id: Uuid,
    file: File,
    hasher: Option<Hasher>,
    offset: u64,
    live: Arc<Mutex<HashMap<Uuid, Live>>>,
    /// Where the last early write-back was started.
    flushed: u64,
    /// Whether an early write-back is running.
    flushing: Arc<std::sync::atomic::AtomicBool>,
    /// Set for a shared session.
    shared: Option<SharedChunk>,
}

/// Bytes between two early write-backs of a large upload.
const FLUSH_EVERY: u64 = 32 << 20;

// === impl UploadWriter ===

impl UploadWriter {
    /// Appends `data`, hashing it. On a failed write the file is cut back to the last
    /// good offset so bytes and hash never disagree.
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        if let Err(e) = self.file.write_all(data) {
            let _ = self.file.set_len(self.offset);
            return Err(StoreError::io("write upload", e));
        }
        if let Some(h) = &mut self.hasher {
            h.update(data);
        }
        self.offset += data.len() as u64;
        self.flush_early();
        Ok(())
    }

    /// Starts writing a large upload's bytes to disk while it is still being
    /// received (an `fdatasync` on another thread every [`FLUSH_EVERY`] bytes),
    /// so that the commit's fsync waits for the tail only, not the whole blob:
    /// receiving and the disk then overlap instead of taking turns. Errors are
    /// left to the commit's own fsync, which reports them.
    fn flush_early(&mut self) {
        use std::sync::atomic::Ordering;
        if self.offset - self.flushed < FLUSH_EVERY || self.flushing.swap(true, Ordering::AcqRel) {
            return;
        }
        self.flushed = self.offset;
        let flushing = self.flushing.clone();
        let started = self.file.try_clone().ok().and_then(|f| {
            std::thread::Builder::new()
                .name("slipway-flush".into())
                .spawn(move || {
                    let _ = f.sync_data();
                    flushing.store(false, Ordering::Release);
                })
                .ok()
        });
        if started.is_none() {
            self.flushing.store(false, Ordering::Release);
        }
    }

    /// Bytes in the session so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The session id.
    pub fn id(&self) -> Uuid {
        self.id
    }
}

impl Drop for UploadWriter {
    fn drop(&mut self) {
        if let Some(chunk) = &self.shared {
            // A chunk not kept by `end_chunk` is dropped: the session stays at
            // its last kept offset.
            let _ = fs::remove_file(&chunk.spool);
            return;
        }
        let mut live = lock(&self.live);
        if let Some(l) = live.get_mut(&self.id) {
            l.hasher = self.hasher.take();
            l.offset = self.offset;
        }
    }
}

fn hash_file(path: &std::path::Path, algorithm: Algorithm) -> Result<(Hasher, u64)> {
    let mut f = File::open(path).map_err(|e| StoreError::io("open upload", e))?;
    let mut h = Hasher::new(algorithm);
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f
            .read(&mut buf)
            .map_err(|e| StoreError::io("read upload", e))?;
        if k == 0 {
            return Ok((h, n));
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
}

// === impl Store: uploads ===

impl Store {
    /// Opens an upload session in `repo`.
    pub fn start_upload(&self, repo: &RepoName) -> Result<Uuid> {
        if self.meta.shared() {
            let id = Uuid::new_v4();
            let rec = UploadRecord {
                repo: repo.to_string(),
                started_ms: now_ms(),
                shared: Some(SharedUpload {
                    offset: 0,
                    hash: hex::encode(Hasher::new(Algorithm::Sha256).save()),
                    parts: Vec::new(),
                }),
            };
            self.meta.insert_upload(&id.to_string(), &to_json(&rec)?)?;
            return Ok(id);
        }
        let id = Uuid::new_v4();
        let path = self.staging.staging_path(&id);
        File::create(&path).map_err(|e| StoreError::io("create upload file", e))?;
        let rec = UploadRecord {
            repo: repo.to_string(),
            started_ms: now_ms(),
            shared: None,
        };
        let res = to_json(&rec).and_then(|v| self.meta.insert_upload(&id.to_string(), &v));
        if let Err(e) = res {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        lock(&self.uploads).insert(
            id,
            Live {
                hasher: Some(Hasher::new(Algorithm::Sha256)),
                offset: 0,
            },
        );
        Ok(id)
    }

    fn check_session(&self, repo: &RepoName, id: &str) -> Result<Uuid> {
        self.session(repo, id).map(|(u, _, _)| u)
    }

    /// The session `id` of `repo`: its id, record and the record's bytes.
    fn session(&self, repo: &RepoName, id: &str) -> Result<(Uuid, UploadRecord, Vec<u8>)> {
        let unknown = || StoreError::UploadUnknown(id.to_owned());
        // Parsing as a UUID is what makes the id safe to use as a file name.
        let uuid = Uuid::parse_str(id).map_err(|_| unknown())?;
        let raw = self.meta.upload(&uuid.to_string())?.ok_or_else(unknown)?;
        let rec: UploadRecord = from_json(&raw)?;
        if rec.repo != repo.as_str() {
            return Err(unknown());
        }
        Ok((uuid, rec, raw))
    }

    /// Bytes received so far by a session.
    pub fn upload_offset(&self, repo: &RepoName, id: &str) -> Result<u64> {
        let (uuid, rec, _) = self.session(repo, id)?;
        if let Some(sh) = rec.shared {
            return Ok(sh.offset);
        }
        if let Some(l) = lock(&self.uploads).get(&uuid) {
            return Ok(l.offset);
        }
        fs::metadata(self.staging.staging_path(&uuid))
            .map(|m| m.len())
            .map_err(|_| StoreError::UploadUnknown(id.to_owned()))
    }

    /// Checks a session out for writing. `start`, when given, must equal the
    /// session's current offset (chunks arrive in order).
    pub fn upload_writer(
        &self,
        repo: &RepoName,
        id: &str,
        start: Option<u64>,
    ) -> Result<UploadWriter> {
        let (uuid, rec, raw) = self.session(repo, id)?;
        if let Some(sh) = &rec.shared {
            return self.shared_writer(uuid, sh, start, raw, rec.clone());
        }
        let path = self.staging.staging_path(&uuid);
        let (hasher, offset) = {
            let mut live = lock(&self.uploads);
            match live.get_mut(&uuid) {
                Some(l) => match l.hasher.take() {
                    Some(h) => (h, l.offset),
                    None => return Err(StoreError::UploadBusy(id.to_owned())),
                },
                None => {
                    // After a restart: rebuild the hash from what is on disk.
                    live.insert(
                        uuid,
                        Live {
                            hasher: None,
                            offset: 0,
                        },
                    );
                    drop(live);
                    match hash_file(&path, Algorithm::Sha256) {
                        Ok(v) => v,
                        Err(e) => {
                            lock(&self.uploads).remove(&uuid);
                            return Err(e);
                        }
                    }
                }
            }
        };
        let writer_file = OpenOptions::new().append(true).open(&path);
        let w = UploadWriter {
            id: uuid,
            file: match writer_file {
                Ok(f) => f,
                Err(e) => {
                    let mut live = lock(&self.uploads);
                    if let Some(l) = live.get_mut(&uuid) {
                        l.hasher = Some(hasher);
                        l.offset = offset;
                    }
                    return Err(StoreError::io("open upload", e));
                }
            },
            hasher: Some(hasher),
            offset,
            live: self.uploads.clone(),
            flushed: offset,
            flushing: Arc::default(),
            shared: None,
        };
        if let Some(start) = start
            && start != offset
        {
            // Dropping `w` hands the state back untouched.
            let expected = w.offset;
            return Err(StoreError::UploadOffset {
                expected,
                got: start,
            });
        }
        Ok(w)
    }

    fn shared_writer(
        &self,
        uuid: Uuid,
        sh: &SharedUpload,
        start: Option<u64>,
        raw: Vec<u8>,
        record: UploadRecord,
    ) -> Result<UploadWriter> {
        if let Some(start) = start
            && start != sh.offset
        {
            return Err(StoreError::UploadOffset {
                expected: sh.offset,
                got: start,
            });
        }
        let hasher = hex::decode(&sh.hash)
            .ok()
            .and_then(|b| Hasher::restore(&b))
            .ok_or_else(|| StoreError::Db(format!("upload {uuid}: bad hash state")))?;
        let spool = self.staging.staging_path(&Uuid::new_v4());
        let file = File::create(&spool).map_err(|e| StoreError::io("create upload chunk", e))?;
        Ok(UploadWriter {
            id: uuid,
            file,
            hasher: Some(hasher),
            offset: sh.offset,
            live: self.uploads.clone(),
            flushed: sh.offset,
            flushing: Arc::default(),
            shared: Some(SharedChunk {
                spool,
                start: sh.offset,
                raw,
                record,
            }),
        })
    }

    /// Ends a chunk (a PATCH): the session keeps what was written. Returns the
    /// session's offset. For a shared session this is when the chunk becomes a
    /// part and the record moves on; if another request moved it first, the
    /// chunk is dropped and the session is busy.
    pub fn end_chunk(&self, writer: UploadWriter) -> Result<u64> {
        let mut w = writer;
        self.keep_chunk(&mut w)?;
        Ok(w.offset)
    }

    /// Keeps a shared session's chunk as a part and swaps its record.
    fn keep_chunk(&self, w: &mut UploadWriter) -> Result<()> {
        let Some(chunk) = &mut w.shared else {
            return Ok(());
        };
        if w.offset == chunk.start {
            return Ok(());
        }
        let Some(hasher) = &w.hasher else {
            return Err(StoreError::UploadBusy(w.id.to_string()));
        };
        let name = format!("{}-{}", chunk.start, Uuid::new_v4());
        self.blobs.put_part(&w.id, &name, &chunk.spool)?;
        let mut record = chunk.record.clone();
        let Some(sh) = &mut record.shared else {
            return Err(StoreError::Db(format!("upload {}: not shared", w.id)));
        };
        sh.offset = w.offset;
        sh.hash = hex::encode(hasher.save());
        sh.parts.push(name.clone());
        let raw = to_json(&record)?;
        let swapped = self.meta.swap_upload(&w.id.to_string(), &chunk.raw, &raw);
        if !matches!(swapped, Ok(true)) {
            let _ = self.blobs.remove_parts(&w.id, &[name]);
            swapped?;
            return Err(StoreError::UploadBusy(w.id.to_string()));
        }
        // The next bytes (if any) start a new chunk in a new spool file.
        let spool = self.staging.staging_path(&Uuid::new_v4());
        w.file = File::create(&spool).map_err(|e| StoreError::io("create upload chunk", e))?;
        *chunk = SharedChunk {
            spool,
            start: w.offset,
            raw,
            record,
        };
        Ok(())
    }

    /// Finishes a shared session: keeps the last chunk, verifies, joins the
    /// parts into the blob, records it, then forgets the session.
    fn finish_shared(
        &self,
        repo: &RepoName,
        mut w: UploadWriter,
        expected: &Digest,
    ) -> Result<u64> {
        self.keep_chunk(&mut w)?;
        let uuid = w.id;
        let size = w.offset;
        let hasher = w.hasher.take();
        let Some(chunk) = w.shared.take() else {
            return Err(StoreError::Db(format!("upload {uuid}: not shared")));
        };
        let _ = fs::remove_file(&chunk.spool);
        drop(w);
        let parts = chunk.record.shared.map(|s| s.parts).unwrap_or_default();
        let computed = match hasher {
            Some(h) if expected.algorithm() == Algorithm::Sha256 => h.finish(),
            _ => {
                let mut h = Hasher::new(expected.algorithm());
                let mut buf = vec![0u8; 1 << 20];
                for p in &parts {
                    let mut r = self.blobs.open_part(&uuid, p)?;
                    loop {
                        let n = r
                            .read(&mut buf)
                            .map_err(|e| StoreError::io("read upload part", e))?;
                        if n == 0 {
                            break;
                        }
                        h.update(&buf[..n]);
                    }
                }
                h.finish()
            }
        };
        if &computed != expected {
            self.discard_upload(&uuid)?;
            return Err(StoreError::DigestMismatch {
                expected: expected.clone(),
                computed,
            });
        }
        {
            let _guard = self
                .blob_lock
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let _fence = self.meta.fence(false)?;
            // On failure the record and parts stay: the finish can be retried.
            self.blobs.commit_parts(&uuid, &parts, expected)?;
            self.record_blob(repo, expected, size)?;
        }
        self.discard_upload(&uuid)?;
        Ok(size)
    }

    /// Finishes a session: verifies the digest, commits the blob and links it into
    /// `repo`. On a digest mismatch the session is discarded. Returns the blob size.
    pub fn finish_upload(
        &self,
        repo: &RepoName,
        writer: UploadWriter,
        expected: &Digest,
    ) -> Result<u64> {
        if writer.shared.is_some() {
            return self.finish_shared(repo, writer, expected);
        }
        let mut w = writer;
        let uuid = w.id;
        let path = self.staging.staging_path(&uuid);
        let hasher = w.hasher.take();
        let size = w.offset;
        drop(w);
        let computed = match hasher {
            Some(h) if expected.algorithm() == Algorithm::Sha256 => h.finish(),
            _ => hash_file(&path, expected.algorithm())?.0.finish(),
        };
        if &computed != expected {
            self.discard_upload(&uuid)?;
            return Err(StoreError::DigestMismatch {
                expected: expected.clone(),
                computed,
            });
        }
        let committed = {
            let _guard = self
                .blob_lock
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.meta.fence(false).and_then(|_fence| {
                self.blobs
                    .commit(&path, expected)
                    .and_then(|()| self.record_blob(repo, expected, size))
            })
        };
        if let Err(e) = committed {
            // The staged bytes stay: the session can be finished again (its hash
            // is rebuilt from them), e.g. once object storage is back.
            lock(&self.uploads).remove(&uuid);
            return Err(e);
        }
        self.discard_upload(&uuid)?;
        Ok(size)
    }

    /// Cancels a session and deletes its staged bytes.
    pub fn cancel_upload(&self, repo: &RepoName, id: &str) -> Result<()> {
        let uuid = self.check_session(repo, id)?;
        if lock(&self.uploads)
            .get(&uuid)
            .is_some_and(|l| l.hasher.is_none())
        {
            return Err(StoreError::UploadBusy(id.to_owned()));
        }
        self.discard_upload(&uuid)
    }

    fn discard_upload(&self, uuid: &Uuid) -> Result<()> {
        if let Some(raw) = self.meta.upload(&uuid.to_string())?
            && let Ok(UploadRecord {
                shared: Some(sh), ..
            }) = from_json::<UploadRecord>(&raw)
        {
            self.blobs.remove_parts(uuid, &sh.parts)?;
        }
        lock(&self.uploads).remove(uuid);
        self.meta.remove_upload(&uuid.to_string())?;
        match fs::remove_file(self.staging.staging_path(uuid)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(StoreError::io("remove upload file", e))
            }
            _ => Ok(()),
        }
    }

    /// Removes sessions started more than `max_age` ago and staging files that no
    /// session owns (left by a crash). Returns how many were removed.
    pub fn purge_uploads(&self, max_age: Duration) -> Result<usize> {
        let cutoff =
            now_ms().saturating_sub(u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX));
        let mut doomed = Vec::new();
        let mut known = std::collections::HashSet::new();
        for (k, v) in self.meta.uploads()? {
            let rec: UploadRecord = from_json(&v)?;
            if let Ok(u) = Uuid::parse_str(&k) {
                known.insert(u);
                if rec.started_ms <= cutoff {
                    doomed.push(u);
                }
            }
        }
        let mut n = 0;
        for u in &doomed {
            if lock(&self.uploads)
                .get(u)
                .is_some_and(|l| l.hasher.is_none())
            {
                continue; // a request is writing to it right now
            }
            self.discard_upload(u)?;
            n += 1;
        }
        let entries = fs::read_dir(self.staging.uploads_dir())
            .map_err(|e| StoreError::io("list uploads", e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let orphan = name
                .to_str()
                .and_then(|s| Uuid::parse_str(s).ok())
                .is_none_or(|u| !known.contains(&u));
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= max_age);
            if orphan && old && fs::remove_file(entry.path()).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }
}
