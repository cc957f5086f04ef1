//! `weaver data pack` (images and a caption file → WebDataset shards and `stats.json`) and
//! `weaver data inspect` (counts and a few samples of a shard set), as functions the CLI
//! calls.
//!
//! Shards are named `{out}/{prefix}-{00000..}.tar`; sample `n` has key `{n:09}` and members
//! `{key}.{jpg|png|webp}` (the image, re-encoded as JPEG when `image_size` shrinks it),
//! `{key}.txt` (the caption) and `{key}.json` (`caption`, `source` file name, `width`,
//! `height`, and every other field or column of the input line as it is: a VQA set's
//! `question` and `answer`), the layout img2dataset writes. `stats.json` holds the counts, bytes and image
//! sizes, and `sizes.json` the samples per shard (what open_clip reads for the epoch size).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use serde::Serialize;

use crate::error::{DataError, Result};
use crate::image::{decode, encode_jpeg, shrink_shorter_side, sniff, Format};
use crate::sample::{Fields, Grouper};
use crate::shards::{runtime, Location, ReadPolicy, ShardReader, Stores};
use crate::tar::{TarReader, TarWriter};

/// One line of the caption file: an image file (relative to the images folder) and its
/// caption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The image file.
    pub image: String,
    /// Its caption.
    pub caption: String,
    /// The line's other fields (columns), copied into the sample's `json` member as they
    /// are: a VQA set's `question` and `answer`, labels, ids.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Fields every packed sample's `json` member holds; an input field of the same name is an
/// error (it would be overwritten).
const META_FIELDS: [&str; 4] = ["key", "source", "width", "height"];

/// The fields of an input line other than its image and caption columns (the names the
/// image and caption may have are left out whichever is used); a field named like one of
/// [`META_FIELDS`] is refused.
fn extra_fields(
    fields: impl Iterator<Item = (String, serde_json::Value)>,
) -> std::result::Result<serde_json::Map<String, serde_json::Value>, String> {
    let mut out = serde_json::Map::new();
    for (name, v) in fields {
        let lower = name.trim().to_ascii_lowercase();
        if IMAGE_COLUMNS.contains(&lower.as_str()) || CAPTION_COLUMNS.contains(&lower.as_str()) {
            continue;
        }
        if META_FIELDS.contains(&lower.as_str()) {
            return Err(format!(
                "field {name:?} clashes with the json member's own {META_FIELDS:?}; rename it"
            ));
        }
        out.insert(name, v);
    }
    Ok(out)
}

const IMAGE_COLUMNS: [&str; 5] = ["image", "file", "filename", "path", "url"];
const CAPTION_COLUMNS: [&str; 4] = ["caption", "text", "txt", "title"];

