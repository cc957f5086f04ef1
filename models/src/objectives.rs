//! The seed's other objectives (issue 13 item 5): masked language modelling (MLM) and visual
//! question answering (VQA), as extra text rows of a micro-batch.
//!
//! Both run the text through the same layers as the caption: the unimodal text layers and
//! the multimodal layers, which attend to the sample's image by cross-attention (or, with
//! prefix fusion, over its projected image tokens). A micro-batch's text stream is then
//! `[captions (B) | MLM rows (B) | VQA rows (B)]` from the text embedding on, and
//! `[captions | matching negatives | MLM | VQA]` in the multimodal layers, whose memory
//! repeats each sample's image for its rows. The extra rows are more rows of the same
//! tensors, so they travel through the pipeline schedule inside the micro-batch's
//! activations (the boundary shapes grow: `ModelConfig::boundary_rows`), and tensor
//! parallelism splits their heads and vocabulary like the caption's. Nothing else changes:
//! no parameter is added, so checkpoints, open_clip import/export and every layout work as
//! they are.
//!
//! - **MLM** rows attend bidirectionally (padding keys masked) in the text and multimodal
//!   layers. BERT's recipe: `train.mlm_rate` of each caption's word tokens (at least one) are
//!   chosen, 80% of those replaced by `[MASK]`, 10% by a random token, 10% kept; the
//!   decoder's LM head predicts the original token at every chosen position. The draws are
//!   a function of (`data.seed`, sample index, position) alone ([`mlm_rows`]), so every
//!   layout, every pipeline stage and a resumed run mask alike.
//! - **VQA** rows are `[BOS] question answer [EOS]`, causal: the answer is *generated* by the
//!   captioning decoder (teacher-forced next-token loss on the answer and its EOS only).
//!   Generation rather than a classifier over a fixed answer vocabulary because it adds no
//!   parameters (a pretrained or open_clip-imported CoCa fine-tunes for VQA and exports back
//!   unchanged), it needs no answer vocabulary built from the shards and stored with the
//!   model (any answer the tokenizer spells can be learned, none is out of vocabulary), and
//!   the decoder's vocabulary-parallel head already works under every layout. Accuracy is
//!   the exact match of the greedy answer, computed in the same single teacher-forced pass
//!   ([`crate::model::Model::vqa_correct`]): greedy decoding after the question produces the
//!   answer exactly when the argmax at every answer position (given the right prefix) is the
//!   answer's next token, EOS included, so no autoregressive loop crosses the pipeline.

use tch::{Kind, Tensor};

use crate::data::{Rng, Scene, COLORS, RELATIONS, SHAPES, SIZES};
use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;

/// Extra text rows of a micro-batch: `input` `[B, T]` token ids fed to the text layers and
/// `targets` `[B, T]`, the token the LM head must predict at each position (the padding id
/// where nothing is predicted).
#[derive(Debug)]
pub struct TextRows {
    /// Token ids the text layers read.
    pub input: Tensor,
    /// What the LM head predicts at each position (padding id: nothing).
    pub targets: Tensor,
}

impl TextRows {
    /// Rows `start..start+len`.
    pub fn slice(&self, start: i64, len: i64) -> Result<TextRows> {
        Ok(TextRows {
            input: self.input.f_narrow(0, start, len)?,
            targets: self.targets.f_narrow(0, start, len)?,
        })
    }

    /// The rows on `device`.
    pub fn to_device(&self, device: tch::Device) -> Result<TextRows> {
        Ok(TextRows {
            input: self.input.f_to_device(device)?,
            targets: self.targets.f_to_device(device)?,
        })
    }
}

/// How the MLM rows are drawn.
#[derive(Debug, Clone, Copy)]
pub struct MlmSpec {
    /// Seed of the draws (`data.seed`).
    pub seed: u64,
    /// Fraction of word tokens chosen (`train.mlm_rate`).
    pub rate: f64,
    /// `[MASK]`.
    pub mask_id: i64,
    /// Padding (also "no target").
    pub pad_id: i64,
    /// Beginning of sequence (never chosen).
    pub bos_id: i64,
    /// End of sequence (never chosen).
    pub eos_id: i64,
    /// Random replacements are drawn from `0..vocab` (the tokenizer's ids).
    pub vocab: i64,
}

