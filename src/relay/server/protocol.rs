//! What an arriving frame means to the relay: the handshake (authentication, then admission
//! into a job), receipts and proofs of the relay's key, and data frames (folded in rank order,
//! or forwarded for a broadcast). The decisions are pure functions in
//! [`crate::relay::admission`]; this applies them to the relay's connections and jobs.

use super::connection::{Fanout, Payload, ReadState, State};
use super::{Job, Relay};
use crate::algo::Collective;
use crate::buffer::Scratch;
use crate::error::{Error, ErrorKind, Result};
use crate::net::conn::FrameIn;
use crate::relay::admission::{self, Admission, KnownJob, Reservations};
use crate::relay::limits::MAX_HELLO_BYTES;
use crate::relay::receipts::{Entry, Kind, Reduction};
use crate::relay::sums::{check_data_header, Fault, Sums};
use crate::wire::{
    self, FrameHeader, FrameKind, Hello, PayloadDigest, SessionKeys, HEADER_LEN,
    MAX_CONTROL_PAYLOAD,
};
use std::cell::Cell;
use std::rc::Rc;
use std::time::Instant;

impl Relay {
    /// A header arrived: check it and size its payload, or handle an empty frame.
    pub(super) fn on_header(&mut self, id: usize, raw: &[u8; HEADER_LEN]) -> Result<()> {
        let h = FrameHeader::decode(raw)?;
        let c = self.conns.get_mut(&id).expect("connection");
        let mut data_of = None;
        let limit = match (&c.state, h.kind()) {
            (State::AwaitHello { .. }, FrameKind::Hello) => MAX_HELLO_BYTES,
            (State::AwaitHello { .. }, k) => {
                return Err(Error::remote(format!("expected a Hello frame, got {k:?}")))
            }
            (State::Ready { job, rank }, FrameKind::Data) => {
                let j = &self.jobs[job];
                check_data_header(&h, *rank, j.hello.world, j.hello.chunk_bytes)?;
                data_of = Some(*job);
                h.len as usize
            }
            (State::Ready { .. }, FrameKind::OpError | FrameKind::Goodbye) => MAX_CONTROL_PAYLOAD,
            (_, k) => return Err(Error::remote(format!("unexpected {k:?} frame"))),
        };
        if h.len as usize > limit {
            return Err(Error::remote(format!(
                "{:?} frame of {} bytes exceeds the limit of {limit} bytes",
                h.kind(),
                h.len
            )));
        }
        // Data payloads are received whole into the buffer, so a reused one needs no zeroing.
        let buf = match data_of.and_then(|job| self.jobs.get_mut(&job)) {
            Some(j) => j.sums.pool.take(h.len as usize)?,
            None => Scratch::zeroed(h.len as usize)?,
        };
        // Even an empty frame has its tag to read before it is acted on.
        let c = self.conns.get_mut(&id).expect("connection");
        c.read = ReadState::Payload {
            frame: Box::new(FrameIn::new(h, raw, c.rx.as_mut())),
            buf,
        };
        Ok(())
    }

    /// A whole frame; `digest`: its payload's hash when the tag check computed it.
    pub(super) fn on_frame(
        &mut self,
        id: usize,
        h: FrameHeader,
        payload: Scratch,
        digest: Option<PayloadDigest>,
    ) -> Result<()> {
        let c = self.conns.get_mut(&id).expect("connection");
        match c.state {
            State::AwaitHello { nonce, .. } => self.on_hello(id, nonce, &h, payload.as_slice()),
            State::Ready { job, rank } => match h.kind() {
                FrameKind::OpError => {
                    if let Some(j) = self.jobs.get_mut(&job) {
                        j.sums.drop_seq(h.seq);
                    }
                    Ok(())
                }
                FrameKind::Goodbye => {
                    self.close(id, "peer said goodbye", false);
                    Ok(())
                }
                _ => self.on_data(job, rank, id, h, payload, digest),
            },
            State::Closing { .. } => Ok(()),
        }
    }

    fn refuse(&mut self, id: usize, kind: ErrorKind, reason: &str) {
        let c = self.conns.get_mut(&id).expect("connection");
        if self.rejects.record(self.now, "refused") {
            log::warn!("rejected connection from {}: {reason}", c.peer);
        } else {
            log::debug!("rejected connection from {}: {reason}", c.peer);
        }
        c.state = State::Closing { since: self.now };
        self.send_control(
            id,
            FrameHeader::reject(kind, reason.len()),
            reason.as_bytes().to_vec(),
        );
    }

