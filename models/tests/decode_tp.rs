//! Caption decoding with tensor parallelism: two ranks (threads over the tcp backend), each
//! holding half of every layer's heads, MLP and vocabulary, generate the captions one
//! process generates, with the cache, greedy and beam search.

use std::sync::Arc;
use std::time::Duration;

use tch::{Device, Kind, Tensor};
use weaver_models::config::Fusion;
use weaver_models::decode::GenerateOptions;
use weaver_models::nn::{ParamStore, TpPos};
use weaver_models::{Model, ModelConfig};
use weaver_parallel::comm::{Communicator, TcpComm};
use weaver_parallel::store::Store;
use weaver_parallel::tcp_store::{TcpStore, TcpStoreServer};
use weaver_parallel::tp::{NoTp, Tape};

/// Three fixed random images, made before any rank thread starts (libtorch's generator is
/// global to the process: ranks seeding and drawing at once would draw different images).
fn images() -> Tensor {
    tch::manual_seed(1);
    Tensor::randn([3, 3, 32, 32], (Kind::Float, Device::Cpu))
}

fn captions(
    cfg: &ModelConfig,
    tp: TpPos,
    comm: Option<Arc<dyn Communicator>>,
    images: &Tensor,
) -> Vec<Vec<i64>> {
    let mut store = ParamStore::new(Device::Cpu, Kind::Float, 9);
    let model = Model::new(&mut store, cfg, 0..Model::num_layers(cfg), tp, 0).unwrap();
    let images = images.shallow_clone();
    let mut out = Vec::new();
    for beam in [1, 3] {
        let opts = GenerateOptions {
            beam,
            length_penalty: 0.5,
            ..GenerateOptions::greedy(10, 1, 2)
        };
        let g = match &comm {
            Some(c) => model.generate(&mut Tape::new(Some(c.clone())), &images, &opts),
            None => model.generate(&mut NoTp, &images, &opts),
        }
        .unwrap();
        out.extend(g.tokens);
    }
    out
}

#[test]
fn two_tensor_parallel_ranks_generate_the_single_process_captions() {
    let mut open_clip = ModelConfig::flavor("openclip-coca-b32").unwrap();
    open_clip = ModelConfig {
        image_size: 32,
        patch_size: 8,
        vision_width: 64,
        vision_layers: 2,
        vision_heads: 4,
        text_width: 32,
        text_heads: 4,
        unimodal_layers: 2,
        multimodal_layers: 2,
        vocab_size: 64,
        max_text_len: 16,
        embed_dim: 32,
        attn_pool_queries: 9,
        attn_pool_heads: 4,
        ..open_clip
    };
    let prefix = ModelConfig {
        fusion: Fusion::Prefix,
        ..ModelConfig::flavor("debug").unwrap()
    };
    // Attention narrower than the stream (`model.*_head_dim`): the cache holds its heads.
    let narrow = ModelConfig {
        vision_head_dim: Some(8),
        text_heads: 2,
        text_head_dim: Some(24),
        ..ModelConfig::flavor("debug").unwrap()
    };
    for cfg in [
        ModelConfig::flavor("debug").unwrap(),
        prefix,
        open_clip,
        narrow,
    ] {
        let images = images();
        let want = captions(&cfg, TpPos::SINGLE, None, &images);
        let server = TcpStoreServer::bind("127.0.0.1:0").unwrap();
        let addr = server.addr();
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                let (cfg, images) = (cfg.clone(), images.copy());
                std::thread::spawn(move || {
                    tch::set_num_threads(1);
                    let store: Arc<dyn Store> =
                        Arc::new(TcpStore::new(addr, Duration::from_secs(30)));
                    let comm: Arc<dyn Communicator> = Arc::new(
                        TcpComm::connect(
                            store,
                            "decode",
                            rank,
                            2,
                            "127.0.0.1",
                            Duration::from_secs(60),
                        )
                        .unwrap(),
                    );
                    captions(&cfg, TpPos { rank, size: 2 }, Some(comm), &images)
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), want, "{:?}", cfg.fusion);
        }
    }
}
