//! The shard loader end to end on real files made here: the order resumes exactly on any
//! data-parallel layout, bad data is skipped and counted (and the counts resume too), too
//! much bad data stops with the worst shards named, and shards stream from an S3 server.

mod common;

use std::collections::{HashMap, HashSet};

use common::*;
use weaver_data::error::DataError;
use weaver_data::loader::{DpRank, ShardLoader};
use weaver_data::sample::Grouper;
use weaver_data::shards::{ReadPolicy, ShardReader, Stores};
use weaver_data::tar::{TarReader, TarWriter};

#[test]
fn the_order_resumes_exactly_when_dp_changes() {
    let dir = tempfile::tempdir().unwrap();
    write_shards(dir.path(), 8, 12, 24, 18);
    let stores = Stores::default();
    let tok = tokenizer(dir.path());
    let cfg = config(dir.path().to_str().unwrap(), &stores, tok);

    // The uninterrupted run, on one rank.
    let mut one = Ranks::start(&cfg, 1, &HashMap::new());
    let whole: Vec<_> = (0..10).map(|_| one.step()).collect();
    let want: Vec<Vec<String>> = whole.iter().map(|s| keys(s)).collect();
    let flat: Vec<&String> = want.iter().flatten().collect();
    let distinct: HashSet<&&String> = flat.iter().collect();
    assert_eq!(
        distinct.len(),
        80,
        "no sample twice within the epoch (96 samples)"
    );

    // dp = 4 for 4 steps, shrink to dp = 2 for 3, grow back to dp = 4 for 3.
    let mut got = Vec::new();
    let mut positions = HashMap::new();
    for (dp, steps) in [(4, 4), (2, 3), (4, 3)] {
        let mut ranks = Ranks::start(&cfg, dp, &positions);
        for i in 0..steps {
            let s = ranks.step();
            if i == 0 && got.len() == 4 {
                // The first resumed step: the same pixels (crops are seeded per sample).
                let imgs: Vec<tch::Tensor> = s.iter().map(|x| x.images.shallow_clone()).collect();
                let mine = tch::Tensor::cat(&imgs, 0);
                let theirs: Vec<tch::Tensor> =
                    whole[4].iter().map(|x| x.images.shallow_clone()).collect();
                assert!(mine.equal(&tch::Tensor::cat(&theirs, 0)));
            }
            got.push(keys(&s));
        }
        positions = ranks.positions();
        assert_eq!(positions.len(), 4, "every stream has a position");
    }
    assert_eq!(got, want);
    assert!(
        positions.values().any(|p| p.offset > 0),
        "resumed mid-shard from a byte offset: {positions:?}"
    );
}

/// Writes a shard whose samples are given member by member.
fn shard(path: &std::path::Path, members: &[(String, Vec<u8>)]) {
    let mut tw = TarWriter::new(std::fs::File::create(path).unwrap());
    for (n, d) in members {
        tw.append(n, d).unwrap();
    }
    tw.finish().unwrap();
}

