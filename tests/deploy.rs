//! One source of truth for which functions exist and what they read: the crates under
//! `functions/`. The local worker (`eo`), `template.yaml` and the CDK app's
//! `infra/functions.json` must all agree with them, and the template's IAM must stay
//! least-privilege.

use std::collections::{BTreeMap, BTreeSet};

use serde_norway::Value;

/// What each MSK trigger sets from a template parameter of the same name (the
/// mapping's error handling and batching), and what `eo esm` takes as options.
const TRIGGER_SETTINGS: &[&str] = &[
    "StartingPosition",
    "BatchSize",
    "MaximumBatchingWindowInSeconds",
    "MaximumRetryAttempts",
    "MaximumRecordAgeInSeconds",
    "BisectBatchOnFunctionError",
    "FunctionResponseTypes",
];

fn root(path: &str) -> String {
    format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"))
}

/// Package names of the crates under functions/.
fn crates() -> BTreeSet<String> {
    std::fs::read_dir(root("functions"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("Cargo.toml")).ok())
        .map(|toml| {
            let line = toml.lines().find(|l| l.starts_with("name = ")).expect("package name").to_owned();
            line.trim_start_matches("name = ").trim_matches('"').to_owned()
        })
        .collect()
}

/// name -> (topics, output topics), from the functions the `eo` binary runs.
fn functions() -> BTreeMap<String, (Vec<String>, Vec<String>)> {
    exactly_once_cli::all_functions()
        .iter()
        .map(|f| {
            let s = f.spec();
            let owned = |t: &[&str]| t.iter().map(|t| (*t).to_owned()).collect::<Vec<_>>();
            (s.name.to_owned(), (owned(s.topics), owned(s.output_topics)))
        })
        .collect()
}

fn untag(v: &Value) -> &Value {
    match v {
        Value::Tagged(t) => &t.value,
        other => other,
    }
}

fn text(v: &Value) -> String {
    serde_norway::to_string(v).unwrap()
}

/// A policy or statement may be conditional (`!If [cond, it, other]`): what it can grant
/// is both branches, `AWS::NoValue` aside.
fn when_true(v: &Value) -> Vec<&Value> {
    match (v, untag(v).as_sequence()) {
        (Value::Tagged(t), Some(branches)) if t.tag == "If" => {
            branches[1..].iter().filter(|b| !text(b).contains("AWS::NoValue")).collect()
        }
        _ => vec![v],
    }
}

#[test]
fn the_local_worker_runs_every_function_crate() {
    let names: BTreeSet<String> = functions().into_keys().collect();
    assert_eq!(
        names,
        crates(),
        "cli/src/lib.rs all_functions() must list every crate under functions/ (and nothing else)"
    );
}

#[test]
fn infra_functions_json_is_up_to_date() {
    let committed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root("infra/functions.json")).unwrap()).expect("valid JSON");
    assert_eq!(
        committed,
        exactly_once_cli::functions_json(),
        "infra/functions.json is stale: run `cargo run -q -p exactly-once-cli --bin eo -- functions --json > infra/functions.json`"
    );
}