impl MlmSpec {
    /// The spec for a tokenizer; a tokenizer without a mask token is a configuration error
    /// naming `data.tokenizer`.
    pub fn new(tok: &dyn Tokenizer, seed: u64, rate: f64) -> Result<MlmSpec> {
        let mask_id = tok.mask_id().ok_or_else(|| ModelError::BadConfig {
            key: "data.tokenizer".into(),
            message: "train.mlm_weight > 0 needs a mask token ([MASK] or <mask>) in the tokenizer's vocabulary".into(),
        })?;
        Ok(MlmSpec {
            seed,
            rate,
            mask_id,
            pad_id: tok.pad_id(),
            bos_id: tok.bos_id(),
            eos_id: tok.eos_id(),
            vocab: tok.vocab_size() as i64,
        })
    }
}

/// The RNG stream of the MLM draws (the synthetic data uses 1–4).
const MLM_STREAM: u64 = 7;
/// The RNG streams of the synthetic questions (training, held-out).
const QA_STREAMS: [u64; 2] = [8, 9];

/// The MLM rows of captions `tokens` `[B, T]` (on any device) of samples `indices`: each
/// position's draws come from `(spec.seed, index, position)`, made on the host (three
/// numbers per token) and applied on the tokens' device without reading them back.
pub fn mlm_rows(tokens: &Tensor, indices: &[u64], spec: &MlmSpec) -> Result<TextRows> {
    let s = tokens.size();
    let (b, t) = (s[0], s[1]);
    if b as usize != indices.len() {
        return Err(ModelError::ParamMismatch(format!(
            "{} sample indices for {b} caption rows",
            indices.len()
        )));
    }
    let n = (b * t) as usize;
    let (mut choose, mut how, mut random) = (vec![0f32; n], vec![0f32; n], vec![0i64; n]);
    for (row, &index) in indices.iter().enumerate() {
        let mut rng = Rng::new(spec.seed, MLM_STREAM, index);
        for p in 0..t as usize {
            let k = row * t as usize + p;
            choose[k] = rng.unit();
            how[k] = rng.unit();
            random[k] = rng.below(spec.vocab.max(1) as usize) as i64;
        }
    }
    let dev = tokens.device();
    let host = |v: &[f32]| -> Result<Tensor> {
        Ok(Tensor::f_from_slice(v)?
            .f_reshape([b, t])?
            .f_to_device(dev)?)
    };
    let (choose, how) = (host(&choose)?, host(&how)?);
    let random = Tensor::f_from_slice(&random)?
        .f_reshape([b, t])?
        .f_to_device(dev)?;
    let eligible = tokens
        .f_ne(spec.pad_id)?
        .f_logical_and(&tokens.f_ne(spec.bos_id)?)?
        .f_logical_and(&tokens.f_ne(spec.eos_id)?)?;
    // Ineligible positions score 2 (never below the rate); the lowest-scoring eligible
    // position is always chosen, so every caption with a word has a target.
    let score = choose.f_where_scalarother(&eligible, 2.0)?;
    let lowest = score
        .f_argmin(1, true)?
        .f_one_hot(t)?
        .f_reshape([b, t])?
        .f_to_kind(Kind::Bool)?;
    let chosen = score
        .f_lt(spec.rate)?
        .f_logical_or(&lowest)?
        .f_logical_and(&eligible)?;
    let to_mask = chosen.f_logical_and(&how.f_lt(0.8)?)?;
    let to_random = chosen.f_logical_and(&how.f_ge(0.8)?.f_logical_and(&how.f_lt(0.9)?)?)?;
    let input = random.f_where_self(&to_random, tokens)?;
    let input = input.f_masked_fill(&to_mask, spec.mask_id)?;
    let targets = tokens.f_masked_fill(&chosen.f_logical_not()?, spec.pad_id)?;
    Ok(TextRows { input, targets })
}

