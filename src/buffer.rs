//! Memory an operation works on: the caller's buffers (borrowed through raw pointers for the
//! duration of the op) and scratch space for accumulators and staging.
//!
//! Large scratch buffers are anonymous memory maps (memmap2), so they are zero pages until
//! touched and go straight back to the OS when the op ends; small ones are plain vectors.

use crate::error::{Error, Result};

/// Scratch buffers at or above this size are memory-mapped.
const MMAP_THRESHOLD: usize = 1 << 20;

/// Zero-initialised scratch memory, 8-byte aligned (so any dtype view is aligned).
pub enum Scratch {
    Heap(Vec<u64>, usize),
    Mapped(memmap2::MmapMut),
}

impl Scratch {
    pub fn zeroed(len: usize) -> Result<Scratch> {
        if len >= MMAP_THRESHOLD {
            let map = memmap2::MmapOptions::new()
                .len(len)
                .map_anon()
                .map_err(|e| Error::io(format!("cannot map {len} bytes of scratch memory"), e))?;
            Ok(Scratch::Mapped(map))
        } else {
            Ok(Scratch::Heap(vec![0u64; len.div_ceil(8)], len))
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Scratch::Heap(_, len) => *len,
            Scratch::Mapped(m) => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        match self {
            Scratch::Heap(v, len) => &bytes_of(v)[..*len],
            Scratch::Mapped(m) => m,
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            Scratch::Heap(v, len) => &mut bytes_of_mut(v)[..*len],
            Scratch::Mapped(m) => m,
        }
    }
}

fn bytes_of(v: &[u64]) -> &[u8] {
    // SAFETY: u64 has no padding and any byte pattern is a valid u8; the length covers
    // exactly the same allocation.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len() * 8) }
}

fn bytes_of_mut(v: &mut [u64]) -> &mut [u8] {
    // SAFETY: as in `bytes_of`, and the unique borrow of `v` is carried over.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len() * 8) }
}

/// A caller's buffer, borrowed for the duration of one operation.
///
/// Created from a raw pointer by the API layer, which guarantees (by the C ABI's contract, or
/// by a Rust borrow held until the op completes) that nothing else touches the memory until
/// the op has completed. Only the communicator's progress thread reads or writes it.
#[derive(Clone, Copy, Debug)]
pub struct RawBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a RawBuf is handed to exactly one progress thread, which is the only user of the
// memory until the op completes (see the type's contract).
unsafe impl Send for RawBuf {}

impl RawBuf {
    /// # Safety
    /// `ptr` must be valid for reads (and writes, if the op writes) of `len` bytes, and no
    /// other code may access that memory until the operation using this buffer completes.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> RawBuf {
        RawBuf {
            ptr: if len == 0 {
                std::ptr::NonNull::dangling().as_ptr()
            } else {
                ptr
            },
            len,
        }
    }

