//! `eo new <name> --topic <topic>`: a new function, registered everywhere a function
//! must be, in one step.
//!
//! It writes the crate (`functions/<name>/`: handler, binary, a test against the real
//! services), its ClickHouse table (`migrations/clickhouse/<table>.sql`), and registers
//! it in the local worker (`cli/src/lib.rs`, `cli/Cargo.toml`), the SAM template
//! (`template.yaml`: topic parameter, log group, role, function with its MSK trigger,
//! output) and the CDK app (`infra/functions.json`). The places it edits carry a marker
//! line (`` `eo new` adds ... above this line``) and the new text goes just above it.
//!
//! Nothing is written unless every check passes first: a valid, unused name and topic,
//! and every marker present. The templates are in `cli/templates/function/`.

use std::path::{Path, PathBuf};

const CARGO_TOML: &str = include_str!("../templates/function/Cargo.toml.tmpl");
const LIB_RS: &str = include_str!("../templates/function/lib.rs.tmpl");
const MAIN_RS: &str = include_str!("../templates/function/main.rs.tmpl");
const TEST_RS: &str = include_str!("../templates/function/test.rs.tmpl");
const CLICKHOUSE_SQL: &str = include_str!("../templates/function/clickhouse.sql.tmpl");
const TEMPLATE_RESOURCES: &str = include_str!("../templates/function/template-resources.yaml.tmpl");

/// Why a function could not be made. Nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum NewError {
    /// The name is not kebab-case ASCII, or too long.
    #[error("function name {0:?}: use lowercase letters, digits and single dashes, starting with a letter (at most 40 characters)")]
    BadName(String),
    /// The topic has characters Kafka does not allow.
    #[error("topic {0:?}: use letters, digits, `.`, `_` and `-` (at most 200 characters)")]
    BadTopic(String),
    /// A function, crate or table of that name exists.
    #[error("{0} already exists")]
    Exists(String),
    /// A file to register the function in has no marker line.
    #[error("{file} has no line containing {marker:?}: add it where new functions go")]
    NoMarker { file: String, marker: &'static str },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// `infra/functions.json` is not the JSON list `eo functions --json` writes.
    #[error("infra/functions.json: {0}")]
    FunctionsJson(String),
}

/// The names a function goes by, derived from its kebab-case name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// `order-events`: crate, binary, guard namespace, Lambda function suffix.
    pub name: String,
    /// `order_events`: the Rust crate path and the ClickHouse table.
    pub snake: String,
    /// `OrderEvents`: the handler type and the template's resource names.
    pub pascal: String,
    /// The topic it reads.
    pub topic: String,
}

impl Names {
    /// Checks `name` and `topic` and derives the rest.
    pub fn new(name: &str, topic: &str) -> Result<Self, NewError> {
        let valid_name = !name.is_empty()
            && name.len() <= 40
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && !name.ends_with('-')
            && !name.contains("--")
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !valid_name {
            return Err(NewError::BadName(name.to_owned()));
        }
        let valid_topic = !topic.is_empty()
            && topic.len() <= 200
            && topic != "."
            && topic != ".."
            && topic.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !valid_topic {
            return Err(NewError::BadTopic(topic.to_owned()));
        }
        let pascal = name
            .split('-')
            .map(|part| {
                let mut chars = part.chars();
                chars.next().map(|c| c.to_ascii_uppercase().to_string() + chars.as_str()).unwrap_or_default()
            })
            .collect();
        Ok(Self { name: name.to_owned(), snake: name.replace('-', "_"), pascal, topic: topic.to_owned() })
    }

    fn render(&self, template: &str) -> String {
        template
            .replace("{{name}}", &self.name)
            .replace("{{crate}}", &self.snake)
            .replace("{{table}}", &self.snake)
            .replace("{{Type}}", &self.pascal)
            .replace("{{topic}}", &self.topic)
    }
}

const WORKER_MARKER: &str = "`eo new` adds a function above this line.";
const CARGO_MARKER: &str = "`eo new` adds a function crate above this line.";
const PARAMETER_MARKER: &str = "`eo new` adds a function's topic parameter above this line.";
const RESOURCES_MARKER: &str = "`eo new` adds a function's resources above this line.";
const OUTPUT_MARKER: &str = "`eo new` adds a function's output above this line.";

/// One file to write (new) or replace (registered in; `old` is what it held).
struct Change {
    path: PathBuf,
    text: String,
    old: Option<String>,
}

