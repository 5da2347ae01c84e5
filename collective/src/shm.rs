//! Shared-memory all-reduce for ranks on one host: a memory copy is ten times faster than a
//! loopback TCP stream, so on one host the limit is memory bandwidth, not the network.
//!
//! One file in /dev/shm per generation, mapped by every rank and unlinked once all have it:
//! a header, one control block per rank (three sequence counters, each a futex word on its
//! own cache line) and one slot per rank. A slot is a ring of `positions` chunk buffers.
//! The buffer is cut into chunks; chunk j uses position j mod `positions` and is split into
//! one segment per rank:
//!
//! 1. publish: rank r copies its chunk, except its own segment, into its slot;
//! 2. reduce: once every rank has published chunk j, rank r sums its own segment over all
//!    ranks, in rank order (x0 + x1 + ...), into its buffer and into its slot;
//! 3. gather: once rank c has reduced chunk j, rank r copies segment c from c's slot.
//!
//! A rank publishes chunk j once every peer has gathered chunk j - positions, the previous
//! user of that position; so a rank runs up to a whole slot ahead of a slower or descheduled
//! peer, and operations follow each other without a barrier. The slots are small enough to
//! stay in the last-level cache: what one rank writes there can be read by the others and
//! overwritten by the next chunk without going to DRAM; whether that beats streaming the
//! writes through DRAM depends on the CPUs' placement, so it is measured (`write_mode`).
//!
//! Each element is summed by exactly one rank and copied to the others, so results are
//! bit-identical across ranks. A wait spins briefly, then sleeps on the futex in short
//! slices, checking between slices whether a neighbour's TCP connection hung up (a killed
//! process), whether another rank flagged the segment aborted, and the timeout.

use super::ring::TcpRing;
use super::segments::Segments;
use super::write_mode::{self, Learner, WriteMode};
use super::CollectiveError;
use memmap2::{MmapMut, MmapOptions};
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub(crate) const SHM_DIR: &str = "/dev/shm";
const MAGIC: u64 = u64::from_le_bytes(*b"FERRYSHM");
const PAGE: usize = 4096;
const LINE: usize = 64;
/// Header: magic, world, chunk floats, positions; then the abort flag and the write modes for
/// slots, each on its own line.
const ABORTED_AT: usize = LINE;
const WRITE_MODE_AT: usize = 2 * LINE;
/// Per rank: three counters, then the operation length of each position.
const CONTROL_AT: usize = PAGE;
const OP_LENS_AT: usize = 3 * LINE;
/// How long a wait busy-polls, then polls with sched_yield, before sleeping on the futex: a
/// peer working on another core usually arrives within microseconds, while a peer that is
/// not running needs our core more than we do.
const SPIN_FOR: Duration = Duration::from_micros(20);
const YIELD_FOR: Duration = Duration::from_micros(50);
/// Longest futex sleep between liveness checks.
const SLEEP_SLICE: Duration = Duration::from_millis(2);

/// Chunks a rank has taken through each step, since the segment was made.
#[derive(Clone, Copy)]
enum Counter {
    Published = 0,
    Reduced = 1,
    Gathered = 2,
}

/// A sequence counter other ranks wait on, and how many of them sleep on it.
#[repr(C)]
struct Flag {
    value: AtomicU32,
    sleepers: AtomicU32,
}

/// The segment file while ranks open it; removed from /dev/shm when dropped (the mappings
/// stay valid), so nothing is left behind even if set-up fails half-way.
pub(crate) struct SegmentFile {
    path: PathBuf,
}