    pub fn empty() -> RawBuf {
        RawBuf {
            ptr: std::ptr::NonNull::dangling().as_ptr(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: by the contract of `new`, ptr is valid for len bytes and used only by us.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: by the contract of `new`; `&mut self` keeps this the only live view made
        // through this RawBuf.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// Where a frame's payload comes from or goes to, relative to an op's memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Region {
    /// The caller's in/out buffer (`buf` of all-reduce/broadcast, `recv` of the others).
    User { offset: usize, len: usize },
    /// The caller's read-only input (`send` of all-gather and reduce-scatter).
    Input { offset: usize, len: usize },
    /// The op's accumulator scratch.
    Acc { offset: usize, len: usize },
    /// Bytes owned by the transmit itself (small control payloads).
    Inline(Vec<u8>),
    /// The op's backup scratch ([`OpMemory::backup`]), read-only: the encoded image of a
    /// compressed relay all-reduce's input, sent (and sent again after a lost relay) from there.
    Backup { offset: usize, len: usize },
    /// One of the op's further caller buffers (`OpMemory::buffers`; point-to-point groups,
    /// where every send and receive has its own).
    Buffer {
        index: usize,
        offset: usize,
        len: usize,
    },
}

impl Region {
    pub fn len(&self) -> usize {
        match self {
            Region::User { len, .. }
            | Region::Input { len, .. }
            | Region::Acc { len, .. }
            | Region::Backup { len, .. }
            | Region::Buffer { len, .. } => *len,
            Region::Inline(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// All memory one operation touches.
pub struct OpMemory {
    /// In/out buffer: reduced or received in place.
    pub user: RawBuf,
    /// Read-only input, for ops with separate send and receive buffers.
    pub input: RawBuf,
    /// Accumulator scratch (partial sums in the accumulator dtype), when the op needs one.
    pub acc: Option<Scratch>,
    /// Further caller buffers, read or written as [`Region::Buffer`] says.
    pub buffers: Vec<RawBuf>,
    /// Room for copies of input the op may have to send again after its result overwrote
    /// it (a relay all-reduce that loses a relay; a compressed one keeps its input's encoded
    /// image here, which it sends from). Its contents are whatever an earlier op left: a
    /// schedule reads back only what it wrote. The progress loop hands one op's
    /// backup to the next, so the pages are faulted in once per communicator.
    pub backup: Option<Scratch>,
}

impl OpMemory {
    pub fn new(user: RawBuf) -> OpMemory {
        OpMemory {
            user,
            input: RawBuf::empty(),
            acc: None,
            buffers: Vec::new(),
            backup: None,
        }
    }

    /// The bytes of a region, for sending.
    pub fn bytes<'a>(&'a self, r: &'a Region) -> &'a [u8] {
        match r {
            Region::User { offset, len } => &self.user.as_slice()[*offset..offset + len],
            Region::Input { offset, len } => &self.input.as_slice()[*offset..offset + len],
            Region::Acc { offset, len } => {
                &self.acc.as_ref().expect("op has an accumulator").as_slice()[*offset..offset + len]
            }
            Region::Inline(v) => v,
            Region::Backup { offset, len } => {
                &self.backup.as_ref().expect("op has a backup").as_slice()[*offset..offset + len]
            }
            Region::Buffer { index, offset, len } => {
                &self.buffers[*index].as_slice()[*offset..offset + len]
            }
        }
    }

    /// The bytes of a region, for receiving into. Only the caller's in/out buffer and the
    /// accumulator are writable.
    pub fn bytes_mut(&mut self, r: &Region) -> &mut [u8] {
        match r {
            Region::User { offset, len } => &mut self.user.as_mut_slice()[*offset..offset + len],
            Region::Acc { offset, len } => &mut self.acc_mut()[*offset..offset + len],
            Region::Buffer { index, offset, len } => {
                &mut self.buffers[*index].as_mut_slice()[*offset..offset + len]
            }
            Region::Input { .. } | Region::Inline(_) | Region::Backup { .. } => {
                panic!("region {r:?} is not writable")
            }
        }
    }

    pub fn acc_mut(&mut self) -> &mut [u8] {
        self.acc
            .as_mut()
            .expect("op has an accumulator")
            .as_mut_slice()
    }

    pub fn acc(&self) -> &[u8] {
        self.acc.as_ref().expect("op has an accumulator").as_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_is_zeroed_and_aligned() {
        for len in [0, 1, 7, 4096, MMAP_THRESHOLD, MMAP_THRESHOLD + 3] {
            let mut s = Scratch::zeroed(len).unwrap();
            assert_eq!(s.len(), len);
            assert!(s.as_slice().iter().all(|&b| b == 0));
            assert_eq!(s.as_slice().as_ptr() as usize % 8, 0);
            if len > 0 {
                s.as_mut_slice()[len - 1] = 9;
                assert_eq!(s.as_slice()[len - 1], 9);
            }
        }
    }
}
