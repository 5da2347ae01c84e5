//! Socket settings, byte views of float buffers and the small header that opens every TCP
//! operation, so ranks that disagree about the operation fail instead of misreading data.

use super::CollectiveError;
use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Kernel socket buffers for data connections: large enough that a sender rarely stalls on a
/// full buffer while its peer is busy summing a piece.
const SOCKET_BUFFER_BYTES: libc::c_int = 8 << 20;

pub(crate) fn configure_data_socket(s: &TcpStream, timeout: Duration) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    set_buffer(s, libc::SO_SNDBUF)?;
    set_buffer(s, libc::SO_RCVBUF)
}

fn set_buffer(s: &TcpStream, option: libc::c_int) -> io::Result<()> {
    let size = SOCKET_BUFFER_BYTES;
    // SAFETY: plain setsockopt on a socket we own, with a correctly sized int argument.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// True when the peer has closed or reset the connection. Unread data is not a hang-up: the
/// peer may already have started the next operation.
pub(crate) fn hung_up(s: &TcpStream) -> bool {
    let mut fd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let rc = unsafe { libc::poll(&mut fd, 1, 0) };
    rc > 0 && fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// How all-reduce data travels on the TCP ring (the header's detail, so ranks that disagree
/// fail at once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    F32 = 0,
    Bf16 = 1,
}

/// float32 to bfloat16, rounding to nearest even; NaN stays NaN.
pub(crate) fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

pub(crate) fn from_bf16(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

pub(crate) fn u16_bytes(v: &[u16]) -> &[u8] {
    // SAFETY: u16 has no padding; the byte view covers exactly the same memory.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

pub(crate) fn u16_bytes_mut(v: &mut [u16]) -> &mut [u8] {
    // SAFETY: as above; every bit pattern is a valid u16.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

pub(crate) fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding; u8 has alignment 1; same length in bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

pub(crate) fn f32_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above, and every bit pattern is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), std::mem::size_of_val(v)) }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub(crate) enum OpKind {
    AllReduce = 1,
    Broadcast = 2,
    AllGather = 3,
}

impl OpKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            OpKind::AllReduce => "all_reduce",
            OpKind::Broadcast => "broadcast",
            OpKind::AllGather => "all_gather",
        }
    }
}

/// Opens each transfer: which operation, its sequence number in this group, a per-kind
/// detail (broadcast root, all-gather block owner) and the payload length in bytes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct OpHeader {
    pub kind: OpKind,
    pub seq: u64,
    pub detail: u32,
    pub len: u64,
}

const HEADER_MAGIC: [u8; 3] = *b"FRO";
pub(crate) const HEADER_BYTES: usize = 24;

impl OpHeader {
    pub(crate) fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[..3].copy_from_slice(&HEADER_MAGIC);
        b[3] = self.kind as u8;
        b[4..8].copy_from_slice(&self.detail.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Checks the peer's header `b` against ours. `detail` and `len` are compared only when
    /// `exact` (all-gather blocks carry their own owner and length).
    pub(crate) fn check(
        &self,
        b: &[u8; HEADER_BYTES],
        peer: usize,
        exact: bool,
    ) -> Result<OpHeader, CollectiveError> {
        let op = self.kind.name();
        let mismatch = |reason: String| CollectiveError::Protocol { peer, op, reason };
        if b[..3] != HEADER_MAGIC {
            return Err(mismatch("not an operation header".into()));
        }
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        let seq = u64_at(8);
        let got = OpHeader {
            kind: self.kind,
            detail: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            seq,
            len: u64_at(16),
        };
        if b[3] != self.kind as u8 || seq != self.seq {
            return Err(mismatch(format!(
                "peer is at operation #{seq} kind {}, this rank at #{} {op}",
                b[3], self.seq
            )));
        }
        if exact && (got.detail != self.detail || got.len != self.len) {
            return Err(mismatch(format!(
                "peer has length {} bytes / detail {}, this rank {} / {}",
                got.len, got.detail, self.len, self.detail
            )));
        }
        Ok(got)
    }
}
