//! Which adapter entries a layer answers to: from the layer's diffusers module name, the names
//! every supported format gives the same module.
//!
//! Mapping forwards (module → format names) rather than parsing each format back into module
//! names keeps kohya's `_`-joined names unambiguous: `lora_unet_down_blocks_0_attentions_0_proj_in`
//! is just `down_blocks.0.attentions.0.proj_in` with dots replaced, and SDXL's SGM names follow
//! from the block layout.
//!
//! | part | diffusers / PEFT | kohya (sd-scripts) | xlabs |
//! |---|---|---|---|
//! | UNet | `unet.{module}` | `lora_unet_{module with _}`; SDXL also SGM: `input_blocks_4_1_…`, `middle_block_1_…`, `output_blocks_0_1_…`, resnets `in_layers_2`/`emb_layers_1`/`out_layers_3`/`skip_connection`, `time_embed_0`, `label_emb_0_0`, `input_blocks_0_0` (conv_in), `out_2` (conv_out), `…_op` (downsamplers) | |
//! | FLUX transformer | `transformer.{module}` | BFL names: `double_blocks_i_img_attn_qkv` (q, k, v rows), `single_blocks_j_linear1` (q, k, v, proj_mlp rows), `final_layer_adaLN_modulation_1` (halves swapped), … | `double_blocks.i.processor.qkv_lora1/2`, `proj_lora1/2`, `single_blocks.j.processor.qkv_lora`, `proj_lora` |
//! | CLIP | `text_encoder[_2].{module}` (`text_model.` optional) | `lora_te_` / `lora_te1_` (first), `lora_te2_` (second) + `text_model_{module with _}` | |

use super::bank::Target;

/// How the denoiser's modules are named in non-diffusers formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// SD 1.x/2.x and SDXL UNets; `layers_per_block` places SGM block numbers.
    Unet { layers_per_block: usize },
    /// FLUX.1 transformers (BFL and xlabs names).
    Flux,
    /// Text encoders (the target says which).
    Clip,
}

/// Which rows of an entry's `up` matrix belong to the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slice {
    Full,
    /// Part of a fused projection (BFL's qkv, linear1).
    Rows {
        start: usize,
        len: usize,
    },
    /// BFL's final modulation is [shift, scale] where diffusers has [scale, shift].
    SwapHalves,
}

/// Entry keys: `peft:{module}`, `kohya:{lora name}`, `xlabs:{name}` (see file.rs).
impl Naming {
    /// Every (entry key, slice) the layer at `path` (in → out features) answers to.
    pub fn candidates(
        &self,
        target: Target,
        path: &str,
        in_dim: usize,
        out_dim: usize,
    ) -> Vec<(String, Slice)> {
        let full = |key: String| (key, Slice::Full);
        match (self, target) {
            (Naming::Clip, _) | (_, Target::TextEncoder | Target::TextEncoder2) => {
                let module = path.strip_prefix("text_model.").unwrap_or(path);
                let kohya = format!("text_model_{}", module.replace('.', "_"));
                let mut keys = vec![full(format!("peft:{module}"))];
                if target == Target::TextEncoder2 {
                    keys.push(full(format!("kohya:lora_te2_{kohya}")));
                } else {
                    keys.push(full(format!("kohya:lora_te_{kohya}")));
                    keys.push(full(format!("kohya:lora_te1_{kohya}")));
                }
                keys
            }
            (Naming::Unet { layers_per_block }, Target::Denoiser) => {
                let mut keys = vec![
                    full(format!("peft:{path}")),
                    full(format!("kohya:lora_unet_{}", path.replace('.', "_"))),
                ];
                if let Some(sgm) = sgm_name(path, *layers_per_block) {
                    keys.push(full(format!("kohya:lora_unet_{sgm}")));
                }
                keys
            }
            (Naming::Flux, Target::Denoiser) => {
                let mut keys = vec![full(format!("peft:{path}"))];
                if let Some((name, slice)) = bfl_name(path, in_dim, out_dim) {
                    keys.push((format!("kohya:lora_unet_{}", name.replace('.', "_")), slice));
                }
                if let Some((name, slice)) = xlabs_name(path, out_dim) {
                    keys.push((format!("xlabs:{name}"), slice));
                }
                keys
            }
        }
    }
}

