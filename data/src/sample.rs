//! WebDataset samples: consecutive tar members with the same key, as webdataset's
//! `group_by_keys` (and open_clip's `group_by_keys_nothrow`) form them, and the image and
//! caption picked out of each.
//!
//! A member `dir/0001.seg.jpg` has key `dir/0001` and extension `seg.jpg` (everything after the
//! first dot of the file name, lower-cased). A new sample starts when the key changes or an
//! extension repeats. Files named `__…__` (metadata) and names without an extension are not
//! sample members.

use std::io::Read;

use crate::tar::{Entry, TarReader};

/// The members of one sample, undecoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSample {
    /// The key shared by its members.
    pub key: String,
    /// (extension, contents) in archive order.
    pub members: Vec<(String, Vec<u8>)>,
    /// Byte offset of its first member's header.
    pub offset: u64,
    /// Byte offset just past its last member.
    pub end: u64,
    /// Unreadable stretches of the archive met since the previous sample.
    pub lost_members: u32,
}

impl RawSample {
    /// The contents of the first member whose extension is in `exts`.
    pub fn find(&self, exts: &[String]) -> Option<(&str, &[u8])> {
        exts.iter().find_map(|e| {
            self.members
                .iter()
                .find(|(x, _)| x == e)
                .map(|(x, d)| (x.as_str(), d.as_slice()))
        })
    }
}

/// Splits a member name into (key, extension), as webdataset's `base_plus_ext`.
pub fn key_and_ext(name: &str) -> Option<(&str, String)> {
    let base_start = name.rfind('/').map_or(0, |i| i + 1);
    let base = &name[base_start..];
    let dot = base.find('.')?;
    if dot == 0 {
        return None;
    }
    let split = base_start + dot;
    Some((&name[..split], name[split + 1..].to_ascii_lowercase()))
}

fn is_meta(name: &str) -> bool {
    let base = name.rsplit('/').next().unwrap_or(name);
    (name.starts_with("__") && name[2..].contains("__"))
        || (base.starts_with("__") && base.ends_with("__"))
}

/// Groups a tar stream's members into samples.
#[derive(Debug)]
pub struct Grouper<R> {
    tar: TarReader<R>,
    current: Option<RawSample>,
    lost: u32,
    /// Why the archive ended early (a truncated or unreadable stream), once it has.
    pub failure: Option<std::io::Error>,
    finished: bool,
}

impl<R: Read> Grouper<R> {
    /// Samples of `tar`.
    pub fn new(tar: TarReader<R>) -> Grouper<R> {
        Grouper {
            tar,
            current: None,
            lost: 0,
            failure: None,
            finished: false,
        }
    }

    /// The next sample; `None` at the end of the archive (see [`Grouper::failure`] for an
    /// early end).
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<RawSample> {
        while !self.finished {
            let entry = match self.tar.next() {
                Ok(Some(e)) => e,
                Ok(None) => {
                    self.finished = true;
                    break;
                }
                Err(e) => {
                    self.failure = Some(e);
                    self.finished = true;
                    self.lost += 1;
                    break;
                }
            };
            let m = match entry {
                Entry::Member(m) => m,
                Entry::Unreadable { .. } => {
                    self.lost += 1;
                    continue;
                }
            };
            if is_meta(&m.name) {
                continue;
            }
            let Some((key, ext)) = key_and_ext(&m.name) else {
                continue;
            };
            let starts_new = match &self.current {
                None => true,
                Some(c) => c.key != key || c.members.iter().any(|(x, _)| *x == ext),
            };
            let key = key.to_string();
            if starts_new {
                let next = RawSample {
                    key,
                    members: vec![(ext, m.data)],
                    offset: m.offset,
                    end: m.end,
                    lost_members: std::mem::take(&mut self.lost),
                };
                if let Some(done) = self.current.replace(next) {
                    return Some(done);
                }
            } else if let Some(c) = &mut self.current {
                c.members.push((ext, m.data));
                c.end = m.end;
            }
        }
        let mut last = self.current.take();
        if let Some(l) = &mut last {
            // Losses after the last sample are reported with it.
            l.lost_members += std::mem::take(&mut self.lost);
        }
        last
    }

