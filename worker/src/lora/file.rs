//! One LoRA file → its entries, whatever the format.
//!
//! ```text
//! bytes ─header check (safetensors: 8-byte length, JSON, offsets inside the file)─▶ tensors +
//!       `__metadata__` ─refusals (DoRA, LoHa/LoKr, control LoRAs)─▶ group by module ─▶ entries
//! ```
//!
//! Each module's tensors become one [`Entry`] (down, up, optional up bias, scale) filed under the
//! part it belongs to and a key in the format's own naming (`names.rs` maps layers onto them):
//!
//! | keys | format | part | scale |
//! |---|---|---|---|
//! | `{unet,transformer,text_encoder,text_encoder_2}.{module}.lora_A/lora_B.weight`, no prefix = denoiser, `base_model.model.` stripped | diffusers / PEFT | by prefix | `lora_adapter_metadata` (`{part}.lora_alpha`, `.alpha_pattern`, `.use_rslora`), else 1 |
//! | `…{module}.processor.to_q_lora.down.weight`, `….lora.down`, `….lora_linear_layer.down` | older diffusers | by prefix | `{module}.alpha`, else 1 |
//! | `lora_unet_…`, `lora_te[1|2]_…` `.lora_down/.lora_up.weight`, `.alpha` | kohya (sd-scripts) | by prefix | alpha / rank (FLUX's `final_layer` alphas ignored, as diffusers does) |
//! | `[diffusion_model.]double_blocks.N.processor.qkv_lora1.down.weight`, … | xlabs FLUX | denoiser | 1 |

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::bank::Target;

/// Where an adapter's file is and what to call it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterFile {
    /// `adapter_name`: what requests use.
    pub name: String,
    /// The config entry errors name, e.g. `pipeline.loras[1]`.
    pub key: String,
    pub path: PathBuf,
}

impl AdapterFile {
    /// An adapter outside a config (tests, tools).
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            key: "lora".into(),
            path: path.into(),
        }
    }

    /// `adapter 'style' (/path/style.safetensors)`.
    pub fn label(&self) -> String {
        format!("adapter '{}' ({})", self.name, self.path.display())
    }

    /// A reason this adapter cannot load: a config error naming its entry, name and file.
    pub fn error(&self, why: impl std::fmt::Display) -> String {
        format!("{}: {why}", self.label())
    }
}

/// One module's low-rank update: `scale · up · down`.
#[derive(Debug, Clone)]
pub struct Entry {
    /// (rank, in[, kh, kw]).
    pub down: Tensor,
    /// (out, rank[, 1, 1]); fused projections have the rows of every part.
    pub up: Tensor,
    /// `lora_B.bias` (PEFT `lora_bias`), scaled with the rest.
    pub up_bias: Option<Tensor>,
    /// alpha / rank (alpha / √rank with rsLoRA).
    pub scale: f64,
    /// The file's key for the down tensor, for errors.
    pub key: String,
    /// The adapter's config entry, name and file, for errors.
    pub(super) origin: String,
}

impl Entry {
    /// An error about this entry, naming the adapter and the key.
    pub fn error(&self, why: &str) -> candle_core::Error {
        candle_core::Error::Msg(format!("{}: key '{}' {why}", self.origin, self.key))
    }
}

/// Every entry of one file, by part and key (`peft:…`, `kohya:…`, `xlabs:…`).
pub type Entries = HashMap<Target, HashMap<String, Entry>>;

/// Reads and checks `file`; tensors stay on the CPU in their file dtype.
pub fn read(file: &AdapterFile) -> Result<Entries, String> {
    let bytes = std::fs::read(&file.path).map_err(|e| file.error(format!("cannot read: {e}")))?;
    let metadata = header_metadata(&bytes).map_err(|e| file.error(e))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| file.error(format!("not a readable safetensors file: {e}")))?;
    let origin = format!("{} {}", file.key, file.label());
    parse(tensors, metadata.as_deref(), &origin).map_err(|e| file.error(e))
}

/// The safetensors header's `__metadata__.lora_adapter_metadata` (diffusers ≥ 0.34 saves PEFT
/// configs there), after checking that the file is safetensors at all.
fn header_metadata(bytes: &[u8]) -> Result<Option<String>, String> {
    let not = "not a safetensors file";
    let len: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("{not}: {} bytes", bytes.len()))?;
    let len = usize::try_from(u64::from_le_bytes(len)).map_err(|_| not.to_string())?;
    let header = bytes
        .get(8..8usize.saturating_add(len))
        .ok_or_else(|| format!("{not} or truncated: its header claims {len} bytes"))?;
    if header.first() != Some(&b'{') {
        let start = String::from_utf8_lossy(&bytes[..bytes.len().min(16)]).into_owned();
        return Err(format!("{not} (it starts with {start:?})"));
    }
    #[derive(Deserialize)]
    struct Header {
        #[serde(rename = "__metadata__", default)]
        metadata: HashMap<String, String>,
    }
    let header: Header = serde_json::from_slice(header)
        .map_err(|e| format!("{not}: its header is not JSON ({e})"))?;
    Ok(header.metadata.get("lora_adapter_metadata").cloned())
}

