//! From a `model_config.json` to a running engine: shared by `fastfusion-worker serve`,
//! `generate`, `bench` and the gateway's embedded worker.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::ModelConfig;
use crate::engine::Engine;
use crate::error::Result;
use crate::pipelines::stable_diffusion::LoadOptions;
use crate::{backend, device, hub};

/// Reads and validates the config, logging a warning for each unknown key.
pub fn read_config(path: &Path) -> Result<ModelConfig> {
    let loaded = ModelConfig::load(path)?;
    for warning in &loaded.warnings {
        tracing::warn!(config = %path.display(), "{warning}");
    }
    Ok(loaded.config)
}

/// Resolves the model directory (fetching from the Hub if needed) and the device and dtype.
pub fn resolve(config: &ModelConfig, base_dir: Option<&Path>) -> Result<(PathBuf, LoadOptions)> {
    let pipeline = &config.pipeline;
    let dir = hub::resolve_model(&pipeline.hf_model_id, base_dir)?;
    let device = device::select_device(config.device())?;
    let dtype = device::select_dtype(config.dtype_run(), &device);
    tracing::info!(model = %pipeline.hf_model_id, dir = %dir.display(), ?device, ?dtype, "loading model");
    if !pipeline.enable_vae_slicing {
        // Batched decoding gave wrong images on the CPU, so the VAE always slices (see vae.rs).
        tracing::info!("the VAE decodes one image at a time whatever enable_vae_slicing says");
    }
    let options = LoadOptions {
        device,
        dtype,
        source_name: pipeline.hf_model_id.clone(),
        vae_tiling: pipeline.enable_vae_tiling,
    };
    Ok((dir, options))
}

/// Loads the model that `config` names into a fresh backend (blocking: resolves and reads weights).
pub fn load_backend(
    config: &ModelConfig,
    base_dir: Option<&Path>,
) -> Result<Box<dyn backend::Backend>> {
    let (dir, options) = resolve(config, base_dir)?;
    backend::load(&dir, &options)
}

/// Starts an engine whose model thread loads `config`'s model; returns at once.
pub fn start_engine(config: Arc<ModelConfig>, base_dir: Option<&Path>) -> Engine {
    let base_dir = base_dir.map(Path::to_path_buf);
    let max_queue = config.pipeline.max_queue;
    Engine::start(max_queue, move || {
        load_backend(&config, base_dir.as_deref())
    })
}
