//! weaver's open_clip flavors against open_clip itself (the venv's open-clip-torch 3.3.0,
//! python/openclip_ref.py): a randomly initialised open_clip model's state dict, written by
//! torch.save, is imported; weaver's image and text embeddings, CoCa's caption logits, the
//! loss open_clip trains with and every gradient equal open_clip's on the same batch; the
//! export loads into open_clip with strict=True and gives the same embeddings; importing
//! the export gives back the same parameters.

use std::path::{Path, PathBuf};
use std::process::Command;

use tch::{Device, Kind, Tensor};
use weaver_models::data::Batch;
use weaver_models::model::{Acts, LossWeights};
use weaver_models::JobConfig;
use weaver_parallel::tp::NoTp;
use weaver_worker::init::{load_init_from, Values};
use weaver_worker::train::build;

fn python() -> String {
    std::env::var("WEAVER_PYTHON").unwrap_or_else(|_| {
        panic!("WEAVER_PYTHON is not set: run the tests through scripts/test.sh, which creates the venv with torch and open-clip-torch")
    })
}

fn py(args: &[&str]) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../python/openclip_ref.py");
    let out = Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .expect("cannot run the venv's python");
    assert!(
        out.status.success(),
        "openclip_ref.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `max |a − b| / max |b|`.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    assert_eq!(a.size(), b.size());
    (&a - &b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-30)
}

fn get<'a>(named: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &named
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{name} missing"))
        .1
}

/// Two captions of different lengths in CLIP's token ids (start 49406, end 49407, padding
/// 0), and random images.
fn batch(text_len: usize) -> Batch {
    tch::manual_seed(7);
    let images = Tensor::randn([2, 3, 224, 224], (Kind::Float, Device::Cpu));
    let mut rows = Vec::new();
    let mut eos = Vec::new();
    for (i, words) in [3usize, 8].into_iter().enumerate() {
        let mut r = vec![0i64; text_len];
        r[0] = 49406;
        for (k, w) in r.iter_mut().skip(1).take(words).enumerate() {
            *w = 320 + (i * 1000 + k * 37) as i64;
        }
        r[words + 1] = 49407;
        eos.push((words + 1) as i64);
        rows.extend(r);
    }
    Batch {
        images,
        tokens: Tensor::from_slice(&rows).reshape([2, text_len as i64]),
        eos: Tensor::from_slice(&eos),
        indices: vec![0, 1],
        mlm: None,
        vqa: None,
    }
}

/// A temporary folder under the build's target dir (`CARGO_TARGET_TMPDIR`) rather than
/// /tmp: a full-size model's state dicts and exports take gigabytes, and a killed test then
/// leaks them inside target/, which `cargo clean` removes, not in /tmp.
fn big_tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

