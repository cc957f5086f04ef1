//! The planner's activation model (`weaver_plan::memory::chunk_activations`) against what
//! libtorch really allocates on a CPU, counted by `weaver_prof::cpu_memory` (every tensor's
//! bytes, live and peak). One test in its own binary: the counter is process-wide.
//!
//! Measured, per chunk of layers (a pipeline stage): the bytes still live after the
//! forward (and the losses, on the last stage) over those live before it, plus the stage's
//! received inputs (which the model counts as kept), within 1%; and the forward's peak,
//! within 15% (the tolerance for the memory model). Then a whole step of the model
//! in one process (a rank of a `dp = pp = tp = 1` job): the steady-state peak of
//! parameters, gradients and activations through forward, losses and backward (the second
//! step, gradients kept from the first as the trainer keeps them) against the rank's modelled
//! breakdown (less the optimizer and the data, which this step does not allocate), within
//! 15%.

use std::sync::Arc;

use tch::{Device, Kind, Tensor};
use weaver_config::config::Recompute;
use weaver_models::config::ModelConfig;
use weaver_models::data::{Dataset, Split};
use weaver_models::model::{Acts, LossWeights};
use weaver_models::nn::ParamStore;
use weaver_models::tokenizer;
use weaver_models::Model;
use weaver_parallel::tp::{NoTp, TpPos};
use weaver_plan::memory::{chunk_activations, ActSpec};
use weaver_prof::cpu_memory;

/// The tolerance for the memory model, on peaks.
const TOLERANCE: f64 = 0.15;
/// What autograd keeps is counted tensor by tensor: within 1%.
const KEPT_TOLERANCE: f64 = 0.01;

fn rel(measured: u64, model: u64) -> f64 {
    (model as f64 - measured as f64).abs() / measured.max(1) as f64
}

#[test]
fn the_memory_model_matches_counted_cpu_memory() {
    cpu_memory::install().unwrap();
    tch::set_num_threads(1);
    let mbs = 4;
    let mut failures = Vec::new();
    for flavor in ["debug", "small"] {
        let cfg = ModelConfig::flavor(flavor).unwrap();
        let n = cfg.num_layers();
        let tok = tokenizer::load("grammar", cfg.vocab_size).unwrap();
        let data = Dataset {
            seed: 0,
            image_size: cfg.image_size,
            max_objects: 2,
            text_len: cfg.max_text_len,
            tokenizer: Arc::from(tok),
        };
        let idx: Vec<u64> = (0..mbs as u64).collect();
        let batch = data.batch(Split::Train, &idx, Device::Cpu).unwrap();
        let spec = ActSpec {
            mbs,
            itm: true,
            extra: 0,
            dtype_bytes: 4,
            tp: 1,
            sp: false,
            recompute: Recompute::None,
        };
        let lv = cfg.vision_layers;
        let first_mm = lv + cfg.unimodal_layers;
        // The whole model, then stages: the vision tower's middle, its last layer (pooling),
        // a text layer, the first multimodal layer (matching negatives), the last (heads).
        let chunks = [
            0..n,
            0..1,
            1..2,
            lv - 1..lv,
            lv..lv + 1,
            first_mm - 1..first_mm,
            first_mm..first_mm + 1,
            n - 1..n,
            lv..n,
        ];
        for layers in chunks {
            let mut store = ParamStore::new(Device::Cpu, Kind::Float, 0);
            let model = Model::new(&mut store, &cfg, layers.clone(), TpPos::SINGLE, 0).unwrap();
            let lay = Model::boundary_layout(&cfg, layers.start, mbs, true, Kind::Float);
            let received: u64 = lay
                .iter()
                .map(|(_, s, k)| s.iter().product::<i64>() as u64 * k.elt_size_in_bytes() as u64)
                .sum();
            let inputs: Vec<Tensor> = lay
                .iter()
                .map(|(_, s, k)| {
                    Tensor::randn(s.as_slice(), (*k, Device::Cpu)).set_requires_grad(true)
                })
                .collect();
            let fields: Vec<_> = lay.iter().map(|(f, _, _)| *f).collect();
            let mut acts = Acts::from_fields(&fields, inputs).unwrap();
            let before = cpu_memory::read().current;
            cpu_memory::reset_peak();
            model.forward(&mut NoTp, &mut acts, &batch, true).unwrap();
            let losses = if layers.end == n {
                let w = LossWeights {
                    itc: 1.0,
                    caption: 1.0,
                    itm: 0.5,
                    mlm: 0.0,
                    vqa: 0.0,
                };
                Some(model.losses(&mut NoTp, &mut acts, &batch, w).unwrap())
            } else {
                None
            };
            let after = cpu_memory::read();
            let kept = after.current - before + received;
            let peak = after.peak - before + received;
            let want = chunk_activations(&cfg, layers.clone(), &spec);
            let (e_kept, e_peak) = (
                rel(kept, want.kept),
                rel(peak, want.kept + want.forward_working),
            );
            eprintln!(
                "{flavor:>6} layers {layers:?}: kept measured {kept} model {} ({:+.1}%), forward peak measured {peak} model {} ({:+.1}%)",
                want.kept,
                100.0 * (want.kept as f64 / kept as f64 - 1.0),
                want.kept + want.forward_working,
                100.0 * ((want.kept + want.forward_working) as f64 / peak as f64 - 1.0),
            );
            if e_kept > KEPT_TOLERANCE || e_peak > TOLERANCE {
                failures.push(format!(
                    "{flavor} {layers:?}: kept {e_kept:.3}, peak {e_peak:.3}"
                ));
            }
            drop(losses);
            drop(acts);
        }
    }
    assert!(
        failures.is_empty(),
        "off by more than the tolerance: {failures:#?}"
    );
    the_rank_model_matches_a_counted_forward_and_backward_within_15_percent();
}

