//! The docs must match the code: the configuration table in docs/CONFIGURATION.md lists
//! exactly the variables the code reads, with their defaults and descriptions; the
//! README's handler example is the one `cargo test -p exactly-once --doc` compiles; and
//! every link between the README and the docs leads somewhere.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use exactly_once::config::VARIABLES;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_path_buf()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn configuration_documents_every_variable_with_its_default() {
    let doc = read("docs/CONFIGURATION.md");
    let mut missing = Vec::new();
    for v in VARIABLES {
        let default = if v.default.is_empty() { "(empty)".to_owned() } else { format!("`{}`", v.default) };
        let secret = if v.secret { " Secret: never logged." } else { "" };
        let row = format!("| `{}` | {} | {}{} |", v.name, default, v.doc, secret);
        if !doc.lines().any(|l| l == row) {
            missing.push(row);
        }
    }
    assert!(
        missing.is_empty(),
        "docs/CONFIGURATION.md lacks these rows (or has other defaults or descriptions; \
         scripts/config-table.py rewrites the table):\n{}",
        missing.join("\n")
    );

    // And nothing documented there that the code does not read, nor anything twice.
    let mut seen = HashSet::new();
    for line in doc.lines().filter(|l| l.starts_with("| `")) {
        let name = line.trim_start_matches("| `").split('`').next().unwrap();
        assert!(
            VARIABLES.iter().any(|v| v.name == name),
            "docs/CONFIGURATION.md documents `{name}`, which the code does not read"
        );
        assert!(seen.insert(name.to_owned()), "docs/CONFIGURATION.md documents `{name}` twice");
    }

    // The README no longer holds a copy that could drift.
    let readme = read("README.md");
    assert!(!readme.contains("\n## Configuration"), "the configuration table lives in docs/CONFIGURATION.md");
}

/// The code of the first ```rust block in `text`.
fn first_rust_block(text: &str) -> Vec<&str> {
    let mut lines = text.lines().skip_while(|l| l.trim() != "```rust").skip(1);
    let block: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
    assert!(!block.is_empty(), "no ```rust block");
    block
}

/// The README's first Rust block after `heading` equals `snippet`'s without the lines
/// rustdoc hides (`# ` and a lone `#`: the scaffolding it compiles with).
fn assert_readme_shows(heading: &str, snippet: &str) {
    let readme = read("README.md");
    let section = readme.split(&format!("\n{heading}")).nth(1).unwrap_or_else(|| panic!("a `{heading}` section"));
    let shown = first_rust_block(section);
    let text = read(snippet);
    let compiled: Vec<&str> = first_rust_block(&text)
        .into_iter()
        .filter(|l| !(l.trim_start().starts_with("# ") || l.trim() == "#"))
        .collect();
    assert_eq!(
        shown.join("\n"),
        compiled.join("\n"),
        "the README's example under `{heading}` must equal {snippet} without its hidden lines"
    );
}

#[test]
fn the_readme_handler_example_is_the_compiled_one() {
    assert_readme_shows("## Writing a function", "docs/snippets/handler.md");
}

#[test]
fn the_readme_avro_example_is_the_compiled_one() {
    assert_readme_shows("### A function over Avro", "docs/snippets/avro.md");
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c),
            _ => None,
        })
        .flat_map(char::to_lowercase)
        .collect()
}

/// The anchors of a Markdown file's headings (repeats get `-1`, `-2`, as on GitHub).
fn anchors(text: &str) -> HashSet<String> {
    let mut out = HashSet::new();
    let mut in_code = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        }
        if in_code || !line.starts_with('#') {
            continue;
        }
        let base = slug(line.trim_start_matches('#'));
        let mut anchor = base.clone();
        let mut n = 0;
        while !out.insert(anchor.clone()) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
    }
    out
}

#[test]
fn links_between_the_docs_resolve() {
    let link = regex::Regex::new(r"\]\(([^)\s]+)\)").unwrap();
    let mut pages = vec![PathBuf::from("README.md")];
    for entry in std::fs::read_dir(root().join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path.strip_prefix(root()).unwrap().to_path_buf());
        }
    }
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in &pages {
        let text = read(page.to_str().unwrap());
        let mut in_code = false;
        for line in text.lines() {
            if line.trim_start().starts_with("```") {
                in_code = !in_code;
            }
            if in_code {
                continue;
            }
            for m in link.captures_iter(line) {
                let target = &m[1];
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                checked += 1;
                let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
                let file = if file.is_empty() { page.clone() } else { page.parent().unwrap().join(file) };
                let full = root().join(&file);
                if !full.exists() {
                    broken.push(format!("{}: {target} (no such file)", page.display()));
                } else if !anchor.is_empty() {
                    let target_text = std::fs::read_to_string(&full).unwrap_or_default();
                    if !anchors(&target_text).contains(anchor) {
                        broken.push(format!("{}: {target} (no such heading)", page.display()));
                    }
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} links found: is the pattern still right?");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn slugs_follow_github() {
    assert_eq!(slug(" Event ids and the move to v2"), "event-ids-and-the-move-to-v2");
    assert_eq!(slug(" Fault injection: `eo chaos`"), "fault-injection-eo-chaos");
    assert_eq!(
        slug(" Why 30x over the baseline is not reachable on loopback"),
        "why-30x-over-the-baseline-is-not-reachable-on-loopback"
    );
    assert_eq!(slug(" MSK from the worker"), "msk-from-the-worker");
}
