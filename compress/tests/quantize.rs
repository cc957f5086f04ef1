//! `quantize` and `load` end to end on a briefly trained debug model: the float checkpoint
//! is quantized with both schemes, loaded back, and its held-out retrieval and greedy
//! captions are compared with the float model's. Bad requests are refused by name.

use tch::{Device, Kind, Tensor};
use weaver_checkpoint::{block_on, commit, CkptStore, Layout, SavedTensor, ShardWriter};
use weaver_compress::load::{quantization, CONFIG};
use weaver_compress::{load, CompressError, LoadOptions, QuantizeOptions, Scheme};
use weaver_models::data::{Dataset, Split};
use weaver_models::decode::GenerateOptions;
use weaver_models::model::Acts;
use weaver_models::nn::{ParamStore, TpPos};
use weaver_models::{tokenizer, JobConfig, LossWeights, Model};
use weaver_parallel::tp::NoTp;

/// Held-out pairs the comparison runs on.
const POOL: usize = 100;

fn job() -> JobConfig {
    JobConfig::parse("[model]\nflavor = \"debug\"\n[train]\nseed = 3\n", &[]).unwrap()
}

fn dataset(job: &JobConfig) -> Dataset {
    let tok = tokenizer::load(&job.data.tokenizer, job.model.vocab_size).unwrap();
    Dataset {
        seed: job.data.seed,
        image_size: job.model.image_size,
        max_objects: job.data.max_objects,
        text_len: job.model.max_text_len,
        tokenizer: std::sync::Arc::from(tok),
    }
}

/// The debug model after `steps` Adam steps on the synthetic task (a plain loop: the
/// trainer is not what is tested here), so that retrieval and captions are not the near
/// ties of a random model.
fn trained(job: &JobConfig, data: &Dataset, steps: usize) -> (ParamStore, Model) {
    let mut store = ParamStore::new(Device::Cpu, Kind::Float, job.train.seed);
    let model = Model::new(
        &mut store,
        &job.model,
        0..Model::num_layers(&job.model),
        TpPos::SINGLE,
        data.tokenizer.pad_id(),
    )
    .unwrap();
    let params: Vec<Tensor> = store
        .params()
        .iter()
        .map(|p| p.tensor.shallow_clone())
        .collect();
    let mut m: Vec<Tensor> = params.iter().map(Tensor::zeros_like).collect();
    let mut v: Vec<Tensor> = params.iter().map(Tensor::zeros_like).collect();
    let (lr, b1, b2, eps) = (1e-3, 0.9, 0.999, 1e-8);
    let w = LossWeights {
        itc: 1.0,
        caption: 1.0,
        itm: 0.0,
        mlm: 0.0,
        vqa: 0.0,
    };
    let batch = 32u64;
    for step in 0..steps as u64 {
        let indices: Vec<u64> = (step * batch..(step + 1) * batch).collect();
        let b = data.batch(Split::Train, &indices, Device::Cpu).unwrap();
        let mut acts = Acts::default();
        model.forward(&mut NoTp, &mut acts, &b, false).unwrap();
        let losses = model.losses(&mut NoTp, &mut acts, &b, w).unwrap();
        for p in &params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        losses.total.backward();
        if step + 1 == steps as u64 {
            eprintln!(
                "trained {steps} steps: loss {:.3}",
                losses.total.double_value(&[])
            );
        }
        let t = (step + 1) as i32;
        tch::no_grad(|| {
            for ((p, m), v) in params.iter().zip(&mut m).zip(&mut v) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                *m = &*m * b1 + &g * (1.0 - b1);
                *v = &*v * b2 + (&g * &g) * (1.0 - b2);
                let mh = &*m / (1.0 - f64::powi(b1, t));
                let vh = &*v / (1.0 - f64::powi(b2, t));
                let mut p = p.shallow_clone();
                let _ = p.f_sub_(&(mh / (vh.sqrt() + eps) * lr)).unwrap();
            }
        });
    }
    (store, model)
}

/// Writes `store` (and the job) as a committed float checkpoint of step 7 under `root`.
fn save(store: &ParamStore, job: &JobConfig, root: &str) -> String {
    let mut saved: Vec<SavedTensor> = store
        .params()
        .iter()
        .map(|p| SavedTensor::whole(p.name.clone(), p.tensor.detach().contiguous()))
        .collect();
    saved.push(SavedTensor::from_bytes(CONFIG, job.to_toml().as_bytes()));
    let s = CkptStore::open(root).unwrap();
    let report = ShardWriter::new(&s)
        .start(7, 0, saved)
        .unwrap()
        .wait()
        .unwrap();
    block_on(commit(&s, 7, Layout::new(1, 1, 1), vec![report])).unwrap();
    format!("{root}/{}", weaver_checkpoint::manifest::step_dir(7))
}