/// Part of the one test (the counter is process-wide: no other test may run alongside).
fn the_rank_model_matches_a_counted_forward_and_backward_within_15_percent() {
    let job = weaver_config::JobConfig::parse(
        "[model]\nflavor = \"small\"\n[train]\nglobal_batch = 4\n",
        &[],
    )
    .unwrap();
    let cfg = job.model.clone();
    let n = cfg.num_layers();
    let tok = tokenizer::load("grammar", cfg.vocab_size).unwrap();
    let data = Dataset {
        seed: 0,
        image_size: cfg.image_size,
        max_objects: 2,
        text_len: cfg.max_text_len,
        tokenizer: Arc::from(tok),
    };
    let idx: Vec<u64> = (0..4).collect();
    let batch = data.batch(Split::Train, &idx, Device::Cpu).unwrap();
    let start = cpu_memory::read().current;
    let mut store = ParamStore::new(Device::Cpu, Kind::Float, 0);
    let model = Model::new(&mut store, &cfg, 0..n, TpPos::SINGLE, 0).unwrap();
    let w = LossWeights {
        itc: job.train.itc_weight,
        caption: job.train.caption_weight,
        itm: job.train.itm_weight,
        mlm: job.train.mlm_weight,
        vqa: job.train.vqa_weight,
    };
    // Two steps: the trainer's gradients stay allocated from one step to the next (zeroed
    // in place), so the second step is the steady state the model describes.
    let mut measured = 0;
    for _ in 0..2 {
        store.zero_grad();
        cpu_memory::reset_peak();
        let mut acts = Acts::default();
        model.forward(&mut NoTp, &mut acts, &batch, true).unwrap();
        let losses = model.losses(&mut NoTp, &mut acts, &batch, w).unwrap();
        drop(acts);
        losses.total.backward();
        drop(losses);
        measured = cpu_memory::read().peak - start;
    }
    let layout = weaver_config::layout::ParallelLayout::new(&job, 1).unwrap();
    let m = weaver_plan::MemoryModel::new(&job, &layout, weaver_plan::DeviceKind::Cpu, 0)
        .unwrap()
        .rank(0);
    let modelled = m.params + m.grads + m.activations + m.in_flight + m.working;
    let e = rel(measured, modelled);
    eprintln!(
        "small, one rank, forward + backward: peak measured {measured} model {modelled} ({:+.1}%): {m:?}",
        100.0 * (modelled as f64 / measured as f64 - 1.0)
    );
    assert!(e <= TOLERANCE, "off by {:.1}%", 100.0 * e);
}
