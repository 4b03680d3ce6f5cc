//! Model resolution: turns `pipeline.hf_model_id` into a directory laid out like a diffusers repo.
//!
//! Data flow: [`resolve_model`] first looks for a local directory (absolute, else relative to the
//! config's directory, else to the working directory). Failing that, an id shaped like a Hub repo
//! id (`name` or `org/name`) is fetched through hf-hub into the Hugging Face cache, exactly as
//! Python's `huggingface_hub` lays it out (`models--org--name/{refs/main, snapshots/<sha>/...}`),
//! so caches filled by either side serve the other.
//!
//! Either way the same walk decides which files the model needs: `model_index.json`, then for
//! each component it lists (`[library, class]` pairs) the files that kind of component loads:
//!
//! | component kind                          | files                                                   |
//! |-----------------------------------------|---------------------------------------------------------|
//! | class `...Scheduler`                    | `scheduler_config.json`                                 |
//! | class `...Tokenizer...`                 | `tokenizer.json`, else `vocab.json` + `merges.txt` (T5: else `spiece.model`); optional `tokenizer_config.json`, `special_tokens_map.json` |
//! | library `diffusers` or `flux` (unet, vae, transformer, Redux `image_embedder`) | `config.json` + `diffusion_pytorch_model.safetensors` (or its sharded `.index.json` and shards) |
//! | library `transformers` (text encoders)  | `config.json` + `model.safetensors` (or sharded)         |
//! | class `...ImageProcessor` (Redux only)  | `preprocessor_config.json`                              |
//!
//! `safety_checker`, `feature_extractor` and `image_encoder` are never loaded by the generation
//! pipelines and are skipped (a `FluxPriorReduxPipeline` repo loads its SigLIP `image_encoder`
//! and `feature_extractor`), as are components listed as `[null, null]`. Local directories are checked the
//! same way, so a broken model fails at start-up naming the missing file, not mid-request.
//!
//! Hub access, from the environment ([`HubSettings::from_env`], the variables Python's
//! `huggingface_hub` reads): the cache is `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub` (hf-hub 0.4 itself only
//! reads `HF_HOME`, so we compute the path and hand it over); `HF_ENDPOINT` replaces
//! `https://huggingface.co`; `HF_TOKEN`, else the token file `huggingface-cli login` writes,
//! authenticates; `HF_HUB_OFFLINE=1` means the cache only, never the network.
//!
//! Online, the repo's current commit is looked up once and every file is fetched at that commit,
//! so all files land in one `snapshots/<sha>` directory even if the repo moves meanwhile; then
//! `refs/main` is pointed at it so a later offline start finds the same snapshot. When the Hub
//! cannot be reached but the cache has the model, the cached snapshot is used with a warning.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Result, WorkerError};

/// The file every diffusers pipeline repo has at its root.
const MODEL_INDEX: &str = "model_index.json";

/// Components our pipelines never load; their files are not fetched.
const UNUSED_COMPONENTS: [&str; 3] = ["safety_checker", "feature_extractor", "image_encoder"];

