//! Reading `torch.save` files (the zip format of torch ≥ 1.6: `ARCHIVE/data.pkl` and one
//! `ARCHIVE/data/KEY` entry per storage) without Python: a small pickle machine that knows
//! the opcodes `torch.save` emits (protocol 2, and 3–5 for files written with a newer
//! protocol) and the few callables a state dict needs (`OrderedDict`,
//! `torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`). Any other callable becomes an
//! opaque value, so a checkpoint holding optimizer state or metadata next to its state dict
//! still reads; tensors inside it are found wherever the state dict sits.
//!
//! Everything read from the file is checked: a malformed or hostile file is an error, never
//! a panic, an out-of-bounds read or an unbounded allocation beyond the file's own size.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use tch::{Kind, Tensor};

use crate::error::{InteropError, Result};

/// A Python value as far as a state dict needs it.
#[derive(Debug, Clone)]
enum Value {
    None,
    Bool,
    Int(i64),
    Float,
    Str(String),
    Bytes,
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// `module.name`.
    Global(String),
    /// A storage named by its persistent id.
    Storage {
        key: String,
        kind: Kind,
    },
    Tensor(TensorRef),
    /// The result of a callable this reader does not model.
    Opaque(String),
    Mark,
}

/// A tensor as `_rebuild_tensor_v2` describes it.
#[derive(Debug, Clone)]
struct TensorRef {
    key: String,
    kind: Kind,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name.rsplit('.').next()? {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    path: &'a str,
}

impl<'a> Machine<'a> {
    fn err(&self, message: impl Into<String>) -> InteropError {
        InteropError::Pickle {
            path: self.path.to_string(),
            offset: self.pos,
            message: message.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| self.err(format!("truncated: {n} more bytes expected")))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| self.err("unterminated line"))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    fn utf8(&mut self, n: usize) -> Result<String> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("invalid UTF-8 in a string"))
    }

    fn pop(&mut self) -> Result<Value> {
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }

    fn top(&mut self) -> Result<&mut Value> {
        let pos = self.pos;
        let path = self.path;
        self.stack.last_mut().ok_or_else(|| InteropError::Pickle {
            path: path.to_string(),
            offset: pos,
            message: "stack underflow".into(),
        })
    }

    /// The values above the topmost mark (the mark removed).
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let at = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or_else(|| self.err("no mark on the stack"))?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn memo_put(&mut self, key: u32) -> Result<()> {
        let v = self.top()?.clone();
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Result<()> {
        let v = self
            .memo
            .get(&key)
            .cloned()
            .ok_or_else(|| self.err(format!("memo key {key} was never stored")))?;
        self.stack.push(v);
        Ok(())
    }

    fn run(mut self) -> Result<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    // PROTO
                    let p = self.u8()?;
                    if p > 5 {
                        return Err(self.err(format!("pickle protocol {p} is not supported")));
                    }
                }
                0x95 => {
                    // FRAME
                    self.u64()?;
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool),
                0x89 => self.stack.push(Value::Bool),
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(i64::from(v)));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(i64::from(v)));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(i64::from(v)));
                }
                0x8a => {
                    // LONG1
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        return Err(self.err(format!("an integer of {n} bytes")));
                    }
                    let mut v: i64 = 0;
                    for (i, &x) in b.iter().enumerate() {
                        v |= i64::from(x) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.stack.push(Value::Int(v));
                }
                b'G' => {
                    self.take(8)?;
                    self.stack.push(Value::Float);
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.utf8(n)?;
                    self.stack.push(Value::Str(s));
                }
                0x8c => {
                    // SHORT_BINUNICODE
                    let n = self.u8()? as usize;
                    let s = self.utf8(n)?;
                    self.stack.push(Value::Str(s));
                }
                0x8d => {
                    // BINUNICODE8
                    let n = usize::try_from(self.u64()?).map_err(|_| self.err("length"))?;
                    let s = self.utf8(n)?;
                    self.stack.push(Value::Str(s));
                }
                b'T' | b'B' => {
                    // BINSTRING, BINBYTES
                    let n = self.u32()? as usize;
                    self.take(n)?;
                    self.stack.push(Value::Bytes);
                }
                b'U' | b'C' => {
                    // SHORT_BINSTRING, SHORT_BINBYTES
                    let n = self.u8()? as usize;
                    self.take(n)?;
                    self.stack.push(Value::Bytes);
                }
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                0x8f => self.stack.push(Value::List(Vec::new())), // EMPTY_SET
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(items));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = pairs(items).map_err(|m| self.err(m))?;
                    self.stack.push(Value::Dict(d));
                }
                0x91 => {
                    // FROZENSET
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(items));
                }
                0x85 => {
                    let a = self.pop()?;
                    self.stack.push(Value::Tuple(vec![a]));
                }
                0x86 => {
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.stack.push(Value::Tuple(vec![a, b]));
                }
                0x87 => {
                    let c = self.pop()?;
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.stack.push(Value::Tuple(vec![a, b, c]));
                }
                b'q' => {
                    let k = self.u8()?;
                    self.memo_put(u32::from(k))?;
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    // MEMOIZE
                    let k = self.memo.len() as u32;
                    self.memo_put(k)?;
                }
                b'h' => {
                    let k = self.u8()?;
                    self.memo_get(u32::from(k))?;
                }
                b'j' => {
                    let k = self.u32()?;
                    self.memo_get(k)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global(format!("{module}.{name}")));
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => {
                            self.stack.push(Value::Global(format!("{m}.{n}")))
                        }
                        _ => return Err(self.err("STACK_GLOBAL of non-strings")),
                    }
                }
                b'Q' => {
                    // BINPERSID
                    let pid = self.pop()?;
                    let v = self.persistent(pid)?;
                    self.stack.push(v);
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.call(f, args)?;
                    self.stack.push(v);
                }
                0x81 => {
                    // NEWOBJ
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.call(cls, args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    // BUILD: the state of an OrderedDict (`_metadata`) or of an opaque
                    // object; nothing a state dict needs.
                    self.pop()?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.top()? {
                        Value::Dict(d) => d.push((k, v)),
                        _ => return Err(self.err("SETITEM on a non-dict")),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let new = pairs(items).map_err(|m| self.err(m))?;
                    match self.top()? {
                        Value::Dict(d) => d.extend(new),
                        _ => return Err(self.err("SETITEMS on a non-dict")),
                    }
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.push(v),
                        _ => return Err(self.err("APPEND on a non-list")),
                    }
                }
                b'e' | 0x90 => {
                    // APPENDS, ADDITEMS
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.extend(items),
                        _ => return Err(self.err("APPENDS on a non-list")),
                    }
                }
                b'0' => {
                    self.pop()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                b'1' => {
                    self.pop_mark()?;
                }
                other => {
                    return Err(self.err(format!(
                        "opcode 0x{other:02x} is not one torch.save writes; is this a PyTorch state dict?"
                    )))
                }
            }
        }
    }

    fn persistent(&self, pid: Value) -> Result<Value> {
        // ('storage', torch.FloatStorage, key, location, numel)
        let Value::Tuple(items) = pid else {
            return Err(self.err("a persistent id that is not a tuple"));
        };
        match items.as_slice() {
            [Value::Str(tag), Value::Global(ty), Value::Str(key), _, ..] if tag == "storage" => {
                let kind = storage_kind(ty)
                    .ok_or_else(|| self.err(format!("storage type {ty} is not supported")))?;
                Ok(Value::Storage {
                    key: key.clone(),
                    kind,
                })
            }
            _ => Err(self.err("a persistent id that is not a storage")),
        }
    }

    fn call(&self, f: Value, args: Value) -> Result<Value> {
        let Value::Global(name) = f else {
            return Ok(Value::Opaque("call of a non-global".into()));
        };
        let Value::Tuple(args) = args else {
            return Ok(Value::Opaque(name));
        };
        match name.as_str() {
            "collections.OrderedDict" => match args.as_slice() {
                [] => Ok(Value::Dict(Vec::new())),
                [Value::List(items)] => {
                    let mut d = Vec::new();
                    for it in items {
                        match it {
                            Value::Tuple(kv) if kv.len() == 2 => {
                                d.push((kv[0].clone(), kv[1].clone()))
                            }
                            _ => return Err(self.err("OrderedDict of non-pairs")),
                        }
                    }
                    Ok(Value::Dict(d))
                }
                _ => Ok(Value::Opaque(name)),
            },
            "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" => {
                let (storage, offset, size, stride) = match args.as_slice() {
                    [s, o, sz, st, ..] => (s, o, sz, st),
                    _ => return Err(self.err(format!("{name} with {} arguments", args.len()))),
                };
                let Value::Storage { key, kind } = storage else {
                    return Err(self.err("a tensor whose storage is not a persistent storage"));
                };
                let ints = |v: &Value, what: &str| -> Result<Vec<i64>> {
                    match v {
                        Value::Tuple(xs) | Value::List(xs) => xs
                            .iter()
                            .map(|x| match x {
                                Value::Int(i) if *i >= 0 => Ok(*i),
                                _ => Err(self
                                    .err(format!("a tensor {what} that is not a tuple of sizes"))),
                            })
                            .collect(),
                        _ => Err(self.err(format!("a tensor {what} that is not a tuple"))),
                    }
                };
                let Value::Int(offset) = offset else {
                    return Err(self.err("a tensor offset that is not an integer"));
                };
                let size = ints(size, "size")?;
                let stride = ints(stride, "stride")?;
                if size.len() != stride.len() || *offset < 0 {
                    return Err(self.err("a tensor whose size and stride disagree"));
                }
                Ok(Value::Tensor(TensorRef {
                    key: key.clone(),
                    kind: *kind,
                    offset: *offset,
                    size,
                    stride,
                }))
            }
            "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => {
                match args.into_iter().next() {
                    Some(t @ Value::Tensor(_)) => Ok(t),
                    _ => Err(self.err("a parameter without a tensor")),
                }
            }
            _ => Ok(Value::Opaque(name)),
        }
    }
}

