//! What the harness-less benches share: starting `medrelay serve` as a user would, loading it
//! with wrk, reading CPU times from /proc, and the statistics of noisy rounds.
#![allow(dead_code)] // Each bench uses its part.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Longer than the server's default shutdown grace (20 s).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(40);

/// USER_HZ: /proc's CPU times are in ticks of 10 ms on Linux.
pub const TICKS_PER_S: f64 = 100.0;

pub fn env_number(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => fail(format!("{name} must be a positive integer, not {v:?}")),
        },
        Err(_) => default,
    }
}

pub fn fail(message: String) -> ! {
    eprintln!("\nbench failed: {message}");
    // Unwinding (not process::exit) so that destructors run: servers are killed, temp dirs
    // go; resume_unwind skips the panic hook, so no backtrace buries the message.
    std::panic::resume_unwind(Box::new(message))
}

pub struct MachineCpu {
    pub busy: f64,
    pub steal: f64,
}

/// CPU seconds the whole machine has been busy (user, nice, system, irq, softirq), and stolen
/// by the hypervisor, from /proc/stat.
pub fn machine_cpu() -> MachineCpu {
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
pub fn bench_dir() -> (PathBuf, String) {
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

pub struct LoadResult {
    pub requests: u64,
    pub elapsed: Duration,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub server_cpu_s: f64,
    pub client_cpu_s: f64,
}

pub async fn load_wrk(url: &str, token: Option<&str>, conns: usize, secs: Duration) -> LoadResult {
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

pub fn client(conns: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(conns)
        .build()
        .expect("an HTTP client")
}

/// One `medrelay serve` process with its own data dir, and a token for user `bench`.
pub struct Server {
    pub label: &'static str,
    pub child: Child,
    pub pid: u32,
    pub url: String,
    pub token: String,
    pub log: PathBuf,
    pub _dir: tempfile::TempDir,
}

/// The environment a user would give: a fresh data dir, a free port, the local processor.
/// Inherited `MEDRELAY_*` variables (a database URL, a config file) are removed so that both
/// binaries run on the embedded defaults. Per-user limits are raised (variables a build does
/// not know are ignored): the bench sends hundreds of uploads as one user.
pub fn server_env(cmd: &mut Command, data: &Path) {
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
    pub async fn start(
        label: &'static str,
        bin: &Path,
        envs: &[(&str, &str)],
        dir: &Path,
    ) -> Server {
        let dir = tempfile::Builder::new()
            .prefix(&format!("medrelay-bench-{label}-"))
            .tempdir_in(dir)
            .unwrap_or_else(|e| fail(format!("a temp dir in {}: {e}", dir.display())));
        let data = dir.path().join("data");
        let log = dir.path().join("server.log");
        let mut cmd = Command::new(bin);
        cmd.arg("serve");
        server_env(&mut cmd, &data);
        cmd.envs(envs.iter().copied());
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
        cmd.envs(envs.iter().copied());
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
    pub fn cpu(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .unwrap_or_else(|e| fail(format!("{} server's /proc stat: {e}", self.label)));
        ticks(&stat, 0) / TICKS_PER_S
    }

    /// SIGTERM, as an operator would stop it, and wait for the exit.
    pub async fn stop(mut self) {
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
pub fn ticks(stat: &str, offset: usize) -> f64 {
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
pub fn own_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("Linux /proc");
    (ticks(&stat, 0) + ticks(&stat, 2)) / TICKS_PER_S
}

pub fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

pub fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => samples[n / 2],
        _ => (samples[n / 2 - 1] + samples[n / 2]) / 2.0,
    }
}

pub fn spread(samples: &[f64]) -> String {
    let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let max = samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{}–{}", fmt(min), fmt(max))
}

/// Three significant digits, enough for noisy numbers.
pub fn fmt(x: f64) -> String {
    match x.abs() {
        a if a >= 100.0 => format!("{x:.0}"),
        a if a >= 10.0 => format!("{x:.1}"),
        a if a >= 1.0 => format!("{x:.2}"),
        _ => format!("{x:.3}"),
    }
}

pub const PROCESS_TIMEOUT: Duration = Duration::from_secs(120);

/// `%PDF-1.7\n` and pseudo-random bytes: the server decides the type from the first bytes and
/// does not parse a PDF at upload time.
pub fn pdf_like(len: usize, seed: u64) -> Vec<u8> {
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

/// A small valid PDF: the corpus' minimal document when it is there, else one built here.
pub fn small_pdf() -> Vec<u8> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/corpus/pdf-real/001-trivial--minimal-document.pdf");
    std::fs::read(&corpus).unwrap_or_else(|_| minimal_pdf())
}

/// A one-page PDF with one line of text, with a correct cross-reference table.
pub fn minimal_pdf() -> Vec<u8> {
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
pub async fn processed_job(server: &Server, pdf: &[u8]) -> String {
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

pub fn job_id(answer: &str) -> String {
    serde_json::from_str::<serde_json::Value>(answer)
        .ok()
        .and_then(|job| job["id"].as_str().map(str::to_owned))
        .unwrap_or_else(|| fail(format!("an upload's answer has no job id: {answer}")))
}
