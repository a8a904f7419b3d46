//! The sandbox child: `medrelay __sandbox TASK MEDIA-TYPE MEMORY CPU-SECS PARSE-LIMITS-JSON`,
//! started by the parent with the document on stdin. It confines itself first, then reads the bytes, does the
//! one task, and writes its answer on stdout. It logs nothing and runs no async runtime: one
//! thread until a parser starts its own.

use std::io::{Read, Write};
use std::process::ExitCode;

use super::{Header, Limits, Part, Task, confine::confine, encode};
use crate::processor::{Document, MediaType, ParseLimits, ProcessError, Refusal};

/// Exit code of a child that could not confine itself (it parses nothing).
pub const UNCONFINED: u8 = 3;

/// The child's `main`. Exit codes: 0 with an answer; 2 for bad arguments or broken pipes;
/// [`UNCONFINED`] when a limit or the seccomp filter could not be applied.
pub fn main(args: &[String]) -> ExitCode {
    let parsed = (|| {
        let [task, media_type, memory, cpu_secs, parse_limits] = args else {
            return None;
        };
        Some((
            Task::parse(task)?,
            MediaType::parse(media_type)?,
            Limits {
                memory: memory.parse().ok()?,
                cpu_secs: cpu_secs.parse().ok()?,
            },
            serde_json::from_str::<ParseLimits>(parse_limits).ok()?,
        ))
    })();
    let Some((task, media_type, limits, parse_limits)) = parsed else {
        return ExitCode::from(2);
    };
    if confine(&limits).is_err() {
        return ExitCode::from(UNCONFINED);
    }
    let mut bytes = Vec::new();
    if std::io::stdin().read_to_end(&mut bytes).is_err() {
        return ExitCode::from(2);
    }
    let document = Document {
        media_type,
        bytes: bytes.into(),
    };
    let (header, payloads) = run(task, &document, &parse_limits);
    let out = encode(&header, &payloads);
    let mut stdout = std::io::stdout().lock();
    if stdout.write_all(&out).and_then(|_| stdout.flush()).is_err() {
        return ExitCode::from(2);
    }
    ExitCode::SUCCESS
}

/// Does one task; every failure becomes the refusal the app will see.
fn run(task: Task, document: &Document, limits: &ParseLimits) -> (Header, Vec<Vec<u8>>) {
    let refused = |e: ProcessError| match e {
        ProcessError::Abort(refusal) => Header::Refused(refusal),
        // Retry and unmanaged do not arise from a parser; a document is never retried for it.
        _ => Header::Refused(Refusal::Unreadable),
    };
    match task {
        Task::Analyze => match crate::processor::local::analyze(document, limits) {
            Ok(result) => (Header::Analyzed(Box::new(result)), Vec::new()),
            Err(e) => (refused(e), Vec::new()),
        },
        Task::Probe => (Header::Probed(probe()), Vec::new()),
        Task::PrepareForClaude => {
            match crate::processor::anthropic::prepare::prepare(document, limits) {
                Ok(parts) => {
                    let header = Header::Prepared(
                        parts
                            .iter()
                            .map(|(part, bytes)| (*part, bytes.len() as u64))
                            .collect::<Vec<(Part, u64)>>(),
                    );
                    (header, parts.into_iter().map(|(_, bytes)| bytes).collect())
                }
                Err(e) => (refused(e), Vec::new()),
            }
        }
    }
}

/// Each thing a compromised parser might try, and whether the confinement let it.
fn probe() -> Vec<(String, bool)> {
    let parent = std::os::unix::process::parent_id();
    let tries: Vec<(&str, bool)> = vec![
        (
            "open a socket",
            std::net::UdpSocket::bind("127.0.0.1:0").is_ok(),
        ),
        (
            "connect to the network",
            std::net::TcpStream::connect("127.0.0.1:9").is_ok(),
        ),
        (
            "create a file",
            std::fs::File::create(std::env::temp_dir().join("medrelay-sandbox-probe")).is_ok(),
        ),
        ("read a file", std::fs::read("/etc/hostname").is_ok()),
        (
            "start a process",
            std::process::Command::new("/bin/true").status().is_ok(),
        ),
        (
            "allocate 4 GiB",
            Vec::<u8>::new().try_reserve_exact(4 << 30).is_ok(),
        ),
        (
            "signal the parent",
            rustix::process::Pid::from_raw(parent as i32)
                .map(|pid| rustix::process::test_kill_process(pid).is_ok())
                .unwrap_or(false),
        ),
        (
            "start a thread",
            std::thread::spawn(|| 1).join().is_ok_and(|v| v == 1),
        ),
    ];
    tries
        .into_iter()
        .map(|(what, allowed)| (what.to_owned(), allowed))
        .collect()
}
