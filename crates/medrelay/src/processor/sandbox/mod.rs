//! The parser sandbox: every parse or decode of a document's bytes runs in a child process,
//! the `medrelay` binary re-executed with a hidden subcommand ([`SUBCOMMAND`]), never in the
//! server.
//!
//! The parent (this file) hands the plaintext to the child through a pipe (never a file),
//! reads its answer through another, discards its stderr (parser crates' logs never reach the
//! service log), and enforces a wall-clock deadline by killing it: nothing is abandoned. The
//! child ([`child`]) confines itself before it reads a byte ([`confine`]): address space, CPU
//! time, no new files or sockets, no exec or fork. A child killed by a limit, a signal or the
//! deadline ends its document as too complex; a parse error as unreadable. Either is a
//! managed, terminal failure of that one document: the server and every other job go on.

pub mod child;
mod confine;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Document, ParseLimits, ProcessError, Refusal};
use crate::config::Settings;
use crate::model::DocumentResult;

/// The hidden subcommand that runs the child (never shown by `--help`).
pub const SUBCOMMAND: &str = "__sandbox";

/// What a child is asked to do with a document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// The `local` processor's analysis: page count and text, or a photo's size.
    Analyze,
    /// What Claude is sent: PDF parts within its limits, or the photo re-encoded.
    PrepareForClaude,
    /// Tries what a compromised parser would (a socket, a file, a process, a huge allocation,
    /// a signal to the parent) and reports what the confinement allowed: for tests.
    Probe,
}

impl Task {
    fn as_str(self) -> &'static str {
        match self {
            Task::Analyze => "analyze",
            Task::PrepareForClaude => "prepare-for-claude",
            Task::Probe => "probe",
        }
    }

    fn parse(text: &str) -> Option<Task> {
        [Task::Analyze, Task::PrepareForClaude, Task::Probe]
            .into_iter()
            .find(|t| t.as_str() == text)
    }
}

/// One part prepared for Claude; its bytes are the payload at the same position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    Pdf { pages: u32 },
    Jpeg { width: u32, height: u32 },
}

/// The first line of a child's answer (JSON); payload bytes follow it.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Header {
    Analyzed(Box<DocumentResult>),
    Prepared(Vec<(Part, u64)>),
    Refused(Refusal),
    /// What the probe managed to do (each `true` would be a hole).
    Probed(Vec<(String, bool)>),
}

/// What a child produced.
pub enum Output {
    Analyzed(Box<DocumentResult>),
    Prepared(Vec<(Part, Vec<u8>)>),
}

fn wrong_answer() -> ProcessError {
    ProcessError::Unmanaged(anyhow::anyhow!("the sandbox answered another task"))
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Output::Analyzed(_) => f.write_str("Analyzed([redacted])"),
            Output::Prepared(parts) => f
                .debug_list()
                .entries(parts.iter().map(|(p, b)| (p, b.len())))
                .finish(),
        }
    }
}

/// The limits a child runs under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Address space, in bytes.
    pub memory: u64,
    /// CPU time, in whole seconds.
    pub cpu_secs: u64,
}

/// Starts children. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Sandbox {
    exe: PathBuf,
    limits: Limits,
    /// What one document may hold, checked by the child.
    parse_limits: ParseLimits,
    timeout: Duration,
    /// The most a child may answer; more is a runaway.
    max_output: u64,
}

impl Sandbox {
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Sandbox> {
        let exe = match &settings.sandbox_exe {
            Some(exe) => exe.clone(),
            None => std::env::current_exe()
                .map_err(|e| anyhow::anyhow!("finding this executable for the sandbox: {e}"))?,
        };
        Ok(Sandbox {
            exe,
            limits: Limits {
                memory: settings.sandbox_memory,
                cpu_secs: settings.sandbox_timeout.as_secs().max(1),
            },
            parse_limits: ParseLimits::from_settings(settings),
            timeout: settings.sandbox_timeout,
            max_output: 4 * settings.max_upload_bytes + 16 * 1024 * 1024,
        })
    }

    /// The `local` processor's analysis of `document`, in a fresh child.
    pub async fn analyze(&self, document: &Document) -> Result<DocumentResult, ProcessError> {
        match self.run(Task::Analyze, document).await? {
            Output::Analyzed(result) => Ok(*result),
            Output::Prepared(_) => Err(wrong_answer()),
        }
    }

    /// What Claude is sent for `document`, made in a fresh child.
    pub async fn prepare(&self, document: &Document) -> Result<Vec<(Part, Vec<u8>)>, ProcessError> {
        match self.run(Task::PrepareForClaude, document).await? {
            Output::Prepared(parts) => Ok(parts),
            Output::Analyzed(_) => Err(wrong_answer()),
        }
    }