/// Encodes a question and its answer as a VQA row of exactly `len` tokens:
/// `[BOS] question answer [EOS] [PAD]...`, with targets (aligned with the input: position
/// `p` predicts `targets[p]`) on the positions before each answer token and before EOS. A
/// question too long to fit keeps its end; an answer that leaves no room for a question
/// word is an error (the caller counts the sample as bad).
pub fn encode_qa(
    tok: &dyn Tokenizer,
    question: &str,
    answer: &str,
    len: usize,
) -> Result<(Vec<i64>, Vec<i64>)> {
    let q = tok.encode(question)?;
    let a = tok.encode(answer)?;
    if a.is_empty() || q.is_empty() || a.len() + 3 > len {
        return Err(ModelError::Data(format!(
            "question {question:?} with answer {answer:?} does not fit {len} tokens (the answer needs {} and at least one question word, BOS and EOS)",
            a.len()
        )));
    }
    let keep = q.len().min(len - 2 - a.len());
    let mut ids = Vec::with_capacity(len);
    ids.push(tok.bos_id());
    ids.extend_from_slice(&q[q.len() - keep..]);
    let first_answer = ids.len();
    ids.extend_from_slice(&a);
    ids.push(tok.eos_id());
    let eos = ids.len() - 1;
    ids.resize(len, tok.pad_id());
    let mut targets = vec![tok.pad_id(); len];
    // Position p - 1 predicts token p, for the answer's tokens and EOS.
    targets[first_answer - 1..eos].copy_from_slice(&ids[first_answer..=eos]);
    Ok((ids, targets))
}

/// The VQA rows of `pairs` (question, answer) on `device`.
pub fn vqa_rows(
    tok: &dyn Tokenizer,
    pairs: &[(String, String)],
    len: usize,
    device: tch::Device,
) -> Result<TextRows> {
    let (mut input, mut targets) = (Vec::new(), Vec::new());
    for (q, a) in pairs {
        let (i, t) = encode_qa(tok, q, a, len)?;
        input.extend(i);
        targets.extend(t);
    }
    let b = pairs.len() as i64;
    let rows = |v: &[i64]| -> Result<Tensor> {
        Ok(Tensor::f_from_slice(v)?
            .f_reshape([b, len as i64])?
            .f_to_device(device)?)
    };
    Ok(TextRows {
        input: rows(&input)?,
        targets: rows(&targets)?,
    })
}

/// The relation of `b` to `a` when `a` stands in relation `rel` to `b`.
fn inverse(rel: usize) -> usize {
    [1, 0, 3, 2][rel]
}

/// A question about `scene` and its one-word answer, drawn with `rng`: the colour, shape or
/// size of an object named by an attribute no other object shares, the number of shapes,
/// or whether a relation between two distinct shapes holds (true half the time). A
/// question that would be ambiguous for this scene becomes the counting question.
pub fn scene_question(scene: &Scene, rng: &mut Rng) -> (String, String) {
    let objs = &scene.objects;
    let kind = rng.below(5);
    let pick = rng.below(objs.len());
    let o = objs[pick];
    let unique =
        |same: &dyn Fn(&crate::data::Object) -> bool| objs.iter().filter(|x| same(x)).count() == 1;
    let count = || {
        let n = ["one", "two"][objs.len() - 1];
        ("how many shapes ?".to_string(), n.to_string())
    };
    match kind {
        0 if unique(&|x| x.shape == o.shape) => (
            format!("what color is the {} ?", SHAPES[o.shape]),
            COLORS[o.color].0.to_string(),
        ),
        1 if unique(&|x| x.color == o.color) => (
            format!("what shape is the {} one ?", COLORS[o.color].0),
            SHAPES[o.shape].to_string(),
        ),
        2 if unique(&|x| x.shape == o.shape) => (
            format!("what size is the {} ?", SHAPES[o.shape]),
            SIZES[o.size].0.to_string(),
        ),
        3 => match (objs.as_slice(), scene.relation) {
            ([a, b], Some(rel)) if a.shape != b.shape => {
                let (x, y, truth) = if rng.below(2) == 0 {
                    (a, b, rel)
                } else {
                    (b, a, inverse(rel))
                };
                let asked = if rng.below(2) == 0 {
                    truth
                } else {
                    (truth + 1 + rng.below(3)) % 4
                };
                let answer = if asked == truth { "yes" } else { "no" };
                (
                    format!(
                        "is the {} {} the {} ?",
                        SHAPES[x.shape], RELATIONS[asked], SHAPES[y.shape]
                    ),
                    answer.to_string(),
                )
            }
            _ => count(),
        },
        _ => count(),
    }
}

/// The synthetic question and answer of sample `index` of `split` (a pure function of the
/// dataset's seed, the split and the index, like the sample itself).
pub fn synthetic_qa(
    data: &crate::data::Dataset,
    split: crate::data::Split,
    index: u64,
) -> (String, String) {
    let stream = match split {
        crate::data::Split::Train => QA_STREAMS[0],
        crate::data::Split::Heldout => QA_STREAMS[1],
    };
    let mut rng = Rng::new(data.seed, stream, index);
    scene_question(&data.scene(split, index), &mut rng)
}

