//! Checkpoints in the safetensors format, loadable by PyTorch (`safetensors.torch.load_file`)
//! and NumPy (`safetensors.numpy.load_file`).
//!
//! A [`Checkpoint`] is a list of named tensors — f32 parameters and statistics, i64 scalars
//! such as `num_batches_tracked` (shape `[]`) — plus a string-to-string metadata map stored as
//! the format's `__metadata__` (step, seed, configuration). Names are kept exactly as given, so
//! PyTorch-style names (`layer1.0.conv1.weight`, `layer1.0.bn1.bn.2.running_mean`) load into a
//! PyTorch `state_dict` unchanged.
//!
//! The file layout (<https://github.com/huggingface/safetensors>): 8 bytes little-endian header
//! length N, N bytes of JSON header (padded with spaces to a multiple of 8), then the raw
//! little-endian, row-major tensor data.
//!
//! - **Writing** is done here, so that the same checkpoint always gives the same bytes:
//!   metadata keys in sorted order, i64 tensors first (so that every tensor is aligned to its
//!   element size, as the `safetensors` crate also does) then f32 tensors, each group sorted by
//!   name. (The crate's own writer keeps `__metadata__` in a `HashMap`, whose order changes from
//!   run to run.) The file is written to a temporary file in the same directory, flushed to
//!   disk and renamed over the target, so a crash never leaves a half-written checkpoint.
//! - **Reading** goes through the `safetensors` crate, which validates the header and the
//!   offsets; every failure becomes [`Error::Checkpoint`].
//!
//! ```
//! use cdcl::checkpoint::{Checkpoint, NamedTensor};
//! # fn main() -> cdcl::Result<()> {
//! let dir = std::env::temp_dir().join(format!("cdcl-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("model.safetensors");
//! let mut ckpt = Checkpoint::new();
//! ckpt.push(NamedTensor::f32("conv1.weight", vec![2, 3], vec![0.5; 6]));
//! ckpt.push(NamedTensor::i64("bn1.num_batches_tracked", vec![], vec![10]));
//! ckpt.metadata.insert("step".into(), "10".into());
//! ckpt.save(&path)?;
//! let back = Checkpoint::load(&path)?;
//! assert_eq!(back.f32("conv1.weight", &[2, 3])?, &[0.5; 6]);
//! assert_eq!(back.metadata["step"], "10");
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// The elements of a tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// 32-bit floats (safetensors `F32`).
    F32(Vec<f32>),
    /// 64-bit signed integers (safetensors `I64`).
    I64(Vec<i64>),
}

impl TensorData {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::I64(v) => v.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The safetensors dtype name: `"F32"` or `"I64"`.
    pub fn dtype_name(&self) -> &'static str {
        match self {
            TensorData::F32(_) => "F32",
            TensorData::I64(_) => "I64",
        }
    }

    /// True when `self` and `other` hold the same type and the same bits (NaN payloads
    /// included), which `==` does not say for floats.
    pub fn bitwise_eq(&self, other: &TensorData) -> bool {
        match (self, other) {
            (TensorData::F32(a), TensorData::F32(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
            }
            (TensorData::I64(a), TensorData::I64(b)) => a == b,
            _ => false,
        }
    }

    fn element_size(&self) -> usize {
        match self {
            TensorData::F32(_) => 4,
            TensorData::I64(_) => 8,
        }
    }

    fn write_le(&self, out: &mut Vec<u8>) {
        match self {
            TensorData::F32(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::I64(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        }
    }
}

/// One tensor of a checkpoint: row-major (C order) data of `shape` (`[]` for a scalar).
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// The name, used as is in the file.
    pub name: String,
    /// The dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The elements; their number is the product of `shape` (1 for a scalar).
    pub data: TensorData,
}

impl NamedTensor {
    /// An f32 tensor.
    pub fn f32(name: impl Into<String>, shape: Vec<usize>, data: Vec<f32>) -> Self {
        NamedTensor { name: name.into(), shape, data: TensorData::F32(data) }
    }

    /// An i64 tensor.
    pub fn i64(name: impl Into<String>, shape: Vec<usize>, data: Vec<i64>) -> Self {
        NamedTensor { name: name.into(), shape, data: TensorData::I64(data) }
    }

    /// The elements, when they are f32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            TensorData::F32(v) => Some(v),
            TensorData::I64(_) => None,
        }
    }

    /// The elements, when they are i64.
    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.data {
            TensorData::I64(v) => Some(v),
            TensorData::F32(_) => None,
        }
    }

    /// The number of elements `shape` calls for, or `None` on overflow.
    fn expected_len(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    }
}