/// Reads a caption file: `.jsonl` (objects with `image`/`file`/`filename`/`path` and
/// `caption`/`text`), `.csv` or `.tsv` (a header row naming those columns).
pub fn read_captions(path: &Path) -> Result<Vec<Entry>> {
    let shown = path.display().to_string();
    let bad = |line: usize, message: String| DataError::Captions {
        path: shown.clone(),
        line,
        message,
    };
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(&shown, e))?;
    let mut out = Vec::new();
    match ext.as_str() {
        "jsonl" | "json" => {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v: serde_json::Value =
                    serde_json::from_str(line).map_err(|e| bad(i + 1, e.to_string()))?;
                let pick = |names: &[&str]| {
                    names
                        .iter()
                        .find_map(|n| v.get(*n).and_then(|x| x.as_str()).map(str::to_string))
                };
                let image = pick(&IMAGE_COLUMNS).ok_or_else(|| {
                    bad(i + 1, format!("no image field (one of {IMAGE_COLUMNS:?})"))
                })?;
                let caption = pick(&CAPTION_COLUMNS).ok_or_else(|| {
                    bad(
                        i + 1,
                        format!("no caption field (one of {CAPTION_COLUMNS:?})"),
                    )
                })?;
                let extra = match &v {
                    serde_json::Value::Object(m) => {
                        extra_fields(m.iter().map(|(k, x)| (k.clone(), x.clone())))
                            .map_err(|m| bad(i + 1, m))?
                    }
                    _ => return Err(bad(i + 1, "not a JSON object".into())),
                };
                out.push(Entry {
                    image,
                    caption,
                    extra,
                });
            }
        }
        "csv" | "tsv" => {
            let mut r = csv::ReaderBuilder::new()
                .delimiter(if ext == "tsv" { b'\t' } else { b',' })
                .flexible(true)
                .from_reader(text.as_bytes());
            let headers = r.headers().map_err(|e| bad(1, e.to_string()))?.clone();
            let col = |names: &[&str]| {
                headers
                    .iter()
                    .position(|h| names.contains(&h.trim().to_ascii_lowercase().as_str()))
            };
            let ic = col(&IMAGE_COLUMNS)
                .ok_or_else(|| bad(1, format!("no image column (one of {IMAGE_COLUMNS:?})")))?;
            let cc = col(&CAPTION_COLUMNS)
                .ok_or_else(|| bad(1, format!("no caption column (one of {CAPTION_COLUMNS:?})")))?;
            for (i, rec) in r.records().enumerate() {
                let rec = rec.map_err(|e| bad(i + 2, e.to_string()))?;
                let (Some(image), Some(caption)) = (rec.get(ic), rec.get(cc)) else {
                    return Err(bad(i + 2, "missing a column".into()));
                };
                let extra = extra_fields(
                    headers
                        .iter()
                        .enumerate()
                        .filter_map(|(c, h)| rec.get(c).map(|x| (h.trim().to_string(), x.into()))),
                )
                .map_err(|m| bad(i + 2, m))?;
                out.push(Entry {
                    image: image.to_string(),
                    caption: caption.to_string(),
                    extra,
                });
            }
        }
        other => {
            return Err(bad(
                0,
                format!("unknown caption file type {other:?}; use .jsonl, .csv or .tsv"),
            ))
        }
    }
    Ok(out)
}

/// What to pack.
#[derive(Debug, Clone)]
pub struct PackOptions {
    /// Folder the caption file's image names are relative to.
    pub images: PathBuf,
    /// The caption file.
    pub captions: PathBuf,
    /// Where the shards go (a folder path or a store URL).
    pub out: String,
    /// Samples per shard.
    pub shard_size: usize,
    /// Shrink images whose shorter side exceeds this (re-encoded as JPEG); none: keep the
    /// files as they are.
    pub image_size: Option<u32>,
    /// Shard name prefix.
    pub prefix: String,
    /// Show a progress bar.
    pub progress: bool,
}

/// Range and mean of a dimension.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct Span {
    /// Smallest.
    pub min: u32,
    /// Largest.
    pub max: u32,
    /// Mean.
    pub mean: f64,
}

/// What `pack` wrote (also `stats.json`).
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct PackStats {
    /// Shards written.
    pub shards: usize,
    /// Samples written.
    pub samples: u64,
    /// Caption lines skipped (missing or undecodable image), with the reason.
    pub skipped: Vec<String>,
    /// Bytes of all shards.
    pub bytes: u64,
    /// Image widths (as stored).
    pub width: Span,
    /// Image heights (as stored).
    pub height: Span,
    /// Samples per image format.
    pub formats: BTreeMap<String, u64>,
    /// Samples per shard file name.
    pub per_shard: BTreeMap<String, u64>,
}

/// Writes one object, locally or through a multipart upload.
enum Sink {
    File(std::io::BufWriter<std::fs::File>, PathBuf),
    Upload(WriteMultipart, String),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::File(f, _) => f.write(buf),
            Sink::Upload(u, _) => {
                let rt = runtime().map_err(|e| std::io::Error::other(e.to_string()))?;
                let _g = rt.enter();
                rt.block_on(u.wait_for_capacity(4))
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                u.write(buf);
                Ok(buf.len())
            }
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::File(f, _) => f.flush(),
            Sink::Upload(..) => Ok(()),
        }
    }
}

fn open_sink(stores: &Stores, url: &str) -> Result<Sink> {
    match stores.locate(url)? {
        Location::Local(p) => {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir.display(), e))?;
            }
            let f = std::fs::File::create(&p).map_err(|e| DataError::io(p.display(), e))?;
            Ok(Sink::File(std::io::BufWriter::new(f), p))
        }
        Location::Remote { store, path } => {
            let up = runtime()?
                .block_on(store.put_multipart(&path))
                .map_err(|e| DataError::Read {
                    url: url.into(),
                    message: e.to_string(),
                })?;
            Ok(Sink::Upload(WriteMultipart::new(up), url.into()))
        }
    }
}

