//! The runs that prove the guard under load and under faults, apart from the operator's
//! `eo`: they drive the real `eo` binary (`eo run`, `eo esm`) against the local
//! services, and stop and start those services, so they are for a development machine
//! or CI, never a production environment.
//!
//! - [`chaos`]: the fault-injection run (`eo-faults chaos`);
//! - [`soak`]: the soak run (`eo-faults soak`).

use std::path::PathBuf;

pub mod chaos;
pub mod soak;

/// The `eo` binary the runs drive: `EO_BIN` when set, else the `eo` beside this binary
/// (cargo builds both into the same directory).
pub fn eo_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("EO_BIN") {
        return Ok(PathBuf::from(path));
    }
    let me = std::env::current_exe()?;
    let eo = me.with_file_name(format!("eo{}", std::env::consts::EXE_SUFFIX));
    if eo.is_file() {
        // `cargo run -p exactly-once-faults` does not rebuild `eo`: say which one runs,
        // and warn when it is older than this binary (a library change not in it).
        let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        eprintln!("[eo-faults] driving {}", eo.display());
        if let (Some(eo_time), Some(my_time)) = (modified(&eo), modified(&me)) {
            if eo_time < my_time {
                eprintln!(
                    "[eo-faults] WARNING: {} is older than eo-faults; rebuild it (cargo build -p exactly-once-cli --bins) if the library changed",
                    eo.display()
                );
            }
        }
        Ok(eo)
    } else {
        anyhow::bail!(
            "no `eo` binary at {}: build it first (cargo build -p exactly-once-cli --bins) or set EO_BIN",
            eo.display()
        )
    }
}