#[test]
fn bad_data_is_skipped_counted_and_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = |range: std::ops::Range<u64>| -> Vec<(String, Vec<u8>)> {
        range.flat_map(|n| sample_members(n, 20, 14)).collect()
    };
    // A corrupt image.
    let mut a = good(0..5);
    a.push((
        "bad-image.jpg".into(),
        vec![0xff, 0xd8, 0xff, 0x00, 1, 2, 3],
    ));
    a.push(("bad-image.txt".into(), b"a red cat".to_vec()));
    a.extend(good(5..8));
    shard(&d.join("a.tar"), &a);
    // A missing caption.
    let mut b = good(10..14);
    b.push((
        "no-caption.jpg".into(),
        sample_members(0, 20, 14)[0].1.clone(),
    ));
    b.extend(good(14..18));
    shard(&d.join("b.tar"), &b);
    // An unreadable member: the caption header of one sample is corrupt.
    let c = good(20..28);
    shard(&d.join("c.tar"), &c);
    let mut bytes = std::fs::read(d.join("c.tar")).unwrap();
    let mut r = TarReader::new(&bytes[..], 0);
    let mut offsets = Vec::new();
    while let Some(weaver_data::tar::Entry::Member(m)) = r.next().unwrap() {
        offsets.push(m.offset);
    }
    bytes[offsets[3] as usize + 20] ^= 0x55; // member 3: sample 21's caption
    std::fs::write(d.join("c.tar"), bytes).unwrap();
    shard(&d.join("e.tar"), &good(30..38));
    // A shard that cannot be read: listed, never written.
    std::fs::write(
        d.join("list.txt"),
        "a.tar\nb.tar\nc.tar\nmissing.tar\ne.tar\n",
    )
    .unwrap();

    let stores = Stores::default();
    let tok = tokenizer(d);
    let mut cfg = config(d.join("list.txt").to_str().unwrap(), &stores, tok);
    cfg.max_bad_fraction = 0.5;
    let steps = 8; // 64 samples: past the end of epoch 0 (33 good ones) on every stream
    let mut one = Ranks::start(&cfg, 1, &HashMap::new());
    let want: Vec<Vec<String>> = (0..steps).map(|_| keys(&one.step())).collect();
    let stats = one.loaders[0].stats();
    assert!(stats.bad_image >= 1, "{stats:?}");
    assert!(
        stats.bad_caption >= 2,
        "the missing one and sample 21's: {stats:?}"
    );
    assert!(stats.bad_members >= 1, "{stats:?}");
    assert!(stats.shards_skipped >= 1, "{stats:?}");
    for k in want.iter().flatten() {
        assert!(
            !["bad-image", "no-caption", "00000021"].contains(&k.as_str()),
            "{k}"
        );
    }

    // The same with a stop and a resume on another layout: same keys, same counters.
    let mut first = Ranks::start(&cfg, 2, &HashMap::new());
    let mut got: Vec<Vec<String>> = (0..3).map(|_| keys(&first.step())).collect();
    let mut second = Ranks::start(&cfg, 4, &first.positions());
    got.extend((3..steps).map(|_| keys(&second.step())));
    assert_eq!(got, want);
    let mut total = weaver_data::DataStats::default();
    for l in &second.loaders {
        total.merge(&l.stats());
    }
    assert_eq!(
        (
            total.samples,
            total.bad_image,
            total.bad_caption,
            total.bad_members,
            total.shards_skipped
        ),
        (
            stats.samples,
            stats.bad_image,
            stats.bad_caption,
            stats.bad_members,
            stats.shards_skipped
        )
    );
}

#[test]
fn too_many_bad_samples_stop_the_job_naming_the_worst_shard() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for s in 0..4u64 {
        let mut m = Vec::new();
        for n in 0..40 {
            let key = format!("{s}-{n:03}");
            let image = if s == 2 {
                b"\x89PNG\r\n\x1a\nnot really".to_vec()
            } else {
                sample_members(n, 8, 8)[0].1.clone()
            };
            let ext = if s == 2 {
                "png"
            } else {
                ["jpg", "png", "webp"][(n % 3) as usize]
            };
            m.push((format!("{key}.{ext}"), image));
            m.push((format!("{key}.txt"), b"a cat".to_vec()));
        }
        shard(&d.join(format!("s{s}.tar")), &m);
    }
    let stores = Stores::default();
    let mut cfg = config(d.to_str().unwrap(), &stores, tokenizer(d));
    cfg.max_bad_fraction = 0.05;
    let mut l = ShardLoader::start(cfg, DpRank { dp: 1, rank: 0 }, &HashMap::new(), None).unwrap();
    let err = (0..40)
        .find_map(|_| l.next_step().err())
        .expect("the bad fraction must stop the loader");
    match &err {
        DataError::TooManyBad { worst, limit, .. } => {
            assert_eq!(*limit, 0.05);
            assert!(worst[0].0.ends_with("s2.tar"), "{err}");
        }
        other => panic!("expected TooManyBad, got {other}"),
    }
    assert!(err.to_string().contains("s2.tar"), "{err}");
}

