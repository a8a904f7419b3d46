//! The cost of the parser sandbox per document: the same analysis of every PDF of the shared
//! corpus (and a photo) in process (`local::analyze`) and in a sandbox child (spawn, limits,
//! seccomp, pipes), interleaved, median of several rounds each.
//!
//! Run: `cargo bench -p medrelay --bench sandbox` (release). The target of issue #11: at most
//! 10 ms or 1.2 x per document, whichever is larger.
//!
//! A second table: the tolerant reader's cost, the in-process analysis of each PDF with a line
//! inserted after its header (every xref offset off, so lopdf refuses it and hayro-syntax
//! reads it) against the same PDF undamaged, interleaved.

use std::path::Path;
use std::time::{Duration, Instant};

use medrelay::config::Settings;
use medrelay::processor::local::analyze;
use medrelay::processor::sandbox::{Sandbox, Task};
use medrelay::processor::{Document, MediaType, ParseLimits, Sniffed, sniff};

const ROUNDS: usize = 7;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Median times of `a` and `b`, run interleaved (alternating which goes first).
fn interleaved(mut a: impl FnMut(), mut b: impl FnMut()) -> (Duration, Duration) {
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        for first in [round % 2 == 0, round % 2 == 1] {
            let started = Instant::now();
            if first {
                a();
                ta.push(started.elapsed());
            } else {
                b();
                tb.push(started.elapsed());
            }
        }
    }
    (median(ta), median(tb))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus/pdf-real");
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&corpus)
        .expect("the shared corpus")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "pdf"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    files.sort();
    let photo = {
        let img = image::RgbImage::from_fn(1600, 1200, |x, y| {
            image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x + y) % 239) as u8])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
        out.into_inner()
    };
    files.push(("photo 1600x1200.jpg".into(), photo));

    let mut settings = Settings::defaults();
    settings.sandbox_exe = Some(env!("CARGO_BIN_EXE_medrelay").into());
    let sandbox = Sandbox::from_settings(&settings).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();

    println!("| document | size | in process (ms) | sandbox (ms) | overhead (ms) | ratio |");
    println!("|---|---|---|---|---|---|");
    let (mut total_in, mut total_sb, mut worst_over, mut over_target) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO, 0);
    for (name, bytes) in &files {
        let media_type: MediaType = match sniff(bytes) {
            Sniffed::Accepted(m) => m,
            _ => continue,
        };
        let document = Document {
            media_type,
            bytes: bytes.clone().into(),
        };
        let limits = ParseLimits::from_settings(&settings);
        let (a, b) = interleaved(
            || {
                let _ = std::hint::black_box(analyze(&document, &limits));
            },
            || {
                let _ = runtime.block_on(sandbox.run(Task::Analyze, &document));
            },
        );
        let over = b.saturating_sub(a);
        let ratio = b.as_secs_f64() / a.as_secs_f64().max(1e-9);
        if over > Duration::from_millis(10) && ratio > 1.2 {
            over_target += 1;
        }
        worst_over = worst_over.max(over);
        total_in += a;
        total_sb += b;
        println!(
            "| {name} | {} KiB | {:.2} | {:.2} | {:.2} | {:.2} |",
            bytes.len() / 1024,
            ms(a),
            ms(b),
            ms(over),
            ratio
        );
    }
    println!(
        "| **all {} documents** | | {:.1} | {:.1} | {:.1} | {:.2} |",
        files.len(),
        ms(total_in),
        ms(total_sb),
        ms(total_sb.saturating_sub(total_in)),
        total_sb.as_secs_f64() / total_in.as_secs_f64()
    );
    println!(
        "\nMedian of {ROUNDS} rounds per document, interleaved. Largest overhead per document: \
         {:.2} ms; documents over the target (more than 10 ms and more than 1.2 x): {over_target}.",
        ms(worst_over)
    );

    tolerant_reader_cost(&files, &ParseLimits::from_settings(&settings));
}

fn tolerant_reader_cost(files: &[(String, Vec<u8>)], limits: &ParseLimits) {
    println!("\n| document | undamaged (ms) | offsets shifted (ms) | ratio |");
    println!("|---|---|---|---|");
    let (mut total_a, mut total_b) = (Duration::ZERO, Duration::ZERO);
    for (name, bytes) in files.iter().filter(|(n, _)| n.ends_with(".pdf")) {
        let header_end = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
        let mut shifted = bytes[..header_end].to_vec();
        shifted.extend_from_slice(b"% a line inserted by a mail gateway\n");
        shifted.extend_from_slice(&bytes[header_end..]);
        let pdf = |bytes: &[u8]| Document {
            media_type: MediaType::Pdf,
            bytes: bytes.to_vec().into(),
        };
        let (original, damaged) = (pdf(bytes), pdf(&shifted));
        let (a, b) = interleaved(
            || {
                let _ = std::hint::black_box(analyze(&original, limits));
            },
            || {
                let _ = std::hint::black_box(analyze(&damaged, limits));
            },
        );
        total_a += a;
        total_b += b;
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} |",
            ms(a),
            ms(b),
            b.as_secs_f64() / a.as_secs_f64().max(1e-9)
        );
    }
    println!(
        "| **all** | {:.1} | {:.1} | {:.2} |",
        ms(total_a),
        ms(total_b),
        total_b.as_secs_f64() / total_a.as_secs_f64()
    );
}
