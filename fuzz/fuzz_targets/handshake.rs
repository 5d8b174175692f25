//! Handshake messages from an untrusted connector: the Hello decoder and MAC check, and the
//! bootstrap and relay hello bodies. A forged Hello must never verify.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mapreduce::relay::JobHello;
use mapreduce::wire::{mac_key, BodyReader, Hello};

fuzz_target!(|data: &[u8]| {
    let key = mac_key(b"fuzz job secret");
    let challenge = [7u8; 32];
    if let Ok(hello) = Hello::decode(data) {
        // Without the key, an attacker-chosen Hello must not verify.
        assert!(!hello.verify(&key, &challenge));
        let _ = JobHello::decode(hello.body);
        let mut r = BodyReader::new(hello.body, "bootstrap hello");
        let _ = r.bytes().and_then(|_| r.u32()).and_then(|_| r.u32()).and_then(|_| r.string());
    }
});