#[test]
fn shards_stream_from_s3_and_match_local_files() {
    let server = S3Server::start();
    let stores = server.stores();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Pack noisy 200×200 PNGs (large, incompressible) into S3 and locally.
    let imgs = d.join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    let mut rng = weaver_models::data::Rng::new(1, 2, 3);
    let mut lines = String::new();
    for i in 0..30u64 {
        let pixels: Vec<u8> = (0..200 * 200 * 3).map(|_| rng.below(256) as u8).collect();
        let img = weaver_data::image::Rgb {
            width: 200,
            height: 200,
            pixels,
        };
        std::fs::write(
            imgs.join(format!("{i}.png")),
            weaver_data::image::encode_png(&img).unwrap(),
        )
        .unwrap();
        lines.push_str(
            &serde_json::json!({"file": format!("{i}.png"), "caption": caption(i)}).to_string(),
        );
        lines.push('\n');
    }
    std::fs::write(d.join("caps.jsonl"), lines).unwrap();
    for out in [
        "s3://weaver/ds".to_string(),
        d.join("local").to_string_lossy().into_owned(),
    ] {
        let stats = weaver_data::pack::pack(
            &weaver_data::pack::PackOptions {
                images: imgs.clone(),
                captions: d.join("caps.jsonl"),
                out,
                shard_size: 10,
                image_size: None,
                prefix: "train".into(),
                progress: false,
            },
            &stores,
        )
        .unwrap();
        assert_eq!((stats.shards, stats.samples), (3, 30));
    }

    // The first sample is read before the shard has been downloaded.
    let shard = &stores
        .expand("data.shards", "s3://weaver/ds/train-00000.tar")
        .unwrap()[0];
    let policy = ReadPolicy {
        retries: 1,
        backoff: std::time::Duration::from_millis(10),
        timeout: std::time::Duration::from_secs(30),
    };
    let reader = ShardReader::open(shard, 0, policy).unwrap();
    let mut g = Grouper::new(TarReader::new(reader, 0));
    let first = g.next().unwrap();
    assert_eq!(first.key, "000000000");
    let size = std::fs::metadata(d.join("local/train-00000.tar"))
        .unwrap()
        .len();
    assert!(size > 1_000_000, "{size}");
    let fetched = g.get_ref().get_ref().fetched().unwrap();
    assert!(
        fetched < size / 2,
        "fetched {fetched} of {size} bytes for the first sample"
    );

    // The loader over S3 yields what it yields over local files.
    let tok = tokenizer(d);
    let mut remote_cfg = config(
        "s3://weaver/ds/train-{00000..00002}.tar",
        &stores,
        tok.clone(),
    );
    remote_cfg.streams = 2;
    let mut local_cfg = config(d.join("local").to_str().unwrap(), &stores, tok);
    local_cfg.streams = 2;
    let mut remote = Ranks::start(&remote_cfg, 1, &HashMap::new());
    let mut local = Ranks::start(&local_cfg, 1, &HashMap::new());
    for _ in 0..3 {
        let (r, l) = (remote.step(), local.step());
        assert_eq!(keys(&r), keys(&l));
        assert!(r[0].images.equal(&l[0].images));
    }
}

#[test]
fn each_batch_row_is_its_sample_decoded_cropped_and_normalised() {
    // The loader hands 8-bit crops to the builder, which normalises them straight into the
    // step's tensor; each row must be what the plain path (decode, crop, resample,
    // `normalize`'s formula) makes of the sample named by its key, bit for bit.
    use weaver_data::image::{center_crop, crop_resize_normalize, decode};
    let dir = tempfile::tempdir().unwrap();
    write_shards(dir.path(), 4, 6, 40, 28);
    let stores = Stores::default();
    let tok = tokenizer(dir.path());
    let mut cfg = config(dir.path().to_str().unwrap(), &stores, tok);
    cfg.train = false;
    let s = cfg.image_size;
    let mut ranks = Ranks::start(&cfg, 1, &HashMap::new());
    let mut resizer = fast_image_resize::Resizer::new();
    for _ in 0..2 {
        let step = ranks.step().remove(0);
        assert_eq!(step.images.size(), [8, 3, s as i64, s as i64]);
        for (i, key) in step.keys.iter().enumerate() {
            let n: u64 = key.parse().unwrap();
            let (_, bytes) = &sample_members(n, 40, 28)[0];
            let img = decode(bytes).unwrap();
            let mut want = vec![0f32; 3 * s * s];
            let crop = center_crop(img.width, img.height);
            crop_resize_normalize(&mut resizer, &img, crop, s, &mut want).unwrap();
            let got = step.images.get(i as i64).flatten(0, -1);
            let got: Vec<f32> = Vec::try_from(&got).unwrap();
            assert_eq!(got, want, "sample {key}");
        }
    }
}