fn close_sink(s: Sink) -> Result<()> {
    match s {
        Sink::File(mut f, p) => {
            f.flush().map_err(|e| DataError::io(p.display(), e))?;
            f.get_ref()
                .sync_all()
                .map_err(|e| DataError::io(p.display(), e))
        }
        Sink::Upload(u, url) => {
            let rt = runtime()?;
            let _g = rt.enter();
            rt.block_on(u.finish())
                .map(|_| ())
                .map_err(|e| DataError::Read {
                    url,
                    message: e.to_string(),
                })
        }
    }
}

fn put_small(stores: &Stores, url: &str, bytes: Vec<u8>) -> Result<()> {
    match stores.locate(url)? {
        Location::Local(p) => std::fs::write(&p, bytes).map_err(|e| DataError::io(p.display(), e)),
        Location::Remote { store, path } => {
            put_remote(&store, &path, bytes).map_err(|e| DataError::Read {
                url: url.into(),
                message: e,
            })
        }
    }
}

fn put_remote(
    store: &std::sync::Arc<dyn ObjectStore>,
    path: &StorePath,
    bytes: Vec<u8>,
) -> std::result::Result<(), String> {
    runtime()
        .map_err(|e| e.to_string())?
        .block_on(store.put(path, bytes.into()))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn bar(progress: bool, len: u64, what: &str) -> indicatif::ProgressBar {
    if !progress {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(&format!(
        "{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {what}  {{msg}}"
    )) {
        b.set_style(style.progress_chars("=> "));
    }
    b
}

/// Packs images and captions into shards; returns (and writes) the stats.
pub fn pack(opts: &PackOptions, stores: &Stores) -> Result<PackStats> {
    if opts.shard_size == 0 {
        return Err(DataError::config("--shard-size", "must be at least 1"));
    }
    let entries = read_captions(&opts.captions)?;
    let out = opts.out.trim_end_matches('/').to_string();
    let mut stats = PackStats::default();
    let progress = bar(opts.progress, entries.len() as u64, "images");
    let mut resizer = fast_image_resize::Resizer::new();
    let (mut wsum, mut hsum) = (0f64, 0f64);
    let mut writer: Option<(TarWriter<Sink>, String, u64)> = None;
    for e in &entries {
        progress.inc(1);
        let file = opts.images.join(&e.image);
        let bytes = match std::fs::read(&file) {
            Ok(b) => b,
            Err(err) => {
                stats.skipped.push(format!("{}: {err}", e.image));
                continue;
            }
        };
        let img = match decode(&bytes) {
            Ok(i) => i,
            Err(err) => {
                stats.skipped.push(format!("{}: {err}", e.image));
                continue;
            }
        };
        let (data, ext, w, h) = match opts.image_size {
            Some(side) if img.width.min(img.height) > side => {
                let small =
                    shrink_shorter_side(&mut resizer, &img, side).map_err(DataError::Loader)?;
                let jpg = encode_jpeg(&small, 90).map_err(DataError::Loader)?;
                (jpg, "jpg", small.width, small.height)
            }
            _ => {
                let ext = match sniff(&bytes) {
                    Some(Format::Jpeg) => "jpg",
                    Some(Format::Png) => "png",
                    _ => "webp",
                };
                (bytes, ext, img.width, img.height)
            }
        };
        if writer.is_none() {
            let name = format!("{}-{:05}.tar", opts.prefix, stats.shards);
            let url = format!("{out}/{name}");
            writer = Some((TarWriter::new(open_sink(stores, &url)?), name, 0));
            stats.shards += 1;
        }
        let Some((tw, name, count)) = writer.as_mut() else {
            continue;
        };
        let key = format!("{:09}", stats.samples);
        let mut meta = e.extra.clone();
        for (k, v) in [
            ("key", serde_json::json!(key)),
            ("caption", serde_json::json!(e.caption)),
            ("source", serde_json::json!(e.image)),
            ("width", serde_json::json!(w)),
            ("height", serde_json::json!(h)),
        ] {
            meta.insert(k.to_string(), v);
        }
        let meta = serde_json::Value::Object(meta);
        let werr = |err: std::io::Error| DataError::io(format!("{out}/{name}"), err);
        tw.append(&format!("{key}.{ext}"), &data).map_err(werr)?;
        tw.append(&format!("{key}.txt"), e.caption.as_bytes())
            .map_err(werr)?;
        tw.append(&format!("{key}.json"), meta.to_string().as_bytes())
            .map_err(werr)?;
        *count += 1;
        stats.samples += 1;
        *stats.formats.entry(ext.to_string()).or_default() += 1;
        if stats.samples == 1 {
            stats.width = Span {
                min: w,
                max: w,
                mean: 0.0,
            };
            stats.height = Span {
                min: h,
                max: h,
                mean: 0.0,
            };
        }
        stats.width.min = stats.width.min.min(w);
        stats.width.max = stats.width.max.max(w);
        stats.height.min = stats.height.min.min(h);
        stats.height.max = stats.height.max.max(h);
        wsum += f64::from(w);
        hsum += f64::from(h);
        if *count as usize >= opts.shard_size {
            if let Some((tw, name, count)) = writer.take() {
                stats.bytes += tw.position() + 1024;
                stats.per_shard.insert(name.clone(), count);
                close_sink(tw.finish().map_err(|e| DataError::io(&name, e))?)?;
            }
        }
    }
    if let Some((tw, name, count)) = writer.take() {
        stats.bytes += tw.position() + 1024;
        stats.per_shard.insert(name.clone(), count);
        close_sink(tw.finish().map_err(|e| DataError::io(&name, e))?)?;
    }
    progress.finish_and_clear();
    if stats.samples > 0 {
        stats.width.mean = wsum / stats.samples as f64;
        stats.height.mean = hsum / stats.samples as f64;
    }
    let json = serde_json::to_vec_pretty(&stats).map_err(|e| DataError::Loader(e.to_string()))?;
    put_small(stores, &format!("{out}/stats.json"), json)?;
    let sizes = serde_json::to_vec_pretty(&stats.per_shard)
        .map_err(|e| DataError::Loader(e.to_string()))?;
    put_small(stores, &format!("{out}/sizes.json"), sizes)?;
    Ok(stats)
}

/// One sample as `inspect` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Shown {
    /// Shard URL.
    pub shard: String,
    /// Sample key.
    pub key: String,
    /// (extension, bytes) of its members.
    pub members: Vec<(String, usize)>,
    /// Image size, or why it does not decode.
    pub image: String,
    /// The caption, or why there is none.
    pub caption: String,
}

/// What `inspect` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Inspection {
    /// Shards in the set.
    pub shards: usize,
    /// `stats.json` next to the shards, when there is one.
    pub stats: Option<serde_json::Value>,
    /// Samples counted (every shard read when `full`, else only the shown ones).
    pub samples: u64,
    /// Samples whose image or caption is unusable (with `full`).
    pub bad: u64,
    /// Unreadable tar members (with `full`).
    pub bad_members: u64,
    /// The first samples.
    pub shown: Vec<Shown>,
}

