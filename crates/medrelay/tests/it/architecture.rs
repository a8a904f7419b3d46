//! The written conventions (CONTRIBUTING.md), checked on the source: no import cycle between
//! the library's modules, the composition root imported by nobody, the roles independent of
//! the worker, objects deleted and keys destroyed only by `lifecycle` and `store`, object keys
//! built only by `store`, no state compared as text, a `//!` header on every file, and
//! imports grouped std / external / this crate.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file below `dir`, with its path relative to `dir`.
fn rust_files(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path
                    .strip_prefix(dir)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.push((rel, std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// The library's files: the binary's own (`main.rs`, `cli.rs`) are left out.
fn library_files() -> Vec<(String, String)> {
    rust_files(&src())
        .into_iter()
        .filter(|(rel, _)| rel != "main.rs" && rel != "cli.rs" && rel != "lib.rs")
        .collect()
}

/// The top-level module a file belongs to (`db/queue.rs` → `db`).
fn module_of(rel: &str) -> String {
    rel.split('/')
        .next()
        .unwrap()
        .trim_end_matches(".rs")
        .to_owned()
}

/// Code without comments (line comments and doc comments), so prose cannot trip a rule.
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The code of a file outside its `#[cfg(test)]` module (tests may poke at internals).
fn production_code(text: &str) -> String {
    let code = code(text);
    match code.find("#[cfg(test)]") {
        Some(i) => code[..i].to_owned(),
        None => code,
    }
}

/// Which top-level modules each module names (`crate::x`).
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, text) in library_files() {
        let from = module_of(&rel);
        let code = code(&text);
        let mut rest = code.as_str();
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let to: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !to.is_empty() && to != from {
                graph.entry(from.clone()).or_default().insert(to);
            }
        }
        graph.entry(from).or_default();
    }
    graph
}

/// A cycle through `start`, if any, as a path of modules.
fn cycle_through(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_owned(), vec![start.to_owned()])];
    let mut seen = BTreeSet::new();
    while let Some((node, path)) = stack.pop() {
        for next in graph.get(&node).into_iter().flatten() {
            if next == start {
                let mut cycle = path.clone();
                cycle.push(next.clone());
                return Some(cycle);
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push((next.clone(), longer));
            }
        }
    }
    None
}

#[test]
fn no_module_of_the_library_imports_one_that_imports_it_back() {
    let graph = imports();
    assert!(graph.len() > 15, "modules found: {:?}", graph.keys());
    let cycles: Vec<_> = graph
        .keys()
        .filter_map(|m| cycle_through(&graph, m))
        .collect();
    assert!(cycles.is_empty(), "import cycles: {cycles:?}");
}

#[test]
fn the_composition_root_and_the_worker_are_imported_only_where_they_belong() {
    let graph = imports();
    for (module, targets) in &graph {
        assert!(
            !targets.contains("app"),
            "{module} imports the composition root"
        );
        if ["http", "purge", "sweeper", "lifecycle"].contains(&module.as_str()) {
            assert!(!targets.contains("worker"), "{module} imports the worker");
        }
        if ["db", "store"].contains(&module.as_str()) {
            for role in ["lifecycle", "http", "worker", "sweeper", "purge", "state"] {
                assert!(!targets.contains(role), "{module} imports {role}");
            }
        }
    }
}

/// Files of these modules may call these names.
fn assert_only_in(names: &[&str], allowed: &[&str]) {
    let mut offenders = Vec::new();
    for (rel, text) in library_files() {
        let module = module_of(&rel);
        if allowed.contains(&module.as_str()) {
            continue;
        }
        let code = production_code(&text);
        for name in names {
            if code.contains(name) {
                offenders.push(format!("{rel}: {name}"));
            }
        }
    }
    assert!(offenders.is_empty(), "outside {allowed:?}: {offenders:?}");
}