/// What diffusers keeps of each part's PEFT `LoraConfig`.
#[derive(Debug, Default, Clone)]
struct PeftConfig {
    alpha: Option<f64>,
    alpha_pattern: BTreeMap<String, f64>,
    rslora: bool,
}

/// `{"unet.lora_alpha": 8, "unet.use_dora": false, …}` → per part.
fn peft_configs(metadata: Option<&str>) -> Result<HashMap<Target, PeftConfig>, String> {
    let Some(text) = metadata else {
        return Ok(HashMap::new());
    };
    let flat: HashMap<String, serde_json::Value> = serde_json::from_str(text)
        .map_err(|e| format!("metadata 'lora_adapter_metadata' is not JSON: {e}"))?;
    let mut configs: HashMap<Target, PeftConfig> = HashMap::new();
    for (key, value) in &flat {
        let Some((part, field)) = key.split_once('.') else {
            continue;
        };
        let Some(target) = Target::from_part(part) else {
            continue;
        };
        let config = configs.entry(target).or_default();
        match field {
            "lora_alpha" => config.alpha = value.as_f64(),
            "use_rslora" => config.rslora = value.as_bool().unwrap_or(false),
            "alpha_pattern" => {
                if let Some(map) = value.as_object() {
                    config.alpha_pattern = map
                        .iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                        .collect();
                }
            }
            "use_dora" if value.as_bool() == Some(true) => {
                return Err(format!(
                    "{part} is a DoRA adapter (use_dora): weight-decomposed LoRAs are not supported"
                ))
            }
            _ => {}
        }
    }
    Ok(configs)
}

/// What a key says about its tensor.
enum Role {
    Down,
    Up,
    UpBias,
    Alpha,
}

/// Key suffixes of each format, longest first so that `.lora.down.weight` wins over `.down.weight`.
const SUFFIXES: &[(&str, Role)] = &[
    (".lora_linear_layer.down.weight", Role::Down),
    (".lora_linear_layer.up.weight", Role::Up),
    ("_lora.down.weight", Role::Down),
    ("_lora.up.weight", Role::Up),
    (".lora.down.weight", Role::Down),
    (".lora.up.weight", Role::Up),
    (".lora_A.weight", Role::Down),
    (".lora_B.weight", Role::Up),
    (".lora_B.bias", Role::UpBias),
    (".lora_down.weight", Role::Down),
    (".lora_up.weight", Role::Up),
    (".down.weight", Role::Down),
    (".up.weight", Role::Up),
    (".alpha", Role::Alpha),
];

const XLABS_SUFFIXES: &[(&str, Role)] = &[(".down.weight", Role::Down), (".up.weight", Role::Up)];

/// `[diffusion_model.]double_blocks.N.processor.…` / `single_blocks.N.processor.…`.
fn is_xlabs(key: &str) -> bool {
    let key = key.strip_prefix("diffusion_model.").unwrap_or(key);
    (key.starts_with("double_blocks.") || key.starts_with("single_blocks."))
        && key.contains(".processor.")
}

/// Variants refused by name: (key fragment, what it is).
const UNSUPPORTED: &[(&str, &str)] = &[
    ("dora_scale", "DoRA (weight-decomposed LoRA)"),
    ("lora_magnitude_vector", "DoRA (weight-decomposed LoRA)"),
    ("hada_w", "LoHa (LyCORIS Hadamard product)"),
    ("lokr_w", "LoKr (LyCORIS Kronecker product)"),
    ("lora_mid", "LoCon with a Tucker (CP) mid tensor"),
    ("oft_", "OFT/BOFT"),
    ("ia3_", "IA3"),
];

#[derive(Default)]
struct Module {
    down: Option<(String, Tensor)>,
    up: Option<Tensor>,
    up_bias: Option<Tensor>,
    alpha: Option<f64>,
}

