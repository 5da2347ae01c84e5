//! `prepare` and the shard reader on a small synthetic corpus: round trip, format, and the
//! errors for damaged prepared directories.

use std::fs;
use std::path::{Path, PathBuf};

use ferry_dataset::corpus::{expand_inputs, read_documents, Document};
use ferry_dataset::prepare::{prepare, PrepareOptions};
use ferry_dataset::shards::{Manifest, TokenSplit};
use ferry_dataset::tokenizer::{load_tokenizer, train_tokenizer, TokenizerKind, EOS_TOKEN};
use ferry_dataset::DataError;

const WORDS: &[&str] = &[
    "the", "a", "lobster", "storm", "game", "was", "is", "in", "of", "and", "sea", "red", "blue",
    "formed", "played", "over", "Atlantic", "café", "naïve", "1", "@.@", "5", ",", "\"", "'s",
];

/// Deterministic pseudo-random sentences.
struct Words(u64);

impl Words {
    fn sentence(&mut self) -> String {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let len = 3 + (self.0 >> 60) as usize;
        let mut words = Vec::new();
        for _ in 0..len {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            words.push(WORDS[(self.0 >> 33) as usize % WORDS.len()]);
        }
        words.join(" ") + " ."
    }
}

/// A corpus directory with a book (two chapters, one over 200 lines) and a WikiText file with
/// three articles: 3 + 3 = 6 documents.
fn write_corpus(dir: &Path) -> PathBuf {
    let corpus = dir.join("corpus");
    fs::create_dir(&corpus).unwrap();
    let mut words = Words(7);
    let mut book = String::from("[ A Book by Someone 1900 ]\nCHAPTER I\n");
    for _ in 0..40 {
        book += &(words.sentence() + "\n");
    }
    book += "CHAPTER II\n";
    for _ in 0..250 {
        book += &(words.sentence() + "\n");
    }
    fs::write(corpus.join("book.txt"), book).unwrap();
    let mut wiki = String::from(" \n");
    for title in ["First", "Second", "Third"] {
        wiki += &format!(" = {title} = \n \n");
        for _ in 0..12 {
            let paragraph: Vec<String> = (0..4).map(|_| words.sentence()).collect();
            wiki += &format!(" {} \n \n = = Part = = \n \n", paragraph.join(" "));
        }
    }
    fs::write(corpus.join("wiki.tokens"), wiki).unwrap();
    corpus
}

fn options(corpus: &Path, output: &Path) -> PrepareOptions {
    PrepareOptions {
        inputs: vec![corpus.display().to_string()],
        output: output.to_path_buf(),
        vocab_size: 400,
        val_fraction: 0.3,
        seed: 3,
        shard_tokens: 500,
        ..Default::default()
    }
}

/// A prepared directory in a fresh temporary directory.
fn prepared() -> (tempfile::TempDir, PathBuf, Manifest) {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = write_corpus(tmp.path());
    let out = tmp.path().join("prepared");
    let manifest = prepare(&options(&corpus, &out)).unwrap();
    (tmp, out, manifest)
}

fn all_documents(corpus: &Path) -> Vec<Document> {
    let paths = expand_inputs(&[corpus.display().to_string()]).unwrap();
    paths
        .iter()
        .flat_map(|p| read_documents(p).unwrap())
        .collect()
}

