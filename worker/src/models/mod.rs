//! Model components built from a diffusers repo's files.
//!
//! ```text
//! config.rs     serde mirrors of unet/vae/text_encoder config.json → candle configs (or a
//!               ModelLoad error naming the unsupported key)
//! weights.rs    safetensors files → candle VarBuilder in the requested dtype
//! component.rs  a part built once (resident) or on each use (enable_cpu_offload)
//! clip.rs       the CLIP text transformer (quick_gelu or gelu), our own: candle's lacks gelu
//! tokenizer.rs  tokenizer.json, or CLIP BPE from vocab.json + merges.txt; bos/eos/pad, truncation
//! unet.rs       the SD 1.x/2.x and SDXL UNet; resnet.rs its resnet and time-embedding blocks
//! transformer.rs  the UNet's spatial transformer (exact-GELU GEGLU, as diffusers)
//! norm.rs       GroupNorm (+ SiLU) fused into one op on the CPU in float32
//! conv.rs       3×3 convolutions (im2col or Winograd, chosen per call) on the CPU in float32
//! attention.rs  scaled dot-product attention for every family: one fused op on the CPU in
//!               float32 (scores kept in cache), blocked over query rows elsewhere
//! vae.rs        the VAE (encoder with a seedable latent sample, decoder); vae_blocks.rs its
//!               blocks, on our resnet (fused GroupNorm + SiLU) and the shared attention
//! vae_tiling.rs tiled VAE encode/decode with overlap blending (diffusers' enable_tiling)
//! flux/         FLUX.1 transformer (dev, schnell, Fill), latent packing and position ids
//! t5.rs, t5_tokenizer.rs  FLUX's T5 v1.1 text encoder and its SentencePiece tokenizer
//! redux.rs      FLUX.1 Redux image prompts (SigLIP + Redux embedder); pil_resize.rs Pillow's resize
//! ```
//!
//! Pipelines put the pieces together.

pub mod attention;
pub mod clip;
pub mod component;
pub mod config;
pub mod conv;
pub mod flux;
pub mod geglu;
pub mod norm;
pub mod pil_resize;
pub mod redux;
pub mod resnet;
pub mod t5;
pub mod t5_tokenizer;
pub mod tokenizer;
pub mod transformer;
pub mod unet;
pub mod vae;
pub mod vae_blocks;
pub mod vae_tiling;
pub mod weights;
