//! `pipeline.loras[]` entries → local files, before the model loads.
//!
//! | `type` | `address` | file |
//! |---|---|---|
//! | `local` | a file, or a directory | the file; in a directory `weight_name`, else its only `.safetensors`, else `pytorch_lora_weights.safetensors` |
//! | `hub` | a repo id | the same choice among the repo's files, fetched through hf-hub into the Hugging Face cache (`HF_HUB_CACHE`, `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE` as for models); the cached snapshot when the Hub is unreachable |
//! | `url` | an http(s) URL | downloaded once into `<hub cache>/fastfusion-loras/<hash of the url>/<weight_name or the URL's file name>` and re-used on later starts |
//!
//! Downloads are written to a `.part` file and renamed when complete and checked (atomic: a
//! crash never leaves a file that looks finished), limited to [`MAX_DOWNLOAD_BYTES`] (or
//! `LORA_MAX_DOWNLOAD_BYTES`), retried three times (resuming with a `Range` request where the
//! server allows it), refused when the server answers with HTML, and checked against the entry's
//! `sha256` when it has one (also when re-used from the cache). Every error names the entry.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use sha2::{Digest, Sha256};

use super::AdapterFile;
use crate::config::{LoraConfig, LoraSource};
use crate::error::{Result, WorkerError};
use crate::hub::HubSettings;

/// The largest adapter a url download may be (2 GiB: rank-128 FLUX LoRAs are ~1.3 GB).
pub const MAX_DOWNLOAD_BYTES: u64 = 2 << 30;
/// The file diffusers' `save_lora_weights` writes, looked for when nothing else says which.
const DEFAULT_WEIGHT_NAME: &str = "pytorch_lora_weights.safetensors";
const ATTEMPTS: u32 = 3;

/// Every entry's file, in config order (downloading `hub` and `url` ones as needed).
pub fn resolve(entries: &[LoraConfig], settings: &HubSettings) -> Result<Vec<AdapterFile>> {
    let limit = std::env::var("LORA_MAX_DOWNLOAD_BYTES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(MAX_DOWNLOAD_BYTES);
    resolve_with(entries, settings, limit)
}

/// [`resolve`] with an explicit download size limit in bytes.
pub fn resolve_with(
    entries: &[LoraConfig],
    settings: &HubSettings,
    limit: u64,
) -> Result<Vec<AdapterFile>> {
    entries
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let key = format!("pipeline.loras[{i}]");
            let fail = |why: String| {
                WorkerError::config(&key, format!("adapter '{}': {why}", entry.adapter_name))
            };
            let path = match entry.source {
                LoraSource::Local => local_file(entry),
                LoraSource::Hub => hub_file(entry, settings),
                LoraSource::Url => url_file(entry, settings, limit),
            }
            .map_err(fail)?;
            if let Some(want) = &entry.sha256 {
                check_sha256(&path, want).map_err(fail)?;
            }
            Ok(AdapterFile {
                name: entry.adapter_name.clone(),
                key,
                path,
            })
        })
        .collect()
}

