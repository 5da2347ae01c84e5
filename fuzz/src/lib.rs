//! Helpers shared by the fuzz targets in `fuzz_targets/`.

use std::path::{Path, PathBuf};

/// Separates the files of a multi-file input (`shard_manifest`, `checkpoint_load`): the
/// input is the files' bytes joined by this line. Seeds in `fuzz/seeds/` are written so.
pub const PART_SEPARATOR: &[u8] = b"\n%%%%\n";

/// The input cut at every [`PART_SEPARATOR`].
pub fn split_parts(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(at) = rest
        .windows(PART_SEPARATOR.len())
        .position(|w| w == PART_SEPARATOR)
    {
        parts.push(&rest[..at]);
        rest = &rest[at + PART_SEPARATOR.len()..];
    }
    parts.push(rest);
    parts
}

/// A scratch directory for one target process, in memory (`/dev/shm`) where there is one:
/// targets that read files write each input there.
pub fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    tempfile::Builder::new()
        .prefix("ferry-fuzz-")
        .tempdir_in(base)
        .expect("a scratch directory")
}

/// Writes `files` (name, bytes) into `dir` and removes every other file there, so each input
/// sees exactly its own files. `None` bytes: the file is absent.
pub fn write_files(dir: &Path, files: &[(&str, Option<&[u8]>)]) {
    for entry in std::fs::read_dir(dir).expect("read the scratch directory") {
        let path: PathBuf = entry.expect("a directory entry").path();
        if !files
            .iter()
            .any(|(name, _)| path.file_name() == Some(name.as_ref()))
        {
            let _ = std::fs::remove_file(&path).or_else(|_| std::fs::remove_dir_all(&path));
        }
    }
    for (name, bytes) in files {
        let path = dir.join(name);
        match bytes {
            Some(b) => std::fs::write(&path, b).expect("write a scratch file"),
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// With `FERRY_FUZZ_DEBUG` set, prints why an input was refused: to check that seeds get as
/// far as they should (`cargo fuzz run <target> fuzz/seeds/<target> -- -runs=0`).
pub fn debug(what: impl std::fmt::Display) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("FERRY_FUZZ_DEBUG").is_some()) {
        eprintln!("fuzz: {what}");
    }
}