#[test]
fn round_trip_restores_every_document_and_sentence() {
    let (tmp, out, manifest) = prepared();
    let originals = all_documents(&tmp.path().join("corpus"));
    assert_eq!(originals.len(), 6);
    let tokenizer = load_tokenizer(&out.join("tokenizer.json")).unwrap();
    let eos = i64::from(manifest.eos_token_id);
    assert_eq!(
        tokenizer.token_to_id(EOS_TOKEN),
        Some(manifest.eos_token_id)
    );

    let mut decoded_all = Vec::new();
    for split in ["train", "val"] {
        let reader = TokenSplit::open(&out, split, true).unwrap();
        let info = &manifest.splits[split];
        assert!(info.documents > 0, "{split} is empty");
        let docs = reader.doc_starts();
        let sents = reader.sentence_starts();
        assert_eq!(docs.len() as u64, info.documents + 1);
        assert_eq!(sents.len() as u64, info.sentences + 1);
        assert_eq!(*docs.last().unwrap(), reader.len_tokens());

        let mut decoded = Vec::new();
        let mut tokens = Vec::new();
        let mut s = 0;
        for d in 0..docs.len() - 1 {
            reader
                .tokens(docs[d], (docs[d + 1] - docs[d]) as usize, &mut tokens)
                .unwrap();
            assert_eq!(
                tokens.last(),
                Some(&eos),
                "document {d} does not end in EOS"
            );
            let ids: Vec<u32> = tokens[..tokens.len() - 1]
                .iter()
                .map(|&t| t as u32)
                .collect();
            let text = tokenizer.decode(&ids, false).unwrap();
            // Each line of the document begins at a sentence start.
            assert_eq!(sents[s], docs[d]);
            let mut lines = Vec::new();
            while sents[s] < docs[d + 1] {
                reader
                    .tokens(sents[s], (sents[s + 1] - sents[s]) as usize, &mut tokens)
                    .unwrap();
                let ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
                let line = tokenizer.decode(&ids, true).unwrap();
                lines.push(line.strip_suffix('\n').unwrap_or(&line).to_owned());
                s += 1;
            }
            assert_eq!(lines.join("\n"), text);
            decoded.push(lines);
        }
        assert_eq!(s, sents.len() - 1);
        // Input order is kept within a split.
        let mut rest = originals.iter();
        for lines in &decoded {
            assert!(
                rest.any(|doc| &doc.lines == lines),
                "{split} has a document out of order or changed: {lines:?}"
            );
        }
        decoded_all.extend(decoded);
    }
    // Together, the splits hold every document exactly once.
    let mut expected: Vec<Vec<String>> = originals.into_iter().map(|d| d.lines).collect();
    expected.sort();
    decoded_all.sort();
    assert_eq!(decoded_all, expected);
}