    /// A member of a granted job asks for the relay's signed receipt of one op (see
    /// [`crate::relay::receipts`]): answer with a Welcome carrying it, then close.
    fn answer_receipt(
        &mut self,
        id: usize,
        hello: &Hello<'_>,
        challenge: &[u8; 32],
        req: Result<crate::relay::receipts::ReceiptRequest>,
    ) {
        let (job, seq, positions) = match req {
            Ok(r) => (r.job, r.seq, r.positions),
            Err(e) => return self.refuse(id, e.kind, &e.message),
        };
        let Some(g) = self.config.grants.clone() else {
            return self.refuse(id, ErrorKind::Auth, "this relay keeps no receipts");
        };
        if !g.key(&job).is_some_and(|k| hello.verify(&k, challenge)) {
            return self.refuse(id, ErrorKind::Auth, "authentication failed: unknown job");
        }
        let Some(p) = g.signed_receipt(&job, seq, &positions) else {
            return self.refuse(id, ErrorKind::Auth, "this relay keeps no receipts");
        };
        let c = self.conns.get_mut(&id).expect("connection");
        c.state = State::Closing {
            since: Instant::now(),
        };
        self.send_control(id, FrameHeader::new(FrameKind::Welcome, p.len()), p);
    }

    /// Someone (the validator) asks the relay to prove its key at this address: answer with a
    /// Welcome carrying the public key and signature, then close.
    fn prove_address(&mut self, id: usize, asker: &[u8; 32], challenge: &[u8; 32]) {
        let proof = self
            .config
            .grants
            .as_ref()
            .and_then(|g| g.prove(asker, challenge));
        let Some(p) = proof else {
            self.refuse(id, ErrorKind::Auth, "this relay has no identity to prove");
            return;
        };
        let c = self.conns.get_mut(&id).expect("connection");
        log::debug!("proved the relay's key to {}", c.peer);
        c.state = State::Closing {
            since: Instant::now(),
        };
        self.send_control(id, FrameHeader::new(FrameKind::Welcome, p.len()), p);
    }

    fn on_hello(
        &mut self,
        id: usize,
        nonce: [u8; 32],
        h: &FrameHeader,
        payload: &[u8],
    ) -> Result<()> {
        let hello = Hello::decode(payload)?;
        if let Some(req) = crate::relay::receipts::parse_request(hello.body) {
            self.answer_receipt(id, &hello, &nonce, req);
            return Ok(());
        }
        if let Some(asker) = crate::relay::registration::proof_request(hello.body) {
            self.prove_address(id, &asker, &nonce);
            return Ok(());
        }
        let fixed = (!self.config.token.is_empty()).then_some(self.key);
        let grants = self.config.grants.as_ref();
        let granted = |job: &[u8; 16]| grants.and_then(|g| g.key(job));
        let (key, jh) = match admission::authenticate(&hello, &nonce, granted, fixed) {
            Ok(proven) => proven,
            Err(r) => {
                self.refuse(id, r.kind, &r.reason);
                return Ok(());
            }
        };
        // Every frame after this one is tagged: refuse a peer whose tags this relay cannot
        // check, by name, rather than failing all its frames.
        if let Some(msg) = crate::wire::tag_format_mismatch(h.aux, "the peer") {
            self.refuse(id, ErrorKind::Remote, &msg);
            return Ok(());
        }
        let tag = crate::config::to_hex(&jh.job[..4]);
        let known = self.jobs.get(&jh.job).map(|j| KnownJob {
            hello: &j.hello,
            rank_streams: j.members[jh.rank].len(),
        });
        let books = Reservations {
            reserved: self.reserved,
            max_memory: self.config.max_memory,
            max_job_memory: self.config.limits.max_job_memory,
        };
        match admission::decide(&jh, known, books) {
            Admission::Join => {}
            Admission::Refuse { kind, reason } => {
                self.refuse(id, kind, &reason);
                return Ok(());
            }
            Admission::NewJob { budget } => {
                self.reserved += budget;
                log::info!(
                    "job {tag}: new, {} peers, {} streams each, {}-byte chunks, window {}",
                    jh.world,
                    jh.streams,
                    jh.chunk_bytes,
                    jh.window
                );
                self.jobs.insert(
                    jh.job,
                    Job {
                        hello: jh.clone(),
                        members: vec![Vec::new(); jh.world],
                        sums: Sums::new(jh.world, budget / 4 * 3, budget),
                        budget,
                        bytes_in: 0,
                        last_data: self.now,
                    },
                );
            }
        }
        let j = self.jobs.get_mut(&jh.job).expect("job");
        j.members[jh.rank].push(id);
        let c = self.conns.get_mut(&id).expect("connection");
        log::debug!(
            "job {tag}: rank {} stream {} from {}",
            jh.rank,
            jh.stream,
            c.peer
        );
        c.state = State::Ready {
            job: jh.job,
            rank: jh.rank,
        };
        self.unauthenticated -= 1;
        let p = wire::welcome_mac(&key, &nonce, &hello.nonce, &[]).to_vec();
        self.send_control(id, FrameHeader::new(FrameKind::Welcome, p.len()), p);
        // Every later frame, both ways, carries a tag under this connection's keys.
        let keys = SessionKeys::derive(&key, &nonce, &hello.nonce, true);
        if let Some(c) = self.conns.get_mut(&id) {
            c.tagged = true;
            let (tx, rx) = keys.streams();
            c.tx = tx;
            c.rx = Some(rx);
        }
        Ok(())
    }

    /// The least-loaded connection of `rank` in `job`.
    fn stream_of(&self, job: &Job, rank: usize) -> Option<usize> {
        job.members[rank]
            .iter()
            .copied()
            .min_by_key(|id| self.conns.get(id).map_or(usize::MAX, |c| c.out_bytes))
    }

