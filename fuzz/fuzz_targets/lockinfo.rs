//! LockInfo parsing: any bytes give either a LockInfo whose ID is what the JSON says,
//! non-blank and free of control characters, kept with the exact bytes it came as,
//! or a 400. Never a panic.
#![no_main]

use bytes::Bytes;
use gitstate::error::Error;
use gitstate::protocol::parse_lock_info;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let raw = Bytes::copy_from_slice(data);
    match parse_lock_info(raw.clone()) {
        Ok(info) => {
            assert_eq!(info.raw, raw, "the LockInfo is kept byte for byte");
            assert!(!info.id.trim().is_empty(), "blank ID accepted");
            assert!(!info.id.chars().any(char::is_control), "ID with control characters accepted: {:?}", info.id);
            let v: serde_json::Value = serde_json::from_slice(data).expect("an accepted LockInfo is JSON");
            assert_eq!(v.get("ID").and_then(|i| i.as_str()), Some(info.id.as_str()));
        }
        Err(e) => {
            let status = Error::from(e).into_response().status();
            assert_eq!(status, 400);
        }
    }
});