/// Named tensors and string metadata: what a model and its trainer save.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Checkpoint {
    /// The tensors. Names must be unique and non-empty. [`Checkpoint::load`] returns them
    /// sorted by name.
    pub tensors: Vec<NamedTensor>,
    /// Stored as the safetensors `__metadata__` map.
    pub metadata: BTreeMap<String, String>,
}

/// What an error that concerns no file names in place of a path.
const IN_MEMORY: &str = "(in memory)";

fn err(path: &str, message: impl Into<String>) -> Error {
    Error::Checkpoint { path: path.to_string(), message: message.into() }
}

impl Checkpoint {
    /// An empty checkpoint.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a tensor (names are checked when saving).
    pub fn push(&mut self, tensor: NamedTensor) {
        self.tensors.push(tensor);
    }

    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Option<&NamedTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The f32 elements of tensor `name`, which must exist and have shape `shape`.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<&[f32]> {
        let t = self.expect(name, shape)?;
        t.as_f32().ok_or_else(|| err(IN_MEMORY, format!("tensor {name:?} is {}, expected F32", t.data.dtype_name())))
    }

    /// The i64 elements of tensor `name`, which must exist and have shape `shape`.
    pub fn i64(&self, name: &str, shape: &[usize]) -> Result<&[i64]> {
        let t = self.expect(name, shape)?;
        t.as_i64().ok_or_else(|| err(IN_MEMORY, format!("tensor {name:?} is {}, expected I64", t.data.dtype_name())))
    }

    fn expect(&self, name: &str, shape: &[usize]) -> Result<&NamedTensor> {
        let t = self.get(name).ok_or_else(|| err(IN_MEMORY, format!("no tensor named {name:?}")))?;
        if t.shape != shape {
            return Err(err(IN_MEMORY, format!("tensor {name:?} has shape {:?}, expected {shape:?}", t.shape)));
        }
        Ok(t)
    }

    /// Checks names and sizes; `path` is only for the messages.
    fn validate(&self, path: &str) -> Result<()> {
        let mut seen = BTreeSet::new();
        for t in &self.tensors {
            if t.name.is_empty() || t.name == "__metadata__" {
                return Err(err(path, format!("invalid tensor name {:?}", t.name)));
            }
            if !seen.insert(t.name.as_str()) {
                return Err(err(path, format!("two tensors are named {:?}", t.name)));
            }
            if t.expected_len() != Some(t.data.len()) {
                return Err(err(
                    path,
                    format!("tensor {:?} has shape {:?} but {} elements", t.name, t.shape, t.data.len()),
                ));
            }
        }
        Ok(())
    }