/// Names a new function may not take: Rust keywords and crates it would shadow (its
/// crate name becomes a Rust path), and the binaries the workspace builds already
/// (its binary lands beside them).
const RESERVED: &[&str] = &[
    "abstract",
    "alloc",
    "as",
    "async",
    "await",
    "become",
    "box",
    "break",
    "const",
    "continue",
    "core",
    "crate",
    "do",
    "dyn",
    "else",
    "enum",
    "extern",
    "false",
    "final",
    "fn",
    "for",
    "gen",
    "if",
    "impl",
    "in",
    "let",
    "loop",
    "macro",
    "match",
    "mod",
    "move",
    "mut",
    "override",
    "priv",
    "proc_macro",
    "pub",
    "ref",
    "return",
    "self",
    "static",
    "std",
    "struct",
    "super",
    "test",
    "trait",
    "true",
    "try",
    "type",
    "typeof",
    "unsafe",
    "unsized",
    "use",
    "virtual",
    "where",
    "while",
    "yield",
    "eo",
    "eo-faults",
    "migrate",
    "chaos-faults",
    "cold-start",
    "bench",
];

/// Makes the function `names` in the repository at `root`; `known` are the functions
/// there are, with their topics. Returns the files written, relative to `root`, new
/// ones first. On any failure nothing is left changed.
pub fn generate(root: &Path, names: &Names, known: &[(&str, &[&str])]) -> Result<Vec<PathBuf>, NewError> {
    if known.iter().any(|(name, _)| *name == names.name) || RESERVED.contains(&names.name.as_str()) {
        return Err(NewError::Exists(format!("function or name `{}`", names.name)));
    }
    if let Some((other, _)) = known.iter().find(|(_, topics)| topics.contains(&names.topic.as_str())) {
        // Two functions on one topic would share its consumer group's offsets: the
        // worker refuses to start with them.
        return Err(NewError::Exists(format!("topic `{}` (read by `{other}`)", names.topic)));
    }
    let dir = Path::new("functions").join(&names.name);
    let table = Path::new("migrations/clickhouse").join(format!("{}.sql", names.snake));
    // A top-level directory of that name is a workspace crate (`core`, `faults`...).
    for path in [&dir, &table, &PathBuf::from(&names.name)] {
        if root.join(path).exists() {
            return Err(NewError::Exists(path.display().to_string()));
        }
    }
    let mut changes = vec![
        Change { path: dir.join("Cargo.toml"), text: names.render(CARGO_TOML), old: None },
        Change { path: dir.join("src/lib.rs"), text: names.render(LIB_RS), old: None },
        Change { path: dir.join("src/main.rs"), text: names.render(MAIN_RS), old: None },
        Change { path: dir.join(format!("tests/{}.rs", names.snake)), text: names.render(TEST_RS), old: None },
        Change { path: table, text: names.render(CLICKHOUSE_SQL), old: None },
    ];

    let original = read(root, "cli/src/lib.rs")?;
    let worker = insert_above(
        &original,
        WORKER_MARKER,
        &format!("Arc::new({}::{}),", names.snake, names.pascal),
        "cli/src/lib.rs",
    )?;
    changes.push(Change { path: "cli/src/lib.rs".into(), text: worker, old: Some(original) });

    let original = read(root, "cli/Cargo.toml")?;
    // A dependency of the same name (`redis = ...`) would make the manifest invalid.
    let taken = original.lines().any(|l| {
        let key = l.split(['=', '.', ' ']).next().unwrap_or_default();
        key == names.name || key == names.snake
    });
    if taken {
        return Err(NewError::Exists(format!("a dependency named `{}` in cli/Cargo.toml", names.name)));
    }
    let cargo = insert_above(
        &original,
        CARGO_MARKER,
        &format!("{} = {{ path = \"../functions/{}\" }}", names.name, names.name),
        "cli/Cargo.toml",
    )?;
    changes.push(Change { path: "cli/Cargo.toml".into(), text: cargo, old: Some(original) });

    let original = read(root, "template.yaml")?;
    // Quoted: a topic like `1.10` or `null` must stay a string.
    let parameter = format!("{}Topic:\n  Type: String\n  Default: \"{}\"", names.pascal, names.topic);
    let template = insert_above(&original, PARAMETER_MARKER, &parameter, "template.yaml")?;
    let resources = names.render(TEMPLATE_RESOURCES);
    let template = insert_block_above(&template, RESOURCES_MARKER, &resources, "template.yaml")?;
    let output = format!("{0}FunctionArn:\n  Value: !GetAtt {0}Function.Arn", names.pascal);
    let template = insert_above(&template, OUTPUT_MARKER, &output, "template.yaml")?;
    changes.push(Change { path: "template.yaml".into(), text: template, old: Some(original) });

    let json = read(root, "infra/functions.json")?;
    let original = json.clone();
    let mut list: Vec<serde_json::Value> =
        serde_json::from_str(&json).map_err(|e| NewError::FunctionsJson(e.to_string()))?;
    if list.iter().any(|f| f["name"] == names.name.as_str()) {
        return Err(NewError::Exists(format!("`{}` in infra/functions.json", names.name)));
    }
    list.push(serde_json::json!({
        "name": names.name,
        "binary": names.name,
        "topics": [names.topic],
        "outputTopics": [],
    }));
    let json = serde_json::to_string_pretty(&list).map_err(|e| NewError::FunctionsJson(e.to_string()))? + "\n";
    changes.push(Change { path: "infra/functions.json".into(), text: json, old: Some(original) });

    // Every check passed: write, and undo it all if a write fails.
    let mut written: Vec<&Change> = Vec::new();
    for change in &changes {
        let path = root.join(&change.path);
        let write = || {
            if change.old.is_none() {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
            }
            std::fs::write(&path, &change.text)
        };
        if let Err(e) = write() {
            for done in written.iter().rev() {
                match &done.old {
                    Some(old) => drop(std::fs::write(root.join(&done.path), old)),
                    None => drop(std::fs::remove_file(root.join(&done.path))),
                }
            }
            let _ = std::fs::remove_dir_all(root.join(&dir));
            return Err(io(&change.path, e));
        }
        written.push(change);
    }
    Ok(changes.into_iter().map(|c| c.path).collect())
}

