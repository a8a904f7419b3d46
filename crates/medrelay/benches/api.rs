//! Regression check between two builds of the `medrelay` binary, measured in one run.
//!
//! Both binaries are started as a user would start them (`BIN serve` with `MEDRELAY_*`
//! variables, a fresh data dir each, a token from `BIN token`), and measured in interleaved
//! rounds (base, head, head, base, base, head, …: each goes first in every other round) so
//! that both see the same machine state. These 2-core VMs are noisy: only the ratio head/base
//! of the medians, measured in the same run, means something; the spread (min–max of the
//! rounds) tells how much noise there was.
//!
//! 1. Upload (roles `api,sweeper`: no worker, so an upload measures ingest only): 32 MiB
//!    `POST /v1/documents` with curl as a second process (as a phone is another machine),
//!    and 100 KiB uploads with an in-process client. Every job is deleted after its upload
//!    (not timed), so that dirty pages do not pile up.
//! 2. Poll (all roles): one small PDF is processed, then `GET /v1/jobs/{id}` is loaded with
//!    64 keep-alive connections (wrk when installed, else an in-process reqwest client), and
//!    `GET /healthz` the same way, as a reference for the server itself.
//!
//! Run: `cargo bench -p medrelay --bench api -- /abs/medrelay-base /abs/medrelay-head`
//! (`scripts/bench [BASE_REV]` builds both and runs this). Prints a Markdown table on stdout,
//! progress on stderr. Settings: `MEDRELAY_BENCH_ROUNDS` (7), `MEDRELAY_BENCH_UPLOADS` (32 MiB
//! uploads per round, 5), `MEDRELAY_BENCH_SMALL` (100 KiB uploads per round, 200),
//! `MEDRELAY_BENCH_SECS` (seconds of load per round, 5), `MEDRELAY_BENCH_CONNS` (64),
//! `MEDRELAY_BENCH_LOADER` (`wrk` or `reqwest`; default: wrk if installed),
//! `MEDRELAY_BENCH_DIR` (where the data dirs go; default /dev/shm, see `bench_dir`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const LARGE: usize = 32 * 1024 * 1024;
const SMALL: usize = 100 * 1024;
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longer than the server's default shutdown grace (20 s).
const STOP_TIMEOUT: Duration = Duration::from_secs(40);
const PROCESS_TIMEOUT: Duration = Duration::from_secs(120);
/// USER_HZ: /proc's CPU times are in ticks of 10 ms on Linux.
const TICKS_PER_S: f64 = 100.0;
const LABELS: [&str; 2] = ["base", "head"];

struct Settings {
    /// Where the data dirs and the upload file go, and what that place is.
    dir: PathBuf,
    dir_note: String,
    rounds: usize,
    uploads: usize,
    small: usize,
    secs: u64,
    conns: usize,
    loader: Loader,
}

#[derive(Clone, Copy, PartialEq)]
enum Loader {
    Wrk,
    Reqwest,
}

impl Loader {
    fn name(self) -> &'static str {
        match self {
            Loader::Wrk => "wrk",
            Loader::Reqwest => "reqwest (in-process, 64 tasks)",
        }
    }
}

fn env_number(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => fail(format!("{name} must be a positive integer, not {v:?}")),
        },
        Err(_) => default,
    }
}

fn fail(message: String) -> ! {
    eprintln!("\nbench failed: {message}");
    // Unwinding (not process::exit) so that destructors run: servers are killed, temp dirs
    // go; resume_unwind skips the panic hook, so no backtrace buries the message.
    std::panic::resume_unwind(Box::new(message))
}