    /// Runs `task` on `document` in a fresh child.
    pub async fn run(&self, task: Task, document: &Document) -> Result<Output, ProcessError> {
        let mut child = tokio::process::Command::new(&self.exe)
            .arg(SUBCOMMAND)
            .arg(task.as_str())
            .arg(document.media_type.as_str())
            .arg(self.limits.memory.to_string())
            .arg(self.limits.cpu_secs.to_string())
            .arg(serde_json::to_string(&self.parse_limits).expect("limits serialize"))
            // Nothing of the server's environment (keys, endpoints, log settings) is needed.
            .env_clear()
            .env("MALLOC_ARENA_MAX", "2")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| ProcessError::Retry {
                reason: format!("starting the parser sandbox failed: {e}"),
                retry_after: None,
            })?;
        let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(ProcessError::Unmanaged(anyhow::anyhow!(
                "the sandbox child has no pipes"
            )));
        };
        let bytes = document.bytes.clone();
        let feed = async move {
            // A child that dies early closes its end: its exit status tells why.
            let _ = stdin.write_all(&bytes).await;
            drop(stdin);
        };
        let max = self.max_output;
        let collect = async move {
            let mut out = Vec::new();
            let read = stdout.take(max + 1).read_to_end(&mut out).await;
            read.map(|_| out)
        };
        let finished = tokio::time::timeout(self.timeout, async {
            let ((), out) = tokio::join!(feed, collect);
            let status = child.wait().await;
            (out, status)
        })
        .await;
        let (out, status) = match finished {
            Ok((Ok(out), Ok(status))) => (out, status),
            Ok(_) => {
                return Err(ProcessError::Retry {
                    reason: "talking to the parser sandbox failed".into(),
                    retry_after: None,
                });
            }
            Err(_) => {
                // Past the deadline: killed and reaped, never abandoned.
                let _ = child.kill().await;
                tracing::warn!(task = task.as_str(), "a parser child ran past its deadline");
                return Err(ProcessError::Abort(Refusal::TooComplex));
            }
        };
        if out.len() as u64 > max {
            tracing::warn!(task = task.as_str(), "a parser child answered too much");
            return Err(ProcessError::Abort(Refusal::TooComplex));
        }
        if status.code() == Some(i32::from(child::UNCONFINED)) {
            // Not the document's fault: this host does not allow the confinement. Nothing
            // is parsed unconfined; the job waits for a retry and the operator is told.
            tracing::error!("the parser sandbox cannot confine itself on this host");
            return Err(ProcessError::Retry {
                reason: "the parser sandbox cannot confine itself".into(),
                retry_after: None,
            });
        }
        if !status.success() {
            use std::os::unix::process::ExitStatusExt;
            // Killed by a limit (SIGKILL/SIGXCPU for CPU time, SIGABRT for memory the
            // allocator could not get, SIGSEGV on a stack overflow): too complex. An exit
            // code without an answer is a parser that failed on the file: unreadable.
            let refusal = match status.signal() {
                Some(_) => Refusal::TooComplex,
                None => Refusal::Unreadable,
            };
            tracing::info!(
                task = task.as_str(),
                signal = status.signal(),
                code = status.code(),
                "a parser child failed"
            );
            return Err(ProcessError::Abort(refusal));
        }
        decode(&out).ok_or_else(|| {
            ProcessError::Unmanaged(anyhow::anyhow!("the sandbox child's answer is malformed"))
        })?
    }
}

/// Reads a child's answer: a JSON header line, then the payloads it announces.
fn decode(out: &[u8]) -> Option<Result<Output, ProcessError>> {
    let newline = out.iter().position(|b| *b == b'\n')?;
    let header: Header = serde_json::from_slice(&out[..newline]).ok()?;
    let mut rest = &out[newline + 1..];
    Some(match header {
        Header::Analyzed(result) => Ok(Output::Analyzed(result)),
        Header::Refused(refusal) => Err(ProcessError::Abort(refusal)),
        Header::Probed(_) => return None,
        Header::Prepared(parts) => {
            let mut prepared = Vec::with_capacity(parts.len());
            for (part, len) in parts {
                let len = usize::try_from(len).ok().filter(|l| *l <= rest.len())?;
                let (bytes, tail) = rest.split_at(len);
                prepared.push((part, bytes.to_vec()));
                rest = tail;
            }
            if !rest.is_empty() {
                return None;
            }
            Ok(Output::Prepared(prepared))
        }
    })
}

/// Writes a child's answer (the child's side of [`decode`]).
pub(crate) fn encode(header: &Header, payloads: &[Vec<u8>]) -> Vec<u8> {
    let mut out = serde_json::to_vec(header).expect("a header always serializes");
    out.push(b'\n');
    for payload in payloads {
        out.extend_from_slice(payload);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_round_trip_and_a_short_payload_is_malformed() {
        let header = Header::Prepared(vec![
            (Part::Pdf { pages: 3 }, 4),
            (
                Part::Jpeg {
                    width: 2,
                    height: 1,
                },
                2,
            ),
        ]);
        let out = encode(&header, &[b"%PDF".to_vec(), b"\xff\xd8".to_vec()]);
        match decode(&out) {
            Some(Ok(Output::Prepared(parts))) => {
                assert_eq!(parts.len(), 2);
                assert_eq!(parts[0], (Part::Pdf { pages: 3 }, b"%PDF".to_vec()));
                assert_eq!(parts[1].1, b"\xff\xd8");
            }
            other => panic!("{other:?}"),
        }
        assert!(decode(&out[..out.len() - 1]).is_none());
        let refused = encode(&Header::Refused(Refusal::Encrypted), &[]);
        assert!(matches!(
            decode(&refused),
            Some(Err(ProcessError::Abort(Refusal::Encrypted)))
        ));
        assert_eq!(Task::parse("analyze"), Some(Task::Analyze));
        assert_eq!(Task::parse("bogus"), None);
    }
}