/// Which of `files` (names relative to a folder or repo) is the adapter.
fn pick(files: &[String], weight_name: Option<&str>, place: &str) -> Result<String, String> {
    if let Some(name) = weight_name {
        return if files.iter().any(|f| f == name) {
            Ok(name.to_string())
        } else {
            Err(format!("{place} has no file '{name}' (weight_name)"))
        };
    }
    let tensors: Vec<&String> = files
        .iter()
        .filter(|f| f.ends_with(".safetensors"))
        .collect();
    match tensors.as_slice() {
        [only] => Ok((*only).clone()),
        [] => Err(format!("{place} has no .safetensors file")),
        many if many.iter().any(|f| *f == DEFAULT_WEIGHT_NAME) => Ok(DEFAULT_WEIGHT_NAME.into()),
        many => Err(format!(
            "{place} has several .safetensors files ({}); set weight_name",
            many.iter()
                .map(|f| f.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn local_file(entry: &LoraConfig) -> Result<PathBuf, String> {
    let path = Path::new(&entry.address);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.is_dir() {
        return Err(format!("no file or directory at '{}'", entry.address));
    }
    let files: Vec<String> = std::fs::read_dir(path)
        .map_err(|e| format!("cannot list '{}': {e}", entry.address))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    let name = pick(&files, entry.weight_name.as_deref(), &entry.address)?;
    Ok(path.join(name))
}

fn hub_file(entry: &LoraConfig, settings: &HubSettings) -> Result<PathBuf, String> {
    let id = entry.address.as_str();
    let weight_name = entry.weight_name.as_deref();
    let why_offline = if settings.offline {
        "HF_HUB_OFFLINE is set".to_string()
    } else {
        let api = ApiBuilder::from_cache(Cache::new(settings.cache_dir.clone()))
            .with_endpoint(settings.endpoint.clone())
            .with_token(settings.token.clone())
            .with_progress(false)
            .build()
            .map_err(|e| format!("cannot set up the Hub client: {e}"))?;
        match api.model(id.to_string()).info() {
            Ok(info) => {
                let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
                let name = pick(&files, weight_name, &format!("Hub repo {id}"))?;
                let repo = Repo::with_revision(id.to_string(), RepoType::Model, info.sha.clone());
                let path = api
                    .repo(repo)
                    .get(&name)
                    .map_err(|e| format!("download of {id}/{name} failed: {e}"))?;
                // A later offline start finds the same snapshot.
                Cache::new(settings.cache_dir.clone())
                    .model(id.to_string())
                    .create_ref(&info.sha)
                    .map_err(|e| format!("cannot update the cache's refs/main: {e}"))?;
                return Ok(path);
            }
            Err(e) => {
                tracing::warn!(repo = id, error = %e, "Hub unreachable; looking in the cache");
                format!("the Hub at {} could not be used: {e}", settings.endpoint)
            }
        }
    };
    let repo_dir = settings
        .cache_dir
        .join(Repo::model(id.to_string()).folder_name());
    let sha = std::fs::read_to_string(repo_dir.join("refs/main")).map_err(|_| {
        format!(
            "not in the Hugging Face cache ({}) and {why_offline}",
            repo_dir.display()
        )
    })?;
    let snapshot = repo_dir.join("snapshots").join(sha.trim());
    let files: Vec<String> = std::fs::read_dir(&snapshot)
        .map_err(|e| format!("cached snapshot {} unreadable: {e}", snapshot.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    let name = pick(&files, weight_name, &format!("the cached snapshot of {id}"))?;
    Ok(snapshot.join(name))
}

/// The download's file name: `weight_name` (`.safetensors` added when it has no extension), else
/// the URL path's last segment.
fn url_file_name(url: &reqwest::Url, weight_name: Option<&str>) -> Result<String, String> {
    let name = match weight_name {
        Some(name) if Path::new(name).extension().is_some() => name.to_string(),
        Some(name) => format!("{name}.safetensors"),
        None => url
            .path_segments()
            .and_then(|mut s| s.next_back())
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .ok_or("the URL names no file; set weight_name")?,
    };
    if name.contains('/') || name.contains('\\') || name.starts_with('.') {
        return Err(format!("'{name}' is not a plain file name"));
    }
    Ok(name)
}

fn url_file(entry: &LoraConfig, settings: &HubSettings, limit: u64) -> Result<PathBuf, String> {
    let url = reqwest::Url::parse(&entry.address).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("URL scheme '{}' is not http(s)", url.scheme()));
    }
    let name = url_file_name(&url, entry.weight_name.as_deref())?;
    let folder = settings
        .cache_dir
        .join("fastfusion-loras")
        .join(&hex(&Sha256::digest(url.as_str().as_bytes()))[..16]);
    let target = folder.join(&name);
    if target.is_file() {
        tracing::info!(adapter = %entry.adapter_name, file = %target.display(), "LoRA download re-used");
        return Ok(target);
    }
    std::fs::create_dir_all(&folder)
        .map_err(|e| format!("cannot create {}: {e}", folder.display()))?;
    let part = folder.join(format!("{name}.part"));
    // The async client on a thread of its own: start-up may run inside a runtime or not.
    let download = {
        let (url, part) = (url.clone(), part.clone());
        std::thread::spawn(move || download_with_retries(&url, &part, limit))
    };
    download
        .join()
        .map_err(|_| "the download thread panicked".to_string())??;
    check_safetensors_start(&part)?;
    std::fs::rename(&part, &target)
        .map_err(|e| format!("cannot move the download into place: {e}"))?;
    tracing::info!(adapter = %entry.adapter_name, file = %target.display(), "LoRA downloaded");
    Ok(target)
}

fn download_with_retries(url: &reqwest::Url, part: &Path, limit: u64) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the download runtime: {e}"))?;
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        match runtime.block_on(download_once(&client, url, part, limit)) {
            Ok(()) => return Ok(()),
            Err(Failure::Final(why)) => {
                let _ = std::fs::remove_file(part);
                return Err(why);
            }
            Err(Failure::Retry(why)) => {
                tracing::warn!(%url, attempt, error = %why, "LoRA download failed; retrying");
                last = why;
                std::thread::sleep(Duration::from_millis(500 * u64::from(attempt)));
            }
        }
    }
    Err(format!("download failed after {ATTEMPTS} attempts: {last}"))
}

enum Failure {
    /// Worth another attempt (network, 5xx).
    Retry(String),
    /// Will not get better (4xx, HTML, too large).
    Final(String),
}

/// One attempt, appending to `part` when the server honours a `Range` for what it already holds.
async fn download_once(
    client: &reqwest::Client,
    url: &reqwest::Url,
    part: &Path,
    limit: u64,
) -> Result<(), Failure> {
    let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let mut request = client.get(url.clone());
    if have > 0 {
        request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let mut response = request
        .send()
        .await
        .map_err(|e| Failure::Retry(e.to_string()))?;
    let status = response.status();
    if status.is_server_error() {
        return Err(Failure::Retry(format!("the server answered {status}")));
    }
    if !status.is_success() {
        return Err(Failure::Final(format!("the server answered {status}")));
    }
    let is_html = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("text/html"));
    if is_html {
        return Err(Failure::Final(
            "the server answered with an HTML page (a login or error page?), not a safetensors file"
                .into(),
        ));
    }
    let resumed = status == reqwest::StatusCode::PARTIAL_CONTENT && have > 0;
    let mut written = if resumed { have } else { 0 };
    if let Some(len) = response.content_length() {
        if written + len > limit {
            return Err(Failure::Final(format!(
                "the file is {} bytes, over the {limit}-byte limit (LORA_MAX_DOWNLOAD_BYTES)",
                written + len
            )));
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed)
        .open(part)
        .map_err(|e| Failure::Final(format!("cannot write {}: {e}", part.display())))?;
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| Failure::Retry(e.to_string()))?
    {
        written += chunk.len() as u64;
        if written > limit {
            return Err(Failure::Final(format!(
                "the download passed the {limit}-byte limit (LORA_MAX_DOWNLOAD_BYTES)"
            )));
        }
        file.write_all(&chunk)
            .map_err(|e| Failure::Final(format!("cannot write {}: {e}", part.display())))?;
    }
    file.sync_all()
        .map_err(|e| Failure::Final(format!("cannot write {}: {e}", part.display())))
}

/// A finished download must at least start like safetensors (the parser checks the rest).
fn check_safetensors_start(path: &Path) -> Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read the download: {e}"))?;
    let ok = bytes.len() > 8 && bytes[8] == b'{';
    if !ok {
        let _ = std::fs::remove_file(path);
        let start = String::from_utf8_lossy(&bytes[..bytes.len().min(16)]).into_owned();
        return Err(format!(
            "the download is not a safetensors file (it starts with {start:?})"
        ));
    }
    Ok(())
}

fn check_sha256(path: &Path, want: &str) -> Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let got = hex(&Sha256::digest(&bytes));
    if !got.eq_ignore_ascii_case(want.trim()) {
        return Err(format!(
            "sha256 of {} is {got}, not the configured {want}",
            path.display()
        ));
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(files: &[&str]) -> Vec<String> {
        files.iter().map(|f| f.to_string()).collect()
    }

    #[test]
    fn the_adapter_file_is_chosen_as_diffusers_does() {
        assert_eq!(
            pick(&names(&["a.safetensors", "README.md"]), None, "x").unwrap(),
            "a.safetensors"
        );
        let two = names(&["a.safetensors", DEFAULT_WEIGHT_NAME]);
        assert_eq!(pick(&two, None, "x").unwrap(), DEFAULT_WEIGHT_NAME);
        assert_eq!(
            pick(&two, Some("a.safetensors"), "x").unwrap(),
            "a.safetensors"
        );
        assert!(pick(&names(&["a.safetensors", "b.safetensors"]), None, "x")
            .unwrap_err()
            .contains("weight_name"));
        assert!(pick(&two, Some("c.bin"), "x")
            .unwrap_err()
            .contains("'c.bin'"));
    }

    #[test]
    fn url_file_names_are_plain() {
        let url =
            reqwest::Url::parse("https://example.com/x/style.safetensors?download=1").unwrap();
        assert_eq!(url_file_name(&url, None).unwrap(), "style.safetensors");
        assert_eq!(
            url_file_name(&url, Some("mine")).unwrap(),
            "mine.safetensors"
        );
        assert!(url_file_name(&url, Some("../evil.safetensors")).is_err());
        let bare = reqwest::Url::parse("https://example.com/").unwrap();
        assert!(url_file_name(&bare, None).is_err());
    }
}
