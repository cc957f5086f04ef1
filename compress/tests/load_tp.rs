//! A quantized checkpoint loaded by two tensor-parallel ranks (threads over the tcp
//! backend, each reading only its slices of the int8 weights, scales and smoothing
//! factors) runs the model one process runs: the same image embeddings and the same greedy
//! captions.

use std::sync::Arc;
use std::time::Duration;

use tch::{Device, Kind, Tensor};
use weaver_checkpoint::{block_on, commit, CkptStore, Layout, SavedTensor, ShardWriter};
use weaver_compress::load::CONFIG;
use weaver_compress::{load, LoadOptions, QuantizeOptions, Scheme};
use weaver_models::decode::GenerateOptions;
use weaver_models::nn::{ParamStore, TpPos};
use weaver_models::{JobConfig, Model};
use weaver_parallel::comm::{Communicator, TcpComm};
use weaver_parallel::store::Store;
use weaver_parallel::tcp_store::{TcpStore, TcpStoreServer};
use weaver_parallel::tp::{NoTp, Tape};

/// Three fixed random images. Made once, before any rank thread starts: libtorch's
/// generator is global to the process, so ranks seeding and drawing at the same time would
/// draw different images.
fn images() -> Tensor {
    tch::manual_seed(1);
    Tensor::randn([3, 3, 32, 32], (Kind::Float, Device::Cpu))
}

/// Image embeddings `[3, e]` and greedy captions of `images`.
fn run(
    url: &str,
    job: &JobConfig,
    tp: TpPos,
    comm: Option<Arc<dyn Communicator>>,
    images: &Tensor,
) -> (Tensor, Vec<Vec<i64>>) {
    let opts = LoadOptions {
        tp,
        ..LoadOptions::cpu()
    };
    let loaded = load(url, job, &opts).unwrap();
    let opts = GenerateOptions::greedy(10, 1, 2);
    let m = &loaded.model;
    tch::no_grad(|| match &comm {
        Some(c) => {
            let mut t = Tape::new(Some(c.clone()));
            let e = m.encode_images(&mut t, images).unwrap().image_emb;
            (e, m.generate(&mut t, images, &opts).unwrap().tokens)
        }
        None => {
            let e = m.encode_images(&mut NoTp, images).unwrap().image_emb;
            (e, m.generate(&mut NoTp, images, &opts).unwrap().tokens)
        }
    })
}

#[test]
fn two_tensor_parallel_ranks_run_a_quantized_checkpoint_as_one_process_does() {
    let job = JobConfig::parse("[model]\nflavor = \"debug\"\n", &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().display().to_string();
    let mut store = ParamStore::new(Device::Cpu, Kind::Float, 5);
    Model::new(
        &mut store,
        &job.model,
        0..Model::num_layers(&job.model),
        TpPos::SINGLE,
        0,
    )
    .unwrap();
    let mut saved: Vec<SavedTensor> = store
        .params()
        .iter()
        .map(|p| SavedTensor::whole(p.name.clone(), p.tensor.detach().contiguous()))
        .collect();
    saved.push(SavedTensor::from_bytes(CONFIG, job.to_toml().as_bytes()));
    let s = CkptStore::open(&format!("{root}/float")).unwrap();
    let report = ShardWriter::new(&s)
        .start(1, 0, saved)
        .unwrap()
        .wait()
        .unwrap();
    block_on(commit(&s, 1, Layout::new(1, 1, 1), vec![report])).unwrap();
    let src = format!("{root}/float");
    let images = images();

    for scheme in [Scheme::Int8Weight, Scheme::Int8Dynamic] {
        let q = weaver_compress::quantize(
            &src,
            &format!("{root}/{}", scheme.name()),
            &job,
            &QuantizeOptions {
                calibration_samples: if scheme == Scheme::Int8Dynamic { 32 } else { 0 },
                ..QuantizeOptions::new(scheme)
            },
        )
        .unwrap();
        let quantized = load(&q.url, &job, &LoadOptions::cpu()).unwrap();
        assert!(quantized.quantization.is_some(), "{}", scheme.name());
        let (want_emb, want) = run(&q.url, &job, TpPos::SINGLE, None, &images);
        let server = TcpStoreServer::bind("127.0.0.1:0").unwrap();
        let addr = server.addr();
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                let (url, job, images) = (q.url.clone(), job.clone(), images.copy());
                std::thread::spawn(move || {
                    tch::set_num_threads(1);
                    let store: Arc<dyn Store> =
                        Arc::new(TcpStore::new(addr, Duration::from_secs(30)));
                    let comm: Arc<dyn Communicator> = Arc::new(
                        TcpComm::connect(
                            store,
                            "load",
                            rank,
                            2,
                            "127.0.0.1",
                            Duration::from_secs(60),
                        )
                        .unwrap(),
                    );
                    run(&url, &job, TpPos { rank, size: 2 }, Some(comm), &images)
                })
            })
            .collect();
        for h in handles {
            let (emb, captions) = h.join().unwrap();
            let diff = (&emb - &want_emb).abs().max().double_value(&[]);
            match scheme {
                // Each rank dequantizes its rows or columns with the same scales: the sums
                // differ from one process's only by float rounding.
                Scheme::Int8Weight => {
                    assert!(diff < 1e-5, "{}: {diff}", scheme.name());
                    assert_eq!(captions, want, "{}", scheme.name());
                }
                // A row-parallel layer quantizes each rank's half of a token with that
                // half's own scale: a different (not worse) rounding of the same product,
                // within the int8 quantization error.
                _ => assert!(diff < 2e-2, "{}: {diff}", scheme.name()),
            }
        }
    }
}