/// Lists a shard set, shows its first `show` samples and, with `full`, reads every shard
/// (decoding each image) to count good and bad samples.
pub fn inspect(
    spec: &str,
    show: usize,
    full: bool,
    fields: &Fields,
    stores: &Stores,
) -> Result<Inspection> {
    let shards = stores.expand("URL", spec)?;
    let mut out = Inspection {
        shards: shards.len(),
        ..Inspection::default()
    };
    let dir = spec.trim_end_matches('/');
    let dir = if dir.ends_with(".tar") || dir.contains('{') {
        dir.rsplit_once('/').map_or("", |x| x.0)
    } else {
        dir
    };
    if !dir.is_empty() {
        let stats_url = format!("{dir}/stats.json");
        if let Ok(Location::Local(p)) = stores.locate(&stats_url) {
            if let Ok(b) = std::fs::read(p) {
                out.stats = serde_json::from_slice(&b).ok();
            }
        } else if let Ok(Location::Remote { store, path }) = stores.locate(&stats_url) {
            let got = runtime()?.block_on(async move { store.get(&path).await?.bytes().await });
            if let Ok(b) = got {
                out.stats = serde_json::from_slice(&b).ok();
            }
        }
    }
    let policy = ReadPolicy {
        retries: 2,
        backoff: std::time::Duration::from_millis(500),
        timeout: std::time::Duration::from_secs(60),
    };
    let progress = bar(full, shards.len() as u64, "shards");
    for shard in &shards {
        if !full && out.shown.len() >= show {
            break;
        }
        let reader = ShardReader::open(shard, 0, policy)?;
        let mut g = Grouper::new(TarReader::new(reader, 0));
        while let Some(s) = g.next() {
            out.samples += 1;
            out.bad_members += u64::from(s.lost_members);
            let image = match fields.image(&s).map(decode) {
                Ok(Ok(i)) => format!("{}×{}", i.width, i.height),
                Ok(Err(e)) => {
                    out.bad += 1;
                    format!("does not decode: {e}")
                }
                Err(e) => {
                    out.bad += 1;
                    e.to_string()
                }
            };
            let caption = match fields.caption(&s) {
                Ok(c) => c,
                Err(e) => {
                    if !image.starts_with("does not") && !image.starts_with("image:") {
                        out.bad += 1;
                    }
                    e.to_string()
                }
            };
            if out.shown.len() < show {
                out.shown.push(Shown {
                    shard: shard.url.clone(),
                    key: s.key.clone(),
                    members: s
                        .members
                        .iter()
                        .map(|(x, d)| (x.clone(), d.len()))
                        .collect(),
                    image,
                    caption,
                });
            } else if !full {
                break;
            }
        }
        out.bad_members += u64::from(g.take_lost());
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{encode_png, encode_webp, test_pattern};

    #[test]
    fn other_fields_are_carried_and_clashes_refused() {
        let dir = tempfile::tempdir().unwrap();
        let jl = dir.path().join("qa.jsonl");
        std::fs::write(
            &jl,
            "{\"image\": \"a.png\", \"caption\": \"a cat\", \"question\": \"what is it ?\", \"answer\": \"cat\"}\n",
        )
        .unwrap();
        let e = read_captions(&jl).unwrap();
        assert_eq!(e[0].extra["question"], "what is it ?");
        assert_eq!(e[0].extra["answer"], "cat");
        assert_eq!(e[0].extra.len(), 2);
        let csv = dir.path().join("qa.csv");
        std::fs::write(&csv, "file,text,question,answer\na.png,a cat,what ?,cat\n").unwrap();
        let e = read_captions(&csv).unwrap();
        assert_eq!(
            (e[0].caption.as_str(), &e[0].extra["answer"]),
            ("a cat", &serde_json::json!("cat"))
        );
        std::fs::write(&csv, "file,caption,width\na.png,a cat,3\n").unwrap();
        match read_captions(&csv) {
            Err(DataError::Captions { line, message, .. }) => {
                assert_eq!(line, 2);
                assert!(message.contains("width"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pack_then_inspect() {
        let dir = tempfile::tempdir().unwrap();
        let imgs = dir.path().join("imgs");
        std::fs::create_dir(&imgs).unwrap();
        let mut lines = String::from("file,caption\n");
        for i in 0..5u64 {
            let img = test_pattern(60 + i as u32, 40, i);
            let (name, bytes) = match i % 3 {
                0 => (format!("{i}.jpg"), encode_jpeg(&img, 90).unwrap()),
                1 => (format!("{i}.png"), encode_png(&img).unwrap()),
                _ => (format!("{i}.webp"), encode_webp(&img).unwrap()),
            };
            std::fs::write(imgs.join(&name), bytes).unwrap();
            lines.push_str(&format!("{name},\"picture {i}, with a comma\"\n"));
        }
        lines.push_str("missing.jpg,gone\n");
        let caps = dir.path().join("caps.csv");
        std::fs::write(&caps, lines).unwrap();
        let out = dir.path().join("shards");
        let stores = Stores::default();
        let stats = pack(
            &PackOptions {
                images: imgs,
                captions: caps,
                out: out.to_string_lossy().into_owned(),
                shard_size: 2,
                image_size: Some(32),
                prefix: "train".into(),
                progress: false,
            },
            &stores,
        )
        .unwrap();
        assert_eq!(
            (stats.shards, stats.samples, stats.skipped.len()),
            (3, 5, 1)
        );
        assert_eq!(stats.height.max, 32);
        let fields = Fields::new("jpg;png;webp", "txt", "caption");
        let got = inspect(out.to_str().unwrap(), 2, true, &fields, &stores).unwrap();
        assert_eq!((got.shards, got.samples, got.bad), (3, 5, 0));
        assert_eq!(got.shown[1].caption, "picture 1, with a comma");
        assert_eq!(got.stats.unwrap()["samples"], 5);
    }
}
