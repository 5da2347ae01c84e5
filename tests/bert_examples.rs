//! BERT's pretraining data (issue: GPT and BERT, must-show 3): sentence pairs and the masking
//! rule, on the shared corpora prepared with WordPiece. The rule holds statistically, and the
//! same example index gives the same example in separate processes.

mod support;

use ferry_dataset::sentence_pairs::{
    BertExample, MaskAction, MaskingRule, PairBuilder, SpecialIds, IGNORE_LABEL, IS_NEXT, IS_RANDOM,
};
use ferry_dataset::shards::TokenSplit;
use ferry_dataset::tokenizer::load_tokenizer;
use support::*;

const SEQ_LEN: &str = "128";

fn examples_json(seed: &str, index: u64, count: u64) -> Vec<BertExample> {
    let data = prepared_shared_corpus_for("bert");
    let out = run_ok(
        ferry()
            .args([
                "examples",
                "--json",
                "--model",
                "bert",
                "--seq-len",
                SEQ_LEN,
            ])
            .args(["--seed", seed, "--index", &index.to_string()])
            .args(["--count", &count.to_string(), "--data"])
            .arg(data),
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn special_ids() -> SpecialIds {
    let data = prepared_shared_corpus_for("bert");
    let path = data.join("tokenizer.json");
    SpecialIds::from_tokenizer(&load_tokenizer(&path).unwrap(), &path).unwrap()
}

#[test]
fn masking_rule_holds_statistically() {
    let s = special_ids();
    let examples = examples_json("1234", 0, 3000);
    assert_eq!(examples.len(), 3000);
    let specials = [s.pad, s.unk, s.cls, s.sep, s.mask].map(i64::from);
    let (mut candidates, mut chosen) = (0usize, 0usize);
    let (mut masked, mut random, mut kept, mut random_next) = (0usize, 0usize, 0usize, 0usize);
    for e in &examples {
        // Layout: [CLS] A [SEP] B [SEP] then padding, segment ids 0 then 1.
        let real = e.attention_mask.iter().take_while(|&&m| m == 1).count();
        assert!(
            e.attention_mask[real..].iter().all(|&m| m == 0),
            "#{}",
            e.index
        );
        assert_eq!(e.input_ids[0], i64::from(s.cls), "#{}", e.index);
        assert_eq!(e.input_ids[real - 1], i64::from(s.sep), "#{}", e.index);
        assert!(e.input_ids[real..].iter().all(|&t| t == i64::from(s.pad)));
        let first_sep = (1..real)
            .find(|&i| e.input_ids[i] == i64::from(s.sep) && e.mlm_labels[i] == IGNORE_LABEL)
            .unwrap();
        assert!(
            first_sep > 1 && first_sep < real - 2,
            "#{}: empty segment",
            e.index
        );
        for (i, &t) in e.token_type_ids.iter().enumerate() {
            let expect = i64::from(i > first_sep && i < real);
            assert_eq!(t, expect, "#{} token_type_ids[{i}]", e.index);
        }
        // The rule draws from the segments' non-special tokens (WikiText's `<unk>` is [UNK]);
        // a chosen position's original token is its label.
        candidates += (1..real - 1)
            .filter(|&i| i != first_sep)
            .filter(|&i| {
                let original = if e.mlm_labels[i] == IGNORE_LABEL {
                    e.input_ids[i]
                } else {
                    e.mlm_labels[i]
                };
                !specials.contains(&original)
            })
            .count();
        let labelled = e.mlm_labels.iter().filter(|&&l| l != IGNORE_LABEL).count();
        assert_eq!(labelled, e.masked.len());
        chosen += labelled;
        for &(pos, action) in &e.masked {
            let (pos, label) = (pos as usize, e.mlm_labels[pos as usize]);
            assert!(pos > 0 && pos < real - 1 && pos != first_sep);
            assert!(
                !specials.contains(&label),
                "#{}: a special token was chosen",
                e.index
            );
            match action {
                MaskAction::Mask => {
                    assert_eq!(e.input_ids[pos], i64::from(s.mask));
                    masked += 1;
                }
                MaskAction::Random => {
                    assert!(!specials.contains(&e.input_ids[pos]));
                    random += 1;
                }
                MaskAction::Keep => {
                    assert_eq!(e.input_ids[pos], label);
                    kept += 1;
                }
            }
        }
        random_next += usize::from(e.next_sentence_label == IS_RANDOM);
        assert!([IS_NEXT, IS_RANDOM].contains(&e.next_sentence_label));
    }
    let share = |n: usize, of: usize| n as f64 / of as f64;
    println!(
        "{chosen} of {candidates} tokens chosen ({:.4}); of those [MASK] {:.4}, random {:.4}, \
         unchanged {:.4}; random next segment {:.4} of {} pairs",
        share(chosen, candidates),
        share(masked, chosen),
        share(random, chosen),
        share(kept, chosen),
        share(random_next, examples.len()),
        examples.len()
    );
    // ~55k chosen tokens: the standard error of a 10% share is 0.13 percentage points, so
    // these bands are about 5 standard errors wide; a 0.12/0.75/0.15 rule would fail them.
    assert!((share(chosen, candidates) - 0.15).abs() < 0.003);
    assert!((share(masked, chosen) - 0.80).abs() < 0.01);
    assert!((share(random, chosen) - 0.10).abs() < 0.008);
    assert!((share(kept, chosen) - 0.10).abs() < 0.008);
    // 3000 pairs: the standard error of the random-next share is 0.9 percentage points. A
    // little above one half: a pair whose anchor ends its document has no true next segment.
    let r = share(random_next, examples.len());
    assert!((0.47..0.56).contains(&r), "random-next share {r}");
}

#[test]
fn an_example_is_the_same_in_separate_processes() {
    let first = examples_json("1234", 4321, 4);
    let second = examples_json("1234", 4321, 4);
    assert_eq!(first, second, "two processes built different examples");
    assert_eq!(first[0].index, 4321);
    // This process, through the library, agrees with both.
    let data = prepared_shared_corpus_for("bert");
    let split = TokenSplit::open(data, "train", false).unwrap();
    let builder =
        PairBuilder::new(&split, 128, 1234, MaskingRule::default(), special_ids()).unwrap();
    for e in &first {
        assert_eq!(&builder.example(&split, e.index).unwrap(), e);
    }
    // The masks depend on the seed: another seed gives other choices for the same index.
    let other = examples_json("99", 4321, 4);
    assert_ne!(
        first.iter().map(|e| &e.masked).collect::<Vec<_>>(),
        other.iter().map(|e| &e.masked).collect::<Vec<_>>()
    );
    // An index past the end is a clear error, not a panic.
    let n = builder.num_examples(&split);
    let err = run_err(
        ferry()
            .args(["examples", "--model", "bert", "--seq-len", SEQ_LEN])
            .args(["--index", &n.to_string(), "--data"])
            .arg(data),
    );
    assert!(err.contains("--index"), "{err}");
}

/// The example's segments with the masked tokens put back: (A, B).
fn restored_segments(e: &BertExample, sep: i64) -> (Vec<i64>, Vec<i64>) {
    let real = e.attention_mask.iter().filter(|&&m| m == 1).count();
    let tokens: Vec<i64> = (0..real)
        .map(|i| {
            if e.mlm_labels[i] == IGNORE_LABEL {
                e.input_ids[i]
            } else {
                e.mlm_labels[i]
            }
        })
        .collect();
    let first_sep = tokens.iter().position(|&t| t == sep).unwrap();
    (
        tokens[1..first_sep].to_vec(),
        tokens[first_sep + 1..real - 1].to_vec(),
    )
}

#[test]
fn a_true_next_segment_continues_a_where_it_ends() {
    // Next-sentence prediction is about the seam: for a true pair, B must start exactly where A
    // stops in the corpus, also when the pair had to be cut to fit. A cut that drops the end of
    // A would teach the model that continuations skip text.
    let data = prepared_shared_corpus_for("bert");
    let split = TokenSplit::open(data, "train", false).unwrap();
    let s = special_ids();
    let builder = PairBuilder::new(&split, 128, 1234, MaskingRule::default(), s).unwrap();
    let (mut true_pairs, mut cut, mut buf) = (0, 0, Vec::new());
    for index in (0..builder.num_examples(&split)).step_by(7).take(600) {
        let e = builder.example(&split, index).unwrap();
        let (a, b) = restored_segments(&e, i64::from(s.sep));
        assert!(!a.is_empty() && !b.is_empty(), "#{index}: an empty segment");
        if e.next_sentence_label != IS_NEXT {
            continue;
        }
        true_pairs += 1;
        cut += usize::from(a.len() + b.len() == 125);
        // Find A + B as one run of the corpus near the anchor (the anchor's sentence starts at
        // most a long sentence before it).
        let anchor = index * 128;
        let from = anchor.saturating_sub(4096);
        let len = ((anchor + 512).min(split.len_tokens()) - from) as usize;
        split.tokens(from, len, &mut buf).unwrap();
        let joined: Vec<i64> = a.iter().chain(&b).copied().collect();
        assert!(
            buf.windows(joined.len()).any(|w| w == joined.as_slice()),
            "#{index}: A ({} tokens) and its true next segment B ({} tokens) are not one run \
             of the corpus",
            a.len(),
            b.len()
        );
    }
    println!("{true_pairs} true pairs checked, {cut} of them cut to fit 128 tokens");
    assert!(true_pairs > 200, "only {true_pairs} true pairs");
}