/// Where and how to reach the Hugging Face Hub and its cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSettings {
    /// The `hub` cache directory holding `models--org--name` folders.
    pub cache_dir: PathBuf,
    /// Base URL of the Hub (`HF_ENDPOINT`), without a trailing slash.
    pub endpoint: String,
    /// Bearer token for gated or private repos.
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE`: use the cache only.
    pub offline: bool,
}

impl HubSettings {
    /// Reads the settings from the process environment (see the module doc).
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Same as [`HubSettings::from_env`] with `get` standing in for the environment.
    fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        // An empty variable counts as unset, as it does for huggingface_hub.
        let var = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache_home = var("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
                var("HOME")
                    .map(PathBuf::from)
                    .unwrap_or_default()
                    .join(".cache")
            });
            cache_home.join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                let token_path = var("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| hf_home.join("token"));
                std::fs::read_to_string(token_path).ok()
            })
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        let endpoint = var("HF_ENDPOINT")
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .unwrap_or_else(|| "https://huggingface.co".to_string());
        HubSettings {
            cache_dir,
            endpoint,
            token,
            offline,
        }
    }
}

/// Resolves `hf_model_id` to a diffusers-layout directory with every file the model needs,
/// downloading from the Hub when allowed. `base_dir` is the config file's directory.
pub fn resolve_model(hf_model_id: &str, base_dir: Option<&Path>) -> Result<PathBuf> {
    resolve_model_with(hf_model_id, base_dir, &HubSettings::from_env())
}

/// [`resolve_model`] with explicit Hub settings instead of the environment's.
pub fn resolve_model_with(
    hf_model_id: &str,
    base_dir: Option<&Path>,
    settings: &HubSettings,
) -> Result<PathBuf> {
    let id = hf_model_id.trim();
    let candidates = local_candidates(id, base_dir);
    if let Some(dir) = candidates.iter().find(|c| c.is_dir()) {
        let source = LocalDir {
            name: id.to_string(),
            dir: dir.clone(),
        };
        fetch_model_files(&source)?;
        return Ok(dir.clone());
    }
    if !is_repo_id(id) {
        let looked_in: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
        return Err(WorkerError::model_load(
            id,
            MODEL_INDEX,
            format!(
                "no such directory (looked in {}), and not a Hub repo id",
                looked_in.join(", ")
            ),
        ));
    }
    if settings.offline {
        return resolve_cached(
            id,
            settings,
            "HF_HUB_OFFLINE is set, so nothing is downloaded",
        );
    }
    resolve_online(id, settings)
}

/// Where a relative id could be a local directory, in order of preference.
fn local_candidates(id: &str, base_dir: Option<&Path>) -> Vec<PathBuf> {
    let path = Path::new(id);
    if path.is_absolute() {
        return vec![path.to_path_buf()];
    }
    base_dir
        .map(|base| base.join(path))
        .into_iter()
        .chain(std::iter::once(path.to_path_buf()))
        .collect()
}

/// Whether `id` has the shape of a Hub repo id: `name` or `org/name`, each part made of
/// letters, digits, `-`, `_` and `.`, without `--` or `..` (the Hub's own rules).
fn is_repo_id(id: &str) -> bool {
    let parts: Vec<&str> = id.split('/').collect();
    let part_ok = |p: &&str| {
        !p.is_empty()
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
            && !p.contains("--")
            && !p.contains("..")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (1..=2).contains(&parts.len()) && parts.iter().all(part_ok)
}

/// The model from the cache alone; `why` says why the network is not used.
fn resolve_cached(id: &str, settings: &HubSettings, why: &str) -> Result<PathBuf> {
    let repo_dir = settings
        .cache_dir
        .join(Repo::model(id.to_string()).folder_name());
    let source = CachedRepo {
        id: id.to_string(),
        cache: Cache::new(settings.cache_dir.clone()).model(id.to_string()),
        repo_dir: repo_dir.clone(),
    };
    let Some(index) = source.fetch(MODEL_INDEX)? else {
        return Err(WorkerError::model_load(
            id,
            MODEL_INDEX,
            format!(
                "not in the Hugging Face cache ({} has no snapshot for refs/main) and {why}",
                repo_dir.display()
            ),
        ));
    };
    fetch_model_files(&source)?;
    snapshot_dir(id, &index)
}

/// The model from the Hub, pinned to the repo's current commit; falls back to the cache when the
/// Hub cannot be reached.
fn resolve_online(id: &str, settings: &HubSettings) -> Result<PathBuf> {
    let api = ApiBuilder::from_cache(Cache::new(settings.cache_dir.clone()))
        .with_endpoint(settings.endpoint.clone())
        .with_token(settings.token.clone())
        // Progress bars would garble the worker's JSON logs.
        .with_progress(false)
        .build()
        .map_err(|e| {
            WorkerError::model_load(
                id,
                MODEL_INDEX,
                format!("cannot set up the Hub client: {e}"),
            )
        })?;
    let info = match api.model(id.to_string()).info() {
        Ok(info) => info,
        Err(e) => {
            let why = format!("the Hub at {} could not be used: {e}", settings.endpoint);
            // Like huggingface_hub: with the Hub unreachable, a cached snapshot still serves.
            let dir = resolve_cached(id, settings, &why)?;
            tracing::warn!(model = id, error = %e, "Hub unreachable; using the cached snapshot");
            return Ok(dir);
        }
    };
    tracing::info!(model = id, revision = %info.sha, endpoint = %settings.endpoint, "fetching model files");
    let source = HubRepo {
        id: id.to_string(),
        sha: info.sha.clone(),
        repo: api.repo(Repo::with_revision(
            id.to_string(),
            RepoType::Model,
            info.sha.clone(),
        )),
        files: info.siblings.into_iter().map(|s| s.rfilename).collect(),
    };
    let index = fetch_model_files(&source)?;
    Cache::new(settings.cache_dir.clone())
        .model(id.to_string())
        .create_ref(&info.sha)
        .map_err(|e| {
            WorkerError::model_load(id, "refs/main", format!("cannot update the cache: {e}"))
        })?;
    snapshot_dir(id, &index)
}

/// The snapshot directory holding `model_index.json` (its parent).
fn snapshot_dir(id: &str, index: &Path) -> Result<PathBuf> {
    index
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| WorkerError::model_load(id, MODEL_INDEX, "has no parent directory"))
}

/// Somewhere model files can be found by their repo-relative path (`unet/config.json`).
trait FileSource {
    /// The repo id or directory, for errors.
    fn name(&self) -> &str;
    /// The local path of `file`, fetching it if needed; `None` when the model has no such file.
    fn fetch(&self, file: &str) -> Result<Option<PathBuf>>;
    /// Why a file is missing here, for the error message.
    fn missing(&self) -> String;
}

/// A local diffusers-layout directory.
struct LocalDir {
    name: String,
    dir: PathBuf,
}

impl FileSource for LocalDir {
    fn name(&self) -> &str {
        &self.name
    }
    fn fetch(&self, file: &str) -> Result<Option<PathBuf>> {
        let path = self.dir.join(file);
        Ok(path.is_file().then_some(path))
    }
    fn missing(&self) -> String {
        format!("missing from {}", self.dir.display())
    }
}

/// The snapshot `refs/main` points at in the Hugging Face cache.
struct CachedRepo {
    id: String,
    cache: hf_hub::CacheRepo,
    repo_dir: PathBuf,
}

impl FileSource for CachedRepo {
    fn name(&self) -> &str {
        &self.id
    }
    fn fetch(&self, file: &str) -> Result<Option<PathBuf>> {
        Ok(self.cache.get(file))
    }
    fn missing(&self) -> String {
        format!(
            "not in the cached snapshot under {} and the Hub is not used",
            self.repo_dir.display()
        )
    }
}

/// A Hub repo at one commit; `files` is its listing, so absent files cost no request.
struct HubRepo {
    id: String,
    sha: String,
    repo: ApiRepo,
    files: HashSet<String>,
}

impl FileSource for HubRepo {
    fn name(&self) -> &str {
        &self.id
    }
    fn fetch(&self, file: &str) -> Result<Option<PathBuf>> {
        if !self.files.contains(file) {
            return Ok(None);
        }
        tracing::debug!(model = %self.id, file, "fetching");
        self.repo
            .get(file)
            .map(Some)
            .map_err(|e| WorkerError::model_load(&self.id, file, format!("download failed: {e}")))
    }
    fn missing(&self) -> String {
        format!("the repo has no such file at revision {}", self.sha)
    }
}

/// What kind of loader a `model_index.json` component needs, hence which files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ComponentKind {
    Scheduler,
    Tokenizer,
    DiffusersModel,
    TransformersModel,
    ImageProcessor,
}

/// The Redux prior's class: the one repo whose image encoder and processor are loaded.
const REDUX_PIPELINE: &str = "FluxPriorReduxPipeline";

/// The kind of component `name` listed as `[library, class]` in a `pipeline` repo; `None` when
/// we never load it.
fn component_kind(pipeline: &str, name: &str, library: &str, class: &str) -> Option<ComponentKind> {
    if pipeline == REDUX_PIPELINE && class.ends_with("ImageProcessor") {
        Some(ComponentKind::ImageProcessor)
    } else if UNUSED_COMPONENTS.contains(&name) && pipeline != REDUX_PIPELINE {
        None
    } else if class.ends_with("Scheduler") {
        Some(ComponentKind::Scheduler)
    } else if class.contains("Tokenizer") {
        Some(ComponentKind::Tokenizer)
    } else if library == "diffusers" || library == "flux" {
        // `flux`: models defined in diffusers' FLUX pipeline module (Redux's image embedder).
        Some(ComponentKind::DiffusersModel)
    } else if library == "transformers" {
        Some(ComponentKind::TransformersModel)
    } else {
        None
    }
}

/// Makes sure every file the model needs is present in `source`; returns `model_index.json`'s path.
fn fetch_model_files(source: &dyn FileSource) -> Result<PathBuf> {
    let index_path = require(source, MODEL_INDEX)?;
    let text = std::fs::read_to_string(&index_path).map_err(|e| {
        WorkerError::model_load(source.name(), MODEL_INDEX, format!("cannot read: {e}"))
    })?;
    let index: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        WorkerError::model_load(source.name(), MODEL_INDEX, format!("invalid JSON: {e}"))
    })?;
    let entries = index.as_object().ok_or_else(|| {
        WorkerError::model_load(source.name(), MODEL_INDEX, "is not a JSON object")
    })?;
    let pipeline = entries
        .get("_class_name")
        .and_then(|c| c.as_str())
        .unwrap_or("");
    for (name, value) in entries {
        // `_class_name`, `_diffusers_version` and flags like `requires_safety_checker` are not
        // components; components are `[library, class]` pairs, `[null, null]` when absent.
        let pair = value
            .as_array()
            .filter(|a| a.len() == 2 && !name.starts_with('_'));
        let Some([library, class]) = pair.map(Vec::as_slice) else {
            continue;
        };
        let (Some(library), Some(class)) = (library.as_str(), class.as_str()) else {
            continue;
        };
        match component_kind(pipeline, name, library, class) {
            Some(ComponentKind::Scheduler) => {
                require(source, &format!("{name}/scheduler_config.json"))?;
            }
            Some(ComponentKind::Tokenizer) => {
                fetch_tokenizer(source, name, class.starts_with("T5"))?
            }
            Some(ComponentKind::ImageProcessor) => {
                require(source, &format!("{name}/preprocessor_config.json"))?;
            }
            Some(ComponentKind::DiffusersModel) => {
                require(source, &format!("{name}/config.json"))?;
                fetch_weights(source, name, "diffusion_pytorch_model")?;
            }
            Some(ComponentKind::TransformersModel) => {
                require(source, &format!("{name}/config.json"))?;
                fetch_weights(source, name, "model")?;
            }
            None => {
                tracing::debug!(model = source.name(), component = %name, class, "component not loaded; skipped")
            }
        }
    }
    Ok(index_path)
}

/// `tokenizer.json` (what transformers 5 writes), else the `vocab.json` + `merges.txt` pair
/// many Hub repos have (T5: else SentencePiece's `spiece.model`); the two small side files are
/// used when present.
fn fetch_tokenizer(source: &dyn FileSource, dir: &str, t5: bool) -> Result<()> {
    let tokenizer_json = format!("{dir}/tokenizer.json");
    if source.fetch(&tokenizer_json)?.is_none() {
        if t5 {
            require(source, &format!("{dir}/spiece.model"))?;
            source.fetch(&format!("{dir}/tokenizer_config.json"))?;
            return Ok(());
        }
        if source.fetch(&format!("{dir}/vocab.json"))?.is_none() {
            return Err(WorkerError::model_load(
                source.name(),
                tokenizer_json,
                format!(
                    "{}, and so is the vocab.json + merges.txt pair",
                    source.missing()
                ),
            ));
        }
        require(source, &format!("{dir}/merges.txt"))?;
    }
    source.fetch(&format!("{dir}/tokenizer_config.json"))?;
    source.fetch(&format!("{dir}/special_tokens_map.json"))?;
    Ok(())
}

/// `{dir}/{stem}.safetensors`, else the shards its `{stem}.safetensors.index.json` lists.
fn fetch_weights(source: &dyn FileSource, dir: &str, stem: &str) -> Result<()> {
    let single = format!("{dir}/{stem}.safetensors");
    if source.fetch(&single)?.is_some() {
        return Ok(());
    }
    let index_file = format!("{dir}/{stem}.safetensors.index.json");
    let Some(index_path) = source.fetch(&index_file)? else {
        return Err(WorkerError::model_load(
            source.name(),
            single,
            format!(
                "{} (only .safetensors weights are loaded, single or sharded with an .index.json)",
                source.missing()
            ),
        ));
    };
    let text = std::fs::read_to_string(&index_path).map_err(|e| {
        WorkerError::model_load(source.name(), &index_file, format!("cannot read: {e}"))
    })?;
    let index: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        WorkerError::model_load(source.name(), &index_file, format!("invalid JSON: {e}"))
    })?;
    let shards: BTreeSet<&str> = index
        .get("weight_map")
        .and_then(serde_json::Value::as_object)
        .ok_or_else(|| {
            WorkerError::model_load(source.name(), &index_file, "has no weight_map object")
        })?
        .values()
        .filter_map(serde_json::Value::as_str)
        .collect();
    if shards.is_empty() {
        return Err(WorkerError::model_load(
            source.name(),
            &index_file,
            "weight_map lists no files",
        ));
    }
    for shard in shards {
        // Shards sit beside their index; anything else would reach outside the model.
        if shard.contains(['/', '\\']) || shard == ".." {
            return Err(WorkerError::model_load(
                source.name(),
                &index_file,
                format!("weight_map names '{shard}', which is not a file beside the index"),
            ));
        }
        require(source, &format!("{dir}/{shard}"))?;
    }
    Ok(())
}

/// `file`'s path, or an error naming the source and the file.
fn require(source: &dyn FileSource, file: &str) -> Result<PathBuf> {
    source
        .fetch(file)?
        .ok_or_else(|| WorkerError::model_load(source.name(), file, source.missing()))
}

#[cfg(test)]
// A failed setup step should fail the test: that is what unwrap does here.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// An SD1.5-style `model_index.json`, with the components we skip.
    const SD_INDEX: &str = r#"{
      "_class_name": "StableDiffusionPipeline",
      "_diffusers_version": "0.42.0",
      "requires_safety_checker": false,
      "feature_extractor": ["transformers", "CLIPImageProcessor"],
      "safety_checker": [null, null],
      "image_encoder": [null, null],
      "scheduler": ["diffusers", "PNDMScheduler"],
      "text_encoder": ["transformers", "CLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"],
      "unet": ["diffusers", "UNet2DConditionModel"],
      "vae": ["diffusers", "AutoencoderKL"]
    }"#;

    /// Every file an `SD_INDEX` model needs, with a `tokenizer.json` tokenizer.
    const SD_FILES: [&str; 9] = [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ];

    /// Writes `files` under `dir`; `model_index.json` gets `SD_INDEX`, the rest `{}`.
    fn write_files(dir: &Path, files: &[&str]) {
        for file in files {
            let path = dir.join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let text = if *file == MODEL_INDEX { SD_INDEX } else { "{}" };
            std::fs::write(path, text).unwrap();
        }
    }

    fn without<'a>(files: &[&'a str], drop: &[&str]) -> Vec<&'a str> {
        files
            .iter()
            .copied()
            .filter(|f| !drop.contains(f))
            .collect()
    }

    /// Settings that never reach a network: offline, cache under `cache_dir`.
    fn offline(cache_dir: &Path) -> HubSettings {
        HubSettings {
            cache_dir: cache_dir.to_path_buf(),
            endpoint: "http://127.0.0.1:1".to_string(),
            token: None,
            offline: true,
        }
    }

    /// Lays out `org/name` in an HF cache under `cache_dir` with `files`; returns the snapshot.
    fn cache_model(cache_dir: &Path, repo: &str, files: &[&str]) -> PathBuf {
        let repo_dir = cache_dir.join(format!("models--{}", repo.replace('/', "--")));
        let sha = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
        std::fs::write(repo_dir.join("refs/main"), sha).unwrap();
        let snapshot = repo_dir.join("snapshots").join(sha);
        write_files(&snapshot, files);
        snapshot
    }

    /// Expects a model-load error; returns (source_name, file, message).
    fn load_error(result: Result<PathBuf>) -> (String, PathBuf, String) {
        match result {
            Err(WorkerError::ModelLoad {
                source_name,
                file,
                message,
            }) => (source_name, file, message),
            other => panic!("expected a model-load error, got {other:?}"),
        }
    }

    #[test]
    fn complete_local_directory_is_used_as_is() {
        let dir = tempfile::tempdir().unwrap();
        write_files(dir.path(), &SD_FILES);
        let id = dir.path().to_str().unwrap();
        let resolved = resolve_model_with(id, None, &offline(dir.path())).unwrap();
        assert_eq!(resolved, dir.path());
    }

    #[test]
    fn relative_directory_resolves_against_base_dir() {
        let base = tempfile::tempdir().unwrap();
        let model = base.path().join("models/tiny");
        write_files(&model, &SD_FILES);
        let resolved =
            resolve_model_with("models/tiny", Some(base.path()), &offline(base.path())).unwrap();
        assert_eq!(resolved, model);
    }

    #[test]
    fn vocab_and_merges_replace_tokenizer_json() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = without(&SD_FILES, &["tokenizer/tokenizer.json"]);
        files.extend(["tokenizer/vocab.json", "tokenizer/merges.txt"]);
        write_files(dir.path(), &files);
        let id = dir.path().to_str().unwrap();
        assert!(resolve_model_with(id, None, &offline(dir.path())).is_ok());

        std::fs::remove_file(dir.path().join("tokenizer/merges.txt")).unwrap();
        let (_, file, _) = load_error(resolve_model_with(id, None, &offline(dir.path())));
        assert_eq!(file, Path::new("tokenizer/merges.txt"));
    }

    #[test]
    fn missing_files_are_named_with_the_model() {
        for missing in [
            "model_index.json",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/config.json",
            "text_encoder/model.safetensors",
            "scheduler/scheduler_config.json",
            "tokenizer/tokenizer.json",
        ] {
            let dir = tempfile::tempdir().unwrap();
            write_files(dir.path(), &without(&SD_FILES, &[missing]));
            let id = dir.path().to_str().unwrap();
            let (source, file, message) =
                load_error(resolve_model_with(id, None, &offline(dir.path())));
            assert_eq!(source, id);
            assert_eq!(file, Path::new(missing), "{message}");
            assert!(message.contains("missing from"), "{message}");
        }
    }

    /// A copy of the fixture `name` (tiny FLUX repos).
    fn fixture_copy(name: &str) -> tempfile::TempDir {
        let from = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models")
            .join(name);
        let dir = tempfile::tempdir().unwrap();
        fn copy(from: &Path, to: &Path) {
            for entry in std::fs::read_dir(from).unwrap() {
                let entry = entry.unwrap();
                let target = to.join(entry.file_name());
                if std::fs::metadata(entry.path()).unwrap().is_dir() {
                    std::fs::create_dir_all(&target).unwrap();
                    copy(&entry.path(), &target);
                } else {
                    std::fs::copy(entry.path(), &target).unwrap();
                }
            }
        }
        copy(&from, dir.path());
        dir
    }

    #[test]
    fn flux_and_redux_repos_need_their_own_parts() {
        // FLUX: a sharded transformer and a T5 tokenizer.
        let flux = fixture_copy("tiny-flux-dev");
        let id = flux.path().to_str().unwrap();
        assert!(resolve_model_with(id, None, &offline(flux.path())).is_ok());
        std::fs::remove_file(
            flux.path()
                .join("transformer/diffusion_pytorch_model-00002-of-00003.safetensors"),
        )
        .unwrap();
        let (_, file, _) = load_error(resolve_model_with(id, None, &offline(flux.path())));
        assert_eq!(
            file,
            Path::new("transformer/diffusion_pytorch_model-00002-of-00003.safetensors")
        );
        // A T5 tokenizer may be SentencePiece's model instead of tokenizer.json.
        let flux = fixture_copy("tiny-flux-dev");
        let id = flux.path().to_str().unwrap();
        std::fs::remove_file(flux.path().join("tokenizer_2/tokenizer.json")).unwrap();
        let (_, file, _) = load_error(resolve_model_with(id, None, &offline(flux.path())));
        assert_eq!(file, Path::new("tokenizer_2/spiece.model"));
        std::fs::write(flux.path().join("tokenizer_2/spiece.model"), b"x").unwrap();
        assert!(resolve_model_with(id, None, &offline(flux.path())).is_ok());

        // Redux: SigLIP (image_encoder), its processor and the `flux` image embedder are loaded.
        for (missing, file) in [
            (
                "image_encoder/model.safetensors",
                "image_encoder/model.safetensors",
            ),
            (
                "feature_extractor/preprocessor_config.json",
                "feature_extractor/preprocessor_config.json",
            ),
            (
                "image_embedder/diffusion_pytorch_model.safetensors",
                "image_embedder/diffusion_pytorch_model.safetensors",
            ),
        ] {
            let redux = fixture_copy("tiny-flux-redux");
            let id = redux.path().to_str().unwrap();
            assert!(resolve_model_with(id, None, &offline(redux.path())).is_ok());
            std::fs::remove_file(redux.path().join(missing)).unwrap();
            let (_, named, _) = load_error(resolve_model_with(id, None, &offline(redux.path())));
            assert_eq!(named, Path::new(file));
        }
    }

    #[test]
    fn components_not_listed_are_not_required() {
        let dir = tempfile::tempdir().unwrap();
        let files = without(
            &SD_FILES,
            &["vae/config.json", "vae/diffusion_pytorch_model.safetensors"],
        );
        write_files(dir.path(), &files);
        let mut index: serde_json::Value = serde_json::from_str(SD_INDEX).unwrap();
        index["vae"] = serde_json::json!([null, null]);
        std::fs::write(dir.path().join(MODEL_INDEX), index.to_string()).unwrap();
        let id = dir.path().to_str().unwrap();
        assert!(resolve_model_with(id, None, &offline(dir.path())).is_ok());
    }

    #[test]
    fn sharded_weights_need_every_shard() {
        let dir = tempfile::tempdir().unwrap();
        write_files(
            dir.path(),
            &without(&SD_FILES, &["unet/diffusion_pytorch_model.safetensors"]),
        );
        let index = serde_json::json!({"weight_map": {
            "a.weight": "diffusion_pytorch_model-00001-of-00002.safetensors",
            "b.weight": "diffusion_pytorch_model-00002-of-00002.safetensors",
            "c.weight": "diffusion_pytorch_model-00001-of-00002.safetensors"
        }});
        std::fs::write(
            dir.path()
                .join("unet/diffusion_pytorch_model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
        write_files(
            dir.path(),
            &["unet/diffusion_pytorch_model-00001-of-00002.safetensors"],
        );
        let id = dir.path().to_str().unwrap();
        let (_, file, _) = load_error(resolve_model_with(id, None, &offline(dir.path())));
        assert_eq!(
            file,
            Path::new("unet/diffusion_pytorch_model-00002-of-00002.safetensors")
        );
        write_files(
            dir.path(),
            &["unet/diffusion_pytorch_model-00002-of-00002.safetensors"],
        );
        assert!(resolve_model_with(id, None, &offline(dir.path())).is_ok());
    }

    #[test]
    fn shard_names_cannot_leave_the_component() {
        let dir = tempfile::tempdir().unwrap();
        write_files(
            dir.path(),
            &without(&SD_FILES, &["unet/diffusion_pytorch_model.safetensors"]),
        );
        let index = serde_json::json!({"weight_map": {"a": "../vae/config.json"}});
        std::fs::write(
            dir.path()
                .join("unet/diffusion_pytorch_model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
        let id = dir.path().to_str().unwrap();
        let (_, file, message) = load_error(resolve_model_with(id, None, &offline(dir.path())));
        assert_eq!(
            file,
            Path::new("unet/diffusion_pytorch_model.safetensors.index.json")
        );
        assert!(message.contains("../vae/config.json"), "{message}");
    }

    #[test]
    fn a_missing_path_is_not_taken_for_a_repo_id() {
        let dir = tempfile::tempdir().unwrap();
        let (source, file, message) = load_error(resolve_model_with(
            "tests/fixtures/models/nope",
            Some(dir.path()),
            &offline(dir.path()),
        ));
        assert_eq!(source, "tests/fixtures/models/nope");
        assert_eq!(file, Path::new(MODEL_INDEX));
        assert!(message.contains("no such directory"), "{message}");
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
    }

    #[test]
    fn repo_id_shapes() {
        for id in ["stabilityai/sd-turbo", "gpt2", "org/name.v1_x", "a-b/c"] {
            assert!(is_repo_id(id), "{id}");
        }
        for id in [
            "a/b/c", "/abs", "./rel", "../up", "a--b/c", "a/..", "org/", "", "a b/c", "-a/b",
        ] {
            assert!(!is_repo_id(id), "{id}");
        }
    }

    #[test]
    fn shipped_fixture_models_resolve() {
        // tiny-sd15 has tokenizer.json, tiny-sd2-v vocab.json + merges.txt.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let cache = tempfile::tempdir().unwrap();
        for model in [
            "tests/fixtures/models/tiny-sd15",
            "tests/fixtures/models/tiny-sd2-v",
        ] {
            let dir = resolve_model_with(model, Some(&root), &offline(cache.path())).unwrap();
            assert_eq!(dir, root.join(model));
        }
    }

    #[test]
    fn offline_uses_the_cached_snapshot() {
        let cache = tempfile::tempdir().unwrap();
        let snapshot = cache_model(cache.path(), "org/tiny-sd", &SD_FILES);
        let resolved = resolve_model_with("org/tiny-sd", None, &offline(cache.path())).unwrap();
        assert_eq!(resolved, snapshot);
        assert!(resolved.join("unet/config.json").is_file());
    }

    #[test]
    fn offline_without_the_model_says_so() {
        let cache = tempfile::tempdir().unwrap();
        let (source, file, message) = load_error(resolve_model_with(
            "org/absent",
            None,
            &offline(cache.path()),
        ));
        assert_eq!(source, "org/absent");
        assert_eq!(file, Path::new(MODEL_INDEX));
        assert!(message.contains("HF_HUB_OFFLINE"), "{message}");
        assert!(message.contains("models--org--absent"), "{message}");
    }

    #[test]
    fn offline_with_a_file_missing_names_repo_and_file() {
        let cache = tempfile::tempdir().unwrap();
        cache_model(
            cache.path(),
            "org/tiny-sd",
            &without(&SD_FILES, &["vae/diffusion_pytorch_model.safetensors"]),
        );
        let (source, file, message) = load_error(resolve_model_with(
            "org/tiny-sd",
            None,
            &offline(cache.path()),
        ));
        assert_eq!(source, "org/tiny-sd");
        assert_eq!(file, Path::new("vae/diffusion_pytorch_model.safetensors"));
        assert!(message.contains("not in the cached snapshot"), "{message}");
    }

    #[test]
    fn unreachable_hub_falls_back_to_the_cache() {
        let cache = tempfile::tempdir().unwrap();
        // Port 1 on loopback refuses connections: the online path fails without any network.
        let settings = HubSettings {
            offline: false,
            ..offline(cache.path())
        };
        let (source, _, message) = load_error(resolve_model_with("org/tiny-sd", None, &settings));
        assert_eq!(source, "org/tiny-sd");
        assert!(message.contains("http://127.0.0.1:1"), "{message}");

        let snapshot = cache_model(cache.path(), "org/tiny-sd", &SD_FILES);
        assert_eq!(
            resolve_model_with("org/tiny-sd", None, &settings).unwrap(),
            snapshot
        );
    }

    #[test]
    fn settings_follow_huggingface_hub_precedence() {
        let home = tempfile::tempdir().unwrap();
        let hf_home = home.path().join("hf");
        std::fs::create_dir_all(&hf_home).unwrap();
        std::fs::write(hf_home.join("token"), "hf_file_token\n").unwrap();
        let from = |vars: &[(&str, &str)]| {
            let map: HashMap<String, String> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            HubSettings::from_lookup(|name| map.get(name).cloned())
        };
        let home_str = home.path().to_str().unwrap();
        let hf_home_str = hf_home.to_str().unwrap();

        let defaults = from(&[("HOME", home_str)]);
        assert_eq!(
            defaults.cache_dir,
            home.path().join(".cache/huggingface/hub")
        );
        assert_eq!(defaults.endpoint, "https://huggingface.co");
        assert_eq!(defaults.token, None);
        assert!(!defaults.offline);

        let xdg = from(&[("HOME", home_str), ("XDG_CACHE_HOME", "/xdg")]);
        assert_eq!(xdg.cache_dir, Path::new("/xdg/huggingface/hub"));

        let with_home = from(&[("HOME", home_str), ("HF_HOME", hf_home_str)]);
        assert_eq!(with_home.cache_dir, hf_home.join("hub"));
        assert_eq!(with_home.token.as_deref(), Some("hf_file_token"));

        let explicit = from(&[
            ("HF_HOME", hf_home_str),
            ("HF_HUB_CACHE", "/models/hub"),
            ("HF_TOKEN", "hf_env_token"),
            ("HF_ENDPOINT", "https://mirror.example/"),
            ("HF_HUB_OFFLINE", "1"),
        ]);
        assert_eq!(explicit.cache_dir, Path::new("/models/hub"));
        assert_eq!(explicit.token.as_deref(), Some("hf_env_token"));
        assert_eq!(explicit.endpoint, "https://mirror.example");
        assert!(explicit.offline);

        for (value, expected) in [("true", true), ("ON", true), ("0", false), ("", false)] {
            assert_eq!(
                from(&[("HF_HUB_OFFLINE", value)]).offline,
                expected,
                "{value}"
            );
        }
    }
}