#[test]
fn manifest_and_files_on_disk() {
    let (_tmp, out, manifest) = prepared();
    assert_eq!(Manifest::load(&out).unwrap(), manifest);
    assert_eq!(manifest.format, "ferry-shards");
    assert_eq!(manifest.tokenizer_kind, "byte_level_bpe");
    assert!(manifest.vocab_size <= 400 && manifest.vocab_size > 257);
    assert_eq!(manifest.token_bytes, 2);
    assert_eq!(manifest.sources.len(), 2);
    assert_eq!(
        manifest.sources.iter().map(|s| s.documents).sum::<u64>(),
        manifest.splits.values().map(|s| s.documents).sum::<u64>()
    );

    let train = &manifest.splits["train"];
    assert!(train.shards.len() > 1, "expected several 500-token shards");
    let reader = TokenSplit::open(&out, "train", false).unwrap();
    for (i, shard) in train.shards.iter().enumerate() {
        assert_eq!(shard.file, format!("train-{i:05}.bin"));
        let bytes = fs::read(out.join(&shard.file)).unwrap();
        assert_eq!(bytes.len() as u64, shard.tokens * 2);
        assert!(shard.tokens <= 500);
    }
    // Raw little-endian u16, no header.
    let bytes = fs::read(out.join("train-00001.bin")).unwrap();
    let mut tokens = Vec::new();
    reader
        .tokens(train.shards[0].tokens, 4, &mut tokens)
        .unwrap();
    let on_disk: Vec<i64> = bytes[..8]
        .chunks(2)
        .map(|b| i64::from(u16::from_le_bytes([b[0], b[1]])))
        .collect();
    assert_eq!(tokens, on_disk);

    let index = fs::read(out.join("train.idx")).unwrap();
    assert_eq!(&index[..8], b"FERRYIDX");
    assert_eq!(index[8..16], [1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        index.len() as u64,
        32 + 8 * (train.documents + train.sentences + 2)
    );
    // Only the final directory is left: no staging or old copies.
    let names: Vec<_> = fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn sequence_windows_are_contiguous_across_shards() {
    let (_tmp, out, _) = prepared();
    let reader = TokenSplit::open(&out, "train", false).unwrap();
    let seq_len = 64;
    let n = reader.num_sequences(seq_len);
    assert_eq!(n, (reader.len_tokens() - 1) / seq_len as u64);
    assert!(n > 10);
    let (mut a, mut b, mut all) = (Vec::new(), Vec::new(), Vec::new());
    reader
        .tokens(0, reader.len_tokens() as usize, &mut all)
        .unwrap();
    for i in 0..n {
        reader.sequence(i, seq_len, &mut a).unwrap();
        assert_eq!(a.len(), seq_len + 1);
        let start = i as usize * seq_len;
        assert_eq!(a[..], all[start..start + seq_len + 1]);
        if i + 1 < n {
            reader.sequence(i + 1, seq_len, &mut b).unwrap();
            assert_eq!(
                a.last(),
                b.first(),
                "windows {i} and {} do not touch",
                i + 1
            );
        }
    }
    let err = reader.sequence(n, seq_len, &mut a).unwrap_err();
    assert!(matches!(err, DataError::OutOfRange { .. }), "{err:?}");
    assert!(reader.sequence(u64::MAX, seq_len, &mut a).is_err());
    assert!(reader.tokens(u64::MAX, 2, &mut a).is_err());
    assert_eq!(reader.num_sequences(0), 0);
}

#[test]
fn same_inputs_give_the_same_files() {
    let (tmp, out, manifest) = prepared();
    let corpus = tmp.path().join("corpus");
    // Again, replacing the first run's directory.
    let again = prepare(&options(&corpus, &out)).unwrap();
    assert_eq!(again, manifest);
    // With the saved tokenizer instead of training.
    let saved = tmp.path().join("saved.json");
    fs::copy(out.join("tokenizer.json"), &saved).unwrap();
    let mut opts = options(&corpus, &tmp.path().join("loaded"));
    opts.tokenizer = Some(saved);
    let loaded = prepare(&opts).unwrap();
    assert_eq!(loaded.splits, manifest.splits);
    assert_eq!(loaded.tokenizer_sha256, manifest.tokenizer_sha256);
    // Another seed moves documents between splits.
    let mut opts = options(&corpus, &tmp.path().join("reseeded"));
    opts.seed = 4;
    assert_ne!(prepare(&opts).unwrap().splits, manifest.splits);
}

#[test]
fn tokenizer_training_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = all_documents(&write_corpus(tmp.path()));
    let train = || train_tokenizer(TokenizerKind::ByteLevelBpe, &docs, 500, false).unwrap();
    let (a, b) = (train(), train());
    assert_eq!(a.get_vocab(true), b.get_vocab(true));
    assert_eq!(
        serde_json::to_string(&a).unwrap(),
        serde_json::to_string(&b).unwrap()
    );
    assert_eq!(a.token_to_id(EOS_TOKEN), Some(0));
    // Byte-level: any text round-trips, even characters never seen in training.
    let text = "Zebra 🦓 ünïcödé\n  spaces";
    let ids = a.encode(text, false).unwrap().get_ids().to_vec();
    assert_eq!(a.decode(&ids, false).unwrap(), text);
}

#[test]
fn large_vocabularies_use_four_byte_tokens() {
    let (tmp, out, manifest) = prepared();
    // The same tokenizer with EOS moved to id 70000: ids no longer fit in u16.
    let mut json: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("tokenizer.json")).unwrap()).unwrap();
    json["added_tokens"][0]["id"] = 70_000.into();
    json["model"]["vocab"][EOS_TOKEN] = 70_000.into();
    let big = tmp.path().join("big.json");
    fs::write(&big, json.to_string()).unwrap();
    let mut opts = options(&tmp.path().join("corpus"), &tmp.path().join("big"));
    opts.tokenizer = Some(big);
    let wide = prepare(&opts).unwrap();
    assert_eq!(
        (wide.token_bytes, wide.vocab_size, wide.eos_token_id),
        (4, 70_001, 70_000)
    );

    let narrow = TokenSplit::open(&out, "train", true).unwrap();
    let reader = TokenSplit::open(&tmp.path().join("big"), "train", true).unwrap();
    assert_eq!(reader.len_tokens(), narrow.len_tokens());
    assert_eq!(
        fs::metadata(tmp.path().join("big/train-00000.bin"))
            .unwrap()
            .len(),
        4 * wide.splits["train"].shards[0].tokens
    );
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let n = reader.len_tokens() as usize;
    reader.tokens(0, n, &mut a).unwrap();
    narrow.tokens(0, n, &mut b).unwrap();
    let eos = i64::from(manifest.eos_token_id);
    let expected: Vec<i64> = b
        .iter()
        .map(|&t| if t == eos { 70_000 } else { t })
        .collect();
    assert_eq!(a, expected);
}