fn main() {
    // `cargo bench` passes `--bench` (and maybe other flags) to a harness-less bench.
    let bins: Vec<PathBuf> = std::env::args_os()
        .skip(1)
        .filter(|a| !a.to_string_lossy().starts_with("--"))
        .map(PathBuf::from)
        .collect();
    if bins.is_empty() {
        eprintln!(
            "api bench skipped: it compares two medrelay binaries; run\n  \
             cargo bench -p medrelay --bench api -- /abs/medrelay-base /abs/medrelay-head\n\
             or scripts/bench [BASE_REV]"
        );
        return;
    }
    if bins.len() != 2 {
        fail(format!(
            "expected two binaries (base, head), got {}: {bins:?}",
            bins.len()
        ));
    }
    for bin in &bins {
        if !bin.is_file() {
            fail(format!("{} is not a file", bin.display()));
        }
    }
    if std::process::Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        fail("curl is not installed (the 32 MiB uploads are sent with curl)".into());
    }
    let wrk = std::process::Command::new("wrk")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    let loader = match std::env::var("MEDRELAY_BENCH_LOADER").as_deref() {
        Ok("wrk") if !wrk => fail("MEDRELAY_BENCH_LOADER=wrk but wrk is not installed".into()),
        Ok("wrk") => Loader::Wrk,
        Ok("reqwest") => Loader::Reqwest,
        Ok(other) => fail(format!(
            "MEDRELAY_BENCH_LOADER must be wrk or reqwest, not {other:?}"
        )),
        Err(_) if wrk => Loader::Wrk,
        Err(_) => Loader::Reqwest,
    };
    let (dir, dir_note) = bench_dir();
    let settings = Settings {
        dir,
        dir_note,
        rounds: env_number("MEDRELAY_BENCH_ROUNDS", 7),
        uploads: env_number("MEDRELAY_BENCH_UPLOADS", 5),
        small: env_number("MEDRELAY_BENCH_SMALL", 200),
        secs: env_number("MEDRELAY_BENCH_SECS", 5) as u64,
        conns: env_number("MEDRELAY_BENCH_CONNS", 64),
        loader,
    };
    let bins = [bins[0].clone(), bins[1].clone()];
    let started = Instant::now();
    let (machine_before, own_before) = (machine_cpu(), own_cpu());
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let rows = runtime.block_on(run(&bins, &settings));
    drop(runtime);
    let machine = machine_cpu();
    let took = started.elapsed().as_secs_f64();
    // The servers were children of this process and have been waited for: their CPU is in
    // own_cpu's children part, as is every curl's and wrk's.
    let others = Load {
        others: ((machine.busy - machine_before.busy) - (own_cpu() - own_before)).max(0.0) / took,
        steal: (machine.steal - machine_before.steal) / took,
    };
    print_report(&bins, &settings, &rows, took, others);
}

/// What the machine did besides this run, in cores on average.
struct Load {
    others: f64,
    steal: f64,
}

struct MachineCpu {
    busy: f64,
    steal: f64,
}

/// CPU seconds the whole machine has been busy (user, nice, system, irq, softirq), and stolen
/// by the hypervisor, from /proc/stat.
fn machine_cpu() -> MachineCpu {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let get = |i: usize| fields.get(i).copied().unwrap_or(0.0) / TICKS_PER_S;
    MachineCpu {
        busy: get(0) + get(1) + get(2) + get(5) + get(6),
        steal: get(7),
    }
}

/// The servers' data dirs live on tmpfs when there is room. In short same-binary runs on these
/// VMs' ext4 disk, the two instances of one binary differed by up to 40% in server CPU per
/// 32 MiB upload, the same way in every round of a run (it seems to depend on where each data
/// dir lands on disk), which no number of rounds averages out; on tmpfs, within ~7%. The
/// filesystem is not the code under comparison. `MEDRELAY_BENCH_DIR` chooses another place.
fn bench_dir() -> (PathBuf, String) {
    if let Ok(dir) = std::env::var("MEDRELAY_BENCH_DIR") {
        return (PathBuf::from(&dir), format!("{dir} (MEDRELAY_BENCH_DIR)"));
    }
    // Room for the 32 MiB upload file, one stored upload and the databases, with margin.
    let shm_kib = std::process::Command::new("df")
        .args(["-Pk", "/dev/shm"])
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let line = text.lines().nth(1)?.to_owned();
            line.split_whitespace().nth(3)?.parse::<u64>().ok()
        });
    match shm_kib {
        Some(kib) if kib >= 512 * 1024 => ("/dev/shm".into(), "/dev/shm (tmpfs)".into()),
        _ => {
            let dir = std::env::temp_dir();
            let note = format!("{} (/dev/shm missing or small)", dir.display());
            (dir, note)
        }
    }
}

/// One row of the report: per binary, one value per round.
struct Row {
    name: String,
    samples: [Vec<f64>; 2],
}

