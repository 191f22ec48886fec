//! The deploy's migrate step as a CloudFormation custom resource: CloudFormation invokes
//! the `migrate` function with a request, and waits for an answer PUT to the request's
//! pre-signed `ResponseURL` (an hour at most: every path answers, failures included).
//!
//! Create and Update apply the schema (`migrate::apply`); Delete does nothing (the data
//! outlives the stack). The template changes the resource's `MigrationsVersion`
//! property with every new migration, so an update of the stack runs it again, before
//! the functions are updated (they depend on it).

use serde::Deserialize;
use serde_json::{json, Value};

/// The fields of a custom resource request this step uses.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Request {
    pub request_type: String,
    #[serde(rename = "ResponseURL")]
    pub response_url: String,
    pub stack_id: String,
    pub request_id: String,
    pub logical_resource_id: String,
    #[serde(default)]
    pub physical_resource_id: Option<String>,
}

/// The physical id of the one migration resource.
pub const PHYSICAL_ID: &str = "exactly-once-migrations";

/// CloudFormation takes at most 4096 bytes of answer.
const MAX_REASON: usize = 2000;

/// The answer's JSON.
pub fn response(request: &Request, outcome: &Result<Value, String>) -> Value {
    let mut body = json!({
        "StackId": request.stack_id,
        "RequestId": request.request_id,
        "LogicalResourceId": request.logical_resource_id,
        "PhysicalResourceId": request.physical_resource_id.as_deref().unwrap_or(PHYSICAL_ID),
    });
    match outcome {
        Ok(data) => {
            body["Status"] = "SUCCESS".into();
            body["Data"] = data.clone();
        }
        Err(reason) => {
            let mut end = reason.len().min(MAX_REASON);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            body["Status"] = "FAILED".into();
            body["Reason"] = reason[..end].into();
        }
    }
    body
}

/// PUTs the answer to the pre-signed URL (no content type: the URL is signed without one).
pub async fn answer(request: &Request, body: &Value) -> Result<(), String> {
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    let bytes = serde_json::to_vec(body).map_err(|e| e.to_string())?;
    let status = client
        .put(&request.response_url)
        .header("content-type", "")
        .body(bytes)
        .send()
        .await
        .map_err(|e| format!("answering CloudFormation: {e}"))?
        .status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("answering CloudFormation: HTTP {status}"))
    }
}
