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
//! (`scripts/bench-compare [BASE_REV]` builds both and runs this). Prints a Markdown table on stdout,
//! progress on stderr. Settings: `MEDRELAY_BENCH_ROUNDS` (7), `MEDRELAY_BENCH_UPLOADS` (32 MiB
//! uploads per round, 5), `MEDRELAY_BENCH_SMALL` (100 KiB uploads per round, 200),
//! `MEDRELAY_BENCH_SECS` (seconds of load per round, 5), `MEDRELAY_BENCH_CONNS` (64),
//! `MEDRELAY_BENCH_LOADER` (`wrk` or `reqwest`; default: wrk if installed),
//! `MEDRELAY_BENCH_DIR` (where the data dirs go; default /dev/shm, see `bench_dir`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::process::Command;

mod support;
use support::{
    LoadResult, Server, bench_dir, client, env_number, fail, fmt, job_id, load_wrk, machine_cpu,
    median, own_cpu, pdf_like, processed_job, small_pdf, spread,
};

const LARGE: usize = 32 * 1024 * 1024;
const SMALL: usize = 100 * 1024;
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
             or scripts/bench-compare [BASE_REV]"
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
        Server::start(
            LABELS[0],
            &bins[0],
            &[("MEDRELAY_ROLES", "api,sweeper")],
            &s.dir,
        )
        .await,
        Server::start(
            LABELS[1],
            &bins[1],
            &[("MEDRELAY_ROLES", "api,sweeper")],
            &s.dir,
        )
        .await,
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
        Server::start(LABELS[0], &bins[0], &[], &s.dir).await,
        Server::start(LABELS[1], &bins[1], &[], &s.dir).await,
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

// --- servers ----------------------------------------------------------------------------------

// --- report -----------------------------------------------------------------------------------

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
