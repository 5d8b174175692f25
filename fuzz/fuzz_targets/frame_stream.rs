//! A byte stream as a relay would read it from one connection: frames decoded one after
//! another, hello bodies parsed, data headers checked against a job and then summed.
//! Nothing here may panic, allocate beyond the job's limits, or loop.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mapreduce::buffer::Scratch;
use mapreduce::relay::sums::{check_data_header, Sums};
use mapreduce::relay::JobHello;
use mapreduce::wire::{FrameHeader, FrameKind, Hello, HEADER_LEN};

const WORLD: usize = 3;
const CHUNK: usize = 256;

fuzz_target!(|data: &[u8]| {
    let mut sums = Sums::new(WORLD, WORLD * 4 * CHUNK * 4);
    let mut rest = data;
    while rest.len() >= HEADER_LEN + 1 {
        // One byte picks which peer "sent" the frame, as if it came on its connection.
        let rank = rest[0] as usize % WORLD;
        let header: &[u8; HEADER_LEN] = rest[1..1 + HEADER_LEN].try_into().unwrap();
        rest = &rest[1 + HEADER_LEN..];
        let Ok(h) = FrameHeader::decode(header) else { return };
        let len = h.len as usize;
        if len > rest.len() {
            return;
        }
        let (payload, tail) = rest.split_at(len);
        rest = tail;
        match h.kind() {
            FrameKind::Hello => {
                if let Ok(hello) = Hello::decode(payload) {
                    let _ = JobHello::decode(hello.body);
                }
            }
            FrameKind::Data => {
                if let Ok(f) = check_data_header(&h, rank, WORLD, CHUNK) {
                    let mut scratch = Scratch::zeroed(len).unwrap();
                    scratch.as_mut_slice().copy_from_slice(payload);
                    let _ = sums.contribute(rank, &h, f, scratch);
                    assert!(sums.held() <= WORLD * 4 * CHUNK * 4 + CHUNK * 4);
                }
            }
            _ => {}
        }
    }
});
