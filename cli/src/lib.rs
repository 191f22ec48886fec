//! The functions this repository ships, in one list: the local worker runs them all, and
//! the deployment templates are checked against it.

pub mod ops;

use std::sync::Arc;

use exactly_once::Handler;

/// Every function crate under `functions/`.
pub fn all_functions() -> Vec<Arc<dyn Handler>> {
    vec![Arc::new(user_events::UserEvents), Arc::new(notifications::Notifications), Arc::new(cdc::Cdc)]
}
