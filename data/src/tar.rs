//! A streaming tar reader and a minimal writer, enough for WebDataset shards.
//!
//! The reader pulls one member at a time from any [`Read`] (a local file, an object-store
//! download in progress), so memory holds one member, whatever the shard's size. It knows the
//! byte offset of every member, so a resumed reader can start in the middle of a shard (at a
//! member boundary) with a ranged read. It understands ustar names (prefix + name), GNU long
//! names (`L`) and pax headers (`x`: `path`, `size`). A header whose checksum is wrong is
//! reported as an unreadable member and the reader resynchronises on the next valid header,
//! so one corrupt header costs one member, not the rest of the shard.

use std::io::{self, Read, Write};

const BLOCK: usize = 512;
/// Largest member read into memory; bigger ones are skipped as unreadable (WebDataset members
/// are single images and captions).
pub const MAX_MEMBER_BYTES: u64 = 256 << 20;

/// A regular file of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Path inside the archive.
    pub name: String,
    /// Contents.
    pub data: Vec<u8>,
    /// Byte offset of the member's first header (extended headers included).
    pub offset: u64,
    /// Byte offset just past the member's data and padding.
    pub end: u64,
}

/// What the reader found next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A regular file.
    Member(Member),
    /// Bytes that are not a valid member (a corrupt header, an oversized member); skipped.
    Unreadable {
        /// Where the bad bytes start.
        offset: u64,
        /// What was wrong.
        message: String,
    },
}

/// Reads members from a tar stream.
#[derive(Debug)]
pub struct TarReader<R> {
    r: R,
    pos: u64,
    done: bool,
    block: [u8; BLOCK],
    /// A header found while resynchronising, to be read next: (its offset, its bytes).
    pending: Option<(u64, [u8; BLOCK])>,
}

fn parse_octal(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // GNU base-256 for large sizes.
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let s: Vec<u8> = field
        .iter()
        .copied()
        .take_while(|&b| b != 0)
        .filter(|&b| b != b' ')
        .collect();
    if s.is_empty() {
        return Some(0);
    }
    let mut v: u64 = 0;
    for b in s {
        if !(b'0'..=b'7').contains(&b) {
            return None;
        }
        v = v.checked_mul(8)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

fn checksum_ok(h: &[u8; BLOCK]) -> bool {
    let Some(want) = parse_octal(&h[148..156]) else {
        return false;
    };
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u64::from(b)
            }
        })
        .sum();
    sum == want
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

fn padded(size: u64) -> u64 {
    size.div_ceil(BLOCK as u64) * BLOCK as u64
}

impl<R: Read> TarReader<R> {
    /// A reader of `r`, whose first byte is at byte `offset` of the archive (a member
    /// boundary).
    pub fn new(r: R, offset: u64) -> TarReader<R> {
        TarReader {
            r,
            pos: offset,
            done: false,
            block: [0; BLOCK],
            pending: None,
        }
    }

    /// The underlying reader.
    pub fn get_ref(&self) -> &R {
        &self.r
    }

