//! Prepares the real shared corpus (WikiText valid/test and the Gutenberg books). Skipped, with
//! a message, where the data folder is absent.

use std::path::PathBuf;
use std::time::Instant;

use ferry_dataset::prepare::{prepare, PrepareOptions};
use ferry_dataset::shards::TokenSplit;
use ferry_dataset::tokenizer::load_tokenizer;

fn data_dir() -> PathBuf {
    std::env::var_os("FERRY_DATA_DIR").map_or_else(
        || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data")),
        PathBuf::from,
    )
}

#[test]
fn prepares_the_shared_corpus() {
    let data = data_dir();
    let (wikitext, books) = (data.join("wikitext"), data.join("books"));
    // The shared corpus is beside every checkout, CI's included: its absence is a failure
    // to report, not a reason to pass.
    assert!(
        wikitext.is_dir() && books.is_dir(),
        "no corpus at {}: this test reads the shared WikiText and books (set FERRY_DATA_DIR, \
         or fetch them with `ferry data fetch --data-dir DIR`)",
        data.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("prepared");
    let opts = PrepareOptions {
        inputs: vec![wikitext.display().to_string(), books.display().to_string()],
        output: out.clone(),
        vocab_size: 8192,
        ..Default::default()
    };
    let started = Instant::now();
    let manifest = prepare(&opts).unwrap();
    let elapsed = started.elapsed();

    let (train, val) = (&manifest.splits["train"], &manifest.splits["val"]);
    println!(
        "prepared {} files in {elapsed:.1?}: train {} tokens / {} docs / {} sentences, \
         val {} tokens / {} docs / {} sentences, vocab {}",
        manifest.sources.len(),
        train.tokens,
        train.documents,
        train.sentences,
        val.tokens,
        val.documents,
        val.sentences,
        manifest.vocab_size,
    );
    assert_eq!(manifest.sources.len(), 19);
    assert_eq!(manifest.vocab_size, 8192);
    assert!(train.documents + val.documents > 100);
    assert!(train.tokens > 1_000_000, "{} train tokens", train.tokens);
    assert!(val.tokens > 10_000, "{} val tokens", val.tokens);
    // About 10 MB of English: byte-level BPE with 8k merges gives 3 to 5 bytes per token.
    let bytes: u64 = manifest.sources.iter().map(|s| s.bytes).sum();
    let per_token = bytes as f64 / (train.tokens + val.tokens) as f64;
    assert!(
        (2.5..6.0).contains(&per_token),
        "{per_token} bytes per token"
    );

    let reader = TokenSplit::open(&out, "val", true).unwrap();
    let tokenizer = load_tokenizer(&out.join("tokenizer.json")).unwrap();
    let mut tokens = Vec::new();
    reader.sequence(0, 64, &mut tokens).unwrap();
    let ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
    let text = tokenizer.decode(&ids, false).unwrap();
    println!("val starts: {text:?}");
    assert!(text.split_whitespace().count() > 20, "{text:?}");
}
