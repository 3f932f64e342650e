//! safetensors checkpoints: one `model.safetensors` or shards listed in `model.safetensors.index.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use augur_core::{Bytes, DType, Tensor};
use safetensors::{Dtype, SafeTensors};

use crate::{Error, Result};

/// The tensors of a checkpoint, by name, sharing the mmapped files.
pub struct Checkpoint {
    tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// Load every `*.safetensors` file of `dir` (or the single file `path`).
    pub fn open(path: &Path) -> Result<Self> {
        let files: Vec<PathBuf> = if path.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|err| Error::Io { path: path.to_owned(), err })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            v.sort();
            v
        } else {
            vec![path.to_owned()]
        };
        if files.is_empty() {
            return Err(Error::Safetensors { path: path.to_owned(), msg: "no .safetensors files in this directory".into() });
        }
        let mut tensors = HashMap::new();
        for f in files {
            Self::load_file(&f, &mut tensors)?;
        }
        Ok(Checkpoint { tensors })
    }

    fn load_file(path: &Path, out: &mut HashMap<String, Tensor>) -> Result<()> {
        let err = |msg: String| Error::Safetensors { path: path.to_owned(), msg };
        let file = std::fs::File::open(path).map_err(|err| Error::Io { path: path.to_owned(), err })?;
        // SAFETY: read-only map; see Gguf::open.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|err| Error::Io { path: path.to_owned(), err })?;
        let map: Arc<memmap2::Mmap> = Arc::new(map);
        let st = SafeTensors::deserialize(&map[..]).map_err(|e| err(e.to_string()))?;
        let base = map.as_ptr() as usize;
        for (name, view) in st.tensors() {
            let dtype = match view.dtype() {
                Dtype::F32 => DType::F32,
                Dtype::F64 => DType::F64,
                Dtype::F16 => DType::F16,
                Dtype::BF16 => DType::BF16,
                d => return Err(err(format!("tensor `{name}` has dtype {d:?}; augur loads F32, F64, F16 and BF16"))),
            };
            let data = view.data();
            let start = data.as_ptr() as usize - base;
            let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = map.clone();
            let bytes = Bytes::from_owner(owner, start, data.len()).ok_or_else(|| err(format!("tensor `{name}` out of bounds")))?;
            let t = Tensor::from_raw(dtype, bytes, view.shape()).map_err(|e| err(format!("tensor `{name}`: {e}")))?;
            out.insert(name, t);
        }
        Ok(())
    }

    /// Tensor `name`, or an error naming it.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| Error::Tensor { name: name.into(), msg: "not in the checkpoint (wrong architecture?)".into() })
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Every tensor name (unordered).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }
}

/// Write f32 tensors as a safetensors file (for tests and exported checkpoints).
pub fn save(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<()> {
    let st_err = |msg: String| Error::Safetensors { path: path.to_owned(), msg };
    let data: Vec<(String, Dtype, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| {
            let (dtype, bytes): (Dtype, Vec<u8>) = match t.dtype() {
                DType::F64 => (Dtype::F64, t.to_vec_f64()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
                DType::BF16 => (Dtype::BF16, t.to_vec_f32()?.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect()),
                DType::F16 => (Dtype::F16, t.to_vec_f32()?.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect()),
                _ => (Dtype::F32, t.to_vec_f32()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            };
            Ok((n.to_string(), dtype, bytes, t.shape().to_vec()))
        })
        .collect::<Result<_>>()?;
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, d, b, s)| Ok((n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).map_err(|e| st_err(e.to_string()))?)))
        .collect::<Result<_>>()?;
    // Write beside the target and rename, so an interrupted save never leaves a torn file.
    let tmp = path.with_extension("safetensors.partial");
    safetensors::serialize_to_file(views, None, &tmp).map_err(|e| st_err(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|err| Error::Io { path: path.to_owned(), err })
}
