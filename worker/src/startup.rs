//! From a `model_config.json` to a running engine: shared by `fastfusion-worker serve`,
//! `generate`, `bench` and the gateway's embedded worker.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{ModelConfig, DEFAULT_FLUX_FILL_MODEL_ID};
use crate::engine::{Engine, EngineOptions};
use crate::error::Result;
use crate::pipelines::LoadOptions;
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
    let (precision, notes) =
        device::select_precision(pipeline.torch_dtype_init, pipeline.torch_dtype_run, &device);
    for note in notes {
        tracing::warn!("{note}");
    }
    let dtype = precision.run;
    tracing::info!(
        model = %pipeline.hf_model_id,
        dir = %dir.display(),
        ?device,
        init_dtype = ?precision.init,
        ?dtype,
        cpu_offload = pipeline.enable_cpu_offload,
        "loading model"
    );
    if !pipeline.enable_vae_slicing {
        // Batched decoding gave wrong images on the CPU, so the VAE always slices (see vae.rs).
        tracing::info!("the VAE decodes one image at a time whatever enable_vae_slicing says");
    }
    let options = LoadOptions {
        device,
        dtype,
        init_dtype: precision.init,
        cpu_offload: pipeline.enable_cpu_offload,
        source_name: pipeline.hf_model_id.clone(),
        vae_tiling: pipeline.enable_vae_tiling,
        fill_transformer: fill_source(config, &dir)?
            .map(|id| resolve_part(&id, base_dir, "Fill model"))
            .transpose()?,
        redux: redux_source(config)
            .map(|id| resolve_part(&id, base_dir, "Redux prior"))
            .transpose()?,
        loras: crate::lora::source::resolve(&pipeline.loras, &hub::HubSettings::from_env())?,
    };
    Ok((dir, options))
}

/// The Fill repo masked edits run with beside the base, if any: `edits_config.inpaint_pipeline`,
/// else FLUX.1-Fill-dev when edits ask for `FluxFillPipeline` and `hf_model_id` is not a Fill
/// model itself (its `model_index.json` says which).
fn fill_source(config: &ModelConfig, dir: &Path) -> Result<Option<String>> {
    let edits = &config.pipeline.edits_config;
    if !edits.enabled {
        return Ok(None);
    }
    if let Some(id) = &edits.inpaint_pipeline {
        return Ok(Some(id.clone()));
    }
    if !edits.wants_flux_fill() {
        return Ok(None);
    }
    let index = crate::pipelines::ModelIndex::read(&config.pipeline.hf_model_id, dir)?;
    if index.class_name == "FluxFillPipeline" {
        return Ok(None);
    }
    tracing::info!(
        fill = DEFAULT_FLUX_FILL_MODEL_ID,
        "edits_config.pipeline is FluxFillPipeline and hf_model_id is not a Fill model: \
         masked edits use the Fill transformer of {DEFAULT_FLUX_FILL_MODEL_ID} \
         (set edits_config.inpaint_pipeline to choose another)"
    );
    Ok(Some(DEFAULT_FLUX_FILL_MODEL_ID.to_string()))
}

/// The Redux prior variations run through, when `enable_flux_redux` is on.
fn redux_source(config: &ModelConfig) -> Option<String> {
    let variations = &config.pipeline.variations_config;
    (variations.enabled && variations.enable_flux_redux)
        .then(|| variations.flux_redux_model_id.clone())
}

/// A second repo's directory (fetched from the Hub when needed), logged as `what`.
fn resolve_part(id: &str, base_dir: Option<&Path>, what: &str) -> Result<PathBuf> {
    let dir = hub::resolve_model(id, base_dir)?;
    tracing::info!(model = %id, dir = %dir.display(), "loading the {what}");
    Ok(dir)
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
    let pipeline = &config.pipeline;
    let options = EngineOptions {
        max_queue: pipeline.max_queue,
        max_batch: pipeline.max_batch,
        batch_window: std::time::Duration::from_millis(pipeline.batch_window_ms),
    };
    Engine::start_with(options, move || load_backend(&config, base_dir.as_deref()))
}