fn check(arch: &str) {
    let dir = big_tempdir();
    let d = dir.path();
    let (st, pt) = (d.join("sd.safetensors"), d.join("sd.pt"));
    py(&["make", "--arch", arch, "--out", s(&st), "--pt", s(&pt)]);

    // The pickle reader on a file torch.save wrote: every tensor as safetensors has it.
    {
        let from_pt = weaver_openclip::read_state_dict(&pt).unwrap();
        let from_st = Tensor::read_safetensors(&st).unwrap();
        assert_eq!(from_pt.len(), from_st.len());
        for (n, t) in &from_st {
            assert!(
                get(&from_pt, n).equal(t),
                "{n} differs between .pt and .safetensors"
            );
        }
    }

    let ckpt = d.join("imported");
    let report = weaver_openclip::import(arch, &pt, s(&ckpt)).unwrap();
    let flavor = weaver_openclip::flavor_of(arch).unwrap();
    let mut job = weaver_openclip::import_config(flavor).unwrap();
    job.model.init_from = Some(report.url.clone());
    let built = build(&job).unwrap();
    load_init_from(&job.model, &built.store, Values::None).unwrap();
    let cfg = job.model.clone();
    let coca = cfg.multimodal_layers > 0;

    let b = batch(cfg.max_text_len);
    let batch_path = d.join("batch.safetensors");
    Tensor::write_safetensors(&[("images", &b.images), ("tokens", &b.tokens)], &batch_path)
        .unwrap();
    let reference = d.join("ref.safetensors");
    let losses_json = py(&[
        "run",
        "--arch",
        arch,
        "--weights",
        s(&st),
        "--batch",
        s(&batch_path),
        "--out",
        s(&reference),
        "--grads",
    ]);
    let theirs: serde_json::Value = serde_json::from_str(losses_json.trim()).unwrap();
    let r = Tensor::read_safetensors(&reference).unwrap();

    // Forward and backward with open_clip's loss: contrastive 1, captioning 2.
    let w = LossWeights {
        itc: 1.0,
        caption: 2.0,
        itm: 0.0,
        mlm: 0.0,
        vqa: 0.0,
    };
    let mut acts = Acts::default();
    built
        .model
        .forward(&mut NoTp, &mut acts, &b, false)
        .unwrap();
    let ie = acts.image_emb.as_ref().unwrap().detach();
    let te = acts.text_emb.as_ref().unwrap().detach();
    let l = built.model.losses(&mut NoTp, &mut acts, &b, w).unwrap();
    l.total.backward();

    // Tolerance: the same f32 operations as open_clip in another arrangement (q, k, v as
    // three products instead of one packed in_proj; weaver's attention mask boolean, open_clip's
    // additive; the patch convolution as a matrix product), a few ulps each, grown through 12–24
    // layers to ~1e-6 relative; 1e-4 (the bar) leaves margin while a wrong mapping,
    // mask or pooling moves the outputs by O(1).
    let mut figures = vec![
        ("image_emb", rel(&ie, get(&r, "image_emb"))),
        ("text_emb", rel(&te, get(&r, "text_emb"))),
    ];
    if coca {
        let logits = tch::no_grad(|| {
            built
                .model
                .caption_logits(&b.images, &b.tokens, &b.eos)
                .unwrap()
        });
        let t = logits.size()[1];
        figures.push((
            "caption_logits",
            rel(&logits.narrow(1, 0, t - 1), get(&r, "logits")),
        ));
    }
    for (name, ours) in [
        ("total", &l.total),
        ("itc", &l.itc),
        ("caption", &l.caption),
    ] {
        let a = ours.double_value(&[]);
        let b = theirs[name].as_f64().unwrap();
        figures.push((name, (a - b).abs() / b.abs().max(1e-12)));
    }
    // Gradients, mapped to open_clip's names by the same table: relative L2 error per tensor.
    let grads: Vec<(String, Tensor)> = built
        .store
        .params()
        .iter()
        .map(|p| (p.name.clone(), p.tensor.grad()))
        .collect();
    let grads = weaver_openclip::mapping::to_open_clip(&cfg, grads).unwrap();
    let mut worst_grad = (0.0f64, String::new());
    for (n, g) in &grads {
        let theirs = get(&r, &format!("grad.{n}"));
        let e = (g - theirs).norm().double_value(&[]) / theirs.norm().double_value(&[]).max(1e-30);
        if e > worst_grad.0 {
            worst_grad = (e, n.clone());
        }
    }
    eprintln!(
        "{arch}: max relative error {figures:?}; gradients: worst relative L2 {:e} ({})",
        worst_grad.0, worst_grad.1
    );
    for (what, e) in &figures {
        assert!(*e <= 1e-4, "{arch} {what}: relative error {e:e}");
    }
    assert!(
        worst_grad.0 <= 1e-4,
        "{arch} gradient of {}: {:e}",
        worst_grad.1,
        worst_grad.0
    );

    // Export: open_clip loads it with strict=True and computes the same embeddings.
    let exported = d.join("exported.safetensors");
    weaver_openclip::export(&report.url, &exported).unwrap();
    let again = d.join("again.safetensors");
    py(&[
        "run",
        "--arch",
        arch,
        "--weights",
        s(&exported),
        "--batch",
        s(&batch_path),
        "--out",
        s(&again),
    ]);
    let a = Tensor::read_safetensors(&again).unwrap();
    for name in ["image_emb", "text_emb"] {
        let e = rel(get(&a, name), get(&r, name));
        assert!(e <= 1e-5, "{arch} {name} after export: {e:e}");
    }
    // And back: the export imported again is the same checkpoint, parameter for parameter
    // (so the same embeddings, exactly).
    let ckpt2 = d.join("reimported");
    let report2 = weaver_openclip::import(arch, &exported, s(&ckpt2)).unwrap();
    let c1 =
        weaver_checkpoint::block_on(weaver_checkpoint::Checkpoint::open_url(&report.url)).unwrap();
    let c2 =
        weaver_checkpoint::block_on(weaver_checkpoint::Checkpoint::open_url(&report2.url)).unwrap();
    for p in built.store.params() {
        let t1 = weaver_checkpoint::block_on(c1.read_tensor(&p.name)).unwrap();
        let t2 = weaver_checkpoint::block_on(c2.read_tensor(&p.name)).unwrap();
        assert!(
            t1.equal(&t2),
            "{arch}: {} changed in the round trip",
            p.name
        );
    }
}

#[test]
fn coca_vit_b_32_matches_open_clip() {
    check("coca_ViT-B-32");
}

#[test]
fn clip_vit_b_32_matches_open_clip() {
    check("ViT-B-32");
}

#[test]
fn resized_positions_match_open_clips_resize_pos_embed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pos = Tensor::randn([1 + 7 * 7, 16], (Kind::Float, Device::Cpu));
    let p = d.join("pos.safetensors");
    Tensor::write_safetensors(&[("pos", &pos)], &p).unwrap();
    let out = d.join("out.safetensors");
    py(&["resize", "--pos", s(&p), "--grid", "4", "--out", s(&out)]);
    let theirs = Tensor::read_safetensors(&out).unwrap();
    let job = JobConfig::parse(
        "[model]\nflavor = \"openclip-clip-b32\"\nimage_size = 32\npatch_size = 8\n[train]\ncaption_weight = 0\nitm_weight = 0\n",
        &[],
    )
    .unwrap();
    let ours = weaver_models::model::resize_vision_pos(&pos, &job.model).unwrap();
    // The same libtorch kernel on the same values: equal to the last ulp or so.
    let e = rel(&ours, get(&theirs, "pos"));
    assert!(e <= 1e-6, "{e:e}");
}