impl SegmentFile {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SegmentFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Where things are in a segment of `world` ranks.
#[derive(Clone, Copy)]
struct Layout {
    /// Floats per chunk.
    chunk: usize,
    /// Chunk buffers per slot.
    positions: usize,
    control_stride: usize,
    data_at: usize,
    slot_bytes: usize,
    len: usize,
}

impl Layout {
    /// None if the sizes overflow.
    fn new(world: usize, chunk: usize, positions: usize) -> Option<Layout> {
        let control_stride = positions
            .checked_mul(8)?
            .checked_add(OP_LENS_AT)?
            .div_ceil(LINE)
            * LINE;
        let data_at = world
            .checked_mul(control_stride)?
            .checked_add(CONTROL_AT)?
            .div_ceil(PAGE)
            * PAGE;
        let slot_bytes = chunk.checked_mul(positions)?.checked_mul(4)?.div_ceil(PAGE) * PAGE;
        let len = world.checked_mul(slot_bytes)?.checked_add(data_at)?;
        Some(Layout {
            chunk,
            positions,
            control_stride,
            data_at,
            slot_bytes,
            len,
        })
    }
}

pub(crate) struct ShmRing {
    map: MmapMut,
    /// Start of the mapping, for data access without borrowing `map` mutably.
    base: *mut u8,
    layout: Layout,
    rank: usize,
    world: usize,
    timeout: Duration,
    /// Chunks this rank has completed; all ranks run the same operations, so this is also
    /// what every peer's counters reach at the end of each operation.
    chunks_done: u32,
    /// Rank 0 only: picks the write mode everyone uses.
    learner: Learner,
    /// One segment's partial sums, for more than two ranks.
    scratch: Vec<f32>,
}

// SAFETY: `base` points into `map`, which the struct owns; the mapping moves with it.
unsafe impl Send for ShmRing {}

impl ShmRing {
    /// Rank 0: creates and maps a fresh segment. Chunks are `piece` floats per rank; a slot
    /// holds about `slot` floats, and at least two chunks.
    pub(crate) fn create(
        name: &str,
        world: usize,
        slot: usize,
        piece: usize,
        timeout: Duration,
    ) -> io::Result<(SegmentFile, ShmRing)> {
        let chunk = piece.max(1).saturating_mul(world);
        let positions = (slot / chunk).max(2);
        let layout = Layout::new(world, chunk, positions)
            .ok_or_else(|| io::Error::other("segment too large"))?;
        let path = Path::new(SHM_DIR).join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let guard = SegmentFile { path };
        file.set_len(layout.len as u64)?;
        let ring = Self::map(&file, 0, world, timeout, Some(layout))?;
        Ok((guard, ring))
    }