/// What the comparison looks at on the held-out pool.
struct Outputs {
    /// For each image, the caption it retrieves (argmax of the similarities).
    i2t: Vec<i64>,
    /// For each caption, the image it retrieves.
    t2i: Vec<i64>,
    /// Greedy captions (token ids after BOS, cached decoder).
    captions: Vec<Vec<i64>>,
    /// Image embeddings, `[POOL, e]`.
    image_emb: Tensor,
}

impl Outputs {
    fn recall(&self) -> (f64, f64) {
        let hits = |a: &[i64]| {
            a.iter()
                .enumerate()
                .filter(|(i, &j)| *i as i64 == j)
                .count() as f64
                / a.len() as f64
        };
        (hits(&self.i2t), hits(&self.t2i))
    }
}

fn outputs(model: &Model, data: &Dataset) -> Outputs {
    let tok = data.tokenizer.as_ref();
    let opts = GenerateOptions::greedy(data.text_len - 1, tok.bos_id(), tok.eos_id());
    tch::no_grad(|| {
        let indices = data.eval_pool(POOL).unwrap();
        let (mut ie, mut te, mut captions) = (Vec::new(), Vec::new(), Vec::new());
        for part in indices.chunks(POOL) {
            let b = data.batch(Split::Heldout, part, Device::Cpu).unwrap();
            let (i, t) = model.embeddings(&b).unwrap();
            ie.push(i);
            te.push(t);
            captions.extend(model.generate(&mut NoTp, &b.images, &opts).unwrap().tokens);
        }
        let (ie, te) = (Tensor::cat(&ie, 0), Tensor::cat(&te, 0));
        let sim = ie.matmul(&te.tr());
        Outputs {
            i2t: Vec::<i64>::try_from(&sim.argmax(1, false)).unwrap(),
            t2i: Vec::<i64>::try_from(&sim.argmax(0, false)).unwrap(),
            captions,
            image_emb: ie,
        }
    })
}

fn agreement(a: &[i64], b: &[i64]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
}

fn dir_size(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                dir_size(&e.path())
            } else {
                e.metadata().unwrap().len()
            }
        })
        .sum()
}

