//! The sandbox child: `medrelay __sandbox TASK MEDIA-TYPE MEMORY CPU-SECS`, started by the
//! parent with the document on stdin. It confines itself first, then reads the bytes, does the
//! one task, and writes its answer on stdout. It logs nothing and runs no async runtime: one
//! thread until a parser starts its own.

use std::io::{Read, Write};
use std::process::ExitCode;

use super::{Header, Limits, Part, Task, confine::confine, encode};
use crate::processor::{Document, MediaType, ProcessError, Refusal};

/// The child's `main`. Exit codes: 0 with an answer; 2 for bad arguments or a failed
/// confinement (the parent treats any failure without an answer as an unreadable file; a
/// child that cannot confine itself parses nothing).
pub fn main(args: &[String]) -> ExitCode {
    let parsed = (|| {
        let [task, media_type, memory, cpu_secs] = args else {
            return None;
        };
        Some((
            Task::parse(task)?,
            MediaType::parse(media_type)?,
            Limits {
                memory: memory.parse().ok()?,
                cpu_secs: cpu_secs.parse().ok()?,
            },
        ))
    })();
    let Some((task, media_type, limits)) = parsed else {
        return ExitCode::from(2);
    };
    if confine(&limits).is_err() {
        return ExitCode::from(2);
    }
    let mut bytes = Vec::new();
    if std::io::stdin().read_to_end(&mut bytes).is_err() {
        return ExitCode::from(2);
    }
    let document = Document {
        media_type,
        bytes: bytes.into(),
    };
    let (header, payloads) = run(task, &document);
    let out = encode(&header, &payloads);
    let mut stdout = std::io::stdout().lock();
    if stdout.write_all(&out).and_then(|_| stdout.flush()).is_err() {
        return ExitCode::from(2);
    }
    ExitCode::SUCCESS
}

/// Does one task; every failure becomes the refusal the app will see.
fn run(task: Task, document: &Document) -> (Header, Vec<Vec<u8>>) {
    let refused = |e: ProcessError| match e {
        ProcessError::Abort(refusal) => Header::Refused(refusal),
        // Retry and unmanaged do not arise from a parser; a document is never retried for it.
        _ => Header::Refused(Refusal::Unreadable),
    };
    match task {
        Task::Analyze => match crate::processor::local::analyze(document) {
            Ok(result) => (Header::Analyzed(Box::new(result)), Vec::new()),
            Err(e) => (refused(e), Vec::new()),
        },
        Task::PrepareForClaude => match crate::processor::anthropic::prepare::prepare(document) {
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
        },
    }
}
