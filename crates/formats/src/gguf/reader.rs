//! The GGUF reader. Every length, count and offset read from the file is checked against the bytes
//! actually present before it is used, so a truncated or hostile file yields an error naming the
//! key or tensor and the byte offset, never a panic or an out-of-bounds read.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use augur_core::{Bytes, DType, Tensor};

use super::value::{Value, ValueType};
use super::{dtype_of, ggml_type_name, DEFAULT_ALIGNMENT, MAGIC};
use crate::{Error, Result};

/// Deepest nesting of arrays accepted (GGUF files use 1; a bound stops stack exhaustion).
const MAX_ARRAY_DEPTH: u32 = 4;
/// Most dims a tensor may have (ggml's GGML_MAX_DIMS).
const MAX_DIMS: u32 = 4;

/// One tensor's entry in the GGUF header.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Tensor name (`blk.0.attn_q.weight`, …).
    pub name: String,
    /// Outermost first (GGUF order reversed).
    pub shape: Vec<usize>,
    /// The ggml type id as stored.
    pub ggml_type: u32,
    /// Offset of the data from the start of the file.
    pub offset: u64,
    /// Size of the data in bytes (None if augur does not know the type).
    pub size: Option<u64>,
}

impl TensorInfo {
    /// The tensor type's name (`Q4_1`, `F32`, or `type N` for an unknown one).
    pub fn type_name(&self) -> String {
        ggml_type_name(self.ggml_type)
    }
}

/// An opened GGUF file: parsed header, mmapped data.
pub struct Gguf {
    /// GGUF format version (2 or 3).
    pub version: u32,
    metadata: Vec<(String, Value)>,
    index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    /// Alignment of tensor data (`general.alignment`, default 32).
    pub alignment: u64,
    /// Byte offset where tensor data starts.
    pub data_offset: u64,
    data: Arc<dyn AsRef<[u8]> + Send + Sync>,
    /// Whether `data` is a read-only map of the file (its tensors' pages may be released).
    mapped: bool,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gguf(v{}, {} metadata, {} tensors)", self.version, self.metadata.len(), self.tensors.len())
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn err<T>(&self, what: impl Into<String>) -> Result<T> {
        Err(Error::Gguf { what: what.into(), offset: self.pos as u64 })
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if (n as u64) > self.remaining() {
            return self.err(format!("{what}: need {n} bytes, only {} left", self.remaining()));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let start = self.pos;
        let len = self.u64(what)?;
        if len > self.remaining() {
            self.pos = start;
            return self.err(format!("{what}: string length {len} exceeds the {} bytes left", self.remaining()));
        }
        let b = self.take(len as usize, what)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => {
                self.pos = start;
                self.err(format!("{what}: string is not valid UTF-8 ({e})"))
            }
        }
    }

    fn value(&mut self, ty: ValueType, key: &str, depth: u32) -> Result<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(key)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(key)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            ValueType::U32 => Value::U32(self.u32(key)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            ValueType::Bool => match self.array::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    self.pos -= 1;
                    return self.err(format!("metadata `{key}`: bool byte is {b}, must be 0 or 1"));
                }
            },
            ValueType::String => Value::String(self.string(key)?),
            ValueType::U64 => Value::U64(self.u64(key)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return self.err(format!("metadata `{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH}"));
                }
                let et = self.value_type(key)?;
                let n = self.u64(key)?;
                if n.saturating_mul(et.min_size()) > self.remaining() {
                    return self.err(format!("metadata `{key}`: array of {n} {et:?} cannot fit in the {} bytes left", self.remaining()));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(et, key, depth + 1)?);
                }
                Value::Array(et, v)
            }
        })
    }

    fn value_type(&mut self, key: &str) -> Result<ValueType> {
        let t = self.u32(key)?;
        match ValueType::from_u32(t) {
            Some(v) => Ok(v),
            None => {
                self.pos -= 4;
                self.err(format!("metadata `{key}`: unknown value type {t}"))
            }
        }
    }
}

