//! BERT pretraining examples: sentence pairs with masked tokens, cut from the document and
//! sentence boundaries of a prepared split.
//!
//! Example `i` is anchored at token `i * seq_len` of the split, so a split holds exactly as many
//! examples as it holds causal-LM windows ([`crate::shards::sequences_in`]) and the coordinator's
//! sample order covers both the same way. From the anchor's sentence the builder takes whole
//! sentences of that document up to the length budget (`seq_len - 3`, room for [CLS] and two
//! [SEP]s), cuts them into segment A and the true continuation B at a random sentence
//! boundary, and with probability 1/2 replaces B by sentences from a random other document
//! (Devlin et al. 2019, as Google's `create_pretraining_data.py` does). Then 15% of the
//! non-special tokens are chosen for prediction; of those 80% become [MASK], 10% a random
//! token and 10% stay as they are.
//!
//! Every random choice comes from a generator seeded by `(seed, example index)` alone, so an
//! example is the same whichever process builds it, and however many share the step.

use serde::{Deserialize, Serialize};

use crate::shards::TokenSplit;
use crate::DataError;
use ferry_spec::sampler::{mix_seed, splitmix64};

/// Label of an example whose segment B is A's true continuation (`transformers`' convention
/// for `next_sentence_label`).
pub const IS_NEXT: i64 = 0;
/// Label of an example whose segment B comes from another document.
pub const IS_RANDOM: i64 = 1;
/// The label `transformers` ignores in the masked-LM loss.
pub const IGNORE_LABEL: i64 = -100;

/// Mixed into every example's seed so that it differs from dropout and sample-order seeds.
const PAIR_SEED_TAG: u64 = 0xBE27_5EED;

/// Ids of BERT's special tokens in the split's vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialIds {
    pub pad: u32,
    pub unk: u32,
    pub cls: u32,
    pub sep: u32,
    pub mask: u32,
}

impl SpecialIds {
    /// Looks the five tokens up in a tokenizer; `path` names it in the error.
    pub fn from_tokenizer(
        tokenizer: &tokenizers::Tokenizer,
        path: &std::path::Path,
    ) -> Result<SpecialIds, DataError> {
        let id = |token: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| {
                DataError::tokenizer(
                    path,
                    format!(
                        "has no {token} token; BERT needs a WordPiece vocabulary \
                         (`ferry prepare --model bert`)"
                    ),
                )
            })
        };
        Ok(SpecialIds {
            pad: id("[PAD]")?,
            unk: id("[UNK]")?,
            cls: id("[CLS]")?,
            sep: id("[SEP]")?,
            mask: id("[MASK]")?,
        })
    }

    fn sorted(&self) -> Vec<u32> {
        let mut ids = vec![self.pad, self.unk, self.cls, self.sep, self.mask];
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// The masking rule: the share of tokens chosen for prediction, and how a chosen token is
/// shown to the model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MaskingRule {
    /// Share of the non-special tokens chosen (BERT: 0.15).
    pub select: f64,
    /// Of the chosen, the share replaced by [MASK] (0.8).
    pub mask: f64,
    /// Of the chosen, the share replaced by a random token (0.1); the rest stay unchanged.
    pub random: f64,
}

impl Default for MaskingRule {
    fn default() -> Self {
        MaskingRule {
            select: 0.15,
            mask: 0.8,
            random: 0.1,
        }
    }
}

/// What happened to a token chosen for prediction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaskAction {
    Mask,
    Random,
    Keep,
}

/// One BERT pretraining example, padded to the sequence length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BertExample {
    /// The example's index in its split: what seeded it.
    pub index: u64,
    pub input_ids: Vec<i64>,
    /// 0 for [CLS], A and the first [SEP]; 1 for B and the last [SEP]; 0 for padding.
    pub token_type_ids: Vec<i64>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<i64>,
    /// The original token where one was chosen for prediction, else [`IGNORE_LABEL`].
    pub mlm_labels: Vec<i64>,
    /// [`IS_NEXT`] or [`IS_RANDOM`].
    pub next_sentence_label: i64,
    /// The chosen positions, in the order they were drawn, and what was done to each.
    pub masked: Vec<(u32, MaskAction)>,
}

/// Builds [`BertExample`]s from a split. It holds only settings, so one builder serves the
/// train and the held-out split of a prepared directory alike.
#[derive(Clone, Debug)]
pub struct PairBuilder {
    seq_len: usize,
    seed: u64,
    rule: MaskingRule,
    special: SpecialIds,
    /// Special ids, sorted: never drawn as random replacement tokens.
    special_sorted: Vec<u32>,
    vocab_size: u32,
}

/// A run of tokens `[start, end)` of the split.
#[derive(Clone, Copy, Debug)]
struct Span {
    start: u64,
    end: u64,
}

impl Span {
    fn len(self) -> u64 {
        self.end - self.start
    }
}