fn assert_error_names(err: &DataError, path: &Path) {
    let message = err.to_string();
    assert!(
        message.starts_with(&path.display().to_string()),
        "{message:?} does not start with {path:?}"
    );
    assert!(!message.contains('\n'), "{message:?} is not one line");
}

#[test]
fn truncated_shard_is_caught_without_checksums() {
    let (_tmp, out, _) = prepared();
    let shard = out.join("train-00001.bin");
    let bytes = fs::read(&shard).unwrap();
    fs::write(&shard, &bytes[..bytes.len() - 1]).unwrap();
    let err = TokenSplit::open(&out, "train", false).err().unwrap();
    assert!(
        matches!(err, DataError::Truncated { expected, found, .. } if found + 1 == expected),
        "{err:?}"
    );
    assert_error_names(&err, &shard);
    // The other split is intact.
    TokenSplit::open(&out, "val", true).unwrap();
}

#[test]
fn flipped_byte_fails_the_checksum() {
    let (_tmp, out, _) = prepared();
    let shard = out.join("train-00000.bin");
    let mut bytes = fs::read(&shard).unwrap();
    bytes[10] ^= 0x40;
    fs::write(&shard, &bytes).unwrap();
    // Same size, so only the checksum can tell.
    TokenSplit::open(&out, "train", false).unwrap();
    let err = TokenSplit::open(&out, "train", true).err().unwrap();
    assert!(matches!(err, DataError::Checksum { .. }), "{err:?}");
    assert_error_names(&err, &shard);
}

#[test]
fn corrupted_index_is_rejected() {
    let (_tmp, out, _) = prepared();
    let index = out.join("train.idx");
    let good = fs::read(&index).unwrap();
    type Damage = fn(&mut Vec<u8>);
    let damage: [(&str, Damage); 4] = [
        ("magic", |b| b[0] = b'X'),
        ("version", |b| b[8] = 2),
        ("length", |b| {
            b.pop();
        }),
        // Second document start far past the end: offsets no longer increase to the total.
        ("offset", |b| b[32 + 8 + 7] = 0x7f),
    ];
    for (what, damage) in damage {
        let mut bytes = good.clone();
        damage(&mut bytes);
        fs::write(&index, &bytes).unwrap();
        let err = TokenSplit::open(&out, "train", false).err().unwrap();
        assert!(matches!(err, DataError::Index { .. }), "{what}: {err:?}");
        assert_error_names(&err, &index);
        let err = TokenSplit::open(&out, "train", true).err().unwrap();
        assert!(matches!(err, DataError::Checksum { .. }), "{what}: {err:?}");
    }
}

