//! Raw bytes as an MSK event: Lambda's payload and the body of `POST /invoke`.
//! Parse, decode, derive ids with the default chain. Never a panic; every record of a
//! parsed event comes out (none dropped); every rejection has a reason.
#![no_main]

use exactly_once_core::event::Record;
use exactly_once_core::event_id::IdStrategy;
use exactly_once_core::msk;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let event = match msk::parse(body) {
        Ok(e) => e,
        Err(e) => {
            assert!(e.reason == "body_not_json" || e.reason == "body_not_msk_event", "{}", e.reason);
            return;
        }
    };
    let records = msk::decode(&event);
    assert_eq!(records.len(), event.len(), "a record was dropped");
    let ids = IdStrategy::default_chain(Some("/id"), Some(&["/user_id", "/type"]));
    for r in &records {
        match r {
            Record::Ok(e) => {
                assert!(e.partition >= 0 && e.offset >= 0);
                // The chain ends with the offset strategy: a decodable record always has an id.
                let id = ids.derive(e).expect("the offset fallback always yields an id");
                assert!(!id.as_str().is_empty() && id.as_str().len() <= 200);
            }
            Record::Invalid { reason, error, .. } => {
                assert!(reason.starts_with("record_") && !error.is_empty());
            }
        }
    }
});
