//! The README's configuration table must match the code.

use exactly_once::config::VARIABLES;

#[test]
fn readme_documents_every_variable_with_its_default() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).expect("README.md");
    let mut missing = Vec::new();
    for v in VARIABLES {
        let default = if v.default.is_empty() { "(empty)".to_owned() } else { format!("`{}`", v.default) };
        let row = format!("| `{}` | {} |", v.name, default);
        if !readme.contains(&row) {
            missing.push(row);
        }
    }
    assert!(
        missing.is_empty(),
        "README.md lacks these configuration rows (or has other defaults):\n{}",
        missing.join("\n")
    );

    // And nothing documented in the configuration section that the code does not read.
    let section = readme.split("## Configuration").nth(1).expect("a `## Configuration` section");
    let section = section.split("\n## ").next().unwrap();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let name = line.trim_start_matches("| `").split('`').next().unwrap();
        assert!(VARIABLES.iter().any(|v| v.name == name), "README documents `{name}`, which the code does not read");
    }
}