fn pairs(items: Vec<Value>) -> std::result::Result<Vec<(Value, Value)>, String> {
    if !items.len().is_multiple_of(2) {
        return Err("a dict with an odd number of items".into());
    }
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

/// The flat `name → tensor` map inside `v`: the dict itself when its values are tensors,
/// else the first dict found under a `state_dict`, `model` or `module` key.
fn find_state_dict(v: &Value) -> Option<Vec<(String, TensorRef)>> {
    let Value::Dict(d) = v else { return None };
    let tensors: Vec<(String, TensorRef)> = d
        .iter()
        .filter_map(|(k, v)| match (k, v) {
            (Value::Str(k), Value::Tensor(t)) => Some((k.clone(), t.clone())),
            _ => None,
        })
        .collect();
    if !tensors.is_empty() {
        return Some(tensors);
    }
    for key in ["state_dict", "model", "module"] {
        for (k, v) in d {
            if matches!(k, Value::Str(s) if s == key) {
                if let Some(t) = find_state_dict(v) {
                    return Some(t);
                }
            }
        }
    }
    None
}

fn describe(v: &Value) -> String {
    match v {
        Value::None => "None".into(),
        Value::Bool => "a bool".into(),
        Value::Int(_) => "an int".into(),
        Value::Float => "a float".into(),
        Value::Str(_) => "a string".into(),
        Value::Bytes => "bytes".into(),
        Value::Tuple(_) => "a tuple".into(),
        Value::List(_) => "a list".into(),
        Value::Dict(d) => {
            let keys: Vec<String> = d
                .iter()
                .take(8)
                .map(|(k, _)| match k {
                    Value::Str(s) => s.clone(),
                    other => describe(other),
                })
                .collect();
            format!("a dict with keys {keys:?}")
        }
        Value::Global(g) => format!("the global {g}"),
        Value::Storage { .. } => "a storage".into(),
        Value::Tensor(_) => "a tensor".into(),
        Value::Opaque(n) => format!("an object built by {n}"),
        Value::Mark => "a mark".into(),
    }
}

/// Reads the state dict of a `torch.save` zip file: `(name, tensor)` pairs in file order,
/// each tensor a contiguous CPU copy in its saved dtype.
pub fn read_torch_zip(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let p = path.display().to_string();
    let io = |source| InteropError::Io {
        path: p.clone(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut magic = [0u8; 4];
    {
        let mut f = &file;
        f.read_exact(&mut magic).map_err(io)?;
    }
    if &magic != b"PK\x03\x04" {
        return Err(InteropError::NotTorchZip { path: p });
    }
    let zip_err = |e: zip::result::ZipError| InteropError::Zip {
        path: p.clone(),
        message: e.to_string(),
    };
    let mut archive = zip::ZipArchive::new(file).map_err(zip_err)?;
    let pkl = archive
        .file_names()
        .map(str::to_string)
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .ok_or_else(|| InteropError::Zip {
            path: p.clone(),
            message: "no ARCHIVE/data.pkl entry: not a torch.save file".into(),
        })?;
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    if let Ok(mut e) = archive.by_name(&format!("{prefix}byteorder")) {
        let mut s = String::new();
        e.read_to_string(&mut s).map_err(io)?;
        if s.trim() != "little" {
            return Err(InteropError::Zip {
                path: p.clone(),
                message: format!("byte order {s:?}: only little-endian files are supported"),
            });
        }
    }
    let mut data = Vec::new();
    archive
        .by_name(&pkl)
        .map_err(zip_err)?
        .read_to_end(&mut data)
        .map_err(io)?;
    let value = Machine {
        data: &data,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        path: &p,
    }
    .run()?;
    let refs = find_state_dict(&value).ok_or_else(|| InteropError::NoStateDict {
        path: p.clone(),
        found: describe(&value),
    })?;
    let mut storages: HashMap<String, Tensor> = HashMap::new();
    let mut out = Vec::with_capacity(refs.len());
    for (name, r) in refs {
        let bad = |message: String| InteropError::BadTensor {
            path: p.clone(),
            name: name.clone(),
            message,
        };
        if !storages.contains_key(&r.key) {
            let mut entry = archive
                .by_name(&format!("{prefix}data/{}", r.key))
                .map_err(|e| bad(format!("storage {}: {e}", r.key)))?;
            let mut bytes = Vec::with_capacity(entry.size().min(1 << 32) as usize);
            entry.read_to_end(&mut bytes).map_err(io)?;
            let elt = r.kind.elt_size_in_bytes();
            if bytes.len() % elt != 0 {
                return Err(bad(format!(
                    "storage {} holds {} bytes, not a whole number of {:?}",
                    r.key,
                    bytes.len(),
                    r.kind
                )));
            }
            let numel = (bytes.len() / elt) as i64;
            let t = Tensor::f_from_data_size(&bytes, &[numel], r.kind)?;
            storages.insert(r.key.clone(), t);
        }
        let storage = &storages[&r.key];
        let numel = storage.numel() as i64;
        // The furthest element the view reaches must lie inside the storage.
        let reach = r
            .size
            .iter()
            .zip(&r.stride)
            .try_fold(r.offset, |acc, (&s, &st)| {
                if s == 0 {
                    None
                } else {
                    acc.checked_add((s - 1).checked_mul(st)?)
                }
            });
        let empty = r.size.contains(&0);
        match reach {
            Some(last) if last < numel => {}
            None if empty => {}
            _ => {
                return Err(bad(format!(
                    "size {:?}, stride {:?}, offset {} reach past the storage's {numel} elements",
                    r.size, r.stride, r.offset
                )))
            }
        }
        let t = if empty {
            Tensor::f_zeros(&r.size, (r.kind, tch::Device::Cpu))?
        } else {
            storage
                .f_as_strided(&r.size, &r.stride, r.offset)?
                .f_contiguous()?
                .f_detach_copy()?
        };
        out.push((name, t));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(data: &[u8]) -> Result<Value> {
        Machine {
            data,
            pos: 0,
            stack: Vec::new(),
            memo: HashMap::new(),
            path: "test",
        }
        .run()
    }

    #[test]
    fn small_programs_evaluate() {
        // {'a': (1, -2, 300)} in protocol 2
        let prog = b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01K\x01J\xfe\xff\xff\xffM,\x01\x87q\x02s.";
        match run(prog).unwrap() {
            Value::Dict(d) => match &d[0].1 {
                Value::Tuple(t) => {
                    assert!(matches!(
                        t[..],
                        [Value::Int(1), Value::Int(-2), Value::Int(300)]
                    ))
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_input_is_an_error_with_its_offset() {
        for prog in [
            &b""[..],
            b"\x80\x02",
            b"\x80\x02h\x07.",
            b"\x80\x02s.",
            b"\xff",
        ] {
            match run(prog) {
                Err(InteropError::Pickle { .. }) => {}
                other => panic!("{prog:?}: {other:?}"),
            }
        }
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = run(&bytes);
        }

        #[test]
        fn never_panics_on_mutated_programs(pos in 0usize..40, byte in any::<u8>()) {
            let mut prog = b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01K\x01J\xfe\xff\xff\xffM,\x01\x87q\x02s.".to_vec();
            let i = pos % prog.len();
            prog[i] = byte;
            let _ = run(&prog);
        }
    }
}
