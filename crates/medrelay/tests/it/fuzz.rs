//! Fuzzing on the stable toolchain: structure-aware mutations of the corpus (real PDFs and
//! photos made here, HEIC among them) through the entry point every upload takes, sniff → sandboxed parse, for
//! both tasks (the local analysis and the preparation for Claude). The property: the type
//! decision never panics, and the sandbox always answers with a result or a refusal the app
//! can be told, never an unmanaged failure, a transient one, or a hang.
//!
//! `scripts/test` runs a bounded, seeded run (`MEDRELAY_FUZZ_CASES`, 1,000 by default);
//! `scripts/fuzz` runs many more with fresh seeds. A failing case is saved by proptest under
//! `tests/it/proptest-regressions/` and replayed first by every later run: a crash it finds
//! becomes a regression test.

use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use medrelay::config::Settings;
use medrelay::processor::sandbox::{Sandbox, Task};
use medrelay::processor::{Document, ProcessError, Sniffed, sniff};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, RngSeed, TestCaseError, TestRunner};

use crate::fixtures::{corpus_dir, heif_enc, jpeg, png, record_jpeg, webp};

/// Tokens of PDF structure, spliced in where they break the most.
const TOKENS: [&[u8]; 16] = [
    b"obj",
    b"endobj",
    b"stream\n",
    b"endstream",
    b"<<",
    b">>",
    b"[",
    b"]",
    b"/Length 99999999",
    b"/Filter /FlateDecode",
    b"/Type /Pages /Kids [",
    b"9999999 0 R",
    b"xref\n0 1\n",
    b"trailer",
    b"startxref\n1\n",
    b"%%EOF",
];

#[derive(Clone, Debug)]
enum Mutation {
    FlipBit { at: usize, bit: u8 },
    Truncate { at: usize },
    Delete { at: usize, len: usize },
    Duplicate { at: usize, len: usize },
    Splice { at: usize, token: usize },
    Overwrite { at: usize, bytes: Vec<u8> },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (any::<usize>(), 1usize..4096).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (any::<usize>(), 1usize..4096).prop_map(|(at, len)| Mutation::Duplicate { at, len }),
        (any::<usize>(), 0..TOKENS.len()).prop_map(|(at, token)| Mutation::Splice { at, token }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(at, bytes)| Mutation::Overwrite { at, bytes }),
    ]
}

fn apply(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        if bytes.is_empty() {
            break;
        }
        let len = bytes.len();
        match m {
            Mutation::FlipBit { at, bit } => bytes[at % len] ^= 1 << bit,
            Mutation::Truncate { at } => bytes.truncate((at % len).max(1)),
            Mutation::Delete { at, len: n } => {
                let at = at % len;
                bytes.drain(at..(at + n).min(len));
            }
            Mutation::Duplicate { at, len: n } => {
                let at = at % len;
                let copy = bytes[at..(at + n).min(len)].to_vec();
                bytes.splice(at..at, copy);
            }
            Mutation::Splice { at, token } => {
                let at = at % len;
                bytes.splice(at..at, TOKENS[*token].iter().copied());
            }
            Mutation::Overwrite { at, bytes: new } => {
                let at = at % len;
                let end = (at + new.len()).min(len);
                bytes[at..end].copy_from_slice(&new[..end - at]);
            }
        }
    }
    bytes
}

/// The seeds: the corpus's smaller PDFs and one photo of each accepted type.
fn seeds() -> &'static Vec<Vec<u8>> {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(corpus_dir())
            .expect("the shared corpus")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "pdf"))
            .filter_map(|p| std::fs::read(&p).ok())
            .filter(|b| b.len() < 200 * 1024)
            .collect();
        seeds.sort();
        seeds.extend([png(40, 30), jpeg(32, 24), webp(16, 16)]);
        // A HEIC photo with its thumbnail, as heif-enc writes one.
        seeds.push(heif_enc(&[&record_jpeg(96, 64, None)], &["-t", "32"]));
        seeds
    })
}

fn config() -> Config {
    let cases = std::env::var("MEDRELAY_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    // Seeded by default, so that `scripts/test` is repeatable; `scripts/fuzz` asks for fresh
    // seeds with MEDRELAY_FUZZ_SEED=random.
    let rng_seed = match std::env::var("MEDRELAY_FUZZ_SEED").as_deref() {
        Ok("random") => RngSeed::Random,
        Ok(seed) => RngSeed::Fixed(seed.parse().unwrap_or(1)),
        Err(_) => RngSeed::Fixed(20261130),
    };
    Config {
        cases,
        rng_seed,
        max_shrink_iters: 200,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/it/proptest-regressions/fuzz.txt"
        )))),
        ..Config::default()
    }
}

#[test]
fn mutated_documents_get_a_result_or_a_clear_refusal_never_a_crash_or_a_hang() {
    let mut settings = Settings::defaults();
    settings.sandbox_exe = Some(env!("CARGO_BIN_EXE_medrelay").into());
    settings.sandbox_timeout = Duration::from_secs(10);
    let sandbox = Sandbox::from_settings(&settings).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    assert!(Path::new(env!("CARGO_BIN_EXE_medrelay")).exists());
    let seeds = seeds();
    let strategy = (
        0..seeds.len(),
        prop::collection::vec(mutation(), 1..6),
        prop::bool::ANY,
    );
    let config = config();
    let cases = config.cases as usize;
    let (parsed, refused) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let mut runner = TestRunner::new(config);
    let outcome = runner.run(&strategy, |(seed, mutations, for_claude)| {
        let bytes = apply(seeds[seed].clone(), &mutations);
        let media_type = match sniff(&bytes) {
            Sniffed::Accepted(m) => m,
            // Refused at upload: nothing to parse.
            Sniffed::Heic | Sniffed::Avif | Sniffed::Unsupported => return Ok(()),
        };
        let task = if for_claude {
            Task::PrepareForClaude
        } else {
            Task::Analyze
        };
        let document = Document {
            media_type,
            bytes: bytes.into(),
        };
        match runtime.block_on(sandbox.run(task, &document)) {
            Ok(_) => {
                parsed.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(ProcessError::Abort(_)) => {
                refused.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(other) => Err(TestCaseError::fail(format!("{task:?}: {other}"))),
        }
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
    let (parsed, refused) = (parsed.into_inner(), refused.into_inner());
    eprintln!("fuzz: {cases} cases, {parsed} parsed, {refused} refused, the rest not accepted");
    // The run is worth something only if most cases reach the parser, both ways.
    assert!(
        parsed + refused >= cases / 2,
        "{parsed} + {refused} of {cases}"
    );
    assert!(
        parsed > 0 && refused > 0,
        "{parsed} parsed, {refused} refused"
    );
}
