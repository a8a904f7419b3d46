//! Encryption cost, measured against baselines in the same run (these machines are noisy, so
//! only ratios are meaningful):
//!
//! 1. sealing 64 MiB in 64 KiB pieces vs copying the same bytes; opening them vs copying;
//! 2. the cipher alone (ring, used for segments, and aws-lc-rs) vs copying;
//! 3. ingest into the local-folder store, sealed vs plain, 32 MiB per upload;
//! 4. uploads over HTTP with curl: the real route against a plain streaming route, with the
//!    CPU each side spent.
//!
//! Run: `cargo bench --bench crypto`. Prints a Markdown table for docs/benchmarks.md.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use medrelay::crypto::{self, Binding, Keyring, SealingStream};
use medrelay::store::Store;

const PIECE: usize = 64 * 1024;
const ROUNDS: usize = 11;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn mib_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64()
}

fn data(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

const BIND: Binding<'static> = Binding {
    user_prefix: "bench",
    job_id: "job",
    kind: "document",
};

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let keyring = Keyring::parse("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
    let plain = data(64 * 1024 * 1024);

    // 1. Seal vs copy, interleaved so both see the same machine state.
    let (mut copy_t, mut seal_t, mut open_t) = (Vec::new(), Vec::new(), Vec::new());
    // Output buffers are allocated and touched once: a fresh 64 MiB vector per round would
    // measure the kernel's page faults, not the copy or the cipher.
    let mut copied = vec![0u8; plain.len()];
    let mut sealed = vec![0u8; plain.len() + plain.len() / 1000];
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let out = &mut copied;
        out.clear();
        for piece in plain.chunks(PIECE) {
            out.extend_from_slice(black_box(piece));
        }
        black_box(&out);
        copy_t.push(start.elapsed());

        let (key, _) = keyring.new_data_key(&BIND).unwrap();
        let start = Instant::now();
        let mut stream = SealingStream::new(&key, &BIND).unwrap();
        let out = &mut sealed;
        out.clear();
        for piece in plain.chunks(PIECE) {
            for part in stream.push(piece).unwrap() {
                out.extend_from_slice(&part);
            }
        }
        for part in stream.finish().unwrap() {
            out.extend_from_slice(&part);
        }
        seal_t.push(start.elapsed());

        let start = Instant::now();
        let opened = crypto::open(&key, &BIND, out).unwrap();
        open_t.push(start.elapsed());
        assert_eq!(opened.len(), plain.len());
    }
    black_box(&sealed);
    let (copy, seal, open) = (median(copy_t), median(seal_t), median(open_t));

    // 2. The cipher alone, in place on one 64 KiB buffer: ring (used for the segments) and
    //    aws-lc-rs (used to wrap keys), to justify the choice on the machine at hand.
    let (mut ring_t, mut awslc_t) = (Vec::new(), Vec::new());
    let mut buffer = plain[..PIECE].to_vec();
    let ring_key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &[7; 32]).unwrap(),
    );
    let awslc_key = aws_lc_rs::aead::LessSafeKey::new(
        aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, &[7; 32]).unwrap(),
    );
    let nonce = |i: usize| {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&(i as u64).to_be_bytes());
        n
    };
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for i in 0..plain.len() / PIECE {
            let n = ring::aead::Nonce::assume_unique_for_key(nonce(i));
            let tag = ring_key.seal_in_place_separate_tag(n, ring::aead::Aad::empty(), &mut buffer);
            let _ = black_box(tag.unwrap());
        }
        ring_t.push(start.elapsed());
        let start = Instant::now();
        for i in 0..plain.len() / PIECE {
            let n = aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce(i));
            let tag =
                awslc_key.seal_in_place_separate_tag(n, aws_lc_rs::aead::Aad::empty(), &mut buffer);
            let _ = black_box(tag.unwrap());
        }
        awslc_t.push(start.elapsed());
    }
    let (ring_gcm, awslc_gcm) = (median(ring_t), median(awslc_t));

    // 3. Ingest into the local-folder store: plain vs sealed, 32 MiB uploads.
    let upload = &plain[..32 * 1024 * 1024];
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("file://{}", dir.path().display())).unwrap();
    let (mut plain_t, mut sealed_t) = (Vec::new(), Vec::new());
    runtime.block_on(async {
        for round in 0..ROUNDS {
            let path = object_store::path::Path::from(format!("bench/plain-{round}"));
            let start = Instant::now();
            let mut writer = store.writer(&path);
            for piece in upload.chunks(PIECE) {
                writer.write(Bytes::copy_from_slice(piece)).await.unwrap();
            }
            writer.finish().await.unwrap();
            plain_t.push(start.elapsed());
            store.delete(&path).await.unwrap();

            let path = object_store::path::Path::from(format!("bench/sealed-{round}"));
            let start = Instant::now();
            let (key, _) = keyring.new_data_key(&BIND).unwrap();
            let mut stream = SealingStream::new(&key, &BIND).unwrap();
            let mut writer = store.writer(&path);
            for piece in upload.chunks(PIECE) {
                for part in stream.push(piece).unwrap() {
                    writer.write(part).await.unwrap();
                }
            }
            for part in stream.finish().unwrap() {
                writer.write(part).await.unwrap();
            }
            writer.finish().await.unwrap();
            sealed_t.push(start.elapsed());
            store.delete(&path).await.unwrap();
        }
    });
    let (ingest_plain, ingest_sealed) = (median(plain_t), median(sealed_t));

    // 4. Upload ingest over HTTP: the real upload route (sniff, seal, store, commit) against a
    //    route that streams the same bytes into the same store unencrypted.
    let http = runtime.block_on(http_ingest(upload));
    let (http_plain, http_sealed) = (http.plain, http.sealed);

    let n = plain.len();
    let u = upload.len();
    println!("| measurement (median of {ROUNDS}) | MiB/s | ratio to its baseline |");
    println!("|---|---|---|");
    println!(
        "| copy 64 MiB in 64 KiB pieces (baseline) | {:.0} | 1.00 |",
        mib_per_s(n, copy)
    );
    println!(
        "| seal 64 MiB (STREAM, AES-256-GCM) | {:.0} | {:.3} |",
        mib_per_s(n, seal),
        copy.as_secs_f64() / seal.as_secs_f64()
    );
    println!(
        "| AES-256-GCM alone, in place, 64 KiB buffers: ring (segments) | {:.0} | {:.3} |",
        mib_per_s(n, ring_gcm),
        copy.as_secs_f64() / ring_gcm.as_secs_f64()
    );
    println!(
        "| AES-256-GCM alone, in place, 64 KiB buffers: aws-lc-rs | {:.0} | {:.3} |",
        mib_per_s(n, awslc_gcm),
        copy.as_secs_f64() / awslc_gcm.as_secs_f64()
    );
    println!(
        "| open 64 MiB | {:.0} | {:.3} |",
        mib_per_s(n, open),
        copy.as_secs_f64() / open.as_secs_f64()
    );
    println!(
        "| ingest 32 MiB into the local folder, plain (baseline) | {:.0} | 1.00 |",
        mib_per_s(u, ingest_plain)
    );
    println!(
        "| ingest 32 MiB into the local folder, sealed | {:.0} | {:.3} |",
        mib_per_s(u, ingest_sealed),
        ingest_plain.as_secs_f64() / ingest_sealed.as_secs_f64()
    );
    println!(
        "| upload 32 MiB over HTTP, plain streaming route (baseline) | {:.0} | 1.00 |",
        mib_per_s(u, http_plain)
    );
    println!(
        "| upload 32 MiB over HTTP, the real `POST /v1/documents` | {:.0} | {:.3} |",
        mib_per_s(u, http_sealed),
        http_plain.as_secs_f64() / http_sealed.as_secs_f64()
    );
    let (plain_server, plain_client) = http.plain_cpu.per_upload();
    let (sealed_server, sealed_client) = http.sealed_cpu.per_upload();
    println!(
        "| CPU per 32 MiB upload, plain route: server / curl client (ms) | {plain_server:.0} / {plain_client:.0} | 1.00 |"
    );
    println!(
        "| CPU per 32 MiB upload, real route: server / curl client (ms) | {sealed_server:.0} / {sealed_client:.0} | {:.3} |",
        (plain_server + plain_client) / (sealed_server + sealed_client)
    );
    let cost = 1.0 - ingest_plain.as_secs_f64() / ingest_sealed.as_secs_f64();
    println!(
        "\nencryption costs {:.1}% of store ingest throughput",
        cost * 100.0
    );
    let cost = 1.0 - http_plain.as_secs_f64() / http_sealed.as_secs_f64();
    println!(
        "the real upload route costs {:.1}% of plain HTTP upload ingest throughput (target: under 10%)",
        cost * 100.0
    );
}