    /// The file's bytes (deterministic: the same checkpoint always gives the same bytes).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.to_bytes_for(IN_MEMORY)
    }

    fn to_bytes_for(&self, path: &str) -> Result<Vec<u8>> {
        self.validate(path)?;
        // i64 first, then f32; by name within each: every offset stays a multiple of the
        // element size, since the data section starts 8-byte aligned.
        let mut order: Vec<&NamedTensor> = self.tensors.iter().collect();
        order.sort_by(|a, b| b.data.element_size().cmp(&a.data.element_size()).then_with(|| a.name.cmp(&b.name)));

        let mut header = String::from("{");
        if !self.metadata.is_empty() {
            header.push_str("\"__metadata__\":{");
            for (i, (k, v)) in self.metadata.iter().enumerate() {
                if i > 0 {
                    header.push(',');
                }
                json_string(&mut header, k);
                header.push(':');
                json_string(&mut header, v);
            }
            header.push('}');
        }
        let mut offset = 0usize;
        for (i, t) in order.iter().enumerate() {
            if i > 0 || !self.metadata.is_empty() {
                header.push(',');
            }
            json_string(&mut header, &t.name);
            let bytes = t.data.len() * t.data.element_size();
            let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
            let _ = write!(
                header,
                ":{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
                t.data.dtype_name(),
                shape.join(","),
                offset,
                offset + bytes
            );
            offset += bytes;
        }
        header.push('}');
        while header.len() % 8 != 0 {
            header.push(' ');
        }

        let mut out = Vec::with_capacity(8 + header.len() + offset);
        out.extend_from_slice(&(header.len() as u64).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        for t in order {
            t.data.write_le(&mut out);
        }
        Ok(out)
    }

    /// Writes the checkpoint to `path` atomically: a temporary file in the same directory is
    /// written, flushed to disk and renamed over `path`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let bytes = self.to_bytes_for(&shown)?;
        let file_name = path.file_name().ok_or_else(|| err(&shown, "the path names no file"))?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        // Unique per process and per call, so concurrent saves never share a temporary file.
        static SAVES: AtomicU64 = AtomicU64::new(0);
        let serial = SAVES.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{}.{}.{serial}.tmp", file_name.to_string_lossy(), std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, path)?;
            // Make the rename itself durable; not every platform lets a directory be opened.
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(())
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            err(&shown, format!("cannot write: {e}"))
        })
    }

    /// Checks, without touching `path`, that [`Checkpoint::save`] could write it: the folder
    /// exists and takes a new file, and `path` is not a folder. Long runs call this before
    /// their first iteration, so that a bad path fails at once instead of after the training.
    pub fn check_writable(path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        if path.is_dir() {
            return Err(err(&shown, "is a directory"));
        }
        let file_name = path.file_name().ok_or_else(|| err(&shown, "the path names no file"))?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(err(&shown, format!("cannot write: no such directory {}", dir.display())));
        }
        static PROBES: AtomicU64 = AtomicU64::new(0);
        let serial = PROBES.fetch_add(1, Ordering::Relaxed);
        let probe = dir.join(format!(".{}.{}.{serial}.probe", file_name.to_string_lossy(), std::process::id()));
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)
            .map_err(|e| err(&shown, format!("cannot write: {e}")))?;
        let _ = std::fs::remove_file(&probe);
        Ok(())
    }

    /// Reads a checkpoint written by [`Checkpoint::save`] or by any safetensors writer whose
    /// tensors are all F32 or I64. Tensors come back sorted by name.
    pub fn load(path: impl AsRef<Path>) -> Result<Checkpoint> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => err(&shown, "no such file"),
            _ => err(&shown, format!("cannot read: {e}")),
        })?;
        Self::from_bytes_for(&bytes, &shown)
    }

    /// Parses the bytes of a safetensors file.
    pub fn from_bytes(bytes: &[u8]) -> Result<Checkpoint> {
        Self::from_bytes_for(bytes, IN_MEMORY)
    }

    fn from_bytes_for(bytes: &[u8], path: &str) -> Result<Checkpoint> {
        let (n, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| err(path, format!("not a valid safetensors file: {e}")))?;
        let data = &bytes[8 + n..];
        let mut tensors = Vec::new();
        for name in meta.offset_keys() {
            let info =
                meta.info(&name).ok_or_else(|| err(path, format!("tensor {name:?} vanished from the header")))?;
            let (start, end) = info.data_offsets;
            let raw =
                data.get(start..end).ok_or_else(|| err(path, format!("tensor {name:?} lies outside the file")))?;
            let data = match info.dtype {
                safetensors::Dtype::F32 => TensorData::F32(
                    raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect(),
                ),
                safetensors::Dtype::I64 => TensorData::I64(
                    raw.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(),
                ),
                other => {
                    return Err(err(
                        path,
                        format!("tensor {name:?} has dtype {other:?}; only F32 and I64 are supported"),
                    ))
                }
            };
            tensors.push(NamedTensor { name, shape: info.shape.clone(), data });
        }
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        let metadata = meta.metadata().as_ref().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        Ok(Checkpoint { tensors, metadata: metadata.unwrap_or_default() })
    }
}

/// Appends `s` as a JSON string literal.
fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}
