//! Id extraction from arbitrary headers and payloads, with every strategy, in both
//! formats. Never a panic; the same record always gives the same id; an id is never
//! empty, never longer than `EventId::MAX_LEN`, never holds a control character, and is
//! its own stored form (`EventId::new` keeps it as is); a v2 id starts with its kind's
//! tag.
#![no_main]

use arbitrary::Arbitrary;
use exactly_once_core::event::Event;
use exactly_once_core::event_id::{EventId, IdFormat, IdStrategy};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    header_name: String,
    header_value: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    pointer: String,
    composite: Vec<String>,
    raw_id: String,
}

fn check(id: &EventId) {
    let s = id.as_str();
    assert!(!s.is_empty());
    assert!(s.len() <= EventId::MAX_LEN, "{} bytes", s.len());
    assert!(!s.chars().any(char::is_control));
    assert_eq!(EventId::new(s).as_ref(), Ok(id), "not its own stored form");
}

const TAGS: [&str; 10] = ["h:", "h#", "f:", "f#", "c:", "c#", "p:", "p#", "sha256:", "sha256#"];

fuzz_target!(|input: Input| {
    let mut event = Event::new("t", 0, 1);
    if let Some(v) = &input.header_value {
        event = event.with_header(input.header_name.clone(), v.clone());
    }
    if let Some(p) = &input.payload {
        event = event.with_value(p.clone());
    }
    let composite: Vec<&str> = input.composite.iter().map(String::as_str).collect();
    let strategies = [
        IdStrategy::Header(input.header_name.clone()),
        IdStrategy::PayloadField(input.pointer.clone()),
        IdStrategy::Composite(input.composite.clone()),
        IdStrategy::ContentHash,
        IdStrategy::Offset,
        IdStrategy::default_chain(Some(&input.pointer), Some(&composite)),
    ];
    for s in &strategies {
        for format in [IdFormat::V1, IdFormat::V2] {
            match (s.derive_in(&event, format), s.derive_in(&event, format)) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a, b, "not deterministic");
                    check(&a);
                    if format == IdFormat::V2 {
                        assert!(TAGS.iter().any(|t| a.as_str().starts_with(t)), "untagged {a:?}");
                    }
                }
                (Err(a), Err(b)) => {
                    assert_eq!(a, b);
                    assert!(!a.reason().is_empty());
                }
                _ => panic!("not deterministic"),
            }
        }
        // Whether a record has an id does not depend on the format.
        assert_eq!(s.derive_in(&event, IdFormat::V1).is_ok(), s.derive_in(&event, IdFormat::V2).is_ok());
    }
    if let Ok(id) = EventId::new(input.raw_id.clone()) {
        check(&id);
    }
});
