//! Durable file writes and checksums: every file ferry writes for later is written to a temp
//! file in the same directory, flushed to disk and renamed, so a crash leaves either the old
//! file or the new one, never half of one.

use crate::error::{EngineError, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::Path;

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        EngineError::io(path, e)
    })?;
    // The rename itself, made durable. Best effort: some file systems cannot sync a directory,
    // and the new file is complete either way.
    let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    Ok(())
}

/// Whether `a` and `b` name one existing file: the same path however spelled (`./x` and `x`),
/// through symlinks, or (on Unix) hard links to one inode. A path not there yet is no file.
pub fn same_file(a: &Path, b: &Path) -> bool {
    let (Ok(ca), Ok(cb)) = (a.canonicalize(), b.canonicalize()) else {
        return false;
    };
    if ca == cb {
        return true;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(ma), Ok(mb)) = (std::fs::metadata(&ca), std::fs::metadata(&cb)) {
            return ma.dev() == mb.dev() && ma.ino() == mb.ino();
        }
    }
    false
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| EngineError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Flushes a directory's entries (the renames inside it) to disk.
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| EngineError::io(dir, e))
}

pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| EngineError::file(path, format!("invalid JSON: {e}")))
}

pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| EngineError::file(path, e))?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The entries of `dir`, sorted: what a test expects to be left after a write.
    pub(crate) fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn same_file_sees_through_spellings_and_links() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a.csv");
        std::fs::write(&a, "x").unwrap();
        assert!(same_file(&a, &a));
        assert!(same_file(&a, &tmp.path().join(".").join("a.csv")));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&a, tmp.path().join("link.csv")).unwrap();
            assert!(same_file(&a, &tmp.path().join("link.csv")));
            std::fs::hard_link(&a, tmp.path().join("hard.csv")).unwrap();
            assert!(same_file(&a, &tmp.path().join("hard.csv")));
        }
        std::fs::write(tmp.path().join("b.csv"), "x").unwrap();
        assert!(!same_file(&a, &tmp.path().join("b.csv")));
        // A file not there yet is no other file.
        assert!(!same_file(&a, &tmp.path().join("new.csv")));
        assert!(!same_file(&tmp.path().join("new.csv"), &a));
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temporary() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("out.csv");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(names(tmp.path()), ["out.csv"]);
        // Into a missing directory: an error naming the file, nothing written.
        let err = write_atomic(&tmp.path().join("missing/out.csv"), b"x").unwrap_err();
        assert!(err.to_string().contains("missing/out.csv"), "{err}");
    }
}
