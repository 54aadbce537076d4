//! `GET /api/v1/services/{name}/logs`: a service's instances in one stream, each
//! line prefixed with its instance, following instances as they come and go during
//! a rollout (as `docker service logs` and `kamal app logs` do).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::Services;
use crate::api_error::ApiError;

#[derive(Deserialize)]
pub(crate) struct LogsQuery {
    #[serde(default)]
    follow: bool,
    revision: Option<u64>,
    tail: Option<usize>,
    since: Option<String>,
}

/// One instance's log being read: a file of this node's runtime, or an agent's
/// (`file` is `None`), read from `pos` on.
struct Reader {
    file: Option<tokio::fs::File>,
    pos: u64,
    partial: Vec<u8>,
}

struct Merge {
    services: Arc<Services>,
    name: String,
    revision: Option<u64>,
    tail: Option<usize>,
    since_ms: Option<u64>,
    follow: bool,
    readers: HashMap<String, Reader>,
    first: bool,
}

/// The last `n` lines of `bytes`.
fn last_lines(bytes: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return &[];
    }
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return &bytes[i + 1..];
            }
        }
    }
    bytes
}

fn prefix_lines(id: &str, partial: &mut Vec<u8>, chunk: &[u8], out: &mut Vec<u8>) {
    partial.extend_from_slice(chunk);
    while let Some(pos) = partial.iter().position(|b| *b == b'\n') {
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(b" | ");
        out.extend(partial.drain(..=pos));
    }
}

impl Merge {
    /// The instances to read now.
    fn instances(&self) -> Option<Vec<String>> {
        let record = self.services.record(&self.name).ok()?;
        let runtime = self.services.runtime();
        let now = slipway_core::now_ms();
        Some(
            record
                .instances
                .iter()
                .chain(&record.stopping)
                .filter(|i| self.revision.is_none_or(|r| r == i.revision))
                .filter(|i| {
                    self.since_ms.is_none_or(|since| {
                        self.remote(&i.id)
                            || runtime
                                .inspect(&i.id)
                                .is_ok_and(|c| c.finished_at_ms.is_none_or(|f| f + since >= now))
                    })
                })
                .map(|i| i.id.clone())
                .collect(),
        )
    }

    /// Whether instance `id` runs on another node (its log is its agent's).
    fn remote(&self, id: &str) -> bool {
        self.services.cluster().is_some_and(|c| c.is_remote(id))
    }

    /// Reads what is new in every instance's log; `None` when the stream is over.
    async fn step(&mut self) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        let ids = self.instances();
        let Some(ids) = ids else {
            // The service is gone: drain what is open, then end.
            if self.readers.is_empty() {
                return None;
            }
            let readers = std::mem::take(&mut self.readers);
            for (id, mut r) in readers {
                self.read_new(&id, &mut r, &mut out).await;
            }
            return Some(out);
        };
        for id in &ids {
            if self.readers.contains_key(id) {
                continue;
            }
            if self.remote(id) {
                let mut pos = 0;
                if let (Some(n), Some(c)) =
                    (self.tail.filter(|_| self.first), self.services.cluster())
                    && let Some((_, all)) = c.read_log(id, 0).await
                {
                    pos = (all.len() - last_lines(&all, n).len()) as u64;
                }
                self.readers.insert(
                    id.clone(),
                    Reader {
                        file: None,
                        pos,
                        partial: Vec::new(),
                    },
                );
                continue;
            }
            let Ok(path) = self.services.runtime().log_path(id) else {
                continue;
            };
            let Ok(mut file) = tokio::fs::File::open(&path).await else {
                continue;
            };
            let mut pos = 0;
            if let Some(n) = self.tail.filter(|_| self.first) {
                let mut all = Vec::new();
                if file.read_to_end(&mut all).await.is_ok() {
                    let kept = last_lines(&all, n);
                    pos = (all.len() - kept.len()) as u64;
                    let _ = file.seek(std::io::SeekFrom::Start(pos)).await;
                }
            }
            self.readers.insert(
                id.clone(),
                Reader {
                    file: Some(file),
                    pos,
                    partial: Vec::new(),
                },
            );
        }
        let mut ids_sorted: Vec<String> = self.readers.keys().cloned().collect();
        ids_sorted.sort();
        for id in ids_sorted {
            if let Some(mut r) = self.readers.remove(&id) {
                self.read_new(&id, &mut r, &mut out).await;
                // An instance that left the service has been read to its end.
                if ids.contains(&id)
                    || (r.file.is_some() && self.services.runtime().inspect(&id).is_ok())
                {
                    self.readers.insert(id, r);
                }
            }
        }
        self.first = false;
        Some(out)
    }

    async fn read_new(&self, id: &str, r: &mut Reader, out: &mut Vec<u8>) {
        match r.file.as_mut() {
            Some(file) => {
                // Rotation truncates the file: start over from its beginning.
                let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
                if len < r.pos {
                    r.pos = 0;
                    let _ = file.seek(std::io::SeekFrom::Start(0)).await;
                }
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    match file.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            r.pos += n as u64;
                            prefix_lines(id, &mut r.partial, &buf[..n], out);
                        }
                    }
                }
            }
            None => {
                if let Some((from, bytes)) = match self.services.cluster() {
                    Some(c) => c.read_log(id, r.pos).await,
                    None => None,
                } {
                    r.pos = from + bytes.len() as u64;
                    prefix_lines(id, &mut r.partial, &bytes, out);
                }
            }
        }
        if !self.follow && !r.partial.is_empty() {
            r.partial.push(b'\n');
            prefix_lines(id, &mut r.partial, &[], out);
        }
    }
}

pub(crate) async fn logs(
    State(s): State<Arc<Services>>,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    s.record(&name)?;
    let since_ms = q
        .since
        .as_deref()
        .map(|d| {
            slipway_core::parse_duration(d)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .map_err(|e| ApiError::invalid("since", e.to_string()))
        })
        .transpose()?;
    let mut merge = Merge {
        services: s,
        name,
        revision: q.revision,
        tail: q.tail,
        since_ms,
        follow: q.follow,
        readers: HashMap::new(),
        first: true,
    };
    if !q.follow {
        let out = merge.step().await.unwrap_or_default();
        return Ok(out.into_response());
    }
    let stream = futures_util::stream::unfold(merge, |mut m| async move {
        loop {
            let out = m.step().await?;
            if !out.is_empty() {
                return Some((Ok::<_, std::io::Error>(Bytes::from(out)), m));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    Ok(Body::from_stream(stream).into_response())
}

#[cfg(test)]
mod tests {
    #[test]
    fn tail_keeps_the_last_lines_and_lines_get_their_instance() {
        assert_eq!(super::last_lines(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(super::last_lines(b"a\nb\nc\n", 5), b"a\nb\nc\n");
        assert_eq!(super::last_lines(b"a\nb\nc", 1), b"c");
        let (mut partial, mut out) = (Vec::new(), Vec::new());
        super::prefix_lines("web-r1", &mut partial, b"one\ntw", &mut out);
        super::prefix_lines("web-r1", &mut partial, b"o\n", &mut out);
        assert_eq!(out, b"web-r1 | one\nweb-r1 | two\n");
    }
}
