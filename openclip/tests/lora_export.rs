//! A LoRA run exported to open_clip's format: the adapters are merged into their layers'
//! weights (open_clip has no place for them), exactly as `weaver ckpt export` merges them,
//! so the open_clip model computes what the adapted one did. (That the merged weights give
//! the adapted outputs is worker/tests/finetune.rs's test; that an export loads into
//! open_clip is parity.rs's.)

use std::sync::Arc;

use tch::Tensor;
use weaver_checkpoint::{block_on, Checkpoint, CkptStore};
use weaver_models::JobConfig;
use weaver_worker::ckpt::{export_params, LocalCommitter};
use weaver_worker::parallel::{checkpoint_layout, ParallelTrainer, Plan};

#[test]
fn open_clip_export_of_a_lora_run_merges_the_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ckpt");
    // open_clip's CoCa layout at a size a CPU test trains in a second.
    let job = JobConfig::parse(
        &format!(
            "[model]\nflavor = \"openclip-coca-b32\"\nimage_size = 64\nvision_width = 64\nvision_layers = 1\n\
             vision_heads = 2\ntext_width = 64\ntext_heads = 2\nunimodal_layers = 1\nmultimodal_layers = 1\n\
             embed_dim = 64\nattn_pool_queries = 4\nattn_pool_heads = 2\n\
             [train]\nsteps = 2\nglobal_batch = 4\nwarmup_steps = 1\nlr = 1e-2\nthreads = 1\nitm_weight = 0.0\n\
             lora_rank = 2\nlora_targets = [\"attn.q\", \"attn.o\", \"mlp.fc2\", \"xattn.v\"]\n\
             [checkpoint]\nurl = \"{}\"\n",
            root.display()
        ),
        &[],
    )
    .unwrap();
    let mut t = ParallelTrainer::solo(job.clone(), dir.path().join("run"), false).unwrap();
    let plan = Plan::new(&job, 1).unwrap();
    t.enable_checkpoints(Arc::new(LocalCommitter::new(
        CkptStore::open(&job.checkpoint.url).unwrap(),
        1,
        0,
        checkpoint_layout(&job, &plan),
    )))
    .unwrap();
    t.train_step().unwrap();
    t.train_step().unwrap();
    t.save_checkpoint().unwrap();
    t.finish_checkpoints().unwrap();
    let url = format!("{}/step-2", root.display());

    let out = dir.path().join("open_clip.safetensors");
    weaver_openclip::export(&url, &out).unwrap();
    let exported = Tensor::read_safetensors(&out).unwrap();

    // The reference: the merged weaver export, mapped to open_clip's names.
    let ckpt = block_on(Checkpoint::open_url(&url)).unwrap();
    let merged_file = dir.path().join("merged.safetensors");
    export_params(&ckpt, &merged_file).unwrap();
    let merged = Tensor::read_safetensors(&merged_file).unwrap();
    let expect = weaver_openclip::mapping::to_open_clip(&job.model, merged).unwrap();
    assert_eq!(exported.len(), expect.len());
    for (name, e) in &expect {
        let (_, got) = exported.iter().find(|(n, _)| n == name).unwrap();
        assert!(got.equal(e), "{name} differs from the merged export");
    }
    // The adapters mattered: the base weights alone map to another state dict.
    let base: Vec<(String, Tensor)> = weaver_openclip::param_shapes(&job.model)
        .unwrap()
        .into_iter()
        .map(|(n, _)| {
            let t = block_on(ckpt.read_tensor(&n)).unwrap();
            (n, t)
        })
        .collect();
    let unmerged = weaver_openclip::mapping::to_open_clip(&job.model, base).unwrap();
    let differ = unmerged
        .iter()
        .filter(|(n, u)| {
            let (_, e) = expect.iter().find(|(m, _)| m == n).unwrap();
            !u.equal(e)
        })
        .count();
    assert!(differ > 0, "no open_clip tensor changed with the merge");
}
