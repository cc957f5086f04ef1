//! The data-loading bench's weaver side (bench/data/run.sh drives it).
//!
//!     data_bench make DIR N          # N 512×384 JPEGs with captions in shards of 250, and a
//!                                    # word-level tokenizer.json
//!     data_bench run DIR WORKERS BATCH SAMPLES
//!
//! `run` streams DIR's shards through weaver's loader (random-resized crop to 224 px, CLIP
//! normalisation, tokenisation to 32 tokens, whole step batches) and prints one JSON line:
//! samples/s after the first batch, CPU seconds of the whole process over the same span.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use weaver_data::image::{encode_jpeg, test_pattern};
use weaver_data::loader::{DpRank, LoaderConfig, ShardLoader};
use weaver_data::sample::Fields;
use weaver_data::shards::{ReadPolicy, Stores};
use weaver_data::tar::TarWriter;
use weaver_models::data::Rng;

const WORDS: [&str; 16] = [
    "a", "photo", "of", "the", "red", "green", "small", "large", "dog", "cat", "house", "tree",
    "on", "in", "street", "field",
];

fn caption(n: u64) -> String {
    let mut r = Rng::new(5, 6, n);
    (0..8 + r.below(8))
        .map(|_| WORDS[r.below(WORDS.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct we pass and reads nothing else.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn make(dir: &str, n: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let per = 250;
    let mut bytes = 0usize;
    for s in 0..n.div_ceil(per) {
        let f = std::fs::File::create(format!("{dir}/bench-{s:05}.tar"))?;
        let mut tw = TarWriter::new(std::io::BufWriter::new(f));
        for i in s * per..((s + 1) * per).min(n) {
            // A pattern with noise: JPEG sizes like photos' (~50–90 KB at 512×384, q 90).
            let mut img = test_pattern(512, 384, i);
            let mut r = Rng::new(9, 9, i);
            for p in img.pixels.iter_mut() {
                *p = p.saturating_add(r.below(24) as u8).saturating_sub(12);
            }
            let jpg = encode_jpeg(&img, 90).map_err(anyhow::Error::msg)?;
            bytes += jpg.len();
            tw.append(&format!("{i:09}.jpg"), &jpg)?;
            tw.append(&format!("{i:09}.txt"), caption(i).as_bytes())?;
        }
        tw.finish()?;
    }
    let mut vocab = serde_json::Map::new();
    for (i, w) in ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
        .iter()
        .chain(WORDS.iter())
        .enumerate()
    {
        vocab.insert(w.to_string(), serde_json::json!(i));
    }
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(format!("{dir}/tokenizer.json"), tok.to_string())?;
    std::fs::write(
        format!("{dir}/vocab.json"),
        serde_json::Value::Object(vocab).to_string(),
    )?;
    eprintln!("{n} samples, mean JPEG {} bytes", bytes / n as usize);
    Ok(())
}

fn run(dir: &str, workers: usize, batch: usize, samples: usize) -> anyhow::Result<()> {
    let stores = Stores::default();
    let tok = weaver_models::tokenizer::load(&format!("{dir}/tokenizer.json"), 64)?;
    let shards = stores.expand("data.shards", dir)?;
    let streams = shards.len().min(8);
    let cfg = LoaderConfig {
        shards,
        seed: 0,
        streams,
        shuffle_buffer: 100,
        fields: Fields::new("jpg", "txt", "caption"),
        image_size: 224,
        text_len: 32,
        tokenizer: Arc::from(tok),
        train: true,
        workers,
        global_batch: batch,
        max_bad_fraction: 0.0,
        policy: ReadPolicy {
            retries: 0,
            backoff: Duration::from_millis(100),
            timeout: Duration::from_secs(60),
        },
        prefetch: 2,
    };
    let started = Instant::now();
    let mut l = ShardLoader::start(cfg, DpRank { dp: 1, rank: 0 }, &HashMap::new(), None)?;
    let first = l.next_step()?;
    let first_s = started.elapsed().as_secs_f64();
    let (t0, c0) = (Instant::now(), cpu_seconds());
    let mut n = 0;
    let mut checksum = 0f64;
    while n < samples {
        let s = l.next_step()?;
        n += s.keys.len();
        checksum += s.images.double_value(&[0, 0, 0, 0]);
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - c0;
    drop(first);
    println!(
        "{}",
        serde_json::json!({
            "loader": "weaver", "workers": workers, "batch": batch, "samples": n,
            "wall_s": wall, "cpu_s": cpu, "samples_per_s": n as f64 / wall,
            "first_batch_s": first_s, "checksum": checksum,
        })
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    match a.get(1).map(String::as_str) {
        Some("make") if a.len() == 4 => make(&a[2], a[3].parse()?),
        Some("run") if a.len() == 6 => run(&a[2], a[3].parse()?, a[4].parse()?, a[5].parse()?),
        _ => anyhow::bail!("usage: data_bench make DIR N | run DIR WORKERS BATCH SAMPLES"),
    }
}