    /// The tar reader underneath.
    pub fn get_ref(&self) -> &TarReader<R> {
        &self.tar
    }

    /// Unreadable stretches after the last sample returned (reported once the archive ends
    /// with no sample to carry them).
    pub fn take_lost(&mut self) -> u32 {
        std::mem::take(&mut self.lost)
    }
}

/// Why a sample cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadSample {
    /// No member with an image extension, or the image did not decode.
    Image(String),
    /// No caption member, an empty caption, or one that is not UTF-8 / valid JSON.
    Caption(String),
    /// Question/answer pairs are read (`train.vqa_weight > 0`) and the sample's JSON member
    /// is missing, is not JSON, lacks the question or answer field, holds a non-string or
    /// empty value there, or the pair does not fit the text length. Counted with the bad
    /// captions (`bad_caption`: the sample's text is unusable).
    Question(String),
}

impl std::fmt::Display for BadSample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadSample::Image(m) => write!(f, "image: {m}"),
            BadSample::Caption(m) => write!(f, "caption: {m}"),
            BadSample::Question(m) => write!(f, "question/answer: {m}"),
        }
    }
}

/// Which members hold the image and the caption (`data.image_key`, `data.caption_key`,
/// `data.caption_field`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields {
    /// Image extensions, in order of preference.
    pub image: Vec<String>,
    /// Caption extensions, in order of preference; `json` means the `caption_field` of a
    /// JSON member.
    pub caption: Vec<String>,
    /// The JSON field holding the caption.
    pub caption_field: String,
}

impl Fields {
    /// Parses `;`-separated extension lists (`"jpg;jpeg;png;webp"`, `"txt;json"`).
    pub fn new(image: &str, caption: &str, caption_field: &str) -> Fields {
        let split = |s: &str| {
            s.split(';')
                .map(|x| x.trim().trim_start_matches('.').to_ascii_lowercase())
                .filter(|x| !x.is_empty())
                .collect::<Vec<_>>()
        };
        Fields {
            image: split(image),
            caption: split(caption),
            caption_field: caption_field.to_string(),
        }
    }

    /// The image bytes of `s`.
    pub fn image<'a>(&self, s: &'a RawSample) -> Result<&'a [u8], BadSample> {
        s.find(&self.image).map(|(_, d)| d).ok_or_else(|| {
            BadSample::Image(format!(
                "no member with extension {} (has {})",
                self.image.join("/"),
                extensions(s)
            ))
        })
    }

    /// The caption of `s`, trimmed and non-empty.
    pub fn caption(&self, s: &RawSample) -> Result<String, BadSample> {
        let Some((ext, data)) = s.find(&self.caption) else {
            return Err(BadSample::Caption(format!(
                "no member with extension {} (has {})",
                self.caption.join("/"),
                extensions(s)
            )));
        };
        let text = if ext == "json" {
            let v: serde_json::Value = serde_json::from_slice(data)
                .map_err(|e| BadSample::Caption(format!("{ext} member is not JSON: {e}")))?;
            match v.get(&self.caption_field) {
                Some(serde_json::Value::String(t)) => t.clone(),
                _ => {
                    return Err(BadSample::Caption(format!(
                        "{ext} member has no string field {:?}",
                        self.caption_field
                    )))
                }
            }
        } else {
            String::from_utf8(data.to_vec())
                .map_err(|_| BadSample::Caption(format!("{ext} member is not UTF-8")))?
        };
        let t = text.trim();
        if t.is_empty() {
            return Err(BadSample::Caption("empty caption".into()));
        }
        Ok(t.to_string())
    }
}

/// Which fields of a sample's `json` member hold its question and answer
/// (`data.question_field`, `data.answer_field`), read when VQA trains or evaluates on shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QaFields {
    /// The JSON field holding the question.
    pub question: String,
    /// The JSON field holding the answer.
    pub answer: String,
}