fn io(path: &Path, source: std::io::Error) -> NewError {
    NewError::Io { path: path.display().to_string(), source }
}

fn read(root: &Path, path: &str) -> Result<String, NewError> {
    std::fs::read_to_string(root.join(path)).map_err(|e| io(Path::new(path), e))
}

/// `text` with `lines` inserted above the marker's line, indented like it.
fn insert_above(text: &str, marker: &'static str, lines: &str, file: &str) -> Result<String, NewError> {
    let at = text.find(marker).ok_or_else(|| NewError::NoMarker { file: file.into(), marker })?;
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let indent: String = text[line_start..].chars().take_while(|c| *c == ' ').collect();
    let block: String = lines.lines().map(|l| format!("{indent}{l}\n")).collect();
    Ok(format!("{}{block}{}", &text[..line_start], &text[line_start..]))
}

/// `text` with `block` (already indented, ending with a blank line) inserted above the
/// marker's line.
fn insert_block_above(text: &str, marker: &'static str, block: &str, file: &str) -> Result<String, NewError> {
    let at = text.find(marker).ok_or_else(|| NewError::NoMarker { file: file.into(), marker })?;
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let block = block.trim_end_matches('\n');
    Ok(format!("{}{block}\n\n{}", &text[..line_start], &text[line_start..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_derived_and_bad_ones_refused() {
        let n = Names::new("order-events", "orders.v1").unwrap();
        assert_eq!((n.snake.as_str(), n.pascal.as_str()), ("order_events", "OrderEvents"));
        for bad in ["", "Orders", "9lives", "a--b", "trailing-", "under_score", "sp ace", &"x".repeat(41)] {
            assert!(matches!(Names::new(bad, "t"), Err(NewError::BadName(_))), "{bad:?}");
        }
        for bad in ["", "a/b", "..", "sp ace", "é"] {
            assert!(matches!(Names::new("ok", bad), Err(NewError::BadTopic(_))), "{bad:?}");
        }
    }

    /// A scratch copy of the files `eo new` edits, from this repository.
    fn scratch(tag: &str) -> PathBuf {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repository").to_owned();
        let dir = std::env::temp_dir().join(format!("eo-new-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for f in ["cli/src/lib.rs", "cli/Cargo.toml", "template.yaml", "infra/functions.json"] {
            std::fs::create_dir_all(dir.join(f).parent().expect("parent")).expect("mkdir");
            std::fs::copy(repo.join(f), dir.join(f)).expect("copy");
        }
        std::fs::create_dir_all(dir.join("functions")).expect("mkdir");
        std::fs::create_dir_all(dir.join("migrations/clickhouse")).expect("mkdir");
        dir
    }

    #[test]
    fn a_new_function_is_registered_like_the_existing_ones() {
        let root = scratch("registered");
        let names = Names::new("order-events", "orders").unwrap();
        let written = generate(&root, &names, &[("user-events", &["user-events"])]).expect("generated");
        assert_eq!(written.len(), 9, "{written:?}");
        let text = |p: &str| std::fs::read_to_string(root.join(p)).expect(p);

        let lib = text("functions/order-events/src/lib.rs");
        assert!(lib.contains("pub struct OrderEvents;") && lib.contains("\"orders\""), "{lib}");
        assert!(lib.contains("include_str!(\"../../../migrations/clickhouse/order_events.sql\")"));
        assert!(text("migrations/clickhouse/order_events.sql").contains("CREATE TABLE IF NOT EXISTS order_events ("));
        assert!(text("cli/src/lib.rs").contains("        Arc::new(order_events::OrderEvents),\n        // `eo new`"));
        assert!(text("cli/Cargo.toml").contains("order-events = { path = \"../functions/order-events\" }\n# `eo new`"));

        // The template: the function beside user-events, with the same shape.
        let yaml: serde_norway::Value = serde_norway::from_str(&text("template.yaml")).expect("valid YAML");
        let resources = &yaml["Resources"];
        let ours = &resources["OrderEventsFunction"];
        assert_eq!(ours["Metadata"]["BuildProperties"]["Binary"].as_str(), Some("order-events"));
        assert_eq!(yaml["Parameters"]["OrderEventsTopic"]["Default"].as_str(), Some("orders"));
        assert!(yaml["Outputs"]["OrderEventsFunctionArn"].is_mapping());
        for (kind, theirs) in [
            ("Function", "UserEventsFunction"),
            ("Role", "UserEventsRole"),
            ("Logs", "UserEventsLogs"),
            ("Msk", "UserEventsMsk"),
        ] {
            let mine = serde_norway::to_string(&resources[format!("OrderEvents{kind}").as_str()]).unwrap();
            let expected = serde_norway::to_string(&resources[theirs]).unwrap();
            assert_eq!(mine, expected.replace("user-events", "order-events").replace("UserEvents", "OrderEvents"));
        }

        let json: serde_json::Value = serde_json::from_str(&text("infra/functions.json")).unwrap();
        let last = json.as_array().and_then(|a| a.last()).expect("entries");
        assert_eq!(last["name"], "order-events");
        assert_eq!(last["topics"], serde_json::json!(["orders"]));

        // Nothing twice, and an existing function's name is refused.
        assert!(matches!(generate(&root, &names, &[]), Err(NewError::Exists(_))));
        let user_events: &[(&str, &[&str])] = &[("user-events", &["user-events"])];
        for (name, topic) in
            [("user-events", "x"), ("other", "user-events"), ("type", "x"), ("redis", "x"), ("eo", "x")]
        {
            let taken = Names::new(name, topic).unwrap();
            assert!(matches!(generate(&root, &taken, user_events), Err(NewError::Exists(_))), "{name} on {topic}");
        }
        // A topic that YAML would read as a number stays a string.
        generate(&root, &Names::new("numeric-topic", "1.10").unwrap(), &[]).expect("generated");
        let yaml: serde_norway::Value = serde_norway::from_str(&text("template.yaml")).expect("valid YAML");
        assert_eq!(yaml["Parameters"]["NumericTopicTopic"]["Default"].as_str(), Some("1.10"));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_missing_marker_writes_nothing() {
        let root = scratch("marker");
        let yaml = std::fs::read_to_string(root.join("template.yaml")).unwrap();
        std::fs::write(root.join("template.yaml"), yaml.replace(OUTPUT_MARKER, "")).unwrap();
        let names = Names::new("order-events", "orders").unwrap();
        assert!(matches!(generate(&root, &names, &[]), Err(NewError::NoMarker { .. })));
        assert!(!root.join("functions/order-events").exists(), "no crate written");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn lines_go_above_the_marker_with_its_indentation() {
        let text = "a\n    // M\nb\n";
        assert_eq!(insert_above(text, "M", "x,\ny,", "f").unwrap(), "a\n    x,\n    y,\n    // M\nb\n");
        assert!(matches!(insert_above(text, "N", "x", "f"), Err(NewError::NoMarker { .. })));
    }
}