    /// Other ranks: maps the segment rank 0 created and reads its geometry.
    pub(crate) fn open(
        path: &Path,
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> io::Result<ShmRing> {
        if path.parent() != Some(Path::new(SHM_DIR)) {
            return Err(io::Error::other("segment outside /dev/shm"));
        }
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Self::map(&file, rank, world, timeout, None)
    }

    fn map(
        file: &File,
        rank: usize,
        world: usize,
        timeout: Duration,
        create: Option<Layout>,
    ) -> io::Result<ShmRing> {
        let file_len = file.metadata()?.len() as usize;
        if file_len < PAGE {
            return Err(io::Error::other("segment too small"));
        }
        // SAFETY: a file only ranks of this group open; all access to the shared part goes
        // through atomics or through ranges the protocol hands from one rank to another.
        // Populated: first touches of tmpfs pages would otherwise land in the first operations.
        let mut map = unsafe { MmapOptions::new().len(file_len).populate().map_mut(file)? };
        let base = map.as_mut_ptr();
        let word = |i: usize| {
            // SAFETY: the header's first four u64s are inside the mapping and aligned.
            unsafe { &*(base.add(8 * i) as *const AtomicU64) }
        };
        let layout = match create {
            Some(layout) => {
                word(1).store(world as u64, Ordering::Relaxed);
                word(2).store(layout.chunk as u64, Ordering::Relaxed);
                word(3).store(layout.positions as u64, Ordering::Relaxed);
                word(0).store(MAGIC, Ordering::Release);
                layout
            }
            None => {
                if word(0).load(Ordering::Acquire) != MAGIC
                    || word(1).load(Ordering::Relaxed) != world as u64
                {
                    return Err(io::Error::other("not a segment of this group"));
                }
                let chunk = word(2).load(Ordering::Relaxed) as usize;
                let positions = word(3).load(Ordering::Relaxed) as usize;
                match Layout::new(world, chunk, positions) {
                    Some(l) if chunk > 0 && positions >= 2 && l.len == file_len => l,
                    _ => return Err(io::Error::other("segment geometry does not match its size")),
                }
            }
        };
        Ok(ShmRing {
            map,
            base,
            layout,
            rank,
            world,
            timeout,
            chunks_done: 0,
            learner: Learner::default(),
            scratch: Vec::new(),
        })
    }

    /// Rank `rank`'s control block, `at` bytes in; 8-byte aligned for `at` multiple of 8.
    fn control<T>(&self, rank: usize, at: usize) -> &T {
        let at = CONTROL_AT + rank * self.layout.control_stride + at;
        debug_assert!(at + std::mem::size_of::<T>() <= self.map.len());
        // SAFETY: inside the mapping, aligned, and only ever accessed atomically.
        unsafe { &*(self.base.add(at) as *const T) }
    }

    fn flag(&self, rank: usize, counter: Counter) -> &Flag {
        self.control(rank, counter as usize * LINE)
    }

    /// Total length of the operation that chunk `j` of rank `rank` belongs to, so ranks
    /// that disagree about the length fail instead of summing mismatched data.
    fn op_len(&self, rank: usize, j: u32) -> &AtomicU64 {
        self.control(rank, OP_LENS_AT + 8 * self.position(j))
    }

    fn header_word(&self, at: usize) -> &AtomicU32 {
        // SAFETY: inside the header page, aligned, only ever accessed atomically.
        unsafe { &*(self.base.add(at) as *const AtomicU32) }
    }

    fn aborted(&self) -> &AtomicU32 {
        self.header_word(ABORTED_AT)
    }

    /// Tells every rank to give up its current and future operations on this segment.
    pub(crate) fn abort(&self) {
        self.aborted().store(1, Ordering::Release);
    }

    fn position(&self, j: u32) -> usize {
        j as usize % self.layout.positions
    }

    /// `range` of chunk `j` in rank `q`'s slot, to read.
    ///
    /// # Safety
    /// Rank q posted that it wrote the range and does not write it while the slice lives.
    unsafe fn slot(&self, q: usize, j: u32, range: &Range<usize>) -> &[f32] {
        std::slice::from_raw_parts(self.slot_ptr(q, j, range), range.len())
    }

    /// `range` of chunk `j` in our own slot, to write.
    ///
    /// # Safety
    /// No peer reads the range while the slice lives (they have gathered the previous chunk
    /// at this position and wait for our post before reading this one).
    #[allow(clippy::mut_from_ref)]
    unsafe fn own_slot(&self, j: u32, range: &Range<usize>) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.slot_ptr(self.rank, j, range), range.len())
    }

    /// `range` (within a chunk) of chunk `j`'s buffer in rank `q`'s slot.
    fn slot_ptr(&self, q: usize, j: u32, range: &Range<usize>) -> *mut f32 {
        debug_assert!(range.end <= self.layout.chunk);
        let at = self.layout.data_at
            + q * self.layout.slot_bytes
            + self.position(j) * self.layout.chunk * 4;
        // SAFETY: the slot of rank q holds `positions` chunk buffers inside the mapping.
        unsafe { (self.base.add(at) as *mut f32).add(range.start) }
    }

    fn post(&self, counter: Counter, value: u32) {
        let f = self.flag(self.rank, counter);
        f.value.store(value, Ordering::SeqCst);
        if f.sleepers.load(Ordering::SeqCst) != 0 {
            futex_wake(&f.value);
        }
    }

    fn others(&self) -> impl Iterator<Item = usize> {
        let (r, n) = (self.rank, self.world);
        (1..n).map(move |d| (r + d) % n)
    }

    /// True when every peer's `counter` has reached `target` (wrapping comparison).
    fn all_reached(&self, counter: Counter, target: u32) -> bool {
        self.others()
            .all(|q| reached(self.flag(q, counter).value.load(Ordering::Acquire), target))
    }

