//! Which id formats a guard writes (`EVENT_ID_FORMAT`), and, with `auto`, asking the
//! ledger whether the transition from v1 ids is still needed (see docs/RELIABILITY.md,
//! "Event ids and the move to v2").

use std::time::Duration;

use tokio::time::Instant;

use super::{ledger, Guard};
use crate::event::Event;
use crate::event_id::{EventId, IdFormat, IdFormatSetting, IdFormats};

/// After a failed check, how long `auto` goes on with the formats it has before asking
/// again (so batches neither queue behind a ledger that does not answer nor wait out the
/// whole recheck interval).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(10);

impl Guard {
    /// The id formats this guard works with now (`auto` may not have decided yet: then
    /// `v1+v2`).
    pub fn id_formats(&self) -> IdFormats {
        self.formats.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// With `EVENT_ID_FORMAT=auto`, asks the ledger now which formats to use (otherwise
    /// returns the fixed ones).
    pub async fn refresh_id_formats(&self) -> Result<IdFormats, sqlx::Error> {
        if let IdFormatSetting::Fixed(f) = self.config.id_format {
            return Ok(f);
        }
        let v1_rows = ledger::has_v1_only_rows(&self.pg, &self.ns).await;
        let mut state = self.formats.lock().unwrap_or_else(|e| e.into_inner());
        match v1_rows {
            Ok(v1_rows) => {
                let now = if v1_rows { IdFormats::V1AndV2 } else { IdFormats::V2 };
                if now != state.0 || state.1.is_none() {
                    tracing::info!(function = %self.ns, formats = %now, v1_only_rows = v1_rows, "event id formats (EVENT_ID_FORMAT=auto)");
                }
                *state = (now, Some(Instant::now() + self.config.id_format_recheck));
                Ok(now)
            }
            Err(e) => {
                state.1 = Some(Instant::now() + RETRY_AFTER_FAILURE.min(self.config.id_format_recheck));
                Err(e)
            }
        }
    }

    /// The formats for the next batch. With `auto` the ledger is asked:
    /// - the first time: batches wait for that answer, so none confirms under formats it
    ///   was not meant to use;
    /// - when `EVENT_ID_FORMAT_RECHECK_SECS` has passed: one batch asks, the others go on
    ///   with the last answer.
    ///
    /// A failed check keeps the formats (`v1+v2` before any answer: it fences against
    /// both) and is tried again after [`RETRY_AFTER_FAILURE`].
    pub(super) async fn batch_id_formats(&self) -> IdFormats {
        if !matches!(self.config.id_format, IdFormatSetting::Auto) {
            return self.id_formats();
        }
        let next_check = || self.formats.lock().unwrap_or_else(|e| e.into_inner()).1;
        let _asking = match next_check() {
            Some(at) if Instant::now() < at => return self.id_formats(),
            Some(_) => match self.format_check.try_lock() {
                Ok(held) => held,
                Err(_) => return self.id_formats(),
            },
            None => {
                let held = self.format_check.lock().await;
                // Asked (or tried) while we waited.
                if next_check().is_some() {
                    return self.id_formats();
                }
                held
            }
        };
        // Not counted in `round_trips`: it is no step of the batch, one query every few
        // minutes per process.
        match self.refresh_id_formats().await {
            Ok(f) => f,
            Err(e) => {
                let keep = self.id_formats();
                tracing::warn!(function = %self.ns, error = %e, formats = %keep, "could not check the ledger for v1-only ids; keeping the current id formats");
                keep
            }
        }
    }

    /// Every id `event` can be known by in the ledger, whatever the format it was
    /// confirmed or dead-lettered in (v1, v2), for operator tools: empty when it has no
    /// usable id.
    pub fn known_ids(&self, event: &Event) -> Vec<EventId> {
        let mut ids: Vec<EventId> =
            [IdFormat::V1, IdFormat::V2].into_iter().filter_map(|f| self.ids.derive_in(event, f).ok()).collect();
        ids.dedup();
        ids
    }
}