#[test]
fn bad_manifests_are_rejected() {
    let (tmp, out, _) = prepared();
    let path = out.join("manifest.json");
    let err = TokenSplit::open(&out, "test", false).err().unwrap();
    assert!(matches!(err, DataError::Manifest { .. }), "{err:?}");
    assert!(err.to_string().contains("no split \"test\""), "{err}");

    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, text.replace("\"tokens\":", "\"tokens\" ")).unwrap();
    let err = Manifest::load(&out).unwrap_err();
    assert!(matches!(err, DataError::Manifest { .. }), "{err:?}");
    assert!(err.to_string().contains("line"), "{err}");
    assert_error_names(&err, &path);

    fs::write(&path, text.replace("train-00000.bin", "../train-00000.bin")).unwrap();
    assert!(matches!(
        Manifest::load(&out),
        Err(DataError::Manifest { .. })
    ));

    let err = Manifest::load(tmp.path()).unwrap_err();
    assert!(matches!(err, DataError::Manifest { .. }), "{err:?}");
    assert_error_names(&err, &tmp.path().join("manifest.json"));
}

#[test]
fn missing_tokenizer_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = write_corpus(tmp.path());
    let missing = tmp.path().join("nope/tokenizer.json");
    let mut opts = options(&corpus, &tmp.path().join("out"));
    opts.tokenizer = Some(missing.clone());
    let err = prepare(&opts).unwrap_err();
    assert!(matches!(err, DataError::TokenizerMissing { .. }), "{err:?}");
    assert_error_names(&err, &missing);
    // Nothing is left behind.
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);

    let garbled = tmp.path().join("garbled.json");
    fs::write(&garbled, "{\"model\": 3}").unwrap();
    let err = load_tokenizer(&garbled).unwrap_err();
    assert!(matches!(err, DataError::Tokenizer { .. }), "{err:?}");
    assert_error_names(&err, &garbled);
}

#[test]
fn directory_of_empty_files_is_an_empty_corpus() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("empty-corpus");
    fs::create_dir(&corpus).unwrap();
    fs::write(corpus.join("a.txt"), "").unwrap();
    fs::write(corpus.join("b.txt"), "\n\n").unwrap();
    let err = prepare(&options(&corpus, &tmp.path().join("out"))).unwrap_err();
    assert!(matches!(err, DataError::EmptyCorpus { .. }), "{err:?}");
    assert_error_names(&err, &corpus);
}

#[test]
fn bad_file_stops_prepare() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = write_corpus(tmp.path());
    let bad = corpus.join("zzz.txt");
    fs::write(&bad, b"text\n\xff\n").unwrap();
    let err = prepare(&options(&corpus, &tmp.path().join("out"))).unwrap_err();
    assert!(
        matches!(err, DataError::InvalidUtf8 { line: 2, .. }),
        "{err:?}"
    );
    assert_error_names(&err, &bad);
    // An empty file next to good ones is only recorded.
    fs::write(&bad, "").unwrap();
    let manifest = prepare(&options(&corpus, &tmp.path().join("out"))).unwrap();
    let empty = manifest
        .sources
        .iter()
        .find(|s| s.path.ends_with("zzz.txt"));
    assert_eq!(empty.map(|s| s.documents), Some(0));
}

#[test]
fn refuses_to_overwrite_other_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = write_corpus(tmp.path());
    let out = tmp.path().join("precious");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("notes.txt"), "keep me").unwrap();
    let err = prepare(&options(&corpus, &out)).unwrap_err();
    assert!(matches!(err, DataError::OutputExists { .. }), "{err:?}");
    assert_error_names(&err, &out);
    assert_eq!(
        fs::read_to_string(out.join("notes.txt")).unwrap(),
        "keep me"
    );
    // An empty directory is fine.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    prepare(&options(&corpus, &empty)).unwrap();
    assert!(empty.join("manifest.json").is_file());
}

