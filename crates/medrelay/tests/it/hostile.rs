//! A hostile document cannot hurt the service: each one is parsed in a sandboxed child, ends
//! alone with a clear code (too complex when a limit stopped it, unreadable when it does not
//! parse), leaves nothing behind, and neither the server's memory nor other patients' jobs
//! notice. Through a real `medrelay serve` process.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use medrelay::ids::JobId;
use serde_json::Value;

use crate::claude_mock::{Mock, Reply, extraction};
use crate::fixtures::{
    active_pdf_with_appended_zip, apng, corpus_file, deeply_nested_pdf, flate_bomb_pdf,
    nested_flate_bomb_pdf, object_stream_bomb_pdf, pdf_claiming_pages, pixel_flood_png, png,
    png_with_chunk_bombs, text_pdf, xref_stream_bomb_pdf,
};
use crate::harness::{Backend, drop_postgres};
use crate::server::{Server, backend_env, wait_terminal};

/// The sandbox deadline of these servers; a hostile job must end within twice that.
const DEADLINE: Duration = Duration::from_secs(10);

async fn upload(server: &Server, token: &str, bytes: Vec<u8>) -> Value {
    let response = reqwest::Client::new()
        .post(format!("{}/v1/documents", server.addr))
        .bearer_auth(token)
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    response.json().await.unwrap()
}

/// Bombs take seconds to make: made once for the whole matrix.
static FLATE_BOMB: OnceLock<Vec<u8>> = OnceLock::new();
static CHUNK_BOMBS: OnceLock<Vec<u8>> = OnceLock::new();
static APNG: OnceLock<Vec<u8>> = OnceLock::new();

fn cached(cell: &OnceLock<Vec<u8>>, make: impl FnOnce() -> Vec<u8>) -> Vec<u8> {
    cell.get_or_init(make).clone()
}