async fn http_ingest(upload: &[u8]) -> HttpIngest {
    use futures::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = medrelay::config::Settings::defaults();
    settings.listen = "127.0.0.1:0".into();
    settings.data_dir = dir.path().to_path_buf();
    settings.roles.worker = false;
    settings.roles.sweeper = false;
    let running = medrelay::app::start(settings).await.unwrap();
    let token = running
        .state
        .auth
        .mint("bench", Duration::from_secs(3600))
        .unwrap();
    let store = running.state.lifecycle.store().clone();
    let plain_route = axum::Router::new().route(
        "/plain",
        axum::routing::post(move |body: axum::body::Body| {
            let store = store.clone();
            async move {
                let path =
                    object_store::path::Path::from(format!("plain/{}", uuid::Uuid::new_v4()));
                let mut writer = store.writer(&path);
                let mut stream = body.into_data_stream();
                while let Some(chunk) = stream.next().await {
                    writer.write(chunk.unwrap()).await.unwrap();
                }
                writer.finish().await.unwrap();
                store.delete(&path).await.unwrap();
                axum::http::StatusCode::ACCEPTED
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, plain_route).await.unwrap() });

    let mut body = b"%PDF-1.7\n".to_vec();
    body.extend_from_slice(&upload[9..]);
    // The client is a second process (curl), as a phone would be: it does not share the
    // server's runtime, only the machine's two cores.
    let file = dir.path().join("upload.bin");
    std::fs::write(&file, &body).unwrap();
    let curl = |url: String, auth: Option<String>| {
        let file = file.clone();
        async move {
            // curl's own transfer time: process start-up is not part of an upload.
            let mut cmd = tokio::process::Command::new("curl");
            cmd.args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{time_total}",
                "--data-binary",
            ])
            .arg(format!("@{}", file.display()))
            .args(["-H", "content-type: application/octet-stream"]);
            if let Some(token) = auth {
                cmd.args(["-H", &format!("authorization: Bearer {token}")]);
            }
            let out = cmd.arg(&url).output().await.expect("curl runs");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let (code, secs) = text.split_once(' ').expect("curl's -w output");
            assert_eq!(code, "202");
            Duration::from_secs_f64(secs.trim().parse().expect("a time in seconds"))
        }
    };
    let (mut plain_t, mut sealed_t) = (Vec::new(), Vec::new());
    let (mut plain_cpu, mut sealed_cpu) = (Cpu::default(), Cpu::default());
    for _ in 0..ROUNDS {
        let before = Cpu::now();
        plain_t.push(curl(format!("http://{plain_addr}/plain"), None).await);
        plain_cpu.add(before, Cpu::now());
        let before = Cpu::now();
        sealed_t.push(
            curl(
                format!("http://{}/v1/documents", running.addr),
                Some(token.clone()),
            )
            .await,
        );
        sealed_cpu.add(before, Cpu::now());
        // Not timed: delete the job and its document, as the plain route deletes its object,
        // so neither side leaves dirty pages for the kernel to write back during the next round.
        let deleted = tokio::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "DELETE",
            ])
            .args(["-H", &format!("authorization: Bearer {token}")])
            .arg(format!("http://{}/v1/me/data", running.addr))
            .output()
            .await
            .expect("curl runs");
        assert_eq!(String::from_utf8_lossy(&deleted.stdout), "204");
    }
    running.stop().await.unwrap();
    HttpIngest {
        plain: median(plain_t),
        sealed: median(sealed_t),
        plain_cpu,
        sealed_cpu,
    }
}