/// Which objectives' rows a job's batches carry.
#[derive(Debug, Clone, Copy, Default)]
pub struct Objectives {
    /// MLM rows (`train.mlm_weight > 0`).
    pub mlm: Option<MlmSpec>,
    /// VQA rows (`train.vqa_weight > 0`).
    pub vqa: bool,
}

impl Objectives {
    /// Whether any extra rows are added.
    pub fn any(&self) -> bool {
        self.mlm.is_some() || self.vqa
    }

    /// Adds the MLM rows (seeded by the batch's sample indices, unless it has them already)
    /// and (for the synthetic data, whose questions are a function of the sample) the VQA
    /// rows to a batch of `split`. Batches from shards bring their VQA rows from the loader;
    /// a batch that needs them and has none is an error.
    pub fn attach(
        &self,
        batch: &mut crate::data::Batch,
        data: &crate::data::Dataset,
        split: crate::data::Split,
        synthetic: bool,
    ) -> Result<()> {
        if let (Some(spec), None) = (&self.mlm, &batch.mlm) {
            batch.mlm = Some(mlm_rows(&batch.tokens, &batch.indices, spec)?);
        }
        if self.vqa && batch.vqa.is_none() {
            if !synthetic {
                return Err(ModelError::Data(
                    "train.vqa_weight > 0 but the batch has no question/answer rows".into(),
                ));
            }
            let pairs: Vec<(String, String)> = batch
                .indices
                .iter()
                .map(|&i| synthetic_qa(data, split, i))
                .collect();
            batch.vqa = Some(vqa_rows(
                data.tokenizer.as_ref(),
                &pairs,
                data.text_len,
                batch.tokens.device(),
            )?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Dataset, Split};
    use crate::tokenizer::{encode_padded, GrammarTokenizer};
    use std::sync::Arc;
    use tch::Device;

    fn data() -> Dataset {
        Dataset {
            seed: 5,
            image_size: 32,
            max_objects: 2,
            text_len: 16,
            tokenizer: Arc::new(GrammarTokenizer::new()),
        }
    }

    fn spec(rate: f64) -> MlmSpec {
        MlmSpec::new(&GrammarTokenizer::new(), 11, rate).unwrap()
    }

    #[test]
    fn mlm_draws_are_a_function_of_the_sample_and_follow_bert() {
        let d = data();
        let indices: Vec<u64> = (0..400).collect();
        let b = d.batch(Split::Train, &indices, Device::Cpu).unwrap();
        let s = spec(0.15);
        let rows = mlm_rows(&b.tokens, &b.indices, &s).unwrap();
        // The same sample in another batch, at another row, is masked alike.
        let other = d.batch(Split::Train, &[399, 7], Device::Cpu).unwrap();
        let r2 = mlm_rows(&other.tokens, &other.indices, &s).unwrap();
        assert!(r2.input.get(0).equal(&rows.input.get(399)));
        assert!(r2.targets.get(1).equal(&rows.targets.get(7)));

        let tok = Vec::<i64>::try_from(b.tokens.flatten(0, -1)).unwrap();
        let inp = Vec::<i64>::try_from(rows.input.flatten(0, -1)).unwrap();
        let tgt = Vec::<i64>::try_from(rows.targets.flatten(0, -1)).unwrap();
        let (mut words, mut chosen, mut masked, mut kept) = (0, 0, 0, 0);
        for (row, chunk) in tgt.chunks(16).enumerate() {
            assert!(
                chunk.iter().any(|&t| t != s.pad_id),
                "row {row} has no target"
            );
        }
        for k in 0..tok.len() {
            let word = ![s.pad_id, s.bos_id, s.eos_id].contains(&tok[k]);
            words += usize::from(word);
            if tgt[k] == s.pad_id {
                assert_eq!(inp[k], tok[k], "an unchosen token is unchanged");
                continue;
            }
            assert!(word, "a special token was chosen");
            assert_eq!(tgt[k], tok[k]);
            chosen += 1;
            masked += usize::from(inp[k] == s.mask_id);
            kept += usize::from(inp[k] == tok[k]);
        }
        // ~4000 words: the rate (plus the one forced pick of rows that drew none) and the
        // 80/10/10 split, within a few standard deviations.
        let rate = chosen as f64 / words as f64;
        assert!((0.15..0.22).contains(&rate), "rate {rate}");
        let m = masked as f64 / chosen as f64;
        assert!((0.74..0.86).contains(&m), "masked {m}");
        let kept = kept as f64 / chosen as f64;
        assert!((0.06..0.16).contains(&kept), "kept {kept}");
    }

    #[test]
    fn a_tokenizer_without_a_mask_token_is_a_config_error() {
        #[derive(Debug)]
        struct NoMask;
        impl Tokenizer for NoMask {
            fn encode(&self, _: &str) -> Result<Vec<i64>> {
                Ok(vec![])
            }
            fn decode(&self, _: &[i64]) -> String {
                String::new()
            }
            fn vocab_size(&self) -> usize {
                4
            }
            fn pad_id(&self) -> i64 {
                0
            }
            fn bos_id(&self) -> i64 {
                1
            }
            fn eos_id(&self) -> i64 {
                2
            }
        }
        match MlmSpec::new(&NoMask, 0, 0.15) {
            Err(ModelError::BadConfig { key, .. }) => assert_eq!(key, "data.tokenizer"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn qa_rows_target_the_answer_and_eos_only() {
        let tok = GrammarTokenizer::new();
        let (ids, targets) = encode_qa(&tok, "what color is the square ?", "red", 10).unwrap();
        let q = tok.encode("what color is the square ?").unwrap();
        let red = tok.encode("red").unwrap()[0];
        assert_eq!(ids[0], tok.bos_id());
        assert_eq!(&ids[1..7], q.as_slice());
        assert_eq!((ids[7], ids[8], ids[9]), (red, tok.eos_id(), tok.pad_id()));
        let mut want = vec![tok.pad_id(); 10];
        want[6] = red;
        want[7] = tok.eos_id();
        assert_eq!(targets, want);
        // Too long: the question keeps its end; an answer with no room is an error.
        let (ids, _) = encode_qa(&tok, "what color is the square ?", "red", 6).unwrap();
        assert_eq!(tok.decode(&ids), "the square ? red");
        assert!(encode_qa(&tok, "is it", "a small red circle", 6).is_err());
    }

    #[test]
    fn synthetic_answers_are_true_of_the_scene() {
        let d = data();
        let tok = GrammarTokenizer::new();
        let mut kinds = std::collections::BTreeSet::new();
        for i in 0..500 {
            let scene = d.scene(Split::Heldout, i);
            let (q, a) = synthetic_qa(&d, Split::Heldout, i);
            assert_eq!((q.clone(), a.clone()), synthetic_qa(&d, Split::Heldout, i));
            // Every word is in the built-in vocabulary and the row fits.
            let ids = encode_padded(&tok, &format!("{q} {a}"), 16).unwrap();
            assert!(!ids.contains(&3), "{q} {a}");
            let words: Vec<&str> = q.split(' ').collect();
            kinds.insert(words[..2].join(" "));
            let named = |w: &str| scene.objects.iter().find(|o| SHAPES[o.shape] == w);
            match (words[0], words[1]) {
                ("what", "color") => assert_eq!(COLORS[named(words[4]).unwrap().color].0, a),
                ("what", "size") => assert_eq!(SIZES[named(words[4]).unwrap().size].0, a),
                ("what", "shape") => {
                    let o = scene.objects.iter().find(|o| COLORS[o.color].0 == words[4]);
                    assert_eq!(SHAPES[o.unwrap().shape], a);
                }
                ("how", _) => assert_eq!(a, ["one", "two"][scene.objects.len() - 1]),
                ("is", _) => {
                    let x = named(words[2]).unwrap();
                    let y = named(words[words.len() - 2]).unwrap();
                    let rel = words[3..words.len() - 3].join(" ");
                    let holds = match rel.as_str() {
                        "left of" => x.cx < y.cx && (x.cx - y.cx).abs() > (x.cy - y.cy).abs(),
                        "right of" => x.cx > y.cx && (x.cx - y.cx).abs() > (x.cy - y.cy).abs(),
                        "above" => x.cy < y.cy && (x.cy - y.cy).abs() > (x.cx - y.cx).abs(),
                        _ => x.cy > y.cy && (x.cy - y.cy).abs() > (x.cx - y.cx).abs(),
                    };
                    assert_eq!(a, if holds { "yes" } else { "no" }, "{q} {scene:?}");
                }
                other => panic!("unexpected question {other:?}"),
            }
        }
        assert_eq!(kinds.len(), 5, "{kinds:?}");
    }
}
