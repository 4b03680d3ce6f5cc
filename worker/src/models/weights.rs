//! Loading a component's safetensors weights into a candle `VarBuilder`.
//!
//! The files are read into memory (the workspace forbids `unsafe`, which rules out candle's mmap
//! builder), converted to the requested dtype when the model asks for each tensor, and freed once
//! the model is built. A component's weights are one of, in order of preference:
//! `<stem>.safetensors`, `<stem>.fp16.safetensors`, or the shards listed by
//! `<stem>.safetensors.index.json`.

use std::collections::{BTreeSet, HashMap};
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

/// Reads every tensor of the component in `dir` and returns a builder that hands them out in
/// `dtype` on `device`.
pub fn load_var_builder(
    source_name: &str,
    dir: &Path,
    stem: &str,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for file in weight_files(source_name, dir, stem)? {
        let loaded = candle_core::safetensors::load(&file, device)
            .map_err(|e| WorkerError::model_load(source_name, &file, e))?;
        tensors.extend(loaded);
    }
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
