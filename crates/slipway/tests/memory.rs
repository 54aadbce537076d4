//! Blobs are streamed end to end: pushing and pulling a 2 GiB blob must not grow the
//! server's RSS by more than 64 MiB.

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sha2::Digest as _;
use slipway_testkit::{TestServer, open_request, read_response};

const BIN: &str = env!("CARGO_BIN_EXE_slipway");
const SIZE: u64 = 2 << 30;
const LIMIT: u64 = 64 << 20;

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| {
                    l.strip_prefix("VmRSS:")
                        .map(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
                })
                .flatten()
        })
        .map_or(0, |kb| kb * 1024)
}

/// Samples the server's RSS in the background; returns the peak seen.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_bytes(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self {
            stop,
            peak,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

#[test]
fn two_gib_push_and_pull_keep_server_rss_within_64_mib() {
    let s = TestServer::start(BIN);
    // Warm up the allocator and the blocking pool with a small push first.
    s.push_blob("mem/app", &vec![1u8; 1 << 20]);
    let baseline = rss_bytes(s.pid());
    let sampler = RssSampler::start(s.pid());

    let r = s.request("POST", "/v2/mem/app/blobs/uploads/", &[], b"");
    let loc = r.header("location").expect("location").to_owned();
    let mut stream = open_request(
        s.addr,
        "PATCH",
        &loc,
        &[("Content-Length", &SIZE.to_string())],
        b"",
    );
    let mut hasher = sha2::Sha256::new();
    let mut chunk = vec![0u8; 1 << 20];
    let mut sent = 0u64;
    while sent < SIZE {
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = u8::try_from((sent as usize + i) % 253).unwrap_or(0);
        }
        hasher.update(&chunk);
        stream.write_all(&chunk).expect("send");
        sent += chunk.len() as u64;
    }
    assert_eq!(read_response(stream, "PATCH").status, 202);
    let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
    let r = s.request("PUT", &format!("{loc}?digest={digest}"), &[], b"");
    assert_eq!(r.status, 201);

    // Pull it back, hashing as it streams, without buffering it here either.
    let stream = open_request(
        s.addr,
        "GET",
        &format!("/v2/mem/app/blobs/{digest}"),
        &[],
        b"",
    );
    let mut reader = BufReader::with_capacity(1 << 20, stream);
    let mut len = 0u64;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("head");
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().expect("len");
        }
    }
    assert_eq!(len, SIZE);
    let mut hasher = sha2::Sha256::new();
    let mut got = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while got < SIZE {
        let n = reader.read(&mut buf).expect("read");
        assert!(n > 0, "body ended at {got}");
        hasher.update(&buf[..n]);
        got += n as u64;
    }
    assert_eq!(format!("sha256:{}", hex::encode(hasher.finalize())), digest);

    let peak = sampler.finish();
    assert!(
        peak.saturating_sub(baseline) <= LIMIT,
        "RSS grew from {} MiB to {} MiB",
        baseline >> 20,
        peak >> 20
    );
}
