use std::ops::Range;

/// How a ring cuts a buffer: `parts` nearly equal contiguous segments (one owned by each
/// rank), each processed in pieces of at most `piece` elements so that sending, receiving
/// and summing of consecutive pieces overlap. Segments differ in length by at most one, so
/// every segment has the same number of pieces; trailing pieces of a shorter segment may be
/// empty.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Segments {
    len: usize,
    parts: usize,
    piece: usize,
    pub pieces_per_segment: usize,
}

impl Segments {
    pub(crate) fn new(len: usize, parts: usize, piece: usize) -> Self {
        let piece = piece.max(1);
        Segments {
            len,
            parts,
            piece,
            pieces_per_segment: len.div_ceil(parts).div_ceil(piece),
        }
    }

    pub(crate) fn segment(&self, c: usize) -> Range<usize> {
        let cut = |c: usize| (c as u128 * self.len as u128 / self.parts as u128) as usize;
        cut(c)..cut(c + 1)
    }

    /// Piece `i` of segment `c`; empty past the segment's end.
    pub(crate) fn piece(&self, c: usize, i: usize) -> Range<usize> {
        let seg = self.segment(c);
        let start = seg
            .start
            .saturating_add(i.saturating_mul(self.piece))
            .min(seg.end);
        start..start.saturating_add(self.piece).min(seg.end)
    }
}

/// `(a - b) mod n` for ring positions.
pub(crate) fn ring_sub(a: usize, b: usize, n: usize) -> usize {
    (a + n - b % n) % n
}