impl Gguf {
    /// Open and mmap a GGUF file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let io = |err| Error::Io { path: path.to_owned(), err };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; augur never writes the file while it is open. A file
        // changed by another process underneath is outside what any mmap reader can defend against.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Ok(Gguf { mapped: true, ..Self::from_owner(Arc::new(map))? })
    }

    /// Parse GGUF bytes held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Self::from_owner(Arc::new(bytes))
    }

    fn from_owner(data: Arc<dyn AsRef<[u8]> + Send + Sync>) -> Result<Self> {
        let buf: &[u8] = (*data).as_ref();
        let mut c = Cursor { buf, pos: 0 };
        let magic = c.take(4, "magic").map_err(|_| Error::Gguf { what: "file is shorter than the 4-byte magic".into(), offset: 0 })?;
        if magic != MAGIC {
            return Err(Error::Gguf { what: format!("bad magic {magic:02x?}: not a GGUF file"), offset: 0 });
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::Gguf { what: format!("unsupported GGUF version {version} (augur reads 2 and 3)"), offset: 4 });
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        // Each kv needs at least 8 (key len) + 4 (type) + 1 bytes; each tensor info at least 8+4+8+4+8.
        if n_kv.saturating_mul(13) > c.remaining() {
            return c.err(format!("metadata count {n_kv} cannot fit in the file"));
        }
        if n_tensors.saturating_mul(32) > c.remaining() {
            return c.err(format!("tensor count {n_tensors} cannot fit in the file"));
        }
        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut index = HashMap::new();
        for i in 0..n_kv {
            let at = c.pos;
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.value_type(&key)?;
            let v = c.value(ty, &key, 0)?;
            if index.insert(key.clone(), metadata.len()).is_some() {
                return Err(Error::Gguf { what: format!("duplicate metadata key `{key}`"), offset: at as u64 });
            }
            metadata.push((key, v));
        }
        let alignment = match index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 16 => a,
                _ => return Err(Error::Metadata { key: "general.alignment".into(), msg: format!("{v} is not a power of two up to 65536") }),
            },
        };
        let mut infos = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let at = c.pos as u64;
            let name = c.string(&format!("tensor #{i} name"))?;
            let n_dims = c.u32(&name)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(Error::Gguf { what: format!("tensor `{name}`: {n_dims} dims (1..={MAX_DIMS} allowed)"), offset: at });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&name)?);
            }
            let ggml_type = c.u32(&name)?;
            let offset = c.u64(&name)?;
            let numel = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let Some(numel) = numel.filter(|&n| n <= 1 << 40) else {
                return Err(Error::Gguf { what: format!("tensor `{name}`: dims {dims:?} overflow"), offset: at });
            };
            let size = match dtype_of(ggml_type) {
                Some(dt) => {
                    let inner = dims[0] as usize;
                    let Some(row) = dt.bytes_for(inner) else {
                        return Err(Error::Gguf {
                            what: format!("tensor `{name}`: row length {inner} is not a whole number of {} blocks", dt.name()),
                            offset: at,
                        });
                    };
                    let outer = if inner == 0 { 0 } else { numel / inner as u64 };
                    Some(row as u64 * outer)
                }
                None => None,
            };
            infos.push(TensorInfo { name, shape: dims.iter().rev().map(|&d| d as usize).collect(), ggml_type, offset, size });
        }
        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        let file_len = buf.len() as u64;
        let mut tensor_index = HashMap::new();
        for (i, t) in infos.iter_mut().enumerate() {
            if t.offset % alignment != 0 {
                return Err(Error::Tensor { name: t.name.clone(), msg: format!("data offset {} is not aligned to {alignment}", t.offset) });
            }
            let start = data_offset.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(t.size.unwrap_or(0)));
            match (start, end) {
                (Some(s), Some(e)) if e <= file_len => t.offset = s,
                _ => {
                    return Err(Error::Tensor {
                        name: t.name.clone(),
                        msg: format!(
                            "data at {}+{} ({} bytes) runs past the end of the file ({file_len} bytes); the file is truncated",
                            data_offset,
                            t.offset,
                            t.size.unwrap_or(0)
                        ),
                    })
                }
            }
            if tensor_index.insert(t.name.clone(), i).is_some() {
                return Err(Error::Tensor { name: t.name.clone(), msg: "appears twice in the file".into() });
            }
        }
        Ok(Gguf { version, metadata, index, tensors: infos, tensor_index, alignment, data_offset, data, mapped: false })
    }

    /// All metadata, in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// The metadata value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn typed<T>(&self, key: &str, want: &str, f: impl Fn(&Value) -> Option<T>) -> Result<T> {
        let v = self.get(key).ok_or_else(|| Error::Metadata { key: key.into(), msg: "missing".into() })?;
        f(v).ok_or_else(|| Error::Metadata { key: key.into(), msg: format!("expected {want}, found {:?} {v}", v.value_type()) })
    }

    /// `key` as an unsigned integer (any integer type that fits), or an error naming it.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.typed(key, "an unsigned integer", Value::as_u64)
    }

    /// `key` as a float (any numeric type), or an error naming it.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        self.typed(key, "a number", Value::as_f64)
    }

    /// `key` as a string, or an error naming it.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.get(key).ok_or_else(|| Error::Metadata { key: key.into(), msg: "missing".into() })?;
        v.as_str().ok_or_else(|| Error::Metadata { key: key.into(), msg: format!("expected a string, found {v}") })
    }

    /// `key` as an array, or an error naming it.
    pub fn get_array(&self, key: &str) -> Result<&[Value]> {
        let v = self.get(key).ok_or_else(|| Error::Metadata { key: key.into(), msg: "missing".into() })?;
        v.as_array().ok_or_else(|| Error::Metadata { key: key.into(), msg: format!("expected an array, found {v}") })
    }

    /// Every tensor's description, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The description of tensor `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor `name` as an augur tensor sharing the mapped bytes (f32 data is copied).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let t = self
            .tensor_info(name)
            .ok_or_else(|| Error::Tensor { name: name.into(), msg: "not in the file (wrong model architecture?)".into() })?;
        let dtype: DType = dtype_of(t.ggml_type).ok_or_else(|| Error::Tensor {
            name: name.into(),
            msg: format!("type {} is not supported by augur (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)", t.type_name()),
        })?;
        let size = t.size.expect("size is known for supported types");
        let make = if self.mapped { Bytes::from_file_map } else { Bytes::from_owner };
        let bytes = make(self.data.clone(), t.offset as usize, size as usize)
            .ok_or_else(|| Error::Tensor { name: name.into(), msg: "data out of bounds".into() })?;
        Ok(Tensor::from_raw(dtype, bytes, &t.shape)?)
    }
}