    fn on_data(
        &mut self,
        job: [u8; 16],
        rank: usize,
        id: usize,
        h: FrameHeader,
        payload: Scratch,
        digest: Option<PayloadDigest>,
    ) -> Result<()> {
        let Some(j) = self.jobs.get_mut(&job) else {
            return Err(Error::internal("connection of a job that ended"));
        };
        j.bytes_in += payload.len() as u64;
        j.last_data = self.now;
        self.test_faults.on_data_frame();
        let f = check_data_header(&h, rank, j.hello.world, j.hello.chunk_bytes)?;
        let world = j.hello.world;
        // How this relay reduces the op, as its receipts sign it: what the checked header says
        // (every frame of an op must say the same, or the op fails) and the job's world.
        let reduction = self.test_faults.signed(Reduction {
            dtype: f.dtype,
            op: f.op,
            wire: f.compress,
            world: world as u32,
        });
        if !matches!(f.coll, Collective::Broadcast) {
            if let Some(g) = self.config.grants.as_ref().filter(|g| g.keeps_receipts()) {
                let d = *blake3::hash(payload.as_slice()).as_bytes();
                let e = Entry::digested(Kind::Input, rank, h.offset, payload.len(), d);
                g.note(&job, h.seq, reduction, e);
            }
        }
        match f.coll {
            Collective::Broadcast => {
                let targets: Vec<usize> = (0..world)
                    .filter(|&r| r != rank)
                    .filter_map(|r| self.stream_of(&self.jobs[&job], r))
                    .collect();
                let ack = FrameHeader { len: 0, ..h };
                if targets.is_empty() {
                    self.enqueue(id, ack, Payload::None, None);
                    return Ok(());
                }
                let fan = Rc::new(Fanout {
                    remaining: Cell::new(targets.len()),
                    root_conn: id,
                    ack,
                });
                // Forwarded unchanged: the hash its tag check computed serves every copy.
                let shared = Rc::new(payload);
                for t in targets {
                    let p = Payload::Shared(shared.clone());
                    self.enqueue_digest(t, h, p, Some(fan.clone()), digest.clone());
                }
                Ok(())
            }
            _ => match j.sums.contribute(rank, &h, f, payload) {
                Ok(None) => Ok(()),
                Ok(Some((rh, result))) => {
                    let elem = f.dtype.size();
                    let shared = Rc::new(self.test_faults.result(result, elem)?);
                    let others = self.test_faults.for_others(&shared, elem)?;
                    let targets: Vec<(usize, usize)> = (0..world)
                        .filter_map(|r| self.stream_of(&self.jobs[&job], r).map(|t| (r, t)))
                        .collect();
                    if let Some(g) = self.config.grants.as_ref().filter(|g| g.keeps_receipts()) {
                        // What each rank is sent, as sent.
                        let first = *blake3::hash(shared.as_slice()).as_bytes();
                        let rest = if Rc::ptr_eq(&shared, &others) {
                            first
                        } else {
                            *blake3::hash(others.as_slice()).as_bytes()
                        };
                        for &(r, _) in &targets {
                            let d = if r == 0 { first } else { rest };
                            let e = Entry::digested(Kind::Result, r, rh.offset, shared.len(), d);
                            g.note(&job, rh.seq, reduction, e);
                        }
                    }
                    // One hash of the result serves every peer's tag (every peer of a job
                    // connects with the same secret, so under the same payload key).
                    let hash = |p: &Rc<Scratch>| {
                        let t = targets.first()?.1;
                        Some(self.conns.get(&t)?.tx.digest(p.as_slice()))
                    };
                    let first = hash(&shared);
                    let rest = if Rc::ptr_eq(&shared, &others) {
                        first.clone()
                    } else {
                        hash(&others)
                    };
                    for (r, t) in targets {
                        let (p, d) = if r == 0 {
                            (&shared, first.clone())
                        } else {
                            (&others, rest.clone())
                        };
                        self.enqueue_digest(t, rh, Payload::Shared(p.clone()), None, d);
                    }
                    Ok(())
                }
                Err(Fault::Conn(e)) => Err(e),
                Err(Fault::Op(seq, e)) => {
                    // The sums dropped what they held of the op; its receipts must not pair
                    // the inputs recorded so far with results of inputs taken after.
                    if let Some(g) = self.config.grants.as_ref() {
                        g.fail(&job, seq);
                    }
                    log::warn!(
                        "job {}: op seq {seq} failed: {}",
                        crate::config::to_hex(&job[..4]),
                        e.message
                    );
                    let targets: Vec<usize> = (0..world)
                        .filter_map(|r| self.stream_of(&self.jobs[&job], r))
                        .collect();
                    let msg = format!("relay: {}", e.message);
                    for t in targets {
                        self.send_control(
                            t,
                            FrameHeader::op_error(seq, e.kind, msg.len()),
                            msg.clone().into_bytes(),
                        );
                    }
                    Ok(())
                }
            },
        }
    }
}