struct HttpIngest {
    plain: Duration,
    sealed: Duration,
    plain_cpu: Cpu,
    sealed_cpu: Cpu,
}

/// CPU seconds, summed over the rounds: of this process (the server runs in it) and of its
/// finished children (the curl clients, including their start-up). From /proc/self/stat, in
/// clock ticks of 10 ms (USER_HZ is 100 on Linux), so only sums over many rounds are useful.
#[derive(Default, Clone, Copy)]
struct Cpu {
    server: f64,
    client: f64,
}

impl Cpu {
    fn now() -> Cpu {
        let stat = std::fs::read_to_string("/proc/self/stat").expect("Linux /proc");
        let fields: Vec<f64> = stat
            .rsplit_once(')')
            .expect("a stat line")
            .1
            .split_whitespace()
            .skip(11)
            .take(4)
            .map(|f| f.parse().expect("a tick count"))
            .collect();
        Cpu {
            server: (fields[0] + fields[1]) / 100.0,
            client: (fields[2] + fields[3]) / 100.0,
        }
    }

    fn add(&mut self, before: Cpu, after: Cpu) {
        self.server += after.server - before.server;
        self.client += after.client - before.client;
    }

    /// Milliseconds per upload.
    fn per_upload(self) -> (f64, f64) {
        let n = ROUNDS as f64;
        (self.server * 1000.0 / n, self.client * 1000.0 / n)
    }
}
