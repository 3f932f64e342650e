//! The GGUF writer (version 3), used by tests to build tiny models and by augur to save models.

use std::io::Write;
use std::path::Path;

use augur_core::{DType, Tensor};

use super::value::Value;
use super::{ggml_type_of, DEFAULT_ALIGNMENT, MAGIC};
use crate::{Error, Result};

/// Collects metadata and tensors, then writes one GGUF file.
#[derive(Default)]
pub struct Writer {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, u32, Vec<usize>, Vec<u8>)>,
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_string(out, s),
        Value::Array(t, items) => {
            out.extend_from_slice(&(*t as u32).to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                put_value(out, it);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

impl Writer {
    /// An empty file: no metadata, no tensors.
    pub fn new() -> Self {
        Self::default()
    }

    /// Set metadata `key` (replacing an earlier value).
    pub fn metadata(&mut self, key: impl Into<String>, value: Value) -> &mut Self {
        self.metadata.push((key.into(), value));
        self
    }

    /// Add a tensor in its own dtype (quantized tensors are written as their raw blocks).
    pub fn tensor(&mut self, name: impl Into<String>, t: &Tensor) -> Result<&mut Self> {
        let name = name.into();
        let bytes = match (t.dtype(), t.storage().raw()) {
            (DType::Quant(_), Some(raw)) if t.layout().is_contiguous() => raw.to_vec(),
            (DType::Quant(_), _) => return Err(Error::Tensor { name, msg: "quantized tensor view cannot be written".into() }),
            (DType::F32, _) => t.to_vec_f32()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            (DType::F64, _) => t.to_vec_f64()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            (DType::F16, _) => t.to_vec_f32()?.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
            (DType::BF16, _) => t.to_vec_f32()?.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
        };
        self.tensors.push((name, ggml_type_of(t.dtype()), t.shape().to_vec(), bytes));
        Ok(self)
    }

    /// The file as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let align = DEFAULT_ALIGNMENT as usize;
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_string(&mut out, k);
            out.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0usize;
        for (name, ty, shape, bytes) in &self.tensors {
            put_string(&mut out, name);
            out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
            for d in shape.iter().rev() {
                out.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += bytes.len().div_ceil(align) * align;
        }
        out.resize(out.len().div_ceil(align) * align, 0);
        for (_, _, _, bytes) in &self.tensors {
            out.extend_from_slice(bytes);
            out.resize(out.len().div_ceil(align) * align, 0);
        }
        out
    }

    /// Write the file atomically (temporary file, then rename).
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let tmp = path.with_extension("gguf.tmp");
        let io = |err| Error::Io { path: path.to_owned(), err };
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&self.to_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Gguf, ValueType};
    use super::*;
    use augur_core::{Bytes, QuantType};
    use proptest::prelude::*;

    fn sample() -> Vec<u8> {
        let mut w = Writer::new();
        w.metadata("general.architecture", Value::String("llama".into()))
            .metadata("a.u8", Value::U8(7))
            .metadata("a.i8", Value::I8(-7))
            .metadata("a.u16", Value::U16(700))
            .metadata("a.i16", Value::I16(-700))
            .metadata("a.u32", Value::U32(70000))
            .metadata("a.i32", Value::I32(-70000))
            .metadata("a.f32", Value::F32(1.5))
            .metadata("a.bool", Value::Bool(true))
            .metadata("a.u64", Value::U64(1 << 40))
            .metadata("a.i64", Value::I64(-(1 << 40)))
            .metadata("a.f64", Value::F64(-2.25))
            .metadata("a.strs", Value::Array(ValueType::String, vec![Value::String("x".into()), Value::String("héllo".into())]))
            .metadata("a.nested", Value::Array(ValueType::Array, vec![Value::Array(ValueType::I32, vec![Value::I32(1), Value::I32(2)])]));
        let f = Tensor::from_vec((0..12).map(|v| v as f32).collect(), &[3, 4]).unwrap();
        let q = QuantType::Q4_1.quantize_row(&(0..64).map(|v| v as f32 / 10.0).collect::<Vec<_>>());
        let q = Tensor::from_raw(DType::Quant(QuantType::Q4_1), Bytes::from_vec(q), &[2, 32]).unwrap();
        w.tensor("f", &f).unwrap().tensor("q", &q).unwrap().tensor("h", &f.to_dtype(DType::F16).unwrap()).unwrap();
        w.to_bytes()
    }

    #[test]
    fn roundtrip_every_value_type_and_tensor() {
        let g = Gguf::from_bytes(sample()).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(g.get("a.i16"), Some(&Value::I16(-700)));
        assert_eq!(g.get("a.f64"), Some(&Value::F64(-2.25)));
        assert_eq!(g.get_u64("a.u64").unwrap(), 1 << 40);
        assert_eq!(g.get_array("a.strs").unwrap()[1], Value::String("héllo".into()));
        assert_eq!(g.get_array("a.nested").unwrap()[0].as_array().unwrap()[1], Value::I32(2));
        let f = g.tensor("f").unwrap();
        assert_eq!(f.shape(), &[3, 4]);
        assert_eq!(f.to_vec_f32().unwrap()[5], 5.0);
        assert_eq!(g.tensor("h").unwrap().to_vec_f32().unwrap()[11], 11.0);
        let q = g.tensor("q").unwrap();
        assert_eq!(q.dtype(), DType::Quant(QuantType::Q4_1));
        assert!((q.to_vec_f32().unwrap()[40] - 4.0).abs() < 0.3);
        assert!(g.tensor("missing").unwrap_err().to_string().contains("missing"));
        assert!(g.get_str("a.u8").unwrap_err().to_string().contains("a.u8"));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let b = sample();
        for n in 0..b.len() {
            // Cutting inside the trailing padding of the last tensor still leaves a valid file.
            if let Err(e) = Gguf::from_bytes(b[..n].to_vec()) {
                assert!(!e.to_string().is_empty());
            } else {
                assert!(n >= b.len() - 32, "truncated at {n} of {} still parsed", b.len());
            }
        }
    }

    #[test]
    fn bad_header_messages_name_the_problem() {
        let e = Gguf::from_bytes(b"GGML\x03\0\0\0".to_vec()).unwrap_err().to_string();
        assert!(e.contains("magic"), "{e}");
        let mut b = sample();
        b[4] = 1;
        assert!(Gguf::from_bytes(b).unwrap_err().to_string().contains("version 1"));
        let mut b = sample();
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Gguf::from_bytes(b).unwrap_err().to_string().contains("tensor count"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn mutated_files_never_panic(flips in proptest::collection::vec((0usize..4096, any::<u8>()), 1..8)) {
            let mut b = sample();
            for (at, v) in flips {
                let i = at % b.len();
                b[i] = v;
            }
            if let Ok(g) = Gguf::from_bytes(b) {
                for t in g.tensors().to_vec() {
                    if let Ok(t) = g.tensor(&t.name) { let _ = t.to_vec_f32(); }
                }
            }
        }
    }
}