    /// Bytes consumed so far (as an archive offset).
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Reads one block; `false` at a clean end of the stream.
    fn read_block(&mut self) -> io::Result<bool> {
        if let Some((_, b)) = self.pending.take() {
            self.block = b;
            return Ok(true);
        }
        let mut got = 0;
        while got < BLOCK {
            match self.r.read(&mut self.block[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("archive truncated at byte {}", self.pos + got as u64),
                    ))
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.pos += BLOCK as u64;
        Ok(true)
    }

    fn read_data(&mut self, size: u64) -> io::Result<Vec<u8>> {
        let mut data = vec![0u8; size as usize];
        self.r
            .read_exact(&mut data)
            .map_err(|e| truncated(e, self.pos))?;
        self.pos += size;
        self.skip(padded(size) - size)?;
        Ok(data)
    }

    fn skip(&mut self, mut n: u64) -> io::Result<()> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let k = n.min(buf.len() as u64) as usize;
            self.r
                .read_exact(&mut buf[..k])
                .map_err(|e| truncated(e, self.pos))?;
            self.pos += k as u64;
            n -= k as u64;
        }
        Ok(())
    }

    /// The next member or unreadable stretch; `None` at the end of the archive. An error is
    /// an I/O failure of the underlying reader or a truncated archive.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> io::Result<Option<Entry>> {
        if self.done {
            return Ok(None);
        }
        let mut long_name: Option<String> = None;
        let mut pax_size: Option<u64> = None;
        let mut start: Option<u64> = None;
        loop {
            let at = self.pending.as_ref().map_or(self.pos, |p| p.0);
            if !self.read_block()? {
                self.done = true;
                return Ok(None);
            }
            if self.block.iter().all(|&b| b == 0) {
                // End-of-archive marker.
                self.done = true;
                return Ok(None);
            }
            if !checksum_ok(&self.block) {
                // Resynchronise: skip blocks until one is a valid header.
                loop {
                    if !self.read_block()? {
                        self.done = true;
                        break;
                    }
                    if self.block.iter().all(|&b| b == 0) {
                        self.done = true;
                        break;
                    }
                    if checksum_ok(&self.block) {
                        // Step back: this block is the next header.
                        self.pending = Some((self.pos - BLOCK as u64, self.block));
                        break;
                    }
                }
                return Ok(Some(Entry::Unreadable {
                    offset: at,
                    message: "corrupt tar header (bad checksum)".into(),
                }));
            }
            let start_at = *start.get_or_insert(at);
            let Some(size) = parse_octal(&self.block[124..136]) else {
                return Ok(Some(self.unreadable_rest(start_at, "bad size field")?));
            };
            let size = pax_size.take().unwrap_or(size);
            let kind = self.block[156];
            let header = self.block;
            match kind {
                b'L' => {
                    if size > 64 * 1024 {
                        return Ok(Some(self.unreadable_rest(start_at, "oversized long name")?));
                    }
                    let d = self.read_data(size)?;
                    long_name = Some(cstr(&d));
                }
                b'x' => {
                    if size > 1 << 20 {
                        return Ok(Some(
                            self.unreadable_rest(start_at, "oversized pax header")?,
                        ));
                    }
                    let d = self.read_data(size)?;
                    for (k, v) in pax_records(&d) {
                        match k.as_str() {
                            "path" => long_name = Some(v),
                            "size" => pax_size = v.parse().ok(),
                            _ => {}
                        }
                    }
                }
                b'0' | 0 | b'7' => {
                    let name = long_name.take().unwrap_or_else(|| {
                        let name = cstr(&header[0..100]);
                        let prefix = cstr(&header[345..500]);
                        if &header[257..262] == b"ustar" && !prefix.is_empty() {
                            format!("{prefix}/{name}")
                        } else {
                            name
                        }
                    });
                    if size > MAX_MEMBER_BYTES {
                        self.skip(padded(size))?;
                        return Ok(Some(Entry::Unreadable {
                            offset: start_at,
                            message: format!("member {name} of {size} bytes is too large"),
                        }));
                    }
                    let data = self.read_data(size)?;
                    return Ok(Some(Entry::Member(Member {
                        name,
                        data,
                        offset: start_at,
                        end: self.pos,
                    })));
                }
                _ => {
                    // Directories, links, global pax headers...: not sample members.
                    self.skip(padded(size))?;
                    long_name = None;
                    start = None;
                }
            }
        }
    }

    fn unreadable_rest(&mut self, offset: u64, message: &str) -> io::Result<Entry> {
        Ok(Entry::Unreadable {
            offset,
            message: message.into(),
        })
    }
}

fn truncated(e: io::Error, pos: u64) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("archive truncated near byte {pos}"),
        )
    } else {
        e
    }
}

/// `"len key=value\n"` records of a pax header.
fn pax_records(d: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = d;
    while !rest.is_empty() {
        let Some(sp) = rest.iter().position(|&b| b == b' ') else {
            break;
        };
        let Some(len) = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
        else {
            break;
        };
        if len <= sp + 1 || len > rest.len() {
            break;
        }
        let rec = &rest[sp + 1..len];
        let rec = rec.strip_suffix(b"\n").unwrap_or(rec);
        if let Some(eq) = rec.iter().position(|&b| b == b'=') {
            out.push((
                String::from_utf8_lossy(&rec[..eq]).into_owned(),
                String::from_utf8_lossy(&rec[eq + 1..]).into_owned(),
            ));
        }
        rest = &rest[len..];
    }
    out
}

