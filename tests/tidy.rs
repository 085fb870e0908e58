//! Tidy checks that hold the layout in place: every Rust file of the workspace opens with a
//! `//!` line saying where it sits, `unsafe` appears only in the files ARCHITECTURE.md lists,
//! and every file ARCHITECTURE.md's code map names exists.

use std::path::{Path, PathBuf};

/// The workspace root (this crate lives in `tests/`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// Every `.rs` file under the workspace's source folders, as paths relative to the root.
fn rust_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if name == "target" || name.to_string_lossy().starts_with('.') {
                continue;
            }
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path.strip_prefix(root).expect("under the root").to_owned());
            }
        }
    }
    let root = root();
    let mut files = Vec::new();
    for dir in ["crates", "xtask", "tests"] {
        walk(&root.join(dir), &root, &mut files);
    }
    files.sort();
    files
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(root().join(path))
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A line's code: what comes before a `//` comment (ignoring `//` inside string literals is
/// not needed for the words this test looks for).
fn code(line: &str) -> &str {
    line.split("//").next().unwrap_or("")
}

/// The files ARCHITECTURE.md allows `unsafe` in: the backticked `.rs` paths of its
/// "Architecture invariant: `unsafe` only in ..." item (which may wrap over several lines).
fn unsafe_allowed() -> Vec<String> {
    let doc = read(Path::new("ARCHITECTURE.md"));
    let start = doc
        .find("Architecture invariant: `unsafe`")
        .expect("ARCHITECTURE.md has an \"Architecture invariant: `unsafe` only in\" item");
    let item = &doc[start..];
    let end = [item.find("\n- "), item.find("\n\n")]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(item.len());
    item[..end]
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| s.ends_with(".rs"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_rust_file_opens_with_a_doc_line() {
    let files = rust_files();
    assert!(files.len() > 50, "found only {} files", files.len());
    let missing: Vec<String> = files
        .iter()
        .filter(|f| {
            let text = read(f);
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            !first.starts_with("//!")
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "these files do not open with a `//!` line saying where they sit: {missing:?}"
    );
}

#[test]
fn unsafe_only_where_architecture_md_allows_it() {
    let allowed = unsafe_allowed();
    assert!(!allowed.is_empty(), "no files listed");
    for file in &allowed {
        assert!(
            root().join(file).exists(),
            "ARCHITECTURE.md allows unsafe in {file}, which does not exist"
        );
    }
    let mut found = Vec::new();
    for file in rust_files() {
        let text = read(&file);
        let uses = text
            .lines()
            .any(|l| code(l).contains("unsafe") && !code(l).contains("unsafe_code = \""));
        if uses {
            found.push(file.display().to_string());
        }
    }
    let stray: Vec<&String> = found
        .iter()
        .filter(|f| !allowed.contains(f) && f.as_str() != "tests/tidy.rs")
        .collect();
    assert!(
        stray.is_empty(),
        "`unsafe` outside the files ARCHITECTURE.md lists: {stray:?} (allowed: {allowed:?})"
    );
    for file in &allowed {
        assert!(
            found.contains(file),
            "ARCHITECTURE.md lists {file} for unsafe, but it has none; drop it from the list"
        );
    }
}

#[test]
fn the_code_map_names_files_that_exist() {
    let doc = read(Path::new("ARCHITECTURE.md"));
    let start = doc.find("## Code map").expect("a code map section");
    let end = doc[start..]
        .find("\n## ")
        .map_or(doc.len(), |i| start + 1 + i);
    let map = &doc[start..end];
    let mut checked = 0;
    for word in map.split(|c: char| c.is_whitespace() || matches!(c, '(' | ')' | ',' | '`' | ';')) {
        let word = word.trim_end_matches(['.', ':']);
        if word.starts_with("crates/") || word.starts_with("xtask/") {
            assert!(
                root().join(word).exists(),
                "ARCHITECTURE.md's code map names {word}, which does not exist"
            );
            checked += 1;
        }
    }
    assert!(checked >= 8, "the code map names only {checked} paths");
}

#[test]
fn only_the_generators_know_the_benchmark_sizes() {
    let root = root();
    let layers = [
        "data", "eval", "distill", "infer", "model", "augment", "groups",
    ];
    let needles = [
        "COLORED_MNIST",
        "IMAGE_BYTES",
        "N_COLOURS",
        "debiasdd_cmnist",
        "SIDE: usize = 28",
    ];
    let mut found = Vec::new();
    for path in rust_files() {
        let rel = path
            .strip_prefix(&root)
            .unwrap_or(&path)
            .to_string_lossy()
            .replace('\\', "/");
        if !layers
            .iter()
            .any(|l| rel.starts_with(&format!("crates/{l}/src/")))
        {
            continue;
        }
        for (n, line) in read(&path).lines().enumerate() {
            let code = code(line);
            if let Some(needle) = needles.iter().find(|w| code.contains(*w)) {
                found.push(format!("{rel}:{}: {needle}", n + 1));
            }
        }
    }
    assert!(
        found.is_empty(),
        "Colored MNIST's sizes belong to debiasdd-cmnist (ARCHITECTURE.md's invariant); take them from the Dataset:\n{}",
        found.join("\n")
    );
}
