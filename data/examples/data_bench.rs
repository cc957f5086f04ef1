//! The data-loading bench's weaver side (bench/data/run.sh drives it).
//!
//!     data_bench make DIR N          # N 512×384 JPEGs with captions in shards of 250, and a
//!                                    # word-level tokenizer.json
//!     data_bench run DIR WORKERS BATCH SAMPLES
//!     data_bench stages DIR SAMPLES   # one thread, each step of a sample timed apart
//!     data_bench pixels DIR N OUT     # the first N samples' crop boxes and 224 px crops
//!
//! `run` streams DIR's shards through weaver's loader (random-resized crop to 224 px, CLIP
//! normalisation, tokenisation to 32 tokens, whole step batches) and prints one JSON line:
//! samples/s after the first batch, CPU seconds of the whole process over the same span.
//! `stages` prints seconds per sample of each step of the loader's work, `pixels` writes
//! what bench/data/check_pixels.py compares with PIL's resampling of the same boxes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use weaver_data::image::{
    decode_into, encode_jpeg, random_resized_crop, test_pattern, Normalizer, Resampler, Rgb,
};
use weaver_data::loader::{DpRank, LoaderConfig, ShardLoader};
use weaver_data::sample::{BadSample, Fields, Grouper, RawSample};
use weaver_data::shards::{ReadPolicy, Stores};
use weaver_data::tar::{TarReader, TarWriter};
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
        qa: None,
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

/// CPU seconds this thread has run (a busy machine's other work does not count).
fn thread_cpu() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass and reads nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

fn bad(e: BadSample) -> anyhow::Error {
    anyhow::anyhow!("bad sample: {e}")
}

/// The first `n` samples of DIR's shards, in file order, read whole into memory.
fn first_samples(dir: &str, n: usize) -> anyhow::Result<Vec<RawSample>> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "tar"))
        .collect();
    paths.sort();
    let mut out = Vec::new();
    for p in paths {
        let f = std::io::BufReader::new(std::fs::File::open(&p)?);
        let mut g = Grouper::new(TarReader::new(f, 0));
        while let Some(s) = g.next() {
            if out.len() == n {
                return Ok(out);
            }
            out.push(s);
        }
    }
    Ok(out)
}

/// CPU seconds (of this thread) per sample of each step of the loader's work, on one thread: reading and grouping
/// the tar members, decoding, drawing the crop and resampling it, normalising into the batch
/// layout, tokenising. (The loader's hand-offs between threads are not in it; `run` is.)
fn stages(dir: &str, samples: usize) -> anyhow::Result<()> {
    let tok = weaver_models::tokenizer::load(&format!("{dir}/tokenizer.json"), 64)?;
    let fields = Fields::new("jpg", "txt", "caption");
    let t = thread_cpu();
    let raw = first_samples(dir, samples)?;
    let read = thread_cpu() - t;
    let n = raw.len();
    let (mut decode, mut resize, mut normalize, mut tokenize) = (0f64, 0f64, 0f64, 0f64);
    let mut resampler = Resampler::new();
    let mut img = Rgb {
        width: 0,
        height: 0,
        pixels: Vec::new(),
    };
    let norm = Normalizer::clip();
    let mut crop = vec![0u8; 3 * 224 * 224];
    let mut batch = vec![std::mem::MaybeUninit::<f32>::uninit(); 3 * 224 * 224];
    for (i, s) in raw.iter().enumerate() {
        let a = thread_cpu();
        decode_into(fields.image(s).map_err(bad)?, &mut img).map_err(anyhow::Error::msg)?;
        let b = thread_cpu();
        let c = random_resized_crop(img.width, img.height, &mut Rng::new(0, 1, i as u64));
        resampler
            .crop_resize(&img, c, 224, &mut crop)
            .map_err(anyhow::Error::msg)?;
        let c = thread_cpu();
        norm.write_chw(&crop, &mut batch);
        let d = thread_cpu();
        let ids = weaver_models::tokenizer::encode_padded(
            tok.as_ref(),
            &fields.caption(s).map_err(bad)?,
            32,
        )?;
        let e = thread_cpu();
        std::hint::black_box((&batch, ids));
        decode += b - a;
        resize += c - b;
        normalize += d - c;
        tokenize += e - d;
    }
    let per = |x: f64| x / n as f64;
    println!(
        "{}",
        serde_json::json!({
            "loader": "weaver", "samples": n, "read": per(read), "decode": per(decode),
            "crop_resize": per(resize), "normalize": per(normalize), "tokenize": per(tokenize),
        })
    );
    Ok(())
}

/// For bench/data/check_pixels.py: the first `n` samples' keys, sizes and crop boxes (JSON
/// lines in OUT.json) and weaver's 224 px 8-bit crops of them (OUT.rgb, one after another).
fn pixels(dir: &str, n: usize, out: &str) -> anyhow::Result<()> {
    let fields = Fields::new("jpg", "txt", "caption");
    let mut resampler = Resampler::new();
    let mut img = Rgb {
        width: 0,
        height: 0,
        pixels: Vec::new(),
    };
    let mut crop = vec![0u8; 3 * 224 * 224];
    let (mut meta, mut rgb) = (String::new(), Vec::new());
    for (i, s) in first_samples(dir, n)?.iter().enumerate() {
        decode_into(fields.image(s).map_err(bad)?, &mut img).map_err(anyhow::Error::msg)?;
        let c = random_resized_crop(img.width, img.height, &mut Rng::new(0, 1, i as u64));
        resampler
            .crop_resize(&img, c, 224, &mut crop)
            .map_err(anyhow::Error::msg)?;
        rgb.extend_from_slice(&crop);
        meta += &serde_json::json!({
            "key": s.key, "width": img.width, "height": img.height,
            "box": [c.left, c.top, c.left + c.width, c.top + c.height],
        })
        .to_string();
        meta.push('\n');
    }
    std::fs::write(format!("{out}.json"), meta)?;
    std::fs::write(format!("{out}.rgb"), rgb)?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    match a.get(1).map(String::as_str) {
        Some("make") if a.len() == 4 => make(&a[2], a[3].parse()?),
        Some("run") if a.len() == 6 => run(&a[2], a[3].parse()?, a[4].parse()?, a[5].parse()?),
        Some("stages") if a.len() == 4 => stages(&a[2], a[3].parse()?),
        Some("pixels") if a.len() == 5 => pixels(&a[2], a[3].parse()?, &a[4]),
        _ => anyhow::bail!(
            "usage: data_bench make DIR N | run DIR WORKERS BATCH SAMPLES | stages DIR SAMPLES \
             | pixels DIR N OUT"
        ),
    }
}