impl PairBuilder {
    /// `seq_len` counts every token of the example, [CLS] and [SEP]s included; it needs room
    /// for at least one token of each segment. `split` is checked against the settings.
    pub fn new(
        split: &TokenSplit,
        seq_len: usize,
        seed: u64,
        rule: MaskingRule,
        special: SpecialIds,
    ) -> Result<PairBuilder, DataError> {
        let invalid = |message: String| {
            Err(DataError::InvalidOption {
                option: "seq_len",
                message,
            })
        };
        if seq_len < 5 {
            return invalid(format!(
                "a BERT example needs at least 5 tokens ([CLS] a [SEP] b [SEP]), not {seq_len}"
            ));
        }
        let vocab_size = split.manifest().vocab_size as u32;
        let special_sorted = special.sorted();
        if special_sorted.iter().any(|&id| id >= vocab_size) || vocab_size as usize <= 5 {
            return invalid(format!(
                "special token ids {special_sorted:?} do not fit a vocabulary of {vocab_size}"
            ));
        }
        if split.num_sequences(seq_len) == 0 {
            return invalid(format!(
                "the split has {} tokens, too few for one example of {seq_len}",
                split.len_tokens()
            ));
        }
        Ok(PairBuilder {
            seq_len,
            seed,
            rule,
            special,
            special_sorted,
            vocab_size,
        })
    }