/// Writes a ustar archive (GNU long names past 100 bytes); deterministic (mtime 0).
#[derive(Debug)]
pub struct TarWriter<W: Write> {
    w: W,
    pos: u64,
}

fn header(name: &[u8], size: u64, kind: u8) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    let n = name.len().min(100);
    h[..n].copy_from_slice(&name[..n]);
    h[100..107].copy_from_slice(b"0000644");
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    let size_field = format!("{size:011o}");
    h[124..135].copy_from_slice(size_field.as_bytes());
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    let c = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(c.as_bytes());
    h
}

impl<W: Write> TarWriter<W> {
    /// A writer into `w`.
    pub fn new(w: W) -> TarWriter<W> {
        TarWriter { w, pos: 0 }
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    fn put(&mut self, name: &[u8], data: &[u8], kind: u8) -> io::Result<()> {
        self.w.write_all(&header(name, data.len() as u64, kind))?;
        self.w.write_all(data)?;
        let pad = (padded(data.len() as u64) - data.len() as u64) as usize;
        self.w.write_all(&[0u8; BLOCK][..pad])?;
        self.pos += BLOCK as u64 + padded(data.len() as u64);
        Ok(())
    }

    /// Appends a regular file.
    pub fn append(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        if name.len() > 100 {
            let mut long = name.as_bytes().to_vec();
            long.push(0);
            self.put(b"././@LongLink", &long, b'L')?;
        }
        self.put(name.as_bytes(), data, b'0')
    }

    /// Writes the end-of-archive marker and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.w.write_all(&[0u8; 2 * BLOCK])?;
        self.w.flush()?;
        Ok(self.w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = TarWriter::new(Vec::new());
        for (n, d) in members {
            w.append(n, d).unwrap();
        }
        w.finish().unwrap()
    }

    fn members(bytes: &[u8], offset: u64) -> Vec<Entry> {
        let mut r = TarReader::new(bytes, offset);
        let mut out = Vec::new();
        while let Some(e) = r.next().unwrap() {
            out.push(e);
        }
        out
    }

    #[test]
    fn round_trip_long_names_and_offsets() {
        let long = format!("{}/x.txt", "d".repeat(120));
        let bytes = archive(&[("a.jpg", b"123"), (&long, b"hello"), ("b.txt", &[7u8; 600])]);
        let got = members(&bytes, 0);
        let names: Vec<String> = got
            .iter()
            .map(|e| match e {
                Entry::Member(m) => m.name.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(names, vec!["a.jpg".to_string(), long, "b.txt".to_string()]);
        // Starting at the third member's offset reads just it.
        let Entry::Member(third) = &got[2] else {
            panic!()
        };
        let rest = members(&bytes[third.offset as usize..], third.offset);
        assert_eq!(rest, vec![got[2].clone()]);
    }

    #[test]
    fn python_tarfile_archives_read() {
        // Header fields as Python's tarfile writes them (ustar, checksum "0012345\0").
        let mut h = header(b"k.txt", 2, b'0');
        let sum: u64 = {
            let mut t = h;
            t[148..156].copy_from_slice(b"        ");
            t.iter().map(|&b| u64::from(b)).sum()
        };
        h[148..156].copy_from_slice(format!("{sum:07o}\0").as_bytes());
        let mut bytes = h.to_vec();
        bytes.extend_from_slice(b"hi");
        bytes.resize(2048, 0);
        assert!(matches!(&members(&bytes, 0)[..], [Entry::Member(m)] if m.data == b"hi"));
    }

    #[test]
    fn a_corrupt_header_costs_one_member() {
        let bytes = archive(&[("a.txt", b"1"), ("b.txt", b"2"), ("c.txt", b"3")]);
        let mut bad = bytes.clone();
        bad[BLOCK * 2 + 10] ^= 0xff; // b.txt's header
        let got = members(&bad, 0);
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(matches!(&got[1], Entry::Unreadable { offset, .. } if *offset == 1024));
        assert!(matches!(&got[2], Entry::Member(m) if m.name == "c.txt"));
    }

    #[test]
    fn truncation_is_an_error() {
        let bytes = archive(&[("a.txt", &[1u8; 1000])]);
        let mut r = TarReader::new(&bytes[..700], 0);
        assert_eq!(r.next().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
