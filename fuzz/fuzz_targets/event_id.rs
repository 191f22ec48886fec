//! Id extraction from arbitrary headers and payloads, with every strategy. Never a
//! panic; the same record always gives the same id; an id is never empty, never longer
//! than `EventId::MAX_LEN` and never holds a control character.
#![no_main]

use arbitrary::Arbitrary;
use exactly_once_core::event::Event;
use exactly_once_core::event_id::{EventId, IdStrategy};
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
}

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
        match (s.derive(&event), s.derive(&event)) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a, b, "not deterministic");
                check(&a);
            }
            (Err(a), Err(b)) => {
                assert_eq!(a, b);
                assert!(!a.reason().is_empty());
            }
            _ => panic!("not deterministic"),
        }
    }
    if let Ok(id) = EventId::new(input.raw_id.clone()) {
        check(&id);
    }
});
