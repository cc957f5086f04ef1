//! Held-out evaluation: image→text and text→image recall@1 over a pool of image-caption
//! pairs with distinct captions, and exact match of greedily decoded captions.

use std::time::Instant;

use tch::{Device, Kind, Tensor};
use weaver_models::data::{Dataset, Split};
use weaver_models::Model;

use crate::error::WorkerError;
use crate::metrics::EvalMetrics;

/// Evaluates a whole (single-process) model on the first `pool` held-out pairs, `chunk`
/// samples at a time.
pub fn evaluate(
    model: &Model,
    data: &Dataset,
    pool: usize,
    chunk: usize,
    device: Device,
    step: u64,
) -> Result<EvalMetrics, WorkerError> {
    let started = Instant::now();
    let indices = data.eval_pool(pool);
    let chunk = chunk.max(1);
    let (mut image_embs, mut text_embs) = (Vec::new(), Vec::new());
    let mut exact = 0usize;
    // A model without a decoder (CLIP) captions nothing: its exact-match rate is 0.
    let captions = model.config().multimodal_layers > 0;
    tch::no_grad(|| -> Result<(), WorkerError> {
        for part in indices.chunks(chunk) {
            let batch = data.batch(Split::Heldout, part, device)?;
            let (ie, te) = model.embeddings(&batch)?;
            image_embs.push(ie);
            text_embs.push(te);
            if !captions {
                continue;
            }
            let decoded = greedy_captions(model, data, &batch.images)?;
            exact += decoded
                .iter()
                .zip(part)
                .filter(|(d, &i)| **d == data.caption(Split::Heldout, i))
                .count();
        }
        Ok(())
    })?;
    let ie = Tensor::f_cat(&image_embs, 0)?;
    let te = Tensor::f_cat(&text_embs, 0)?;
    let sim = ie.f_matmul(&te.f_tr()?)?;
    let n = indices.len() as i64;
    let truth = Tensor::f_arange(n, (Kind::Int64, sim.device()))?;
    let recall = |dim: i64| -> Result<f64, WorkerError> {
        let hits = sim.f_argmax(dim, false)?.f_eq_tensor(&truth)?;
        Ok(hits
            .f_to_kind(Kind::Float)?
            .f_mean(Kind::Float)?
            .f_double_value(&[])?)
    };
    Ok(EvalMetrics {
        eval: true,
        step,
        i2t_r1: recall(1)?,
        t2i_r1: recall(0)?,
        caption_exact: exact as f64 / n as f64,
        pool: indices.len(),
        eval_time_s: started.elapsed().as_secs_f64(),
    })
}

/// Builds the whole model of `job` on `device` with the global parameters `named` and
/// evaluates it (what rank 0 does with the gathered model, and `weaver eval`).
pub fn evaluate_weights(
    job: &weaver_models::JobConfig,
    named: &[(String, Tensor)],
    device: Device,
    step: u64,
) -> Result<EvalMetrics, WorkerError> {
    let mut job = job.clone();
    job.train.device = match device {
        Device::Cuda(k) => format!("cuda:{k}"),
        _ => "cpu".into(),
    };
    let mut built = crate::train::build(&job)?;
    let named: Vec<(String, Tensor)> = named
        .iter()
        .map(|(n, t)| {
            Ok((
                n.clone(),
                t.f_to_kind(built.store.kind)?.f_to_device(device)?,
            ))
        })
        .collect::<Result<_, tch::TchError>>()?;
    built.store.load_local(&named)?;
    evaluate(
        &built.model,
        &built.data,
        job.eval.pool,
        job.micro_batch_size(),
        device,
        step,
    )
}

/// Greedy captions for `images`: starting from BOS, append the most likely next token until
/// EOS or the maximum length. Each step reruns the fixed-length causal decoder; positions
/// after the current one hold padding and cannot influence it.
pub fn greedy_captions(
    model: &Model,
    data: &Dataset,
    images: &Tensor,
) -> Result<Vec<String>, WorkerError> {
    let tok = data.tokenizer.as_ref();
    let b = images.size()[0];
    let t = data.text_len as i64;
    let dev = images.device();
    let tokens = Tensor::f_full([b, t], tok.pad_id(), (Kind::Int64, dev))?;
    let _ = tokens.f_narrow(1, 0, 1)?.f_fill_(tok.bos_id())?;
    let eos_pos = Tensor::f_zeros([b], (Kind::Int64, dev))?;
    let mut done = Tensor::f_zeros([b], (Kind::Bool, dev))?;
    for pos in 0..t - 1 {
        let logits = model.caption_logits(images, &tokens, &eos_pos)?;
        let next = logits.f_select(1, pos)?.f_argmax(-1, false)?;
        let pad = Tensor::f_full([b], tok.pad_id(), (Kind::Int64, dev))?;
        let next = pad.f_where_self(&done, &next)?;
        tokens
            .f_narrow(1, pos + 1, 1)?
            .f_copy_(&next.f_unsqueeze(1)?)?;
        done = done.f_logical_or(&next.f_eq(tok.eos_id())?)?;
        if done.f_all()?.f_int64_value(&[])? != 0 {
            break;
        }
    }
    let rows: Vec<Vec<i64>> = Vec::<Vec<i64>>::try_from(&tokens.f_to_device(Device::Cpu)?)?;
    Ok(rows
        .iter()
        .map(|r| {
            let end = r.iter().position(|&x| x == tok.eos_id()).unwrap_or(r.len());
            tok.decode(&r[..end])
        })
        .collect())
}