    fn wait_all(
        &self,
        ring: &TcpRing,
        counter: Counter,
        target: u32,
    ) -> Result<(), CollectiveError> {
        for q in self.others() {
            self.wait(ring, q, counter, target)?;
        }
        Ok(())
    }

    /// Waits until rank `peer`'s counter reaches `target`.
    fn wait(
        &self,
        ring: &TcpRing,
        peer: usize,
        counter: Counter,
        target: u32,
    ) -> Result<(), CollectiveError> {
        let op = "all_reduce";
        let f = self.flag(peer, counter);
        if reached(f.value.load(Ordering::Acquire), target) {
            return Ok(());
        }
        let start = Instant::now();
        loop {
            for _ in 0..64 {
                if reached(f.value.load(Ordering::Acquire), target) {
                    return Ok(());
                }
                std::hint::spin_loop();
            }
            let spun = start.elapsed();
            if spun >= YIELD_FOR {
                break;
            }
            if spun >= SPIN_FOR {
                std::thread::yield_now();
            }
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            f.sleepers.fetch_add(1, Ordering::SeqCst);
            let now = f.value.load(Ordering::SeqCst);
            if !reached(now, target) {
                futex_wait(&f.value, now, SLEEP_SLICE);
            }
            f.sleepers.fetch_sub(1, Ordering::SeqCst);
            if reached(f.value.load(Ordering::Acquire), target) {
                return Ok(());
            }
            if self.aborted().load(Ordering::Acquire) != 0 {
                return Err(CollectiveError::Aborted { op });
            }
            if let Some(gone) = ring.hung_up_peer() {
                return Err(CollectiveError::PeerClosed { peer: gone, op });
            }
            if Instant::now() >= deadline {
                return Err(CollectiveError::Timeout { peer, op });
            }
        }
    }

