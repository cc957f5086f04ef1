//! Test data made here: images in every format, captions, tar shards, a tokenizer trained on
//! the captions with the `tokenizers` crate, and the S3 test server.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use weaver_data::image::{encode_jpeg, encode_png, encode_webp, test_pattern};
use weaver_data::loader::{DpRank, HostStep, LoaderConfig, ShardLoader};
use weaver_data::order::StreamPosition;
use weaver_data::sample::Fields;
use weaver_data::shards::{ReadPolicy, Stores};
use weaver_data::tar::TarWriter;
use weaver_models::tokenizer::Tokenizer;

pub const WORDS: [&str; 8] = ["red", "green", "blue", "cat", "dog", "bird", "on", "mat"];

/// The caption of sample `n`.
pub fn caption(n: u64) -> String {
    format!(
        "a {} {} on the {}",
        WORDS[(n % 3) as usize],
        WORDS[3 + (n / 3 % 3) as usize],
        WORDS[7]
    )
}

/// The members of a well-formed sample `n` (format rotating JPEG, PNG, WebP).
pub fn sample_members(n: u64, w: u32, h: u32) -> Vec<(String, Vec<u8>)> {
    let img = test_pattern(w, h, n);
    let (ext, bytes) = match n % 3 {
        0 => ("jpg", encode_jpeg(&img, 85).unwrap()),
        1 => ("png", encode_png(&img).unwrap()),
        _ => ("webp", encode_webp(&img).unwrap()),
    };
    let key = format!("{n:08}");
    let mut m = vec![(format!("{key}.{ext}"), bytes)];
    if n.is_multiple_of(2) {
        m.push((format!("{key}.txt"), caption(n).into_bytes()));
    } else {
        m.push((
            format!("{key}.json"),
            serde_json::json!({"caption": caption(n), "width": w})
                .to_string()
                .into_bytes(),
        ));
    }
    m
}

/// Writes `shards` shards of `per` samples each into `dir`; returns their paths.
pub fn write_shards(dir: &Path, shards: usize, per: u64, w: u32, h: u32) -> Vec<PathBuf> {
    (0..shards)
        .map(|s| {
            let path = dir.join(format!("shard-{s:03}.tar"));
            let mut tw = TarWriter::new(std::fs::File::create(&path).unwrap());
            for i in 0..per {
                for (name, data) in sample_members(s as u64 * per + i, w, h) {
                    tw.append(&name, &data).unwrap();
                }
            }
            tw.finish().unwrap();
            path
        })
        .collect()
}

/// A word-level tokenizer trained on the captions with the `tokenizers` crate.
pub fn train_tokenizer(dir: &Path) -> PathBuf {
    use tokenizers::models::wordlevel::{WordLevel, WordLevelTrainer};
    use tokenizers::models::TrainerWrapper;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::AddedToken;
    let corpus = dir.join("corpus.txt");
    let text: Vec<String> = (0..60).map(caption).collect();
    std::fs::write(&corpus, text.join("\n")).unwrap();
    let model = WordLevel::builder()
        .unk_token("[UNK]".into())
        .build()
        .unwrap();
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    let specials = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let mut trainer: TrainerWrapper = WordLevelTrainer::builder()
        .special_tokens(specials)
        .build()
        .unwrap()
        .into();
    tok.train_from_files(&mut trainer, vec![corpus.to_string_lossy().into_owned()])
        .unwrap();
    let path = dir.join("tokenizer.json");
    tok.save(&path, false).unwrap();
    path
}

pub fn tokenizer(dir: &Path) -> Arc<dyn Tokenizer> {
    let path = train_tokenizer(dir);
    Arc::from(weaver_models::tokenizer::load(path.to_str().unwrap(), 64).unwrap())
}

pub fn config(spec: &str, stores: &Stores, tok: Arc<dyn Tokenizer>) -> LoaderConfig {
    LoaderConfig {
        shards: stores.expand("data.shards", spec).unwrap(),
        seed: 7,
        streams: 4,
        shuffle_buffer: 5,
        fields: Fields::new("jpg;jpeg;png;webp", "txt;json", "caption"),
        qa: None,
        image_size: 16,
        text_len: 12,
        tokenizer: tok,
        train: true,
        workers: 2,
        global_batch: 8,
        max_bad_fraction: 0.5,
        policy: ReadPolicy {
            retries: 1,
            backoff: Duration::from_millis(10),
            timeout: Duration::from_secs(30),
        },
        prefetch: 2,
    }
}

/// A layout's data-parallel ranks, each with its own loader.
pub struct Ranks {
    pub loaders: Vec<ShardLoader>,
}

impl Ranks {
    pub fn start(
        cfg: &LoaderConfig,
        dp: usize,
        positions: &HashMap<usize, StreamPosition>,
    ) -> Ranks {
        Ranks {
            loaders: (0..dp)
                .map(|rank| {
                    ShardLoader::start(cfg.clone(), DpRank { dp, rank }, positions, None).unwrap()
                })
                .collect(),
        }
    }

    /// One step: every rank's share, in rank order (the global batch).
    pub fn step(&mut self) -> Vec<HostStep> {
        self.loaders
            .iter_mut()
            .map(|l| l.next_step().unwrap())
            .collect()
    }

    /// Every stream's position after the last step.
    pub fn positions(&self) -> HashMap<usize, StreamPosition> {
        self.loaders
            .iter()
            .flat_map(|l| l.positions().iter().copied())
            .collect()
    }
}

pub fn keys(steps: &[HostStep]) -> Vec<String> {
    steps.iter().flat_map(|s| s.keys.iter().cloned()).collect()
}

/// The S3-protocol server (s3s-fs) on loopback; fails, does not skip, without it.
pub struct S3Server {
    child: std::process::Child,
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

pub const BUCKET: &str = "weaver";

impl S3Server {
    pub fn start() -> S3Server {
        use std::io::BufRead;
        let bin = std::env::var("WEAVER_S3_SERVER").unwrap_or_default();
        assert!(
            !bin.is_empty() && Path::new(&bin).is_file(),
            "WEAVER_S3_SERVER={bin:?} is not an S3 server binary. Install it and export its path with \
             `eval \"$(scripts/install-s3-server.sh)\"` (from the repository root), then rerun."
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(BUCKET)).unwrap();
        let mut child = std::process::Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args([
                "--access-key",
                "weaver-test",
                "--secret-key",
                "weaver-test-secret",
            ])
            .arg(dir.path())
            .env("RUST_LOG", "s3s_fs=info")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(at) = line.find("server is running at http://") {
                    let addr = line[at + "server is running at ".len()..]
                        .trim()
                        .to_string();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
            }
        });
        let endpoint = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("{bin} did not report its address within 30 s");
            }
        };
        S3Server {
            child,
            endpoint,
            _dir: dir,
        }
    }

    pub fn stores(&self) -> Stores {
        Stores::new(
            [
                ("aws_endpoint", self.endpoint.as_str()),
                ("aws_allow_http", "true"),
                ("aws_region", "us-east-1"),
                ("aws_access_key_id", "weaver-test"),
                ("aws_secret_access_key", "weaver-test-secret"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        )
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