/// What a hostile file must end as: a failure code, or success (read as data), with our own
/// page count where it matters.
enum Expect {
    Fails(&'static str),
    Succeeds,
    SucceedsWithPages(u64),
    /// A photo: no text, in one attempt.
    SucceedsAsPhoto,
}

#[derive(Clone, Copy, Debug)]
enum Processor {
    Local,
    /// Claude, answered by the local mock.
    Anthropic,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_documents_end_alone_on_the_local_processor_sqlite_and_folder() {
    hostile_documents_end_alone(Processor::Local, Backend::SqliteFolder).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_documents_end_alone_on_the_local_processor_postgres_and_s3() {
    hostile_documents_end_alone(Processor::Local, Backend::PostgresS3).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_documents_end_alone_on_claude_sqlite_and_folder() {
    hostile_documents_end_alone(Processor::Anthropic, Backend::SqliteFolder).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_documents_end_alone_on_claude_postgres_and_s3() {
    hostile_documents_end_alone(Processor::Anthropic, Backend::PostgresS3).await
}

/// For each hostile file, while two other users upload ordinary documents: the server stays
/// up within idle + 64 MiB, the others succeed in one attempt, the hostile job ends with its
/// code within twice the deadline, and no document byte or key is left.
async fn hostile_documents_end_alone(processor: Processor, backend: Backend) {
    let deadline = format!("{}s", DEADLINE.as_secs());
    let mut envs: Vec<(&str, String)> = vec![
        ("MEDRELAY_SANDBOX_TIMEOUT", deadline),
        ("MEDRELAY_WORKERS", "4".into()),
    ];
    let mock = match processor {
        Processor::Local => None,
        Processor::Anthropic => {
            let (mock, base) =
                Mock::start(vec![], Some(Reply::ok(extraction("read by Claude")))).await;
            envs.push(("MEDRELAY_PROCESSOR", "anthropic".into()));
            envs.push(("ANTHROPIC_BASE_URL", base));
            envs.push(("ANTHROPIC_API_KEY", "sk-ant-test".into()));
            Some(mock)
        }
    };
    let (backend_envs, pg_name) = backend_env(backend).await;
    envs.extend(backend_envs);
    let env_refs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start(&env_refs);
    let (db, store) = server.backends(&env_refs).await;

    let http = reqwest::Client::new();
    let attacker = server.token("attacker");
    let alice = server.token("alice");
    let bob = server.token("bob");
    // Warm up (first job, allocator pools), then take the server's resident memory.
    let warm = upload(&server, &alice, text_pdf(&["warm up"])).await;
    wait_terminal(&http, &server.addr, &alice, warm["id"].as_str().unwrap()).await;
    let (_, idle_kib) = server.memory_kib();

    let mut truncated = png(64, 64);
    truncated.truncate(truncated.len() / 2);
    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        (
            "a Flate bomb (6 MB inflating to 6 GiB)",
            cached(&FLATE_BOMB, || flate_bomb_pdf(6 << 30)),
            Expect::Fails("document-too-complex"),
        ),
        (
            "Flate inside Flate (a few kB inflating to 10 GiB)",
            nested_flate_bomb_pdf(10 << 30),
            Expect::Fails("document-too-complex"),
        ),
        (
            "an object stream inflating to 6 GiB (lopdf inflates those while loading)",
            object_stream_bomb_pdf(6 << 30),
            Expect::Fails("document-too-complex"),
        ),
        (
            // lopdf's inflation stops at the child's address-space limit (an allocation that
            // fails is an error there, not an abort); the tolerant reader then finds the page.
            "a cross-reference stream inflating to 6 GiB over a readable page",
            xref_stream_bomb_pdf(6 << 30),
            Expect::Succeeds,
        ),
        (
            "arrays nested 10,000 deep",
            deeply_nested_pdf(10_000),
            // The reader refuses the nesting cleanly: a parse error, not a crash.
            Expect::Fails("document-unreadable"),
        ),
        (
            "arrays nested 3 deep (the same file, harmless: a control)",
            deeply_nested_pdf(3),
            Expect::Succeeds,
        ),
        (
            "a PNG declaring 65535 x 65535 pixels",
            pixel_flood_png(),
            Expect::Fails("document-too-complex"),
        ),
        (
            "a PNG whose zTXt and iCCP chunks inflate to 2 GiB each",
            cached(&CHUNK_BOMBS, png_with_chunk_bombs),
            Expect::Fails("document-too-complex"),
        ),
        (
            "a page tree claiming 100,000 pages over one real page",
            pdf_claiming_pages(100_000),
            Expect::SucceedsWithPages(1),
        ),
        (
            "an animated PNG of 5,000 frames (read as a still: its first frame)",
            cached(&APNG, || apng(5_000)),
            Expect::SucceedsAsPhoto,
        ),
        (
            "a truncated PNG",
            truncated,
            Expect::Fails("document-unreadable"),
        ),
        (
            "a password-protected PDF",
            corpus_file("005-libreoffice-writer-password--libreoffice-writer-password.pdf"),
            Expect::Fails("document-encrypted"),
        ),
        (
            "a PDF+ZIP polyglot with JavaScript, actions, an attachment and an XFA form",
            active_pdf_with_appended_zip("Blood count normal", "CANARY-5512"),
            Expect::Succeeds,
        ),
    ];
    for (what, bytes, expect) in cases {
        let what = format!("{processor:?}/{backend:?}: {what}");
        let started = Instant::now();
        let (hostile, ordinary_a, ordinary_b) = tokio::join!(
            upload(&server, &attacker, bytes),
            upload(
                &server,
                &alice,
                text_pdf(&["Lab Report", "Hemoglobin 13.2 g/dL"])
            ),
            upload(&server, &bob, png(200, 100)),
        );
        let hostile_id = hostile["id"].as_str().unwrap();
        let done = wait_terminal(&http, &server.addr, &attacker, hostile_id).await;
        assert!(
            started.elapsed() < 2 * DEADLINE,
            "{what}: ended after {:?}",
            started.elapsed()
        );
        match expect {
            Expect::Fails(code) => {
                assert_eq!(done["status"], "failed", "{what}: {done}");
                assert_eq!(done["error"]["code"], code, "{what}: {done}");
                assert_eq!(done["error"]["retryable"], false, "{what}");
                assert_eq!(done["attempts"], 1, "{what}: not retried");
            }
            Expect::Succeeds => {
                assert_eq!(done["status"], "succeeded", "{what}: {done}");
                assert!(done["result"]["text"].is_string(), "{what}: {done}");
            }
            Expect::SucceedsWithPages(pages) => {
                assert_eq!(done["status"], "succeeded", "{what}: {done}");
                assert_eq!(done["result"]["document"]["page_count"], pages, "{what}");
            }
            Expect::SucceedsAsPhoto => {
                assert_eq!(done["status"], "succeeded", "{what}: {done}");
                assert_eq!(done["attempts"], 1, "{what}: {done}");
            }
        }
        // Other patients' jobs are untouched: one attempt each, and they succeed.
        for (token, job) in [(&alice, &ordinary_a), (&bob, &ordinary_b)] {
            let done = wait_terminal(&http, &server.addr, token, job["id"].as_str().unwrap()).await;
            assert_eq!(done["status"], "succeeded", "{what}: {done}");
            assert_eq!(done["attempts"], 1, "{what}: {done}");
        }
        // A managed failure: the attacker is not purged, the job is listed.
        let listed = server.list_jobs(&attacker).await;
        assert!(
            listed.iter().any(|j| j["id"] == hostile["id"]),
            "{what}: the attacker's job list lost its job"
        );
        // Nothing of the document is left: no key in the row from the commit that ended it,
        // and no object in the store once that commit's deletion ran (it follows the commit).
        let row = db
            .get_job_by_id(&JobId::from_raw(hostile_id))
            .await
            .unwrap()
            .unwrap();
        assert!(row.document_dek.is_none(), "{what}: a document key is left");
        crate::harness::eventually(Duration::from_secs(5), &what, || async {
            let left: Vec<_> = store
                .list_all()
                .await
                .unwrap()
                .into_iter()
                .filter(|(key, _)| key.as_ref().contains(hostile_id))
                .collect();
            left.is_empty().then_some(()).ok_or(format!("{left:?}"))
        })
        .await;
        // The server's memory is the server's: the child's was the child's.
        let (peak_kib, _) = server.memory_kib();
        assert!(
            peak_kib <= idle_kib + 64 * 1024,
            "{what}: server peak {peak_kib} KiB, idle {idle_kib} KiB"
        );
    }
    if let Some(mock) = &mock {
        // Only ordinary documents and what was read as data reached the provider.
        assert!(!mock.calls().is_empty());
    }
    // Nothing of any document is left in the store (every job is terminal).
    crate::harness::eventually(Duration::from_secs(10), "an empty store", || async {
        let left = store.list_all().await.unwrap();
        left.is_empty().then_some(()).ok_or(format!("{left:?}"))
    })
    .await;
    db.close().await;
    drop(server);
    if let Some(name) = pg_name {
        drop_postgres(&name).await;
    }
}

/// The confinement itself: a child that tried what a compromised parser would (a socket, the
/// network, a file, a process, 4 GiB, a signal to the server) was refused each, and could still
/// start a thread (parsers use them).
#[test]
fn a_sandbox_child_can_open_nothing_start_nothing_and_signal_no_one() {
    let limits = serde_json::to_string(&medrelay::processor::ParseLimits::default()).unwrap();
    let out = std::process::Command::new(crate::server::BIN)
        .args([
            "__sandbox",
            "probe",
            "application/pdf",
            "536870912",
            "5",
            &limits,
        ])
        .env_clear()
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running the sandbox child");
    assert!(out.status.success(), "{:?}", out.status);
    let line = out.stdout.split(|b| *b == b'\n').next().unwrap();
    let header: Value = serde_json::from_slice(line).unwrap();
    let tries = header["probed"].as_array().expect("a probe report");
    assert!(tries.len() >= 8, "{header}");
    for entry in tries {
        let (what, allowed) = (entry[0].as_str().unwrap(), entry[1].as_bool().unwrap());
        let expected = what == "start a thread";
        assert_eq!(allowed, expected, "{what}: allowed = {allowed}");
    }
}
