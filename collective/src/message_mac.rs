//! Authentication of every ring message after the handshake.
//!
//! The handshake proves who is at the other end of a connection; this keeps it so for the
//! bytes that follow. Each direction of each link has its own key, derived from the job token
//! and both handshake nonces (so it is fresh per connection and never crosses the network),
//! and counts its messages. A message travels as its bytes followed by a 32-byte tag:
//!
//! ```text
//! tag = BLAKE3-keyed(key, message number (u64 LE) | bytes)
//! ```
//!
//! The receiver computes the same tag and compares in constant time. A host on the path that
//! alters, drops, reorders, replays or injects a message makes the comparison fail, and the
//! operation fails with a protocol error instead of summing its bytes. Data is authenticated,
//! not encrypted: gradients stay readable on the path.

use super::CollectiveError;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes of the tag that follows every message.
pub(crate) const TAG_BYTES: usize = blake3::OUT_LEN;

/// The key of one direction of one link, from the handshake.
pub(crate) type LinkKey = [u8; blake3::KEY_LEN];

/// One direction of one link: the sender seals, the receiver verifies. Both ends count the
/// messages, so a message is bound to its place in the stream. `None` keys (the group turned
/// message authentication off) send bytes alone.
pub(crate) struct MessageMac {
    key: Option<LinkKey>,
    next: AtomicU64,
}

impl MessageMac {
    pub(crate) fn new(key: Option<LinkKey>) -> Self {
        MessageMac {
            key,
            next: AtomicU64::new(0),
        }
    }

    /// The tag of message number `number` with bytes `bytes`.
    pub(crate) fn tag(key: &LinkKey, number: u64, bytes: &[u8]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(key);
        h.update(&number.to_le_bytes());
        h.update(bytes);
        h.finalize()
    }

    /// Writes `bytes` and their tag.
    pub(crate) fn send(&self, mut w: impl Write, bytes: &[u8]) -> std::io::Result<()> {
        w.write_all(bytes)?;
        if let Some(key) = &self.key {
            let number = self.next.fetch_add(1, Ordering::Relaxed);
            w.write_all(Self::tag(key, number, bytes).as_bytes())?;
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes and their tag, and checks the tag. On a mismatch the
    /// bytes in `buf` are not to be used: the operation fails.
    pub(crate) fn receive(
        &self,
        mut r: impl Read,
        buf: &mut [u8],
        peer: usize,
        op: &'static str,
    ) -> Result<(), CollectiveError> {
        r.read_exact(buf)
            .map_err(|e| CollectiveError::from_socket(e, peer, op))?;
        self.verify(r, buf, peer, op)
    }

    /// Reads the tag of `bytes`, already read from `r`, and checks it.
    pub(crate) fn verify(
        &self,
        mut r: impl Read,
        bytes: &[u8],
        peer: usize,
        op: &'static str,
    ) -> Result<(), CollectiveError> {
        let Some(key) = &self.key else {
            return Ok(());
        };
        let mut got = [0u8; TAG_BYTES];
        r.read_exact(&mut got)
            .map_err(|e| CollectiveError::from_socket(e, peer, op))?;
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        // `Hash`'s equality is constant-time.
        if Self::tag(key, number, bytes) != blake3::Hash::from_bytes(got) {
            return Err(CollectiveError::Protocol {
                peer,
                op,
                reason: format!(
                    "message #{number} ({} bytes) failed authentication: it was altered, \
                     dropped, reordered or injected on the path",
                    bytes.len()
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(mac: &MessageMac, messages: &[&[u8]]) -> Vec<u8> {
        let mut wire = Vec::new();
        for m in messages {
            mac.send(&mut wire, m).expect("write to a Vec");
        }
        wire
    }

    fn receive_all(mac: &MessageMac, mut wire: &[u8], lens: &[usize]) -> Result<(), String> {
        for &len in lens {
            let mut buf = vec![0u8; len];
            mac.receive(&mut wire, &mut buf, 1, "test")
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    #[test]
    fn messages_verify_in_order_and_any_change_fails() {
        let key = [7u8; 32];
        let wire = sealed(&MessageMac::new(Some(key)), &[b"first", b"second"]);
        receive_all(&MessageMac::new(Some(key)), &wire, &[5, 6]).expect("unaltered");

        // Any flipped bit, in a message or in a tag.
        for i in 0..wire.len() {
            let mut bad = wire.clone();
            bad[i] ^= 0x10;
            let e = receive_all(&MessageMac::new(Some(key)), &bad, &[5, 6])
                .expect_err("a flipped bit must fail");
            assert!(e.contains("failed authentication"), "{e}");
        }
        // A replayed first message in place of the second, and swapped messages.
        let first = sealed(&MessageMac::new(Some(key)), &[b"first"]);
        let replayed = [first.clone(), first].concat();
        assert!(receive_all(&MessageMac::new(Some(key)), &replayed, &[5, 5]).is_err());
        let swapped = sealed(&MessageMac::new(Some(key)), &[b"second", b"first"]);
        let mut ok = MessageMac::new(Some(key));
        ok.next = AtomicU64::new(1); // "second" sealed as message #0 arrives where #1 belongs
        assert!(receive_all(&ok, &swapped, &[6]).is_err());
        // Another link's key.
        assert!(receive_all(&MessageMac::new(Some([8u8; 32])), &wire, &[5, 6]).is_err());
    }

    #[test]
    fn without_a_key_only_the_bytes_travel() {
        let plain = MessageMac::new(None);
        let wire = sealed(&plain, &[b"abc"]);
        assert_eq!(wire, b"abc");
        receive_all(&plain, &wire, &[3]).expect("plain");
    }
}