#[test]
fn template_declares_each_function_with_its_msk_trigger_and_least_privilege() {
    let t: Value =
        serde_norway::from_str(&std::fs::read_to_string(root("template.yaml")).unwrap()).expect("valid YAML");
    let params = t["Parameters"].as_mapping().unwrap();
    let resources = t["Resources"].as_mapping().unwrap();
    let default_of = |param: &str| {
        params.get(param).and_then(|p| match &p["Default"] {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
    };
    assert_eq!(t["Globals"]["Function"]["Runtime"].as_str(), Some("provided.al2023"));
    assert_eq!(default_of("Architecture").as_deref(), Some("arm64"));

    let mut declared = BTreeSet::new();
    for (name, (topics, outputs)) in functions() {
        let (function_key, function) = resources
            .iter()
            .find(|(_, r)| {
                r["Type"] == "AWS::Serverless::Function" && r["Metadata"]["BuildProperties"]["Binary"] == name.as_str()
            })
            .unwrap_or_else(|| panic!("template.yaml has no function building the `{name}` binary"));
        declared.insert(name.clone());
        assert_eq!(function["Metadata"]["BuildMethod"].as_str(), Some("rust-cargolambda"), "{name}");

        let no_events = serde_norway::Mapping::new();
        let events = function["Properties"]["Events"].as_mapping().unwrap_or(&no_events);
        let of_type = |kind: &str| events.values().filter(|e| e["Type"].as_str() == Some(kind)).collect::<Vec<_>>();
        // The MSK trigger is its own AWS::Lambda::EventSourceMapping resource (SAM's MSK
        // event refuses a conditional SchemaRegistryConfig).
        let function_key = function_key.as_str().unwrap();
        let msks: Vec<&Value> = resources
            .values()
            .filter(|r| {
                r["Type"] == "AWS::Lambda::EventSourceMapping"
                    && untag(&r["Properties"]["FunctionName"]).as_str() == Some(function_key)
            })
            .collect();
        assert_eq!(msks.len(), 1, "{name}: one MSK trigger");
        assert!(of_type("MSK").is_empty(), "{name}: the MSK trigger is the mapping resource, not a SAM event too");
        let msk = msks[0];
        let role_key = untag(&msk["DependsOn"]).as_str().unwrap_or_default();
        assert!(role_key.ends_with("Role"), "{name}: the mapping waits for the function's role (its permissions)");
        let registry = &msk["Properties"]["AmazonManagedKafkaEventSourceConfig"]["SchemaRegistryConfig"];
        let registry = untag(registry).as_sequence().expect("SchemaRegistryConfig: !If [EsmRegistry, ..., NoValue]");
        assert_eq!(registry[0].as_str(), Some("EsmRegistry"), "{name}: the registry is optional");
        assert!(text(&registry[2]).contains("AWS::NoValue"), "{name}: no registry by default");
        let on = &registry[1];
        assert!(text(&on["SchemaRegistryURI"]).contains("MskSchemaRegistryUri"), "{name}: the registry's URI");
        assert_eq!(untag(&on["EventRecordFormat"]).as_str(), Some("MskEventRecordFormat"));
        assert!(text(&on["SchemaValidationConfigs"]).contains("VALUE"), "{name}: values are validated");
        assert!(text(&on["AccessConfigs"]).contains("BASIC_AUTH"), "{name}: Confluent basic auth from the secret");
        // A function that publishes through the outbox is also invoked on a schedule,
        // so its queued messages are sent without new records on its topic; the others
        // have nothing to drain.
        let schedules = of_type("Schedule");
        if outputs.is_empty() {
            assert!(schedules.is_empty(), "{name}: publishes nothing, needs no outbox schedule");
        } else {
            assert_eq!(schedules.len(), 1, "{name}: publishes through the outbox, so a schedule drains it");
            let schedule = untag(&schedules[0]["Properties"]["Schedule"]).as_str().unwrap_or_default().to_owned();
            assert_eq!(schedule, "OutboxDrainSchedule", "{name}: the schedule is the template's parameter");
            let every = default_of("OutboxDrainSchedule").expect("OutboxDrainSchedule has a default");
            assert!(every.starts_with("rate(") || every.starts_with("cron("), "{every}");
            assert!(
                schedules[0]["Properties"]["Input"].is_null(),
                "{name}: the function reads the scheduled event itself"
            );
        }
        assert_eq!(events.len(), schedules.len(), "{name}: no other triggers");
        let p = &msk["Properties"];
        let trigger_topics: Vec<String> = p["Topics"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|t| default_of(untag(t).as_str().expect("!Ref <Parameter>")).expect("topic parameter with a default"))
            .collect();
        assert_eq!(trigger_topics, topics, "{name}: the MSK trigger reads the function's topics");
        assert!(
            text(&p["AmazonManagedKafkaEventSourceConfig"]["ConsumerGroupId"]).contains(&format!("-{name}")),
            "{name}: own consumer group"
        );
        assert_eq!(untag(&p["EventSourceArn"]).as_str(), Some("MskClusterArn"), "{name}: reads the MSK cluster");
        for key in TRIGGER_SETTINGS {
            assert!(!p[key].is_null(), "{name}: MSK trigger sets {key}");
        }
        // Error-handling controls of Kafka mappings work in provisioned mode only.
        for key in ["MinimumPollers", "MaximumPollers"] {
            assert!(!p["ProvisionedPollerConfig"][key].is_null(), "{name}: provisioned mode sets {key}");
        }
        // Nothing healthy is ever discarded: no destination (with one, AWS caps even
        // unlimited retries at 10 and moves on), and the defaults retry without limit.
        assert!(p["DestinationConfig"].is_null(), "{name}: no on-failure destination");
        let param = |key: &str| untag(&p[key]).as_str().map(str::to_owned).unwrap_or_default();
        assert_eq!(default_of(&param("MaximumRetryAttempts")).as_deref(), Some("-1"), "{name}: unlimited retries");
        assert_eq!(
            default_of(&param("MaximumRecordAgeInSeconds")).as_deref(),
            Some("-1"),
            "{name}: no record ages out"
        );

        // The function's own role.
        let role_ref = untag(&function["Properties"]["Role"])
            .as_str()
            .expect("!GetAtt Role.Arn")
            .split('.')
            .next()
            .unwrap()
            .to_owned();
        let role = &resources[role_ref.as_str()];
        let statements: Vec<&Value> = role["Properties"]["Policies"]
            .as_sequence()
            .unwrap()
            .iter()
            .flat_map(when_true)
            .flat_map(|p| p["PolicyDocument"]["Statement"].as_sequence().unwrap().iter())
            .flat_map(when_true)
            .collect();
        let actions = |s: &Value| -> Vec<String> {
            match &s["Action"] {
                Value::String(a) => vec![a.clone()],
                Value::Sequence(v) => v.iter().map(|a| a.as_str().unwrap().to_owned()).collect(),
                _ => vec![],
            }
        };
        for s in &statements {
            let acts = actions(s);
            if acts.iter().any(|a| a.starts_with("kafka-cluster:") || a.starts_with("kafka:")) {
                let resource = text(&s["Resource"]);
                assert!(!resource.contains('*'), "{name}: kafka actions {acts:?} on a wildcard resource: {resource}");
                assert!(!acts.iter().any(|a| a.ends_with(":*")), "{name}: wildcard kafka action {acts:?}");
            }
        }
        let grants = |action: &str, needle: &str| {
            statements.iter().any(|s| actions(s).iter().any(|a| a == action) && text(&s["Resource"]).contains(needle))
        };
        let param_for = |topic: &str| {
            params
                .iter()
                .find(|(_, v)| v["Default"].as_str() == Some(topic))
                .map(|(k, _)| k.as_str().unwrap().to_owned())
        };
        for topic in &topics {
            let param = param_for(topic).unwrap();
            assert!(grants("kafka-cluster:ReadData", &format!("${{{param}}}")), "{name}: may read {topic}");
        }
        for topic in &outputs {
            let param = param_for(topic).unwrap_or_else(|| panic!("{name}: no parameter for output topic {topic}"));
            assert!(grants("kafka-cluster:WriteData", &format!("${{{param}}}")), "{name}: may write {topic}");
        }
        if outputs.is_empty() {
            assert!(
                !statements.iter().any(|s| actions(s).iter().any(|a| a.contains("WriteData"))),
                "{name}: no write access it does not need"
            );
        }
        assert!(grants("kafka-cluster:AlterGroup", &format!("-{name}")), "{name}: may use its own group only");
        // With a registry on the mapping, the mapping reads it with this role.
        assert!(grants("glue:GetSchemaVersion", "MskSchemaRegistryUri"), "{name}: may read a Glue registry");
        assert!(
            grants("secretsmanager:GetSecretValue", "SchemaRegistrySecretArn"),
            "{name}: may read the registry's credentials"
        );
    }
    // A Glue registry on the mappings may deliver SOURCE: the functions fetch its schema
    // versions themselves (GetSchemaVersion, granted above), so no rule refuses it.
    assert!(t["Rules"].get("GlueRegistryDeliversJson").is_none(), "Glue with SOURCE is allowed");
    let rule = text(&t["Rules"]["RegistryNeedsItsUri"]);
    assert!(rule.contains("MskSchemaRegistry") && rule.contains("MskSchemaRegistryUri"), "{rule}");
    // A record cannot tell the mapping's JSON from its SOURCE: the functions are told.
    let format = text(&t["Globals"]["Function"]["Environment"]["Variables"]["LAMBDA_EVENT_RECORD_FORMAT"]);
    assert!(
        format.contains("EsmRegistry") && format.contains("MskEventRecordFormat"),
        "LAMBDA_EVENT_RECORD_FORMAT follows the mapping's EventRecordFormat: {format}"
    );
    // The function answers batchItemFailures exactly when the mapping reads them.
    let env = text(&t["Globals"]["Function"]["Environment"]["Variables"]["LAMBDA_REPORT_BATCH_ITEM_FAILURES"]);
    assert!(
        env.contains("ReportBatchItemFailures"),
        "LAMBDA_REPORT_BATCH_ITEM_FAILURES follows FunctionResponseTypes: {env}"
    );
    let all: BTreeSet<String> = resources
        .values()
        .filter(|r| r["Type"] == "AWS::Serverless::Function")
        .map(|r| r["Metadata"]["BuildProperties"]["Binary"].as_str().unwrap().to_owned())
        .collect();
    let mut expected = declared.clone();
    expected.insert("migrate".into());
    assert_eq!(all, expected, "template.yaml declares functions that no crate provides");

    // The migrate step: at the newest migration, before every function.
    let newest = std::fs::read_dir(root("migrations"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| f.ends_with(".sql"))
        .filter_map(|f| f.split('_').next().map(str::to_owned))
        .max()
        .expect("migrations");
    let migrations = &resources["Migrations"];
    assert_eq!(migrations["Type"].as_str(), Some("Custom::Migrations"));
    assert_eq!(
        migrations["Properties"]["MigrationsVersion"].as_str(),
        Some(newest.as_str()),
        "template.yaml's MigrationsVersion must be the newest migration, so a deploy runs it"
    );
    for (key, r) in resources {
        if r["Type"] == "AWS::Serverless::Function" && r["Metadata"]["BuildProperties"]["Binary"] != "migrate" {
            assert_eq!(r["DependsOn"].as_str(), Some("Migrations"), "{key:?} runs after the migrate step");
        }
    }
}

/// `eo esm` takes the template's parameters (kebab case) with the template's defaults,
/// so a user tries the deployed settings locally by default.
#[test]
fn the_local_mapping_defaults_are_the_templates() {
    let t: Value =
        serde_norway::from_str(&std::fs::read_to_string(root("template.yaml")).unwrap()).expect("valid YAML");
    let command = <exactly_once_esm::MappingSettings as clap::Args>::augment_args(clap::Command::new("esm"));
    let mut checked = Vec::new();
    for (param, spec) in t["Parameters"].as_mapping().unwrap() {
        let param = param.as_str().unwrap();
        let kebab: String = param
            .chars()
            .enumerate()
            .flat_map(|(i, c)| {
                let lower = c.to_ascii_lowercase();
                if c.is_ascii_uppercase() && i > 0 {
                    vec!['-', lower]
                } else {
                    vec![lower]
                }
            })
            .collect();
        let Some(arg) = command.get_arguments().find(|a| a.get_long() == Some(kebab.as_str())) else { continue };
        let ours: Vec<String> = arg.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect();
        let theirs = match &spec["Default"] {
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            other => panic!("{param}: unexpected default {other:?}"),
        };
        assert_eq!(ours, vec![theirs], "eo esm --{kebab} must default to template.yaml's {param}");
        checked.push(param.to_owned());
    }
    for p in TRIGGER_SETTINGS.iter().chain(&["ConsumerGroupPrefix", "Timeout", "MemorySize"]) {
        assert!(checked.iter().any(|c| c == p), "eo esm has no option for template parameter {p}");
    }
}
