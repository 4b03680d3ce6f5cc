//! FLUX.1's transformer (dev, schnell, Fill) and the latent packing around it.
//!
//! ```text
//! config.rs       transformer/config.json (FluxTransformerConfig) and the model kind its input width
//!                 means next to the VAE (FluxVariant: base, Fill, control)
//! packing.rs      2x2 latent packing / unpacking, Fill's mask channels, image and text position ids
//! transformer.rs  FluxTransformer2DModel: embeddings, double and single blocks, output norm
//! blocks.rs       the double-stream and single-stream blocks
//! attention.rs    RoPE and joint attention, blocked over query rows (bounded memory, exact)
//! embeddings.rs   timestep/guidance/pooled conditioning, RoPE tables (float64 angles)
//! layers.rs       linear (the one constructor LoRA will wrap), affine-free LayerNorm, RMSNorm
//! ```
//!
//! The pipeline packs the VAE latents, builds ids, calls [`FluxTransformer::forward`] once per step
//! with `timestep = t / 1000`, steps the flow-matching scheduler on the packed tokens and unpacks
//! before decoding.

mod attention;
mod blocks;
mod config;
mod embeddings;
mod layers;
mod packing;
mod transformer;

pub use attention::Rope;
pub use blocks::{DoubleBlock, SingleBlock};
pub use config::{FluxTransformerConfig, FluxVariant};
pub use embeddings::rope_tables;
pub use packing::{
    fill_mask_channels, image_ids, pack_fill_mask, pack_latents, text_ids, unpack_latents,
};
pub use transformer::FluxTransformer;