    /// In-place sum of `buf` over all ranks. `ring` is only watched for hang-ups.
    ///
    /// Publishes, reduces and gathers chunks as soon as their dependencies allow, and
    /// blocks only when nothing can move, on the oldest dependency.
    pub(crate) fn all_reduce(
        &mut self,
        buf: &mut [f32],
        ring: &TcpRing,
    ) -> Result<(), CollectiveError> {
        let started = Instant::now();
        let mut waited = Duration::ZERO;
        let mode = write_mode::mode_for(
            self.header_word(WRITE_MODE_AT).load(Ordering::Relaxed),
            buf.len(),
        );
        let total = buf.len() as u64;
        let chunk = self.layout.chunk;
        // At least one (empty) chunk, so the ranks meet and compare lengths.
        let chunks = buf.len().div_ceil(chunk).max(1) as u32;
        let first = self.chunks_done;
        let positions = self.layout.positions as u32;
        let len = buf.len();
        let span = |i: u32| {
            let start = (i as usize * chunk).min(len);
            start..(start + chunk).min(len)
        };
        // Chunks of this operation through each step.
        let (mut published, mut reduced, mut gathered) = (0u32, 0u32, 0u32);
        while gathered < chunks {
            let mut moved = false;
            // A position is free once every peer has gathered its previous chunk.
            while published < chunks
                && self.all_reached(
                    Counter::Gathered,
                    (first + published + 1).wrapping_sub(positions),
                )
            {
                self.publish(first + published, &buf[span(published)], total, mode);
                published += 1;
                moved = true;
            }
            while reduced < published && self.all_reached(Counter::Published, first + reduced + 1) {
                self.reduce(first + reduced, &mut buf[span(reduced)], total, mode)?;
                reduced += 1;
                moved = true;
            }
            while gathered < reduced && self.all_reached(Counter::Reduced, first + gathered + 1) {
                self.gather(first + gathered, &mut buf[span(gathered)]);
                gathered += 1;
                moved = true;
            }
            if !moved {
                let blocked = Instant::now();
                if gathered < reduced {
                    self.wait_all(ring, Counter::Reduced, first + gathered + 1)?;
                } else if reduced < published {
                    self.wait_all(ring, Counter::Published, first + reduced + 1)?;
                } else {
                    let target = (first + published + 1).wrapping_sub(positions);
                    self.wait_all(ring, Counter::Gathered, target)?;
                }
                waited += blocked.elapsed();
            }
        }
        self.chunks_done = first.wrapping_add(chunks);
        if self.rank == 0 {
            let work = started.elapsed().saturating_sub(waited);
            self.learner.record(mode, len, work);
            let modes = self.learner.modes();
            self.header_word(WRITE_MODE_AT)
                .store(modes, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Copies every segment of chunk `j` except our own into our slot.
    fn publish(&self, j: u32, data: &[f32], total: u64, mode: WriteMode) {
        let seg = Segments::new(data.len(), self.world, data.len());
        for c in self.others() {
            let range = seg.segment(c);
            // SAFETY: peers finished with this position (the caller waited) and read this
            // range only after we post `Published` below.
            let dst = unsafe { self.own_slot(j, &range) };
            write_mode::copy(&data[range], dst, mode);
        }
        self.op_len(self.rank, j).store(total, Ordering::Relaxed);
        self.post(Counter::Published, j.wrapping_add(1));
    }

    /// Sums our segment of chunk `j` over all ranks in rank order (x0 + x1 + ...) into
    /// `data`, and copies it into our slot for the others to gather.
    fn reduce(
        &mut self,
        j: u32,
        data: &mut [f32],
        total: u64,
        mode: WriteMode,
    ) -> Result<(), CollectiveError> {
        for q in self.others() {
            let theirs = self.op_len(q, j).load(Ordering::Relaxed);
            if theirs != total {
                return Err(CollectiveError::Protocol {
                    peer: q,
                    op: "all_reduce",
                    reason: format!("{theirs} elements there, {total} here"),
                });
            }
        }
        let (r, n) = (self.rank, self.world);
        let range = Segments::new(data.len(), n, data.len()).segment(r);
        let mine = &mut data[range.clone()];
        // SAFETY (all `slot` calls): rank q published chunk j (the caller waited) and leaves
        // it until every rank has gathered it.
        if n == 2 {
            // x0 + x1 == x1 + x0 exactly, so either rank can add in place.
            let theirs = unsafe { self.slot(1 - r, j, &range) };
            for (a, b) in mine.iter_mut().zip(theirs) {
                *a += *b;
            }
        } else {
            let mut acc = std::mem::take(&mut self.scratch);
            acc.clear();
            let term = |q: usize| {
                if q == r {
                    &*mine
                } else {
                    unsafe { self.slot(q, j, &range) }
                }
            };
            acc.extend_from_slice(term(0));
            for q in 1..n {
                for (a, b) in acc.iter_mut().zip(term(q)) {
                    *a += *b;
                }
            }
            mine.copy_from_slice(&acc);
            self.scratch = acc;
        }
        // SAFETY: our own segment of our slot, which peers read only after we post.
        write_mode::copy(mine, unsafe { self.own_slot(j, &range) }, mode);
        self.post(Counter::Reduced, j.wrapping_add(1));
        Ok(())
    }

    /// Copies every other rank's reduced segment of chunk `j` into `data`.
    fn gather(&self, j: u32, data: &mut [f32]) {
        let seg = Segments::new(data.len(), self.world, data.len());
        for c in self.others() {
            let range = seg.segment(c);
            // SAFETY: rank c reduced chunk j (the caller waited) and leaves it until every
            // rank has gathered it.
            data[range.clone()].copy_from_slice(unsafe { self.slot(c, j, &range) });
        }
        self.post(Counter::Gathered, j.wrapping_add(1));
    }
}

/// `value` has reached `target`, for counters that wrap around.
fn reached(value: u32, target: u32) -> bool {
    value.wrapping_sub(target) as i32 >= 0
}

/// Sleeps while `word` holds `expected`, at most `timeout`. A shared (not process-private)
/// futex: the word lives in a mapping other processes share.
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT on a valid aligned u32 with a valid timespec; spurious returns are
    // handled by the caller's loop.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE on a valid aligned u32.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}