impl Row {
    fn new(name: impl Into<String>) -> Row {
        Row {
            name: name.into(),
            samples: [Vec::new(), Vec::new()],
        }
    }
}

async fn run(bins: &[PathBuf; 2], s: &Settings) -> Vec<Row> {
    let work = tempfile::Builder::new()
        .prefix("medrelay-bench-")
        .tempdir_in(&s.dir)
        .unwrap_or_else(|e| fail(format!("a temp dir in {}: {e}", s.dir.display())));
    let mut rows = upload_phase(bins, s, work.path()).await;
    rows.extend(poll_phase(bins, s).await);
    rows
}

/// Which binary goes first in a round: base, head in even rounds, head, base in odd ones, so
/// that neither always runs right after the other (the rounds go A B B A A B …).
fn order(round: usize) -> [usize; 2] {
    if round.is_multiple_of(2) {
        [0, 1]
    } else {
        [1, 0]
    }
}

// --- upload -----------------------------------------------------------------------------------

async fn upload_phase(bins: &[PathBuf; 2], s: &Settings, work: &Path) -> Vec<Row> {
    let large_file = work.join("large.pdf");
    std::fs::write(&large_file, pdf_like(LARGE, 1)).expect("writing the upload file");
    let small = Bytes::from(pdf_like(SMALL, 2));
    let answer = work.join("answer.json");

    eprintln!("upload phase: starting both servers (roles api,sweeper)");
    let servers = [
        Server::start(LABELS[0], &bins[0], Some("api,sweeper"), &s.dir).await,
        Server::start(LABELS[1], &bins[1], Some("api,sweeper"), &s.dir).await,
    ];
    let client = client(4);

    // Warm-up, not measured: the first uploads create the database's pages and folders.
    for server in &servers {
        upload_large(server, &large_file, &answer, &client).await;
        for _ in 0..5 {
            upload_small(server, &small, &client).await;
        }
    }

    let mut large_rate = Row::new("upload 32 MiB, curl (MiB/s, higher is better)");
    let mut large_cpu =
        Row::new("upload 32 MiB: server CPU per upload and its delete (ms, lower is better)");
    let mut small_time = Row::new("upload 100 KiB, reqwest (ms per upload, lower is better)");
    let mut small_cpu =
        Row::new("upload 100 KiB: server CPU per upload and its delete (ms, lower is better)");
    for round in 0..s.rounds {
        eprintln!("upload round {}/{}", round + 1, s.rounds);
        for i in order(round) {
            let server = &servers[i];
            // Server CPU over the whole sequence: /proc counts in 10 ms ticks, so one long
            // interval (uploads and the deletes between them) beats a sum of short ones.
            let before = server.cpu();
            let mut rates = Vec::new();
            for _ in 0..s.uploads {
                let took = upload_large(server, &large_file, &answer, &client).await;
                rates.push(LARGE as f64 / (1024.0 * 1024.0) / took.as_secs_f64());
            }
            large_rate.samples[i].push(median(rates));
            large_cpu.samples[i].push((server.cpu() - before) * 1000.0 / s.uploads as f64);

            let before = server.cpu();
            let mut times = Vec::new();
            for _ in 0..s.small {
                times.push(upload_small(server, &small, &client).await.as_secs_f64() * 1000.0);
            }
            small_time.samples[i].push(median(times));
            small_cpu.samples[i].push((server.cpu() - before) * 1000.0 / s.small as f64);
        }
    }
    for server in servers {
        server.stop().await;
    }
    vec![large_rate, large_cpu, small_time, small_cpu]
}

/// `%PDF-1.7\n` and pseudo-random bytes: the server decides the type from the first bytes and
/// does not parse a PDF at upload time.
fn pdf_like(len: usize, seed: u64) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    let mut out = b"%PDF-1.7\n".to_vec();
    out.extend((out.len()..len).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    }));
    out
}