/// Issue 22: a prepared directory that also holds files `prepare` did not write (notes, the
/// corpus itself, a subdirectory) is not replaced: everything in it stays. Re-preparing a
/// directory that holds only prepare's own files still replaces it.
#[test]
fn refuses_to_replace_a_prepared_directory_holding_other_files() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = write_corpus(tmp.path());
    let out = tmp.path().join("prepared");
    prepare(&options(&corpus, &out)).unwrap();
    prepare(&options(&corpus, &out)).unwrap();
    let manifest = fs::read(out.join("manifest.json")).unwrap();
    for foreign in ["notes.txt", "more-corpus"] {
        let path = out.join(foreign);
        if foreign.contains('.') {
            fs::write(&path, "keep me").unwrap();
        } else {
            fs::create_dir(&path).unwrap();
            fs::write(path.join("book.txt"), "keep me").unwrap();
        }
        let mut opts = options(&corpus, &out);
        opts.seed = 4;
        let err = prepare(&opts).unwrap_err();
        assert!(matches!(err, DataError::OutputExists { .. }), "{err:?}");
        assert_error_names(&err, &out);
        assert!(err.to_string().contains(foreign), "{err}");
        assert_eq!(fs::read(out.join("manifest.json")).unwrap(), manifest);
        if foreign.contains('.') {
            assert_eq!(fs::read_to_string(&path).unwrap(), "keep me");
            fs::remove_file(&path).unwrap();
        } else {
            assert_eq!(
                fs::read_to_string(path.join("book.txt")).unwrap(),
                "keep me"
            );
            fs::remove_dir_all(&path).unwrap();
        }
    }
    // A file where the directory should be is refused too, and kept.
    let file = tmp.path().join("file");
    fs::write(&file, "keep me").unwrap();
    let err = prepare(&options(&corpus, &file)).unwrap_err();
    assert!(matches!(err, DataError::OutputExists { .. }), "{err:?}");
    assert_eq!(fs::read_to_string(&file).unwrap(), "keep me");
}

#[test]
fn invalid_options_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = write_corpus(tmp.path());
    let out = tmp.path().join("out");
    let changes: [fn(&mut PrepareOptions); 5] = [
        |o| o.val_fraction = 1.0,
        |o| o.val_fraction = f64::NAN,
        |o| o.shard_tokens = 0,
        |o| o.vocab_size = 100,
        |o| o.inputs.clear(),
    ];
    let mut bad = Vec::new();
    for change in changes {
        let mut opts = options(&corpus, &out);
        change(&mut opts);
        bad.push(prepare(&opts).unwrap_err());
    }
    for err in bad {
        assert!(matches!(err, DataError::InvalidOption { .. }), "{err:?}");
    }
}

/// WikiText's `<unk>` (its placeholder for the rare words it dropped) is the tokenizer's
/// unknown token, one special id, for every kind: `<unk>` for the BPE kinds, `[UNK]` for
/// WordPiece; never the text "<", "unk", ">" learned as ordinary words.
#[test]
fn wikitext_unk_is_the_unknown_token_for_every_kind() {
    for kind in TokenizerKind::ALL {
        let tmp = tempfile::tempdir().unwrap();
        let corpus = write_corpus(tmp.path());
        let mut wiki = String::from(" \n = Unknown = \n \n");
        for _ in 0..5 {
            wiki += " The <unk> was formed in <unk> , over a <unk> sea . \n \n";
        }
        fs::write(corpus.join("unk.tokens"), wiki).unwrap();
        let out = tmp.path().join("prepared");
        let mut opts = options(&corpus, &out);
        opts.tokenizer_kind = kind;
        let manifest = prepare(&opts).unwrap();
        let tokenizer = load_tokenizer(&out.join("tokenizer.json")).unwrap();
        let unk = tokenizer
            .token_to_id(kind.unknown_token())
            .unwrap_or_else(|| panic!("{kind}: no {} token", kind.unknown_token()));
        let mut count = 0;
        let mut tokens = Vec::new();
        for split in manifest.splits.keys() {
            let reader = TokenSplit::open(&out, split, true).unwrap();
            reader
                .tokens(0, reader.len_tokens() as usize, &mut tokens)
                .unwrap();
            count += tokens.iter().filter(|&&t| t == i64::from(unk)).count();
        }
        assert_eq!(count, 15, "{kind}: every <unk> is one unknown-token id");
    }
}
