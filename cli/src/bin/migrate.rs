//! The deploy's migrate step: a Lambda function (the same configuration as the
//! functions: DATABASE_URL, CLICKHOUSE_*) behind a CloudFormation custom resource in
//! `template.yaml` and the CDK app. See `exactly_once_cli::custom_resource`.

use std::process::ExitCode;

use exactly_once::config::{ProcessConfig, ProcessEnv};
use exactly_once_cli::custom_resource::{self, Request};
use lambda_runtime::{service_fn, LambdaEvent};
use serde_json::{json, Value};

async fn handle(event: LambdaEvent<Value>) -> Result<Value, lambda_runtime::Diagnostic> {
    let request: Request = serde_json::from_value(event.payload).map_err(|e| lambda_runtime::Diagnostic {
        error_type: "NotACustomResourceRequest".into(),
        error_message: format!("expected a CloudFormation custom resource request: {e}"),
    })?;
    let outcome = match request.request_type.as_str() {
        "Create" | "Update" => migrate().await,
        // The schema and its data outlive the stack.
        _ => Ok(json!({})),
    };
    match &outcome {
        Ok(data) => tracing::info!(request = %request.request_type, %data, "migrations in place"),
        Err(e) => tracing::error!(request = %request.request_type, error = %e, "migration failed"),
    }
    let body = custom_resource::response(&request, &outcome);
    custom_resource::answer(&request, &body)
        .await
        .map_err(|e| lambda_runtime::Diagnostic { error_type: "ResponseFailed".into(), error_message: e })?;
    Ok(body)
}

async fn migrate() -> Result<Value, String> {
    let process = ProcessConfig::from_env(&ProcessEnv).map_err(|e| e.to_string())?;
    let config = exactly_once::Config::load().map_err(|e| e.to_string())?;
    let clients = exactly_once::runtime::connect(&config, process.startup_timeout).await.map_err(|e| e.to_string())?;
    let migrated = exactly_once_cli::migrate::apply(&clients).await?;
    tracing::info!("{}", migrated.line(&clients));
    serde_json::to_value(&migrated).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    exactly_once::runtime::init_tracing(true);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(lambda_runtime::run(service_fn(handle))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: Lambda runtime: {e}");
            ExitCode::FAILURE
        }
    }
}