    /// How many examples a split holds (the same count as its causal-LM windows).
    pub fn num_examples(&self, split: &TokenSplit) -> u64 {
        split.num_sequences(self.seq_len)
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Example `index` of `split`, the same every time and in every process.
    pub fn example(&self, split: &TokenSplit, index: u64) -> Result<BertExample, DataError> {
        let count = self.num_examples(split);
        if index >= count {
            return Err(DataError::InvalidOption {
                option: "example index",
                message: format!("{index} is out of range: the split holds {count} examples"),
            });
        }
        let mut rng = Rng(mix_seed(&[self.seed, PAIR_SEED_TAG, index]));
        let (a, b, label) = self.segments(split, index, &mut rng);
        let budget = self.seq_len - 3;
        let (mut a_tokens, mut b_tokens) = (Vec::new(), Vec::new());
        let mut buf = Vec::new();
        for (spans, out) in [(&a, &mut a_tokens), (&b, &mut b_tokens)] {
            for span in spans {
                split.tokens(span.start, span.len() as usize, &mut buf)?;
                out.extend_from_slice(&buf);
            }
        }
        // Google's truncate_seq_pair trims the longer segment a token at a time. Here A loses
        // tokens from its front and B from its back, so the seam between them (the end of A
        // and the start of B, what next-sentence prediction is about) survives the cut.
        let mut a_from = 0;
        while (a_tokens.len() - a_from) + b_tokens.len() > budget {
            if a_tokens.len() - a_from > b_tokens.len() {
                a_from += 1;
            } else {
                b_tokens.pop();
            }
        }
        a_tokens.drain(..a_from);
        Ok(self.assemble(index, &a_tokens, &b_tokens, label, &mut rng))
    }

    /// Segment A, segment B and the next-sentence label of example `index`.
    fn segments(
        &self,
        split: &TokenSplit,
        index: u64,
        rng: &mut Rng,
    ) -> (Vec<Span>, Vec<Span>, i64) {
        let anchor = index * self.seq_len as u64;
        let doc = doc_of(split, anchor);
        let sentences = sentences_of(split, doc);
        // The sentence holding the anchor (the document's end token belongs to its last).
        let first = sentences
            .iter()
            .rposition(|s| s.start <= anchor)
            .unwrap_or(0);
        let budget = (self.seq_len - 3) as u64;
        let mut taken = vec![sentences[first]];
        let mut used = sentences[first].len();
        for &s in &sentences[first + 1..] {
            if used + s.len() > budget {
                break;
            }
            used += s.len();
            taken.push(s);
        }
        // A takes 1..n-1 of the taken sentences and the rest is its true continuation. With
        // one sentence taken, the continuation is the document's next sentence, if any.
        let (a, true_b) = if taken.len() >= 2 {
            let cut = 1 + rng.below(taken.len() as u64 - 1) as usize;
            (taken[..cut].to_vec(), taken[cut..].to_vec())
        } else {
            let next = sentences.get(first + 1).copied();
            (taken, next.into_iter().collect())
        };
        let num_docs = split.doc_starts().len() - 1;
        let coin_says_random = rng.unit() < 0.5;
        let can_be_random = num_docs > 1;
        if can_be_random && (coin_says_random || true_b.is_empty()) {
            let mut other = rng.below(num_docs as u64 - 1) as usize;
            if other >= doc {
                other += 1;
            }
            let theirs = sentences_of(split, other);
            let start = rng.below(theirs.len() as u64) as usize;
            let room = budget.saturating_sub(a.iter().map(|s| s.len()).sum());
            let mut b = vec![theirs[start]];
            let mut used = theirs[start].len();
            for &s in &theirs[start + 1..] {
                if used + s.len() > room {
                    break;
                }
                used += s.len();
                b.push(s);
            }
            (a, b, IS_RANDOM)
        } else if !true_b.is_empty() {
            (a, true_b, IS_NEXT)
        } else {
            // A one-document, one-sentence corpus: halve the sentence.
            let s = a[0];
            let mid = s.start + (s.len() / 2).max(1);
            let b = if mid < s.end {
                vec![Span {
                    start: mid,
                    end: s.end,
                }]
            } else {
                vec![s]
            };
            (
                vec![Span {
                    start: s.start,
                    end: mid,
                }],
                b,
                IS_NEXT,
            )
        }
    }

    /// `[CLS] a [SEP] b [SEP]`, padded, with the masking rule applied.
    fn assemble(&self, index: u64, a: &[i64], b: &[i64], label: i64, rng: &mut Rng) -> BertExample {
        let l = self.seq_len;
        let s = self.special;
        let mut ids = Vec::with_capacity(l);
        let mut types = Vec::with_capacity(l);
        ids.push(i64::from(s.cls));
        ids.extend_from_slice(a);
        ids.push(i64::from(s.sep));
        types.resize(ids.len(), 0);
        ids.extend_from_slice(b);
        ids.push(i64::from(s.sep));
        types.resize(ids.len(), 1);
        let real = ids.len();
        let mut attention = vec![1; real];
        ids.resize(l, i64::from(s.pad));
        types.resize(l, 0);
        attention.resize(l, 0);

        // Candidates: every token of A and B, never [CLS], [SEP] or padding, and never a
        // special token inside a segment (WikiText's `<unk>` is [UNK]): predicting "a word
        // nobody knows" teaches nothing, and `transformers`' collator leaves it out too.
        let mut candidates: Vec<u32> = (1..=a.len() as u32)
            .chain((a.len() as u32 + 2)..(real as u32 - 1))
            .filter(|&pos| {
                let id = ids[pos as usize];
                u32::try_from(id).map_or(true, |id| self.special_sorted.binary_search(&id).is_err())
            })
            .collect();
        let n = candidates.len();
        let chosen = ((self.rule.select * n as f64).round() as usize).clamp(1, n.max(1));
        let mut labels = vec![IGNORE_LABEL; l];
        let mut masked = Vec::with_capacity(chosen);
        for k in 0..chosen.min(n) {
            // A partial Fisher-Yates shuffle: the first `chosen` entries are the sample.
            let j = k + rng.below((n - k) as u64) as usize;
            candidates.swap(k, j);
            let pos = candidates[k] as usize;
            labels[pos] = ids[pos];
            let u = rng.unit();
            let action = if u < self.rule.mask {
                ids[pos] = i64::from(s.mask);
                MaskAction::Mask
            } else if u < self.rule.mask + self.rule.random {
                ids[pos] = i64::from(self.random_token(rng));
                MaskAction::Random
            } else {
                MaskAction::Keep
            };
            masked.push((pos as u32, action));
        }
        BertExample {
            index,
            input_ids: ids,
            token_type_ids: types,
            attention_mask: attention,
            mlm_labels: labels,
            next_sentence_label: label,
            masked,
        }
    }

    /// A uniformly drawn id that is not a special token.
    fn random_token(&self, rng: &mut Rng) -> u32 {
        let regular = self.vocab_size - self.special_sorted.len() as u32;
        let mut id = rng.below(u64::from(regular)) as u32;
        for &s in &self.special_sorted {
            if id >= s {
                id += 1;
            }
        }
        id
    }
}

/// The document holding token `pos`.
fn doc_of(split: &TokenSplit, pos: u64) -> usize {
    let starts = split.doc_starts();
    (starts.partition_point(|&s| s <= pos) - 1).min(starts.len() - 2)
}

/// The non-empty sentences of document `doc`, without its end token. A document always
/// has at least one token besides its end token, so the list is never empty.
fn sentences_of(split: &TokenSplit, doc: usize) -> Vec<Span> {
    let docs = split.doc_starts();
    let (start, end) = (docs[doc], docs[doc + 1].saturating_sub(1).max(docs[doc]));
    let sents = split.sentence_starts();
    let first = sents.partition_point(|&s| s < start);
    let mut spans = Vec::new();
    let mut i = first;
    while i < sents.len() - 1 && sents[i] < end {
        let s_end = sents[i + 1].min(end);
        if s_end > sents[i] {
            spans.push(Span {
                start: sents[i],
                end: s_end,
            });
        }
        i += 1;
    }
    if spans.is_empty() {
        // No sentence index inside (a document of one token): the document is one span.
        spans.push(Span {
            start,
            end: end.max(start + 1),
        });
    }
    spans
}

/// splitmix64 as a stream: small, stable across platforms and dependency upgrades.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        splitmix64(&mut self.0)
    }

    /// Uniform in `0..n` (multiply-shift; `n` > 0).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_below_stays_in_range_and_covers_it() {
        let mut rng = Rng(1);
        let mut counts = [0u32; 3];
        for _ in 0..3000 {
            counts[rng.below(3) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (900..1100).contains(&c)),
            "{counts:?}"
        );
    }
}