#[test]
fn int8_checkpoints_keep_the_float_models_retrieval_and_captions() {
    let job = job();
    let data = dataset(&job);
    // Far enough past the plateau where retrieval starts (about step 150 at this rate) that
    // the float model's recall does not hang on the last bits of the GEMMs: at 150 steps
    // and lr 2e-3 one machine's MKL ended at recall 0.02 where another's passed.
    let (store, model) = trained(&job, &data, 400);
    let want = outputs(&model, &data);
    let (r_i2t, r_t2i) = want.recall();
    eprintln!("float: recall@1 i2t {r_i2t:.3} t2i {r_t2i:.3}");
    // The comparison means something only if the model learned the task: a random model
    // retrieves 1 in POOL.
    assert!(
        r_i2t > 0.1 && r_t2i > 0.1,
        "the model did not train: {r_i2t} {r_t2i}"
    );

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().display().to_string();
    let src = save(&store, &job, &format!("{root}/float"));
    let float_bytes = dir_size(&dir.path().join("float"));

    // Loading the float checkpoint reproduces the model exactly.
    let plain = load(&src, &job, &LoadOptions::cpu()).unwrap();
    assert!(plain.quantization.is_none());
    let again = outputs(&plain.model, &data);
    assert_eq!(again.i2t, want.i2t);
    assert_eq!(again.captions, want.captions);

    let mut failures = Vec::new();
    for scheme in [Scheme::Int8Weight, Scheme::Int8Dynamic] {
        let out = format!("{root}/{}", scheme.name());
        let report =
            weaver_compress::quantize(&src, &out, &job, &QuantizeOptions::new(scheme)).unwrap();
        let q = load(&report.url, &job, &LoadOptions::cpu()).unwrap();
        let info = q.quantization.clone().unwrap();
        assert_eq!(info.scheme, scheme);
        assert_eq!(info.layers, report.info.layers);
        // Every linear layer runs int8; no float copy of its weight stays in the store.
        let (mut int8, mut linear) = (0, 0);
        let mut model = q.model;
        model
            .for_each_linear(&mut |l| {
                linear += 1;
                if let Some(w) = &l.quant {
                    int8 += 1;
                    assert_eq!(w.q.kind(), Kind::Int8);
                    assert_eq!(l.weight.numel(), 0);
                }
                Ok(())
            })
            .unwrap();
        assert_eq!((int8, linear), (info.layers, info.layers));
        assert!(q.store.params().iter().all(|p| p.global_shape.len() != 2
            || p.name.ends_with("tok_embed.weight")
            || p.name.ends_with(".pos")
            || p.name.ends_with("attn_pool.query")));
        let bytes = dir_size(&dir.path().join(scheme.name()));

        let got = outputs(&model, &data);
        let (q_i2t, q_t2i) = got.recall();
        let i2t_agree = agreement(&got.i2t, &want.i2t);
        let t2i_agree = agreement(&got.t2i, &want.t2i);
        let exact = got
            .captions
            .iter()
            .zip(&want.captions)
            .filter(|(a, b)| a == b)
            .count() as f64
            / POOL as f64;
        let cos = Tensor::cosine_similarity(&got.image_emb, &want.image_emb, 1, 1e-8)
            .min()
            .double_value(&[]);
        eprintln!(
            "{}: {bytes} bytes on disk vs {float_bytes} float; recall@1 i2t {q_i2t:.3} t2i {q_t2i:.3}; \
             retrieval agreement {i2t_agree:.3}/{t2i_agree:.3}; captions identical {exact:.3}; \
             min embedding cosine {cos:.5}",
            scheme.name()
        );
        // Every measurement is printed before any is judged (one run shows them all).
        let mut check = |ok: bool, what: String| {
            if !ok {
                failures.push(format!("{}: {what}", scheme.name()));
            }
        };
        // Weights are 4× smaller; embedding tables, positions and norms stay f32.
        check(
            (bytes as f64) < 0.4 * float_bytes as f64,
            format!("{bytes} bytes vs {float_bytes}"),
        );
        // Per-channel int8 weights (and per-token int8 activations) perturb each layer's
        // output by well under 1 % (models/src/quant.rs tests); through the debug model's
        // ten layers the embeddings stay within a few thousandths of a radian.
        check(cos > 0.995, format!("embedding cosine {cos}"));
        // The goal: at most 1 point of held-out recall lost (1 of the 100 pairs).
        let hits = |r: f64| (r * POOL as f64).round() as i64;
        check(
            hits(q_i2t) >= hits(r_i2t) - 1,
            format!("i2t recall {q_i2t} vs {r_i2t}"),
        );
        check(
            hits(q_t2i) >= hits(r_t2i) - 1,
            format!("t2i recall {q_t2i} vs {r_t2i}"),
        );
        // Near-ties among the 100 similarities may flip under the perturbation: 95 % of
        // the retrievals stay what the float model gives (measured: 96 % to 99 %).
        check(
            i2t_agree >= 0.95 && t2i_agree >= 0.95,
            format!("retrieval agreement {i2t_agree} {t2i_agree}"),
        );
        // The captions are 15 greedy steps of a briefly trained model whose next-token
        // distributions are still flat: one near-tie flipped at any step changes the rest
        // of that caption, so a caption is identical only if all its steps are. 85 % of
        // them are (measured: 90 % int8-weight, 92 % int8-dynamic).
        check(exact >= 0.85, format!("captions identical: {exact}"));

        // Quantizing a quantized checkpoint is refused, naming the source.
        let again = weaver_compress::quantize(
            &report.url,
            &format!("{root}/x"),
            &job,
            &QuantizeOptions::new(scheme),
        );
        assert!(
            matches!(&again, Err(CompressError::BadCheckpoint { message, .. }) if message.contains("already quantized")),
            "{again:?}"
        );
        let ckpt = block_on(weaver_checkpoint::Checkpoint::open_url(&report.url)).unwrap();
        assert_eq!(
            quantization(ckpt.manifest()).unwrap().unwrap().scheme,
            scheme
        );
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn bad_quantize_options_are_refused_by_flag() {
    let job = job();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().display().to_string();
    let mut store = ParamStore::new(Device::Cpu, Kind::Float, 0);
    Model::new(
        &mut store,
        &job.model,
        0..Model::num_layers(&job.model),
        TpPos::SINGLE,
        0,
    )
    .unwrap();
    let src = save(&store, &job, &format!("{root}/float"));
    let flag = |opts: QuantizeOptions| match weaver_compress::quantize(
        &src,
        &format!("{root}/out"),
        &job,
        &opts,
    ) {
        Err(CompressError::BadOption { key, .. }) => key,
        other => panic!("{other:?}"),
    };
    let weight = QuantizeOptions::new(Scheme::Int8Weight);
    assert_eq!(
        flag(QuantizeOptions {
            calibration_samples: 8,
            ..weight.clone()
        }),
        "--calibrate"
    );
    let dynamic = QuantizeOptions::new(Scheme::Int8Dynamic);
    assert_eq!(
        flag(QuantizeOptions {
            calibration_samples: 0,
            ..dynamic.clone()
        }),
        "--smooth-alpha"
    );
    assert_eq!(
        flag(QuantizeOptions {
            smooth_alpha: 1.5,
            ..dynamic.clone()
        }),
        "--smooth-alpha"
    );
    assert!(matches!(
        "int4".parse::<Scheme>(),
        Err(CompressError::BadOption { key, .. }) if key == "--scheme"
    ));
    // A checkpoint that lacks one of the model's tensors: the tensor is named.
    let name = store
        .params()
        .iter()
        .find(|p| p.name.ends_with("attn.q.weight"))
        .unwrap()
        .name
        .clone();
    let dropped = store.remove(&name).unwrap();
    let broken = save(&store, &job, &format!("{root}/broken"));
    let err = load(&broken, &job, &LoadOptions::cpu()).unwrap_err();
    assert!(
        matches!(&err, CompressError::BadCheckpoint { message, .. } if message.contains(&dropped.name)),
        "{err:?}"
    );
}