/// The question and answer of sample `n` (words of the tokenizer's captions).
fn qa(n: u64) -> (String, String) {
    (
        format!("a {} on the mat", WORDS[3 + (n / 3 % 3) as usize]),
        WORDS[(n % 3) as usize].to_string(),
    )
}

#[test]
fn questions_ride_with_their_samples_and_bad_ones_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for s in 0..4u64 {
        let mut members = Vec::new();
        for n in s * 8..s * 8 + 8 {
            let key = format!("{n:08}");
            let img = weaver_data::image::test_pattern(20, 14, n);
            members.push((
                format!("{key}.png"),
                weaver_data::image::encode_png(&img).unwrap(),
            ));
            let (q, a) = qa(n);
            let json = match n {
                // Missing answer, a number for an answer, a non-JSON member.
                5 => serde_json::json!({"caption": caption(n), "question": q}).to_string(),
                13 => serde_json::json!({"caption": caption(n), "question": q, "answer": 3})
                    .to_string(),
                22 => "{not json".into(),
                _ => serde_json::json!({"caption": caption(n), "question": q, "answer": a})
                    .to_string(),
            };
            members.push((format!("{key}.json"), json.into_bytes()));
        }
        shard(&d.join(format!("q-{s}.tar")), &members);
    }
    let stores = Stores::default();
    let tok = tokenizer(d);
    let mut cfg = config(d.to_str().unwrap(), &stores, tok.clone());
    cfg.qa = Some(weaver_data::sample::QaFields {
        question: "question".into(),
        answer: "answer".into(),
    });
    let steps = 4;
    let mut one = Ranks::start(&cfg, 1, &HashMap::new());
    let whole: Vec<_> = (0..steps).map(|_| one.step()).collect();
    let stats = one.loaders[0].stats();
    // 32 samples: each stream reads its whole first shard (three of which hold a bad
    // sample, counted as bad text) and one more sample after it.
    assert_eq!(stats.samples, 32, "{stats:?}");
    assert!(stats.bad_caption >= 3, "{stats:?}");
    assert_eq!(stats.bad_image, 0, "{stats:?}");
    for step in &whole {
        let rows = step[0].vqa.as_ref().expect("questions are read");
        for (r, key) in step[0].keys.iter().enumerate() {
            let n: u64 = key.parse().unwrap();
            assert!(![5, 13, 22].contains(&n), "bad sample {key} was batched");
            let (q, a) = qa(n);
            let (input, targets) =
                weaver_models::objectives::encode_qa(tok.as_ref(), &q, &a, cfg.text_len).unwrap();
            assert_eq!(
                Vec::<i64>::try_from(rows.input.get(r as i64)).unwrap(),
                input
            );
            assert_eq!(
                Vec::<i64>::try_from(rows.targets.get(r as i64)).unwrap(),
                targets
            );
        }
    }
    // On two ranks, resumed after one step: the same rows for the same samples.
    let mut first = Ranks::start(&cfg, 2, &HashMap::new());
    first.step();
    let mut second = Ranks::start(&cfg, 2, &first.positions());
    for want in &whole[1..] {
        let got = second.step();
        assert_eq!(keys(&got), keys(want));
        let cat = |s: &[weaver_data::loader::HostStep]| {
            let v: Vec<tch::Tensor> = s
                .iter()
                .map(|x| x.vqa.as_ref().unwrap().input.shallow_clone())
                .collect();
            tch::Tensor::cat(&v, 0)
        };
        assert!(cat(&got).equal(&cat(want)));
    }
    // Without questions asked for, nothing is read and no sample is bad.
    cfg.qa = None;
    let mut plain = Ranks::start(&cfg, 1, &HashMap::new());
    let s = plain.step();
    assert!(s[0].vqa.is_none());
    assert_eq!(plain.loaders[0].stats().bad_caption, 0);
}
