//! How a rank writes into its shared-memory slot, learned at run time.
//!
//! Peers read a slot right after its owner wrote it. With ordinary (cached) stores the data
//! moves cache to cache; with non-temporal (streaming) stores it goes through DRAM. Which is
//! faster depends on where the CPUs sit: on the 2-vCPU VMs this was measured on, the
//! hypervisor's placement flips every few seconds between one where cached writes give ~9
//! GB/s bus bandwidth and streaming ~6, and one where cached writes drop to ~2.3 and
//! streaming gives ~9. So rank 0 times the copying work of each operation under the mode
//! in use, keeps the faster per length class, and re-tries the other now and then; it
//! publishes its choices in the segment and every rank follows. Any mix of modes is correct: a streaming writer
//! fences before it posts.

use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WriteMode {
    Cached = 0,
    Streaming = 1,
}

impl WriteMode {
    fn other(self) -> Self {
        match self {
            WriteMode::Cached => WriteMode::Streaming,
            WriteMode::Streaming => WriteMode::Cached,
        }
    }
}

/// Copies `src` to `dst` with `mode`. The slices must not overlap.
pub(crate) fn copy(src: &[f32], dst: &mut [f32], mode: WriteMode) {
    debug_assert_eq!(src.len(), dst.len());
    match mode {
        WriteMode::Cached => dst.copy_from_slice(src),
        WriteMode::Streaming => stream(src, dst),
    }
}

#[cfg(target_arch = "x86_64")]
fn stream(src: &[f32], dst: &mut [f32]) {
    use std::arch::x86_64::{_mm_loadu_ps, _mm_sfence, _mm_stream_ps};
    let n = src.len().min(dst.len());
    // Scalar until `dst` is 16-byte aligned, as the streaming store needs.
    let head = dst.as_ptr().align_offset(16).min(n);
    dst[..head].copy_from_slice(&src[..head]);
    let mut i = head;
    // SAFETY: SSE is part of x86_64; every access below is within both slices (i + 4 <= n)
    // and the stores are to 16-byte aligned addresses of `dst`.
    unsafe {
        while i + 4 <= n {
            _mm_stream_ps(dst.as_mut_ptr().add(i), _mm_loadu_ps(src.as_ptr().add(i)));
            i += 4;
        }
        // Streaming stores are weakly ordered: make them visible before the caller posts.
        _mm_sfence();
    }
    dst[i..n].copy_from_slice(&src[i..n]);
}

#[cfg(not(target_arch = "x86_64"))]
fn stream(src: &[f32], dst: &mut [f32]) {
    dst.copy_from_slice(src);
}

/// Operations shorter than this measure latency, not bandwidth; they use the mode of the
/// shortest class.
const LEARN_MIN_FLOATS: usize = 1 << 18;
/// Lengths are learned per power of two from LEARN_MIN_FLOATS up, since the cost per float
/// depends on whether a buffer fits in cache: an operation is only compared with operations
/// of about its own length.
const CLASSES: usize = 12;
/// Re-try the mode not in use after this many operations of a class.
const RETRY_EVERY: u32 = 32;

fn class(len: usize) -> usize {
    let steps = (len.max(1).ilog2() as usize).saturating_sub(LEARN_MIN_FLOATS.ilog2() as usize);
    steps.min(CLASSES - 1)
}

/// The mode for an operation of `len` floats, from the modes rank 0 published (bit c set:
/// class c streams).
pub(crate) fn mode_for(modes: u32, len: usize) -> WriteMode {
    if modes >> class(len) & 1 == 1 {
        WriteMode::Streaming
    } else {
        WriteMode::Cached
    }
}

/// Rank 0's running estimate of each mode's cost, per length class.
#[derive(Debug, Default)]
pub(crate) struct Learner {
    classes: [ClassCost; CLASSES],
}

#[derive(Debug, Default, Clone, Copy)]
struct ClassCost {
    /// Seconds of copying work per float, smoothed; None until measured.
    cost: [Option<f64>; 2],
    since_retry: u32,
    next: Option<WriteMode>,
}

impl Learner {
    /// Records an operation of `len` floats that spent `work` copying under `mode`.
    pub(crate) fn record(&mut self, mode: WriteMode, len: usize, work: Duration) {
        if len < LEARN_MIN_FLOATS {
            return;
        }
        let c = &mut self.classes[class(len)];
        let per_float = work.as_secs_f64() / len as f64;
        let slot = &mut c.cost[mode as usize];
        *slot = Some(slot.map_or(per_float, |old| 0.5 * old + 0.5 * per_float));
        let best = match c.cost {
            [Some(cached), Some(streaming)] if streaming < cached => WriteMode::Streaming,
            [Some(_), Some(_)] => WriteMode::Cached,
            // Try each mode once.
            [None, _] => WriteMode::Cached,
            [_, None] => WriteMode::Streaming,
        };
        c.since_retry += 1;
        c.next = Some(if c.since_retry >= RETRY_EVERY {
            c.since_retry = 0;
            best.other()
        } else {
            best
        });
    }

    /// The modes to publish: bit c set when class c should stream.
    pub(crate) fn modes(&self) -> u32 {
        self.classes
            .iter()
            .enumerate()
            .filter(|(_, c)| c.next == Some(WriteMode::Streaming))
            .fold(0, |bits, (i, _)| bits | 1 << i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_copy_copies_every_element_at_any_alignment() {
        let src: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
        for offset in 0..4 {
            for len in [0, 1, 3, 4, 5, 17, 900] {
                let mut dst = vec![-1.0f32; 1000];
                copy(
                    &src[..len],
                    &mut dst[offset..offset + len],
                    WriteMode::Streaming,
                );
                assert_eq!(&dst[offset..offset + len], &src[..len]);
                assert!(dst[..offset]
                    .iter()
                    .chain(&dst[offset + len..])
                    .all(|&x| x == -1.0));
            }
        }
    }

    /// Plays `ops` operations of `len` floats through a learner and the published modes,
    /// with `fast` the faster mode; returns how often the slower one ran.
    fn play(l: &mut Learner, len: usize, fast: WriteMode, ops: u32) -> u32 {
        let mut slower = 0;
        for _ in 0..ops {
            let mode = mode_for(l.modes(), len);
            let work = Duration::from_millis(if mode == fast { 10 } else { 40 });
            slower += (mode != fast) as u32;
            l.record(mode, len, work);
        }
        slower
    }

    #[test]
    fn learner_keeps_the_faster_mode_and_retries_the_other() {
        let mut l = Learner::default();
        let len = LEARN_MIN_FLOATS * 4;
        // Tries cached once, then keeps streaming, re-trying cached every RETRY_EVERY.
        assert_eq!(play(&mut l, len, WriteMode::Streaming, 3 * RETRY_EVERY), 3);
        // Other lengths learn on their own and start from cached.
        assert_eq!(
            mode_for(l.modes(), LEARN_MIN_FLOATS * 64),
            WriteMode::Cached
        );
        // The placement flips: cached wins from its next retry on, and streaming only runs
        // on retries.
        play(&mut l, len, WriteMode::Cached, RETRY_EVERY);
        assert_eq!(play(&mut l, len, WriteMode::Cached, 4 * RETRY_EVERY), 4);
        // Short operations do not count, and follow the shortest class.
        l.record(WriteMode::Streaming, 10, Duration::from_secs(1));
        assert_eq!(
            mode_for(l.modes(), 10),
            mode_for(l.modes(), LEARN_MIN_FLOATS)
        );
    }
}
