//! The functions this repository ships, in one list: the local worker runs them all, and
//! the deployment templates are checked against it.

pub mod chaos_function;
pub mod custom_resource;
pub mod migrate;
pub mod new_function;
pub mod ops;

use std::sync::Arc;

use exactly_once::Handler;

/// The deployable description of every function, as JSON: what `infra/functions.json`
/// holds for the CDK app (tests/deploy.rs keeps the two equal).
pub fn functions_json() -> serde_json::Value {
    let list: Vec<serde_json::Value> = all_functions()
        .iter()
        .map(|f| {
            let spec = f.spec();
            serde_json::json!({
                "name": spec.name,
                "binary": spec.name,
                "topics": spec.topics,
                "outputTopics": spec.output_topics,
            })
        })
        .collect();
    serde_json::Value::Array(list)
}

/// What `eo run` and `eo esm` run: every function, plus the fault run's
/// `chaos-faults` when `EO_CHAOS_FUNCTION=1`.
pub fn runnable_functions() -> Vec<Arc<dyn Handler>> {
    let mut functions = all_functions();
    if std::env::var(chaos_function::ENABLE_VAR).is_ok_and(|v| v == "1") {
        functions.push(Arc::new(chaos_function::ChaosFaults));
    }
    functions
}

/// Every function crate under `functions/`.
pub fn all_functions() -> Vec<Arc<dyn Handler>> {
    vec![
        Arc::new(user_events::UserEvents),
        Arc::new(notifications::Notifications),
        Arc::new(cdc::Cdc),
        // `eo new` adds a function above this line.
    ]
}
