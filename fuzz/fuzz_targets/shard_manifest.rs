//! Prepared data: a manifest, shard files and split indexes of the fuzzer's choosing, read as
//! training reads them (`Manifest::load`, `TokenSplit::open` with and without checksums, then
//! windows and token ranges). Nothing may panic or read out of bounds; an opened split must
//! agree with its manifest.
//!
//! Input: the files' bytes joined by `ferry_fuzz::PART_SEPARATOR`, in the order of `FILES`.

#![no_main]

use ferry_dataset::shards::{Manifest, TokenSplit};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const FILES: [&str; 6] = [
    "manifest.json",
    "train.idx",
    "train-00000.bin",
    "train-00001.bin",
    "val.idx",
    "val-00000.bin",
];

fn scratch() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(ferry_fuzz::scratch_dir)
}

fuzz_target!(|data: &[u8]| {
    let parts = ferry_fuzz::split_parts(data);
    let files: Vec<(&str, Option<&[u8]>)> = FILES
        .iter()
        .enumerate()
        .map(|(i, name)| (*name, parts.get(i).copied()))
        .collect();
    let dir = scratch().path();
    ferry_fuzz::write_files(dir, &files);

    let manifest = match Manifest::load(dir) {
        Ok(m) => m,
        Err(e) => return ferry_fuzz::debug(format!("manifest refused: {e}")),
    };
    for (name, info) in &manifest.splits {
        let checked = TokenSplit::open(dir, name, true);
        if let Err(e) = &checked {
            ferry_fuzz::debug(format!("split {name} with checksums refused: {e}"));
        }
        let split = match TokenSplit::open(dir, name, false) {
            Ok(split) => split,
            Err(e) => {
                assert!(checked.is_err(), "opens with checksums but not without");
                ferry_fuzz::debug(format!("split {name} refused: {e}"));
                continue;
            }
        };
        ferry_fuzz::debug(format!("split {name}: {} tokens", split.len_tokens()));
        assert_eq!(split.len_tokens(), info.tokens);
        for starts in [split.doc_starts(), split.sentence_starts()] {
            assert_eq!(starts.first(), Some(&0));
            assert_eq!(starts.last(), Some(&info.tokens));
            assert!(starts.windows(2).all(|w| w[0] <= w[1]));
        }
        let mut out = Vec::new();
        for seq_len in [1usize, 2, 3, 7, 64] {
            let n = split.num_sequences(seq_len);
            for i in [0, 1, n / 2, n.saturating_sub(1)] {
                if i < n {
                    split
                        .sequence(i, seq_len, &mut out)
                        .unwrap_or_else(|e| panic!("window {i} of {n}: {e}"));
                    assert_eq!(out.len(), seq_len + 1);
                }
            }
            assert!(split.sequence(n, seq_len, &mut out).is_err() || seq_len == 0);
        }
        let total = split.len_tokens();
        for (start, len) in [
            (0, total),
            (total, 0),
            (total / 3, 5),
            (total, 1),
            (u64::MAX, 2),
        ] {
            let r = split.tokens(start, len as usize, &mut out);
            let fits = start.checked_add(len).is_some_and(|end| end <= total);
            assert_eq!(r.is_ok(), fits, "tokens({start}, {len}) of {total}");
            if fits {
                assert_eq!(out.len() as u64, len);
            }
        }
    }
});