impl QaFields {
    /// The (question, answer) of `s`, each trimmed and non-empty, from its `json` member.
    pub fn read(&self, s: &RawSample) -> Result<(String, String), BadSample> {
        let Some((_, data)) = s.find(&["json".to_string()]) else {
            return Err(BadSample::Question(format!(
                "no json member (has {})",
                extensions(s)
            )));
        };
        let v: serde_json::Value = serde_json::from_slice(data)
            .map_err(|e| BadSample::Question(format!("json member is not JSON: {e}")))?;
        let field = |name: &str| match v.get(name) {
            Some(serde_json::Value::String(t)) if !t.trim().is_empty() => Ok(t.trim().to_string()),
            Some(serde_json::Value::String(_)) => {
                Err(BadSample::Question(format!("json field {name:?} is empty")))
            }
            Some(other) => Err(BadSample::Question(format!(
                "json field {name:?} is not a string ({other})"
            ))),
            None => Err(BadSample::Question(format!(
                "json member has no field {name:?}"
            ))),
        };
        Ok((field(&self.question)?, field(&self.answer)?))
    }
}

fn extensions(s: &RawSample) -> String {
    if s.members.is_empty() {
        return "none".into();
    }
    s.members
        .iter()
        .map(|(x, _)| x.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tar::TarWriter;

    #[test]
    fn keys_and_extensions_as_webdataset() {
        assert_eq!(
            key_and_ext("a/b/0001.JPG"),
            Some(("a/b/0001", "jpg".into()))
        );
        assert_eq!(key_and_ext("x.seg.png"), Some(("x", "seg.png".into())));
        assert_eq!(key_and_ext("a.b/c"), None);
        assert_eq!(key_and_ext(".hidden"), None);
        assert!(is_meta("__index__"));
        assert!(!is_meta("a__b.txt"));
    }

    #[test]
    fn grouping_by_key_and_repeated_extensions() {
        let mut w = TarWriter::new(Vec::new());
        for (n, d) in [
            ("0.jpg", "i0"),
            ("0.txt", "c0"),
            ("__meta__", "m"),
            ("1.jpg", "i1"),
            ("1.jpg", "i1b"),
            ("2.txt", "c2"),
        ] {
            w.append(n, d.as_bytes()).unwrap();
        }
        let bytes = w.finish().unwrap();
        let mut g = Grouper::new(TarReader::new(&bytes[..], 0));
        let mut got = Vec::new();
        while let Some(s) = g.next() {
            got.push((s.key.clone(), s.members.len()));
        }
        assert_eq!(
            got,
            vec![
                ("0".into(), 2),
                ("1".into(), 1),
                ("1".into(), 1),
                ("2".into(), 1)
            ]
        );
    }

    #[test]
    fn captions_from_text_or_json() {
        let f = Fields::new("jpg;png", "txt;json", "caption");
        let s = |m: Vec<(&str, &[u8])>| RawSample {
            key: "k".into(),
            members: m
                .into_iter()
                .map(|(a, b)| (a.to_string(), b.to_vec()))
                .collect(),
            offset: 0,
            end: 0,
            lost_members: 0,
        };
        assert_eq!(f.caption(&s(vec![("txt", b" a cat ")])).unwrap(), "a cat");
        assert_eq!(
            f.caption(&s(vec![("json", br#"{"caption":"a dog"}"#)]))
                .unwrap(),
            "a dog"
        );
        assert!(f.caption(&s(vec![("json", br#"{"x":1}"#)])).is_err());
        assert!(f.caption(&s(vec![("txt", b"  ")])).is_err());
        assert!(f.caption(&s(vec![("txt", &[0xff, 0xfe])])).is_err());
        assert!(f.image(&s(vec![("txt", b"x")])).is_err());
        let qa = QaFields {
            question: "question".into(),
            answer: "answer".into(),
        };
        assert_eq!(
            qa.read(&s(vec![(
                "json",
                br#"{"question":" is it red? ","answer":"yes"}"#
            )]))
            .unwrap(),
            ("is it red?".to_string(), "yes".to_string())
        );
        for bad in [
            &br#"{"question":"q"}"#[..],
            br#"{"question":"q","answer":3}"#,
            br#"{"question":" ","answer":"a"}"#,
            b"not json",
        ] {
            assert!(matches!(
                qa.read(&s(vec![("json", bad)])),
                Err(BadSample::Question(_))
            ));
        }
        assert!(qa.read(&s(vec![("txt", b"a cat")])).is_err());
        assert_eq!(f.image(&s(vec![("png", b"x")])).unwrap(), b"x");
    }
}
