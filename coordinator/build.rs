//! The coordinator's build id: a digest of every source that decides how a coordinator
//! behaves (this crate, the crates it builds on, the protocol, the locked dependencies).
//! `ferry` and `ferry-coordinator` embed the same id exactly when they would run the same
//! coordinator, so `ferry launch` can tell a `ferry-coordinator` left from an older build.

use std::hash::Hasher;
use std::path::{Path, PathBuf};

/// Relative to this crate's directory.
const SOURCES: &[&str] = &[
    "src",
    "Cargo.toml",
    "../spec/src",
    "../spec/Cargo.toml",
    "../dataset/src",
    "../dataset/Cargo.toml",
    "../rpc/src",
    "../rpc/build.rs",
    "../rpc/Cargo.toml",
    "../proto",
    "../Cargo.lock",
];

fn files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .map(|e| e.expect("directory entry").path())
            .collect();
        entries.sort();
        for e in entries {
            files(&e, out);
        }
    } else if path.is_file() {
        out.push(path.to_path_buf());
    }
}

fn main() {
    let mut all = Vec::new();
    for s in SOURCES {
        println!("cargo:rerun-if-changed={s}");
        files(Path::new(s), &mut all);
    }
    // FNV-1a over each file's path and bytes: stable across toolchains, unlike std's hasher.
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    for f in &all {
        h.write(f.to_string_lossy().as_bytes());
        h.write(&std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display())));
    }
    // A compile-time name for env!(), not a variable anyone sets: hence no FERRY_ prefix,
    // which the deploy checks reserve for what the binaries read at run time.
    println!("cargo:rustc-env=COORDINATOR_BUILD_ID={:016x}", h.finish());
}

struct Fnv(u64);

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}
