//! Checks a data frame from another rank passes before any of its bytes are used: it belongs
//! to an op called the same way as ours, comes from the rank the schedule expects, names a
//! step the op has, and covers whole elements inside the range that step may write.

use crate::algo::{Endpoint, OpDesc};
use crate::error::{Error, Result};
use crate::wire::FrameHeader;
use std::ops::Range;

/// Checks every ring frame passes: the op matches ours, it comes from our ring predecessor,
/// and its step is one of the op's `steps`. Returns the step.
pub(crate) fn check_ring_frame(
    desc: &OpDesc,
    from: Endpoint,
    prev: Endpoint,
    h: &FrameHeader,
    steps: usize,
) -> Result<usize> {
    desc.check_matches(from, h)?;
    if from != prev {
        return Err(Error::remote(format!(
            "{desc}: unexpected data from {from} (the ring expects {prev})"
        )));
    }
    let step = h.aux as usize;
    if step >= steps {
        return Err(Error::remote(format!(
            "{desc}: {from} sent data for step {step}, which this op does not have"
        )));
    }
    Ok(step)
}

/// Check that a data frame's byte range lies inside `within` and is whole elements.
pub(crate) fn check_range(
    desc: &OpDesc,
    from: Endpoint,
    h: &FrameHeader,
    len: usize,
    within: &Range<usize>,
    elem: usize,
) -> Result<Range<usize>> {
    let start = h.offset as usize;
    let end = start.saturating_add(len);
    if h.offset > usize::MAX as u64
        || start < within.start
        || end > within.end
        || start % elem != 0
        || len % elem != 0
    {
        return Err(Error::remote(format!(
            "{desc}: {from} sent {len} bytes at offset {} for step {}, outside the expected range {}..{} \
             (mismatched counts or chunking across ranks?)",
            h.offset, h.aux, within.start, within.end
        )));
    }
    Ok(start..end)
}
