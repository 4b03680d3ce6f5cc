//! Loading a component's safetensors weights into a candle `VarBuilder`.
//!
//! The files are read tensor by tensor (the workspace forbids `unsafe`, which rules out candle's
//! mmap builder; reading a whole file first, as `candle_core::safetensors::load` does, would hold
//! the file and its tensors at once, twice the memory), converted to the init and then the run
//! dtype as they are read, and freed once the model is built. A component's weights are one of,
//! in order of preference: `<stem>.safetensors`, `<stem>.fp16.safetensors`, or the shards listed
//! by `<stem>.safetensors.index.json`.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::error::{Result, WorkerError};

/// The `weight_map` of a sharded checkpoint's index file.
#[derive(Debug, Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

/// Finds the weight files of the component in `dir` whose file names start with `stem`
/// (`diffusion_pytorch_model` for diffusers, `model` for transformers).
fn weight_files(source_name: &str, dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    for name in [
        format!("{stem}.safetensors"),
        format!("{stem}.fp16.safetensors"),
    ] {
        let path = dir.join(name);
        if path.is_file() {
            return Ok(vec![path]);
        }
    }
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    if index.is_file() {
        let parsed: ShardIndex = super::config::read_json(source_name, &index)?;
        // A BTreeSet gives each shard once, in a stable order.
        let shards: BTreeSet<&String> = parsed.weight_map.values().collect();
        return Ok(shards.into_iter().map(|s| dir.join(s)).collect());
    }
    Err(WorkerError::model_load(
        source_name,
        dir.join(format!("{stem}.safetensors")),
        "no safetensors weights found (also looked for .fp16.safetensors and a shard index)",
    ))
}

/// Reads every tensor of the component in `dir` onto `device`, converted to `init` and then to
/// `run` (`torch_dtype_init` and `torch_dtype_run`: the values are rounded through both, but
/// only one tensor at a time exists in another dtype than `run`).
pub fn load_tensors(
    source_name: &str,
    dir: &Path,
    stem: &str,
    (init, run): (DType, DType),
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for file in weight_files(source_name, dir, stem)? {
        read_safetensors(&file, (init, run), device, &mut tensors)
            .map_err(|e| WorkerError::model_load(source_name, &file, e))?;
    }
    Ok(tensors)
}

/// One entry of a safetensors header.
#[derive(Debug, Deserialize)]
struct TensorEntry {
    dtype: String,
    shape: Vec<usize>,
    /// Byte range in the data section, which starts right after the header.
    data_offsets: (u64, u64),
}

/// Headers beyond this are not safetensors files (real ones are a few MB at most).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Adds every tensor of the safetensors file `path` to `out`, on `device`, converted to `init`
/// and then `run`, reading one tensor's bytes at a time.
fn read_safetensors(
    path: &Path,
    (init, run): (DType, DType),
    device: &Device,
    out: &mut HashMap<String, Tensor>,
) -> std::result::Result<(), String> {
    let mut file = File::open(path).map_err(|e| e.to_string())?;
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| format!("not a safetensors file: {e}"))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
        return Err(format!(
            "not a safetensors file: header of {header_len} bytes"
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|e| e.to_string())?;
    let mut entries: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| format!("bad safetensors header: {e}"))?;
    entries.remove("__metadata__");
    let data_start = 8 + header_len;
    for (name, entry) in entries {
        let entry: TensorEntry = serde_json::from_value(entry)
            .map_err(|e| format!("tensor '{name}': bad header entry: {e}"))?;
        let stored = match entry.dtype.as_str() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F64" => DType::F64,
            other => return Err(format!("tensor '{name}': unsupported dtype {other}")),
        };
        let (begin, end) = entry.data_offsets;
        let elements: usize = entry.shape.iter().product();
        let expected = elements as u64 * stored.size_in_bytes() as u64;
        if end < begin || end - begin != expected || data_start + end > file_len {
            return Err(format!(
                "tensor '{name}': byte range {begin}..{end} does not fit its shape {:?} \
                 or the file",
                entry.shape
            ));
        }
        let mut bytes = vec![0u8; expected as usize];
        file.seek(SeekFrom::Start(data_start + begin))
            .and_then(|_| file.read_exact(&mut bytes))
            .map_err(|e| format!("tensor '{name}': {e}"))?;
        let tensor = Tensor::from_raw_buffer(&bytes, stored, &entry.shape, device)
            .and_then(|t| t.to_dtype(init)?.to_dtype(run))
            .map_err(|e| format!("tensor '{name}': {e}"))?;
        out.insert(name, tensor);
    }
    Ok(())
}