/// One 32 MiB upload with curl (its own transfer time: process start-up and reading the file
/// are not part of an upload), then the job is deleted (not timed).
async fn upload_large(
    server: &Server,
    file: &Path,
    answer: &Path,
    client: &reqwest::Client,
) -> Duration {
    let out = Command::new("curl")
        .args(["-s", "--noproxy", "*", "-o"])
        .arg(answer)
        .args(["-w", "%{http_code} %{time_total}", "--data-binary"])
        .arg(format!("@{}", file.display()))
        // A phone's HTTP client sends no `Expect: 100-continue`; curl would for 32 MiB.
        .args(["-H", "Expect:", "-H", "Content-Type: application/pdf"])
        .args(["-H", &format!("Authorization: Bearer {}", server.token)])
        .arg(format!("{}/v1/documents", server.url))
        .output()
        .await
        .unwrap_or_else(|e| fail(format!("running curl: {e}")));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let body = std::fs::read_to_string(answer).unwrap_or_default();
    let Some((code, secs)) = text.split_once(' ') else {
        fail(format!(
            "curl failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    };
    if code != "202" {
        fail(format!(
            "{}: a 32 MiB upload got {code}, not 202: {body}",
            server.label
        ));
    }
    let took = secs
        .trim()
        .parse::<f64>()
        .unwrap_or_else(|_| fail(format!("curl's time_total {secs:?}")));
    delete_job(server, client, &job_id(&body)).await;
    Duration::from_secs_f64(took)
}

/// One 100 KiB upload with the in-process client (timed from sending to the whole answer),
/// then the job is deleted (not timed).
async fn upload_small(server: &Server, body: &Bytes, client: &reqwest::Client) -> Duration {
    let start = Instant::now();
    let response = client
        .post(format!("{}/v1/documents", server.url))
        .bearer_auth(&server.token)
        .header(reqwest::header::CONTENT_TYPE, "application/pdf")
        .body(body.clone())
        .send()
        .await
        .unwrap_or_else(|e| fail(format!("{}: a 100 KiB upload: {e}", server.label)));
    let status = response.status();
    let answer = response.text().await.unwrap_or_default();
    let took = start.elapsed();
    if status != reqwest::StatusCode::ACCEPTED {
        fail(format!(
            "{}: a 100 KiB upload got {status}, not 202: {answer}",
            server.label
        ));
    }
    delete_job(server, client, &job_id(&answer)).await;
    took
}

fn job_id(answer: &str) -> String {
    serde_json::from_str::<serde_json::Value>(answer)
        .ok()
        .and_then(|job| job["id"].as_str().map(str::to_owned))
        .unwrap_or_else(|| fail(format!("an upload's answer has no job id: {answer}")))
}

async fn delete_job(server: &Server, client: &reqwest::Client, id: &str) {
    let response = client
        .delete(format!("{}/v1/jobs/{id}", server.url))
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap_or_else(|e| fail(format!("{}: DELETE /v1/jobs/{id}: {e}", server.label)));
    if response.status() != reqwest::StatusCode::NO_CONTENT {
        fail(format!(
            "{}: DELETE /v1/jobs/{id} got {}, not 204",
            server.label,
            response.status()
        ));
    }
}

// --- poll -------------------------------------------------------------------------------------

async fn poll_phase(bins: &[PathBuf; 2], s: &Settings) -> Vec<Row> {
    eprintln!(
        "poll phase: starting both servers (all roles), loader: {}",
        s.loader.name()
    );
    let servers = [
        Server::start(LABELS[0], &bins[0], None, &s.dir).await,
        Server::start(LABELS[1], &bins[1], None, &s.dir).await,
    ];
    let pdf = small_pdf();
    let mut targets = Vec::new();
    for server in &servers {
        let id = processed_job(server, &pdf).await;
        targets.push(format!("/v1/jobs/{id}"));
    }

    let mut rows: Vec<Row> = Vec::new();
    let endpoints = [("poll GET /v1/jobs/{id}", true), ("GET /healthz", false)];
    for (name, _) in endpoints {
        let c = s.conns;
        rows.push(Row::new(format!(
            "{name}, {c} conns (req/s, higher is better)"
        )));
        rows.push(Row::new(format!("{name}: p50 latency (ms)")));
        rows.push(Row::new(format!("{name}: p99 latency (ms)")));
        rows.push(Row::new(format!(
            "{name}: server CPU per request (µs, lower is better)"
        )));
        rows.push(Row::new(format!(
            "{name}: load client's CPU (cores; informative)"
        )));
    }

    // Warm-up, not measured: connections, caches, the allocator's arenas.
    for (i, server) in servers.iter().enumerate() {
        for (path, auth) in [(targets[i].as_str(), true), ("/healthz", false)] {
            load(server, path, auth, s, Duration::from_secs(1)).await;
        }
    }
    let secs = Duration::from_secs(s.secs);
    for round in 0..s.rounds {
        eprintln!("poll round {}/{}", round + 1, s.rounds);
        for (e, (_, auth)) in endpoints.iter().enumerate() {
            for i in order(round) {
                let server = &servers[i];
                let path = if *auth {
                    targets[i].as_str()
                } else {
                    "/healthz"
                };
                let r = load(server, path, *auth, s, secs).await;
                let row = &mut rows[e * 5..e * 5 + 5];
                row[0].samples[i].push(r.rps);
                row[1].samples[i].push(r.p50_ms);
                row[2].samples[i].push(r.p99_ms);
                row[3].samples[i].push(r.server_cpu_s * 1e6 / r.requests as f64);
                row[4].samples[i].push(r.client_cpu_s / r.elapsed.as_secs_f64());
            }
        }
    }
    for server in servers {
        server.stop().await;
    }
    rows
}

/// A small valid PDF: the corpus' minimal document when it is there, else one built here.
fn small_pdf() -> Vec<u8> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/corpus/pdf-real/001-trivial--minimal-document.pdf");
    std::fs::read(&corpus).unwrap_or_else(|_| minimal_pdf())
}

/// A one-page PDF with one line of text, with a correct cross-reference table.
fn minimal_pdf() -> Vec<u8> {
    let stream = "BT /F1 12 Tf 72 720 Td (Haemoglobin 13.5 g/dL) Tj ET";
    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>".to_owned(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_owned(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R \
         /Resources << /Font << /F1 5 0 R >> >> >>"
            .to_owned(),
        format!(
            "<< /Length {} >>\nstream\n{stream}\nendstream",
            stream.len()
        ),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_owned(),
    ];
    let mut out = String::from("%PDF-1.4\n");
    let mut offsets = Vec::new();
    for (i, object) in objects.iter().enumerate() {
        offsets.push(out.len());
        let _ = write!(out, "{} 0 obj\n{object}\nendobj\n", i + 1);
    }
    let xref = out.len();
    let _ = write!(out, "xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1);
    for offset in offsets {
        let _ = writeln!(out, "{offset:010} 00000 n ");
    }
    let _ = write!(
        out,
        "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
        objects.len() + 1
    );
    out.into_bytes()
}

/// Uploads `pdf` and waits until its job has succeeded; returns the job's id.
async fn processed_job(server: &Server, pdf: &[u8]) -> String {
    let client = client(1);
    let response = client
        .post(format!("{}/v1/documents", server.url))
        .bearer_auth(&server.token)
        .header(reqwest::header::CONTENT_TYPE, "application/pdf")
        .body(pdf.to_vec())
        .send()
        .await
        .unwrap_or_else(|e| fail(format!("{}: uploading the PDF: {e}", server.label)));
    let status = response.status();
    let answer = response.text().await.unwrap_or_default();
    if status != reqwest::StatusCode::ACCEPTED {
        fail(format!(
            "{}: uploading the PDF got {status}, not 202: {answer}",
            server.label
        ));
    }
    let id = job_id(&answer);
    let deadline = Instant::now() + PROCESS_TIMEOUT;
    loop {
        let job: serde_json::Value = client
            .get(format!("{}/v1/jobs/{id}", server.url))
            .bearer_auth(&server.token)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .unwrap_or_else(|e| fail(format!("{}: GET /v1/jobs/{id}: {e}", server.label)))
            .json()
            .await
            .unwrap_or_else(|e| fail(format!("{}: GET /v1/jobs/{id}: {e}", server.label)));
        match job["status"].as_str() {
            Some("succeeded") => return id,
            Some("failed") => fail(format!(
                "{}: the PDF's job failed: {}",
                server.label, job["error"]
            )),
            _ if Instant::now() > deadline => fail(format!(
                "{}: the PDF's job did not succeed within {}s: {job}",
                server.label,
                PROCESS_TIMEOUT.as_secs()
            )),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

struct LoadResult {
    requests: u64,
    elapsed: Duration,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    server_cpu_s: f64,
    client_cpu_s: f64,
}

async fn load(server: &Server, path: &str, auth: bool, s: &Settings, secs: Duration) -> LoadResult {
    let url = format!("{}{path}", server.url);
    let token = auth.then_some(server.token.as_str());
    let (server_before, client_before) = (server.cpu(), own_cpu());
    let mut r = match s.loader {
        Loader::Wrk => load_wrk(&url, token, s.conns, secs).await,
        Loader::Reqwest => load_reqwest(&url, token, s.conns, secs).await,
    };
    r.server_cpu_s = server.cpu() - server_before;
    r.client_cpu_s = own_cpu() - client_before;
    if r.requests == 0 {
        fail(format!("{}: no request to {path} completed", server.label));
    }
    r
}

/// `conns` tasks on one pooled client, each with one keep-alive connection, sending requests
/// back to back until the time is up.
async fn load_reqwest(url: &str, token: Option<&str>, conns: usize, secs: Duration) -> LoadResult {
    let client = client(conns);
    let start = Instant::now();
    let deadline = start + secs;
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let client = client.clone();
            let url = url.to_owned();
            let token = token.map(str::to_owned);
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(16 * 1024);
                let mut errors = 0u64;
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    let mut request = client.get(&url);
                    if let Some(token) = &token {
                        request = request.bearer_auth(token);
                    }
                    match request.send().await {
                        Ok(response) => {
                            let status = response.status();
                            let body = response.bytes().await;
                            if status != reqwest::StatusCode::OK {
                                return Err(format!("{url} answered {status}"));
                            }
                            if body.is_err() {
                                errors += 1;
                                continue;
                            }
                            latencies.push(sent.elapsed());
                        }
                        // A pooled connection the server closed: counted, reconnected.
                        Err(_) => errors += 1,
                    }
                }
                Ok((latencies, errors))
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        match task.await.expect("a load task") {
            Ok((l, e)) => {
                latencies.extend(l);
                errors += e;
            }
            Err(message) => fail(message),
        }
    }
    let elapsed = start.elapsed();
    let requests = latencies.len() as u64;
    if errors * 1000 > requests.max(1) {
        fail(format!(
            "{url}: {errors} failed requests, {requests} good ones"
        ));
    }
    latencies.sort();
    let at = |q: f64| {
        let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len().max(1));
        latencies
            .get(i - 1)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    LoadResult {
        requests,
        elapsed,
        rps: requests as f64 / elapsed.as_secs_f64(),
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        server_cpu_s: 0.0,
        client_cpu_s: 0.0,
    }
}

async fn load_wrk(url: &str, token: Option<&str>, conns: usize, secs: Duration) -> LoadResult {
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(conns);
    let mut cmd = Command::new("wrk");
    cmd.arg(format!("-t{threads}"))
        .arg(format!("-c{conns}"))
        .arg(format!("-d{}s", secs.as_secs()))
        .arg("--latency");
    if let Some(token) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    let start = Instant::now();
    let out = cmd
        .arg(url)
        .output()
        .await
        .unwrap_or_else(|e| fail(format!("running wrk: {e}")));
    let elapsed = start.elapsed();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        fail(format!(
            "wrk failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    if text.contains("Non-2xx or 3xx responses") {
        fail(format!("{url}: some answers were not 200:\n{text}"));
    }
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
            .unwrap_or_else(|| fail(format!("no `{prefix}` in wrk's output:\n{text}")))
    };
    let rps: f64 = field("Requests/sec:")
        .parse()
        .unwrap_or_else(|_| fail(format!("wrk's Requests/sec:\n{text}")));
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| fail(format!("no request count in wrk's output:\n{text}")));
    let latency = |q: &str| {
        let value = field(q);
        let ms = [("us", 1e-3), ("ms", 1.0), ("s", 1e3), ("m", 60e3)]
            .iter()
            .find_map(|(unit, scale)| {
                value
                    .strip_suffix(unit)
                    .and_then(|n| n.parse::<f64>().ok())
                    .map(|n| n * scale)
            });
        ms.unwrap_or_else(|| fail(format!("wrk's {q} latency {value:?}")))
    };
    LoadResult {
        requests,
        elapsed,
        rps,
        p50_ms: latency("50%"),
        p99_ms: latency("99%"),
        server_cpu_s: 0.0,
        client_cpu_s: 0.0,
    }
}

fn client(conns: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(conns)
        .build()
        .expect("an HTTP client")
}

// --- servers ----------------------------------------------------------------------------------

/// One `medrelay serve` process with its own data dir, and a token for user `bench`.
struct Server {
    label: &'static str,
    child: Child,
    pid: u32,
    url: String,
    token: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// The environment a user would give: a fresh data dir, a free port, the local processor.
/// Inherited `MEDRELAY_*` variables (a database URL, a config file) are removed so that both
/// binaries run on the embedded defaults. Per-user limits are raised (variables a build does
/// not know are ignored): the bench sends hundreds of uploads as one user.
fn server_env(cmd: &mut Command, data: &Path) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("MEDRELAY_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("MEDRELAY_DATA_DIR", data)
        .env("MEDRELAY_LISTEN", "127.0.0.1:0")
        .env("MEDRELAY_PROCESSOR", "local")
        .env("MEDRELAY_USER_UPLOADS_PER_HOUR", "1000000")
        .env("MEDRELAY_USER_ACTIVE_JOBS", "1000000")
        .env("RUST_LOG", "warn");
}

impl Server {
    async fn start(label: &'static str, bin: &Path, roles: Option<&str>, dir: &Path) -> Server {
        let dir = tempfile::Builder::new()
            .prefix(&format!("medrelay-bench-{label}-"))
            .tempdir_in(dir)
            .unwrap_or_else(|e| fail(format!("a temp dir in {}: {e}", dir.display())));
        let data = dir.path().join("data");
        let log = dir.path().join("server.log");
        let mut cmd = Command::new(bin);
        cmd.arg("serve");
        server_env(&mut cmd, &data);
        if let Some(roles) = roles {
            cmd.env("MEDRELAY_ROLES", roles);
        }
        let stderr = std::fs::File::create(&log).expect("the server's log file");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| fail(format!("starting {} serve: {e}", bin.display())));
        let pid = child.id().expect("a running child");
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let found = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some((_, rest)) = line.split_once("listening on http://") {
                    return Ok(rest.split_whitespace().next().map(str::to_owned));
                }
            }
            Ok::<_, std::io::Error>(None)
        })
        .await;
        let addr = match found {
            Ok(Ok(Some(addr))) => addr,
            other => {
                let _ = child.start_kill();
                let status = match child.wait().await {
                    Ok(status) => status.to_string(),
                    Err(e) => e.to_string(),
                };
                let why = match other {
                    Err(_) => format!(
                        "did not print `listening on http://ADDR` within {} s",
                        START_TIMEOUT.as_secs()
                    ),
                    Ok(Err(e)) => format!("could not be read: {e}"),
                    Ok(Ok(_)) => {
                        format!("exited ({status}) without printing `listening on http://ADDR`")
                    }
                };
                fail(format!(
                    "the {label} server ({} serve) {why}. The end of its log (stderr):\n{}",
                    bin.display(),
                    tail(&log)
                ));
            }
        };
        // Keep reading stdout: a server writing to a closed pipe would fail.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

        let mut cmd = Command::new(bin);
        cmd.args(["token", "--user", "bench", "--ttl", "6h"]);
        server_env(&mut cmd, &data);
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap_or_else(|e| fail(format!("running {} token: {e}", bin.display())));
        let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() || token.is_empty() || token.contains(char::is_whitespace) {
            fail(format!(
                "{} token --user bench failed ({}): {}",
                bin.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        eprintln!("  {label}: {} serve on {addr}", bin.display());
        Server {
            label,
            child,
            pid,
            url: format!("http://{addr}"),
            token,
            log,
            _dir: dir,
        }
    }

    /// CPU seconds (user + system) the server has used so far.
    fn cpu(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .unwrap_or_else(|e| fail(format!("{} server's /proc stat: {e}", self.label)));
        ticks(&stat, 0) / TICKS_PER_S
    }

    /// SIGTERM, as an operator would stop it, and wait for the exit.
    async fn stop(mut self) {
        let _ = std::process::Command::new("sh")
            .args(["-c", &format!("kill -TERM {}", self.pid)])
            .status();
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => eprintln!(
                "warning: the {} server exited with {status} after SIGTERM; its log ends with:\n{}",
                self.label,
                tail(&self.log)
            ),
            _ => {
                eprintln!(
                    "warning: the {} server did not stop within {} s of SIGTERM: killed",
                    self.label,
                    STOP_TIMEOUT.as_secs()
                );
                let _ = self.child.kill().await;
            }
        }
    }
}

/// utime + stime (`offset` 0) or cutime + cstime (`offset` 2) from a /proc stat line, in ticks.
fn ticks(stat: &str, offset: usize) -> f64 {
    let fields: Vec<f64> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .skip(11 + offset)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    fields.iter().sum()
}

/// CPU seconds of this process and its waited-for children (curl, wrk).
fn own_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("Linux /proc");
    (ticks(&stat, 0) + ticks(&stat, 2)) / TICKS_PER_S
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

// --- report -----------------------------------------------------------------------------------

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => samples[n / 2],
        _ => (samples[n / 2 - 1] + samples[n / 2]) / 2.0,
    }
}