/// sd-scripts' SGM name of a diffusers UNet module (as diffusers'
/// `_maybe_map_sgm_blocks_to_diffusers` + `_convert_unet_lora_key` read it back), `_`-joined.
fn sgm_name(path: &str, layers: usize) -> Option<String> {
    let fixed = match path {
        "conv_in" => Some("input_blocks_0_0"),
        "conv_out" => Some("out_2"),
        "time_embedding.linear_1" => Some("time_embed_0"),
        "time_embedding.linear_2" => Some("time_embed_2"),
        "add_embedding.linear_1" => Some("label_emb_0_0"),
        "add_embedding.linear_2" => Some("label_emb_0_2"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let resnet = |inner: &str| -> Option<&'static str> {
        match inner {
            "conv1" => Some("in_layers_2"),
            "time_emb_proj" => Some("emb_layers_1"),
            "conv2" => Some("out_layers_3"),
            "conv_shortcut" => Some("skip_connection"),
            _ => None,
        }
    };
    let parts: Vec<&str> = path.split('.').collect();
    let rest = |from: usize| parts.get(from..).map(|p| p.join("_"));
    match parts.as_slice() {
        ["mid_block", kind, j, tail @ ..] => {
            let block = match (*kind, *j) {
                ("resnets", "0") => 0,
                ("attentions", "0") => 1,
                ("resnets", "1") => 2,
                _ => return None,
            };
            let tail = if *kind == "resnets" {
                resnet(tail.first()?)?.to_string()
            } else {
                rest(3)?
            };
            Some(format!("middle_block_{block}_{tail}"))
        }
        [side @ ("down_blocks" | "up_blocks"), b, kind, j, tail @ ..] => {
            let b: usize = b.parse().ok()?;
            let j: usize = j.parse().ok()?;
            let down = *side == "down_blocks";
            let (prefix, block) = if down {
                ("input_blocks", 1 + b * (layers + 1) + j)
            } else {
                ("output_blocks", b * (layers + 1) + j)
            };
            match *kind {
                "downsamplers" => Some(format!("input_blocks_{}_0_op", (b + 1) * (layers + 1))),
                "upsamplers" => Some(format!(
                    "output_blocks_{}_2_conv",
                    b * (layers + 1) + layers
                )),
                "resnets" => Some(format!("{prefix}_{block}_0_{}", resnet(tail.first()?)?)),
                "attentions" => Some(format!("{prefix}_{block}_1_{}", rest(4)?)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The BFL (kohya FLUX) name of a diffusers FLUX transformer module, with the rows of the fused
/// projection it is (q, k, v of `qkv`; q, k, v, mlp of a single block's `linear1`).
fn bfl_name(path: &str, in_dim: usize, out_dim: usize) -> Option<(String, Slice)> {
    let full = |name: String| Some((name, Slice::Full));
    let rows = |name: String, index: usize| {
        Some((
            name,
            Slice::Rows {
                start: index * in_dim,
                len: out_dim,
            },
        ))
    };
    let fixed = match path {
        "x_embedder" => Some("img_in"),
        "context_embedder" => Some("txt_in"),
        "time_text_embed.timestep_embedder.linear_1" => Some("time_in.in_layer"),
        "time_text_embed.timestep_embedder.linear_2" => Some("time_in.out_layer"),
        "time_text_embed.guidance_embedder.linear_1" => Some("guidance_in.in_layer"),
        "time_text_embed.guidance_embedder.linear_2" => Some("guidance_in.out_layer"),
        "time_text_embed.text_embedder.linear_1" => Some("vector_in.in_layer"),
        "time_text_embed.text_embedder.linear_2" => Some("vector_in.out_layer"),
        "proj_out" => Some("final_layer.linear"),
        _ => None,
    };
    if let Some(name) = fixed {
        return full(name.to_string());
    }
    if path == "norm_out.linear" {
        return Some(("final_layer.adaLN_modulation.1".into(), Slice::SwapHalves));
    }
    if let Some(rest) = path.strip_prefix("transformer_blocks.") {
        let (i, module) = rest.split_once('.')?;
        let block = format!("double_blocks.{i}");
        return match module {
            "attn.to_q" => rows(format!("{block}.img_attn.qkv"), 0),
            "attn.to_k" => rows(format!("{block}.img_attn.qkv"), 1),
            "attn.to_v" => rows(format!("{block}.img_attn.qkv"), 2),
            "attn.add_q_proj" => rows(format!("{block}.txt_attn.qkv"), 0),
            "attn.add_k_proj" => rows(format!("{block}.txt_attn.qkv"), 1),
            "attn.add_v_proj" => rows(format!("{block}.txt_attn.qkv"), 2),
            "attn.to_out.0" => full(format!("{block}.img_attn.proj")),
            "attn.to_add_out" => full(format!("{block}.txt_attn.proj")),
            "ff.net.0.proj" => full(format!("{block}.img_mlp.0")),
            "ff.net.2" => full(format!("{block}.img_mlp.2")),
            "ff_context.net.0.proj" => full(format!("{block}.txt_mlp.0")),
            "ff_context.net.2" => full(format!("{block}.txt_mlp.2")),
            "norm1.linear" => full(format!("{block}.img_mod.lin")),
            "norm1_context.linear" => full(format!("{block}.txt_mod.lin")),
            _ => None,
        };
    }
    if let Some(rest) = path.strip_prefix("single_transformer_blocks.") {
        let (j, module) = rest.split_once('.')?;
        let block = format!("single_blocks.{j}");
        return match module {
            "attn.to_q" => rows(format!("{block}.linear1"), 0),
            "attn.to_k" => rows(format!("{block}.linear1"), 1),
            "attn.to_v" => rows(format!("{block}.linear1"), 2),
            "proj_mlp" => rows(format!("{block}.linear1"), 3),
            "proj_out" => full(format!("{block}.linear2")),
            "norm.linear" => full(format!("{block}.modulation.lin")),
            _ => None,
        };
    }
    None
}

/// The xlabs name of a diffusers FLUX module, as diffusers' `_convert_xlabs_flux_lora_to_diffusers`
/// maps them (q, k, v split equally by rows).
fn xlabs_name(path: &str, out_dim: usize) -> Option<(String, Slice)> {
    let rows = |name: String, index: usize| {
        Some((
            name,
            Slice::Rows {
                start: index * out_dim,
                len: out_dim,
            },
        ))
    };
    if let Some(rest) = path.strip_prefix("transformer_blocks.") {
        let (i, module) = rest.split_once('.')?;
        let p = format!("double_blocks.{i}.processor");
        return match module {
            "attn.to_q" => rows(format!("{p}.qkv_lora1"), 0),
            "attn.to_k" => rows(format!("{p}.qkv_lora1"), 1),
            "attn.to_v" => rows(format!("{p}.qkv_lora1"), 2),
            "attn.add_q_proj" => rows(format!("{p}.qkv_lora2"), 0),
            "attn.add_k_proj" => rows(format!("{p}.qkv_lora2"), 1),
            "attn.add_v_proj" => rows(format!("{p}.qkv_lora2"), 2),
            "attn.to_out.0" => Some((format!("{p}.proj_lora1"), Slice::Full)),
            "attn.to_add_out" => Some((format!("{p}.proj_lora2"), Slice::Full)),
            _ => None,
        };
    }
    if let Some(rest) = path.strip_prefix("single_transformer_blocks.") {
        let (j, module) = rest.split_once('.')?;
        let p = format!("single_blocks.{j}.processor");
        return match module {
            "attn.to_q" => rows(format!("{p}.qkv_lora"), 0),
            "attn.to_k" => rows(format!("{p}.qkv_lora"), 1),
            "attn.to_v" => rows(format!("{p}.qkv_lora"), 2),
            "proj_out" => Some((format!("{p}.proj_lora"), Slice::Full)),
            _ => None,
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgm_names_follow_sdxl_block_layout() {
        let name = |p| sgm_name(p, 2);
        assert_eq!(
            name("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q").as_deref(),
            Some("input_blocks_4_1_transformer_blocks_0_attn1_to_q")
        );
        assert_eq!(
            name("down_blocks.0.resnets.1.conv1").as_deref(),
            Some("input_blocks_2_0_in_layers_2")
        );
        assert_eq!(
            name("down_blocks.0.downsamplers.0.conv").as_deref(),
            Some("input_blocks_3_0_op")
        );
        assert_eq!(
            name("mid_block.attentions.0.proj_in").as_deref(),
            Some("middle_block_1_proj_in")
        );
        assert_eq!(
            name("mid_block.resnets.1.time_emb_proj").as_deref(),
            Some("middle_block_2_emb_layers_1")
        );
        assert_eq!(
            name("up_blocks.0.resnets.2.conv_shortcut").as_deref(),
            Some("output_blocks_2_0_skip_connection")
        );
        assert_eq!(
            name("up_blocks.1.upsamplers.0.conv").as_deref(),
            Some("output_blocks_5_2_conv")
        );
        assert_eq!(
            name("add_embedding.linear_2").as_deref(),
            Some("label_emb_0_2")
        );
        assert_eq!(name("conv_norm_out"), None);
    }

    #[test]
    fn fused_flux_projections_take_their_rows() {
        let (name, slice) = bfl_name("single_transformer_blocks.3.proj_mlp", 8, 32).unwrap();
        assert_eq!(name, "single_blocks.3.linear1");
        assert_eq!(slice, Slice::Rows { start: 24, len: 32 });
        let (name, slice) = bfl_name("transformer_blocks.0.attn.add_v_proj", 8, 8).unwrap();
        assert_eq!(name, "double_blocks.0.txt_attn.qkv");
        assert_eq!(slice, Slice::Rows { start: 16, len: 8 });
        assert_eq!(
            bfl_name("norm_out.linear", 8, 16),
            Some(("final_layer.adaLN_modulation.1".into(), Slice::SwapHalves))
        );
    }
}