/// Reads every tensor of the component in `dir` and returns a builder that hands them out in
/// `dtype` on `device`.
pub fn load_var_builder(
    source_name: &str,
    dir: &Path,
    stem: &str,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let tensors = load_tensors(source_name, dir, stem, (dtype, dtype), device)?;
    Ok(VarBuilder::from_tensors(tensors, dtype, device))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_weights_name_the_expected_file() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| WorkerError::Internal(e.to_string()))?;
        let err = load_var_builder("repo", dir.path(), "model", DType::F32, &Device::Cpu).err();
        match err {
            Some(WorkerError::ModelLoad {
                source_name, file, ..
            }) => {
                assert_eq!(source_name, "repo");
                assert_eq!(file, dir.path().join("model.safetensors"));
            }
            other => panic!("expected ModelLoad, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn reads_what_candle_writes_in_every_float_dtype() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| WorkerError::Internal(e.to_string()))?;
        let base = Tensor::arange(0f32, 24., &Device::Cpu)?.reshape((2, 3, 4))?;
        let map = HashMap::from([
            ("a.f32".to_owned(), base.clone()),
            ("b.f16".to_owned(), base.to_dtype(DType::F16)?),
            ("c.bf16".to_owned(), (base.to_dtype(DType::BF16)? * 0.5)?),
            (
                "d.f64".to_owned(),
                base.to_dtype(DType::F64)?.narrow(2, 1, 2)?,
            ),
        ]);
        candle_core::safetensors::save(&map, dir.path().join("model.safetensors"))?;
        let read = load_tensors(
            "repo",
            dir.path(),
            "model",
            (DType::F32, DType::F32),
            &Device::Cpu,
        )?;
        assert_eq!(read.len(), map.len());
        for (name, want) in &map {
            let got = &read[name];
            assert_eq!(got.dims(), want.dims(), "{name}");
            assert_eq!(got.dtype(), DType::F32, "{name}");
            let (got, want) = (
                got.flatten_all()?,
                want.to_dtype(DType::F32)?.flatten_all()?,
            );
            assert_eq!(got.to_vec1::<f32>()?, want.to_vec1::<f32>()?, "{name}");
        }
        Ok(())
    }

    #[test]
    fn a_truncated_file_is_a_model_load_error() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| WorkerError::Internal(e.to_string()))?;
        let path = dir.path().join("model.safetensors");
        let t = Tensor::arange(0f32, 64., &Device::Cpu)?;
        candle_core::safetensors::save(&HashMap::from([("w".to_owned(), t)]), &path)?;
        let bytes = std::fs::read(&path).map_err(|e| WorkerError::Internal(e.to_string()))?;
        std::fs::write(&path, &bytes[..bytes.len() - 4])
            .map_err(|e| WorkerError::Internal(e.to_string()))?;
        match load_tensors(
            "repo",
            dir.path(),
            "model",
            (DType::F32, DType::F32),
            &Device::Cpu,
        ) {
            Err(WorkerError::ModelLoad { file, message, .. }) => {
                assert_eq!(file, path);
                assert!(message.contains("'w'"), "{message}");
            }
            other => panic!("expected ModelLoad, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn loads_and_converts_dtype() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| WorkerError::Internal(e.to_string()))?;
        let t = Tensor::new(&[1.5f32, -2.0], &Device::Cpu)?;
        let map = HashMap::from([("w".to_owned(), t)]);
        candle_core::safetensors::save(&map, dir.path().join("model.fp16.safetensors"))?;
        let vb = load_var_builder("repo", dir.path(), "model", DType::F16, &Device::Cpu)?;
        let w = vb.get(2, "w")?;
        assert_eq!(w.dtype(), DType::F16);
        assert_eq!(w.to_dtype(DType::F32)?.to_vec1::<f32>()?, vec![1.5, -2.0]);
        Ok(())
    }
}
