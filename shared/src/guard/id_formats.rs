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

/// What a guard knows about its id formats.
pub(super) struct FormatState {
    formats: IdFormats,
    /// Fixed by configuration, or answered by the ledger at least once. Until then no
    /// batch is handled: a process must not write ids in one format and, moments later,
    /// in another (the rows ClickHouse collapses by id would not collapse).
    decided: bool,
    /// When `auto` asks the ledger again (`None`: never asked).
    next_check: Option<Instant>,
}

impl FormatState {
    pub(super) fn new(setting: IdFormatSetting) -> Self {
        match setting {
            IdFormatSetting::Fixed(formats) => Self { formats, decided: true, next_check: None },
            IdFormatSetting::Auto => Self { formats: IdFormats::V1AndV2, decided: false, next_check: None },
        }
    }
}

impl Guard {
    fn format_state(&self) -> std::sync::MutexGuard<'_, FormatState> {
        self.formats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The id formats this guard works with now (`auto` before its first answer:
    /// `v1+v2`, though no batch is handled until then).
    pub fn id_formats(&self) -> IdFormats {
        self.format_state().formats
    }

    /// With `EVENT_ID_FORMAT=auto`, asks the ledger now which formats to use (otherwise
    /// returns the fixed ones).
    pub async fn refresh_id_formats(&self) -> Result<IdFormats, sqlx::Error> {
        if let IdFormatSetting::Fixed(f) = self.config.id_format {
            return Ok(f);
        }
        let v1_rows = ledger::has_v1_only_rows(&self.pg, &self.ns).await;
        let mut state = self.format_state();
        match v1_rows {
            Ok(v1_rows) => {
                let now = if v1_rows { IdFormats::V1AndV2 } else { IdFormats::V2 };
                if now != state.formats || !state.decided {
                    tracing::info!(function = %self.ns, formats = %now, v1_only_rows = v1_rows, "event id formats (EVENT_ID_FORMAT=auto)");
                }
                state.formats = now;
                state.decided = true;
                state.next_check = Some(Instant::now() + self.config.id_format_recheck);
                Ok(now)
            }
            Err(e) => {
                // Undecided, batches fail until it answers: ask again soon.
                let wait = if state.decided { RETRY_AFTER_FAILURE } else { Duration::from_secs(1) };
                state.next_check = Some(Instant::now() + wait.min(self.config.id_format_recheck));
                Err(e)
            }
        }
    }

    /// The formats for the next batch. With `auto` the ledger is asked:
    /// - until it has answered once: batches wait for the batch asking, and fail
    ///   (unavailable, retried) while it cannot answer;
    /// - then every `EVENT_ID_FORMAT_RECHECK_SECS`: one batch asks, the others go on
    ///   with the last answer, and a failed check keeps it (tried again after
    ///   [`RETRY_AFTER_FAILURE`]).
    pub(super) async fn batch_id_formats(&self) -> Result<IdFormats, String> {
        let (formats, decided, next_check) = {
            let state = self.format_state();
            (state.formats, state.decided, state.next_check)
        };
        if !matches!(self.config.id_format, IdFormatSetting::Auto) {
            return Ok(formats);
        }
        let due = next_check.is_none_or(|at| Instant::now() >= at);
        if decided && !due {
            return Ok(formats);
        }
        if !decided && !due {
            // The last check failed a moment ago: fail fast rather than queue behind a
            // ledger that does not answer.
            return Err("the ledger did not answer which id formats to use; retrying shortly".into());
        }
        let _asking = if decided {
            match self.format_check.try_lock() {
                Ok(held) => held,
                Err(_) => return Ok(formats),
            }
        } else {
            let held = self.format_check.lock().await;
            // Answered (or failed) while we waited.
            let state = self.format_state();
            if state.decided {
                return Ok(state.formats);
            }
            if state.next_check.is_some_and(|at| Instant::now() < at) {
                return Err("the ledger did not answer which id formats to use; retrying shortly".into());
            }
            drop(state);
            held
        };
        // Not counted in `round_trips`: it is no step of the batch, one query every few
        // minutes per process.
        match self.refresh_id_formats().await {
            Ok(f) => Ok(f),
            Err(e) if decided => {
                tracing::warn!(function = %self.ns, error = %e, formats = %formats, "could not check the ledger for v1-only ids; keeping the current id formats");
                Ok(formats)
            }
            Err(e) => Err(e.to_string()),
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