fn parse(
    tensors: HashMap<String, Tensor>,
    metadata: Option<&str>,
    origin: &str,
) -> Result<Entries, String> {
    if tensors.is_empty() {
        return Err("the file holds no tensors".into());
    }
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in &names {
        if let Some((_, what)) = UNSUPPORTED.iter().find(|(frag, _)| name.contains(frag)) {
            return Err(format!("key '{name}': {what} is not supported"));
        }
        if name.ends_with(".diff") || name.ends_with(".diff_b") {
            return Err(format!(
                "key '{name}': full weight differences (LyCORIS diff) are not supported"
            ));
        }
        if name.contains("query_norm.scale") || name.contains("key_norm.scale") {
            return Err(format!(
                "key '{name}': a FLUX control LoRA (FLUX.1-Canny/Depth-dev-lora style: norm \
                 scales and a widened img_in); it needs a control image, which this worker does \
                 not take"
            ));
        }
    }
    let configs = peft_configs(metadata)?;
    let mut modules: BTreeMap<(Target, String), Module> = BTreeMap::new();
    for name in names {
        let tensor = &tensors[name];
        // xlabs' `qkv_lora.down.weight` would otherwise read as older diffusers' `to_q_lora.down`.
        let suffixes = if is_xlabs(name) {
            XLABS_SUFFIXES
        } else {
            SUFFIXES
        };
        let Some((stem, role)) = suffixes
            .iter()
            .find_map(|(suffix, role)| name.strip_suffix(suffix).map(|stem| (stem, role)))
        else {
            return Err(format!(
                "key '{name}' is not a LoRA tensor of a known format"
            ));
        };
        let (target, key) = entry_key(stem)?;
        let module = modules.entry((target, key)).or_default();
        match role {
            Role::Down => module.down = Some((name.clone(), tensor.clone())),
            Role::Up => module.up = Some(tensor.clone()),
            Role::UpBias => module.up_bias = Some(tensor.clone()),
            Role::Alpha => {
                let value = tensor
                    .to_dtype(DType::F64)
                    .and_then(|t| t.flatten_all()?.to_vec1::<f64>())
                    .map_err(|e| format!("key '{name}': {e}"))?;
                match value.as_slice() {
                    [alpha] => module.alpha = Some(*alpha),
                    _ => return Err(format!("key '{name}': alpha must be one number")),
                }
            }
        }
    }
    let mut entries = Entries::new();
    for ((target, key), module) in modules {
        let (Some((down_key, down)), Some(up)) = (module.down, module.up) else {
            return Err(format!(
                "module '{key}' of the {} has no matching down/up (lora_A/lora_B) pair",
                target.name()
            ));
        };
        let rank = down.dims().first().copied().unwrap_or(0);
        if rank == 0 {
            return Err(format!("key '{down_key}': rank 0"));
        }
        let config = configs.get(&target).cloned().unwrap_or_default();
        let module_name = key.split_once(':').map_or(key.as_str(), |(_, m)| m);
        // diffusers consumes but never applies kohya FLUX final_layer alphas.
        let kohya_final = key.starts_with("kohya:lora_unet_final_layer");
        let alpha = if kohya_final {
            None
        } else {
            module
                .alpha
                .or_else(|| pattern_alpha(&config.alpha_pattern, module_name))
                .or(config.alpha)
        };
        let r = rank as f64;
        let scale = match alpha {
            Some(alpha) if config.rslora => alpha / r.sqrt(),
            Some(alpha) => alpha / r,
            None => 1.0,
        };
        entries.entry(target).or_default().insert(
            key,
            Entry {
                down,
                up,
                up_bias: module.up_bias,
                scale,
                key: down_key,
                origin: origin.to_string(),
            },
        );
    }
    Ok(entries)
}

/// peft's `alpha_pattern`: a key matches a module named exactly so or ending in `.{key}`.
fn pattern_alpha(patterns: &BTreeMap<String, f64>, module: &str) -> Option<f64> {
    patterns
        .iter()
        .find(|(key, _)| module == key.as_str() || module.ends_with(&format!(".{key}")))
        .map(|(_, alpha)| *alpha)
}

/// The part and entry key of a module stem (a key without its `.lora_A.weight`-like suffix).
fn entry_key(stem: &str) -> Result<(Target, String), String> {
    if let Some(rest) = stem.strip_prefix("lora_te2_") {
        return Ok((Target::TextEncoder2, format!("kohya:lora_te2_{rest}")));
    }
    if stem.starts_with("lora_te_") || stem.starts_with("lora_te1_") {
        return Ok((Target::TextEncoder, format!("kohya:{stem}")));
    }
    if stem.starts_with("lora_unet_") {
        return Ok((Target::Denoiser, format!("kohya:{stem}")));
    }
    if is_xlabs(stem) {
        let xlabs = stem.strip_prefix("diffusion_model.").unwrap_or(stem);
        return Ok((Target::Denoiser, format!("xlabs:{xlabs}")));
    }
    let stem = stem.strip_prefix("base_model.model.").unwrap_or(stem);
    let (target, module) = match stem.split_once('.') {
        Some((part, rest)) => match Target::from_part(part) {
            Some(target) => (target, rest),
            None => (Target::Denoiser, stem),
        },
        None => (Target::Denoiser, stem),
    };
    Ok((target, format!("peft:{}", diffusers_module(target, module))))
}

