//! A byte stream as a relay reads it from one connection after the handshake: frames of
//! header, payload and integrity tag, read through the same resumable reader the relay and the
//! engine use ([`FrameIn`], in pieces of fuzzer-chosen size), data headers checked against a
//! job and then summed. Nothing here may panic, allocate beyond the job's limits, or loop, and
//! no frame the fuzzer made up may pass its tag check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mapreduce::buffer::Scratch;
use mapreduce::net::conn::FrameIn;
use mapreduce::relay::sums::{check_data_header, Sums};
use mapreduce::relay::JobHello;
use mapreduce::wire::{FrameHeader, FrameKind, Hello, SessionKeys, HEADER_LEN};
use std::io::Read;

const WORLD: usize = 3;
const CHUNK: usize = 256;
const BUDGET: usize = WORLD * 4 * CHUNK * 4;

/// Hands out at most `step` bytes per read, as a socket may.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.step).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, data)) = data.split_first() else { return };
    let mut sums = Sums::new(WORLD, BUDGET / 4 * 3, BUDGET);
    let keys = SessionKeys::derive(&[1; 32], &[2; 32], &[3; 32], true);
    let (_, mut rx) = keys.streams();
    let mut input = Trickle {
        data,
        step: usize::from(step).max(1),
    };
    let mut frames = 0usize;
    loop {
        // One byte picks which peer "sent" the frame, as if it came on its connection.
        let mut pick = [0u8; 1];
        if input.read(&mut pick).unwrap_or(0) == 0 {
            return;
        }
        let rank = pick[0] as usize % WORLD;
        let mut raw = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match input.read(&mut raw[got..]) {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
        }
        let Ok(h) = FrameHeader::decode(&raw) else { return };
        let len = h.len as usize;
        if len > input.data.len() {
            return;
        }
        let mut frame = FrameIn::new(h, &raw, Some(&mut rx));
        let mut payload = vec![0u8; len];
        while !frame.is_whole() {
            let at = frame.got;
            if frame.read(&mut input, &mut payload[at..]).is_err() {
                return;
            }
        }
        // A fuzzer cannot forge a keyed tag: if this fires, the tag check is broken.
        assert!(!frame.verify(), "made-up frame {frames} passed its tag check");
        frames += 1;
        // The relay would close the connection here; go on as if the tag had checked, so the
        // header checks and sums behind it are fuzzed too.
        match h.kind() {
            FrameKind::Hello => {
                if let Ok(hello) = Hello::decode(&payload) {
                    let _ = JobHello::decode(hello.body);
                }
            }
            FrameKind::Data => {
                if let Ok(f) = check_data_header(&h, rank, WORLD, CHUNK) {
                    let mut scratch = Scratch::zeroed(len).unwrap();
                    scratch.as_mut_slice().copy_from_slice(&payload);
                    let _ = sums.contribute(rank, &h, f, scratch);
                    assert!(sums.held() <= BUDGET + CHUNK * 4);
                }
            }
            _ => {}
        }
    }
});
