//! The digests of a file, computed in one pass.

use std::io::{Read, Write};
use std::path::Path;

use sha1::Sha1;
use sha2::{Digest as _, Sha256};

use crate::{io, FetchError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Digest {
    pub sha256: String,
    pub sha1: String,
    pub bytes: u64,
}

/// A writer that hashes what passes through it.
pub(crate) struct Hashing<W> {
    inner: W,
    sha256: Sha256,
    sha1: Sha1,
    bytes: u64,
}

impl<W: Write> Hashing<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            sha256: Sha256::new(),
            sha1: Sha1::new(),
            bytes: 0,
        }
    }

    pub fn finish(self) -> (W, Digest) {
        let digest = Digest {
            sha256: hex::encode(self.sha256.finalize()),
            sha1: hex::encode(self.sha1.finalize()),
            bytes: self.bytes,
        };
        (self.inner, digest)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha256.update(&buf[..n]);
        self.sha1.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Digest {
    pub fn of_file(path: &Path) -> Result<Self, FetchError> {
        let mut file = std::fs::File::open(path).map_err(|e| io(path, e))?;
        let mut hashing = Hashing::new(std::io::sink());
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = file.read(&mut buf).map_err(|e| io(path, e))?;
            if n == 0 {
                break;
            }
            hashing.write_all(&buf[..n]).map_err(|e| io(path, e))?;
        }
        Ok(hashing.finish().1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_match_the_published_test_vectors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        std::fs::write(&path, b"abc").unwrap();
        let d = Digest::of_file(&path).unwrap();
        assert_eq!(
            d.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.sha1, "a9993e364706816aba3e25717850c26c9cd0d89d");
        assert_eq!(d.bytes, 3);
    }
}