#[test]
fn only_the_lifecycle_and_the_store_delete_objects_or_destroy_keys() {
    // Object deletion, on the store.
    assert_only_in(
        &[
            ".delete(",
            ".delete_prefix(",
            ".delete_job_objects(",
            ".remove_abandoned_uploads(",
            ".prune_empty(",
        ],
        &["lifecycle", "store"],
    );
    // Statements that end a job and destroy its keys.
    assert_only_in(
        &[
            ".complete(",
            ".fail(",
            ".fail_exhausted(",
            ".fail_poisoned(",
            ".tombstone_job(",
            ".tombstone_job_of(",
            ".tombstone_user(",
            ".shred_user(",
            ".mark_unmanaged(",
            ".claim_purge(",
        ],
        &["lifecycle", "db"],
    );
}

#[test]
fn object_keys_are_built_only_by_the_store() {
    assert_only_in(
        &[
            "Path::from(",
            "Path::from_iter(",
            "PathPart",
            "object_path(",
        ],
        &["store"],
    );
}

#[test]
fn no_state_or_reason_is_compared_as_text() {
    let names = [
        "queued",
        "processing",
        "retry_scheduled",
        "succeeded",
        "failed",
        "expired",
        "deleted",
        "client",
        "operator",
        "unmanaged",
        "unmanaged-failure",
    ];
    let mut offenders = Vec::new();
    for (rel, text) in library_files() {
        let code = production_code(&text);
        for name in names {
            for op in ["==", "!="] {
                for pattern in [format!("{op} \"{name}\""), format!("\"{name}\" {op}")] {
                    if code.contains(&pattern) {
                        offenders.push(format!("{rel}: {pattern}"));
                    }
                }
            }
            if code.contains(&format!("Some(\"{name}\")")) {
                offenders.push(format!("{rel}: Some(\"{name}\")"));
            }
        }
    }
    assert!(offenders.is_empty(), "{offenders:?}");
}

#[test]
fn every_source_file_says_what_it_owns() {
    for (rel, text) in rust_files(&src()) {
        let first = text
            .lines()
            .find(|l| !l.starts_with("#!["))
            .unwrap_or_default();
        assert!(first.starts_with("//!"), "{rel} has no //! header");
    }
}

/// 0: std, core, alloc; 1: other crates; 2: this crate.
fn group(path: &str) -> u8 {
    let root = path
        .split("::")
        .next()
        .unwrap_or_default()
        .trim_start_matches('{');
    match root {
        "std" | "core" | "alloc" => 0,
        "crate" | "super" | "self" => 2,
        _ => 1,
    }
}

#[test]
fn imports_are_grouped_std_then_other_crates_then_this_crate() {
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it");
    let files = rust_files(&src())
        .into_iter()
        .map(|(rel, text)| (format!("src/{rel}"), text))
        .chain(
            rust_files(&tests)
                .into_iter()
                .map(|(rel, text)| (format!("tests/it/{rel}"), text)),
        );
    let mut offenders = Vec::new();
    for (rel, text) in files {
        // (group, line number) of each top-level `use`, and whether a blank line preceded it.
        let mut previous: Option<(u8, usize)> = None;
        let mut blank_before = false;
        let mut in_use = false;
        for (n, line) in text.lines().enumerate() {
            if in_use {
                in_use = !line.trim_end().ends_with(';');
                continue;
            }
            if line.trim().is_empty() {
                blank_before = true;
                continue;
            }
            if let Some(path) = line.strip_prefix("use ") {
                let g = group(path);
                if let Some((p, _)) = previous {
                    if g < p {
                        offenders.push(format!("{rel}:{}: group {g} after group {p}", n + 1));
                    } else if g > p && !blank_before {
                        offenders.push(format!("{rel}:{}: no blank line between groups", n + 1));
                    } else if g == p && blank_before {
                        offenders.push(format!("{rel}:{}: a group split by a blank line", n + 1));
                    }
                }
                previous = Some((g, n));
                in_use = !line.trim_end().ends_with(';');
            } else if !line.starts_with("pub use ") && !line.starts_with("//") {
                // Anything else ends the import block: a later `use` starts afresh.
                if !line.starts_with("#[") && !line.starts_with("mod ") {
                    previous = None;
                }
            }
            blank_before = false;
        }
    }
    assert!(offenders.is_empty(), "{offenders:#?}");
}