fn spread(samples: &[f64]) -> String {
    let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let max = samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{}–{}", fmt(min), fmt(max))
}

/// Three significant digits, enough for noisy numbers.
fn fmt(x: f64) -> String {
    match x.abs() {
        a if a >= 100.0 => format!("{x:.0}"),
        a if a >= 10.0 => format!("{x:.1}"),
        a if a >= 1.0 => format!("{x:.2}"),
        _ => format!("{x:.3}"),
    }
}

fn print_report(bins: &[PathBuf; 2], s: &Settings, rows: &[Row], took: f64, load: Load) {
    // From `date`: the crate reads the wall clock in one place only (clippy.toml).
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let size =
        |b: &Path| std::fs::metadata(b).map_or(f64::NAN, |m| m.len() as f64 / (1024.0 * 1024.0));
    println!();
    println!(
        "{date}, nproc {nproc}; base {} ({:.2} MiB), head {} ({:.2} MiB)",
        bins[0].display(),
        size(&bins[0]),
        bins[1].display(),
        size(&bins[1])
    );
    println!(
        "{} interleaved rounds (base, head, head, base, …), medians of the rounds; per round: \
         {} uploads of 32 MiB (median), {} of 100 KiB (median), {} s of load per endpoint with \
         {} connections by {}; the run took {:.0} s.",
        s.rounds,
        s.uploads,
        s.small,
        s.secs,
        s.conns,
        s.loader.name(),
        took
    );
    println!("Data dirs and the upload file in {}.", s.dir_note);
    println!(
        "Other processes used {:.2} cores on average during the run, the hypervisor stole {:.2}{}",
        load.others,
        load.steal,
        if load.others > 0.15 || load.steal > 0.15 {
            ": the machine was not quiet, expect wide spreads and run again."
        } else {
            "."
        }
    );
    println!();
    println!(
        "| measurement | base median | head median | head/base | base spread | head spread | \
         head/base per round: median (min–max) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for row in rows {
        let (base, head) = (
            median(row.samples[0].clone()),
            median(row.samples[1].clone()),
        );
        // Base and head of one round ran back to back: their ratio cancels slow drifts.
        let paired: Vec<f64> = row.samples[0]
            .iter()
            .zip(&row.samples[1])
            .map(|(b, h)| h / b)
            .collect();
        let (lo, hi) = (
            paired.iter().copied().fold(f64::INFINITY, f64::min),
            paired.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        );
        println!(
            "| {} | {} | {} | {:.3} | {} | {} | {:.3} ({lo:.2}–{hi:.2}) |",
            row.name,
            fmt(base),
            fmt(head),
            head / base,
            spread(&row.samples[0]),
            spread(&row.samples[1]),
            median(paired)
        );
    }
    println!();
    println!(
        "head/base above 1 is better for MiB/s and req/s, worse for ms and µs. A difference \
         smaller than the spreads is noise. Server CPU comes from /proc/PID/stat (10 ms ticks) \
         over each round's whole sequence."
    );
}