/// Older diffusers names → the module's: `attn1.processor.to_q(_lora)` → `attn1.to_q`,
/// `to_out(_lora)` → `to_out.0` (the `_lora` went with the key's suffix); text encoders without
/// `text_model.`.
fn diffusers_module(target: Target, module: &str) -> String {
    let mut m = module.replace(".processor.", ".");
    if let Some(head) = m.strip_suffix(".to_out") {
        m = format!("{head}.to_out.0");
    }
    if target != Target::Denoiser {
        if let Some(rest) = m.strip_prefix("text_model.") {
            m = rest.to_string();
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(dims: &[usize]) -> Tensor {
        Tensor::ones(dims, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn formats_land_under_their_part_and_key() {
        let cases = [
            (
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                Target::Denoiser,
                "peft:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            ),
            (
                "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
                Target::TextEncoder,
                "peft:encoder.layers.0.self_attn.q_proj",
            ),
            (
                "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out",
                Target::Denoiser,
                "peft:mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
            ),
            (
                "lora_te2_text_model_encoder_layers_1_mlp_fc1",
                Target::TextEncoder2,
                "kohya:lora_te2_text_model_encoder_layers_1_mlp_fc1",
            ),
            (
                "diffusion_model.double_blocks.0.processor.qkv_lora1",
                Target::Denoiser,
                "xlabs:double_blocks.0.processor.qkv_lora1",
            ),
            (
                "base_model.model.single_transformer_blocks.0.proj_out",
                Target::Denoiser,
                "peft:single_transformer_blocks.0.proj_out",
            ),
        ];
        for (stem, target, key) in cases {
            assert_eq!(
                entry_key(stem).unwrap(),
                (target, key.to_string()),
                "{stem}"
            );
        }
    }

    #[test]
    fn scale_comes_from_alpha_over_rank() {
        let mut tensors = HashMap::new();
        tensors.insert("lora_unet_conv_in.lora_down.weight".into(), t(&[4, 3]));
        tensors.insert("lora_unet_conv_in.lora_up.weight".into(), t(&[5, 4]));
        tensors.insert(
            "lora_unet_conv_in.alpha".into(),
            Tensor::new(2.0f32, &Device::Cpu).unwrap(),
        );
        tensors.insert("unet.conv_out.lora_A.weight".into(), t(&[2, 3]));
        tensors.insert("unet.conv_out.lora_B.weight".into(), t(&[3, 2]));
        let metadata = r#"{"unet.lora_alpha": 8, "unet.r": 2, "unet.alpha_pattern": {}}"#;
        let entries = parse(tensors, Some(metadata), "x").unwrap();
        let unet = &entries[&Target::Denoiser];
        assert_eq!(unet["kohya:lora_unet_conv_in"].scale, 0.5);
        assert_eq!(unet["peft:conv_out"].scale, 4.0);
    }

    #[test]
    fn unsupported_variants_are_refused_by_name() {
        for (key, what) in [
            ("lora_unet_x.dora_scale", "DoRA"),
            ("lora_unet_x.hada_w1_a", "LoHa"),
            (
                "double_blocks.0.img_attn.norm.query_norm.scale",
                "control LoRA",
            ),
            ("unet.x.weight", "not a LoRA tensor"),
        ] {
            let tensors = HashMap::from([(key.to_string(), t(&[2, 2]))]);
            let err = parse(tensors, None, "x").err().unwrap();
            assert!(err.contains(what), "{key}: {err}");
            assert!(err.contains(key), "{key}: {err}");
        }
        let err = peft_configs(Some(r#"{"transformer.use_dora": true}"#)).err();
        assert!(err.unwrap().contains("DoRA"));
    }

    #[test]
    fn non_safetensors_bytes_say_so() {
        assert!(header_metadata(b"<html>")
            .unwrap_err()
            .contains("not a safetensors"));
        let mut truncated = 1000u64.to_le_bytes().to_vec();
        truncated.extend_from_slice(b"{\"a\":");
        assert!(header_metadata(&truncated)
            .unwrap_err()
            .contains("truncated"));
        let mut html = 20u64.to_le_bytes().to_vec();
        html.extend_from_slice(b"<!doctype html><body>");
        assert!(header_metadata(&html).unwrap_err().contains("starts with"));
    }
}
