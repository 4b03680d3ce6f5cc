//! 3×3 convolutions (stride 1, padding 1: nearly every convolution of a UNet and a VAE) on the
//! CPU in float32, without candle's per-call costs, by one of two methods chosen per call
//! ([`Method::choose`]): Winograd (`fastfusion_kernels::winograd`: 4× or 2.25× fewer
//! multiply-adds, for large maps) or tiles of im2col × one matrix product (small maps with many
//! channels, where Winograd's weight transform costs more than it saves). A model's layers
//! ([`Conv`]) keep the transformed weights they make, within a process-wide budget
//! ([`WeightCache`]), so that a denoising loop transforms each layer's weights once, not once
//! per step.
//!
//! candle's CPU conv2d copies the whole input to NHWC serially, re-flattens the weights on every
//! call and builds 512-pixel column blocks with strided writes (../shared/PERF-NOTES.md §1-2: 2-2.5×
//! torch at the VAE's and UNet's large levels). Here the weight tensor is used as it is laid out
//! (c_out × c_in·9), each tile of output pixels gets its column block from
//! `fastfusion_kernels::im2col_3x3` (parallel, contiguous runs) and one gemm (candle's CPU
//! matmul) gives that tile of the output, which is written into its place in the NCHW output
//! with the bias added. Other shapes, devices and dtypes take candle's conv2d.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::Conv2d;
use fastfusion_kernels::winograd::{self, Geometry, Tile};

/// Most floats of one column tile (16 MiB): big enough for an efficient gemm, small enough to
/// stay out of the page-faulting sizes of fresh allocations.
const TILE_FLOATS: usize = 4 << 20;

/// A convolution layer: candle's `Conv2d`, run through [`conv3x3`] when the layer and input
/// allow it, keeping the Winograd-transformed weights it makes (within the process's budget,
/// [`WeightCache`]) so that later calls skip the transform. Clones share the cache.
#[derive(Debug, Clone)]
pub struct Conv {
    base: Conv2d,
    cache: Arc<WeightCache>,
}

impl Conv {
    pub fn new(base: Conv2d) -> Self {
        Self {
            base,
            cache: Arc::default(),
        }
    }

    /// The method a (b, c_in, h, w) input would take through [`conv3x3`]'s path now (for
    /// benchmark tables).
    pub fn method(&self, (b, c_in, h, w): (usize, usize, usize, usize)) -> Method {
        let c_out = self.base.weight().dims().first().copied().unwrap_or(0);
        pick((b, c_in, c_out, h, w), Some(&self.cache)).0
    }
}

impl Module for Conv {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let cfg = self.base.config();
        let weight = self.base.weight();
        let fast = cfg.stride == 1
            && cfg.padding == 1
            && cfg.dilation == 1
            && cfg.groups == 1
            && xs.device().is_cpu()
            && xs.dtype() == DType::F32
            && weight.dtype() == DType::F32
            && xs.rank() == 4
            && matches!(weight.dims(), [_, _, 3, 3]);
        if fast {
            run(xs, weight, self.base.bias(), None, Some(&self.cache))
        } else {
            self.base.forward(xs)
        }
    }
}

/// One layer's transformed weights, by tile (F2, F4), made on the first call that wants them.
///
/// Every value transformed costs the same time (1.5-2.3 ns, [`Rates`]) and the same 4 bytes
/// whichever layer it belongs to, so among the layers worth it ([`KEEP_SHARE`]: those where the
/// transform is a large part of the call, which are a denoiser's, run every step) the time a
/// cached byte saves per call is the same: the budget is simply taken first come, first served
/// (`FASTFUSION_WINOGRAD_CACHE_MIB`, default [`DEFAULT_CACHE_MIB`]; 0 turns caching off). A layer
/// dropped (a model unloaded) gives its bytes back.
#[derive(Debug, Default)]
pub struct WeightCache {
    tiles: Mutex<[Option<Arc<CpuStorage>>; 2]>,
}

/// The least share of a Winograd call that its weight transform must take for the layer to keep
/// the transformed weights. A layer run once per denoising step (a UNet's) on small maps, where
/// the transform is a third to two thirds of the call, keeps them; a VAE's large maps, where it is
/// under a fifth and the decoder runs once per picture, do not (keeping them held 0.7 GB more
/// for a 512² decode no faster within the measurements' noise).
pub const KEEP_SHARE: f64 = 0.25;

/// The default budget for cached transformed weights (MiB). SD 1.5's UNet keeps 1.2 GiB at 256²
/// and fills the 2 GiB at 512² (AVX2 rates: its 16² levels are Winograd too), for a 512² step
/// 0.8× as long; set lower to trade that back for memory.
pub const DEFAULT_CACHE_MIB: usize = 2048;

/// Where a layer's transformed weights for a tile would come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// The layer keeps them already.
    Held,
    /// Not kept, and the budget has room for them.
    Fits,
    /// Not kept, and no room.
    Full,
}

/// Bytes of transformed weights cached by all layers of the process.
static CACHED_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Bytes of transformed weights cached now (all layers, all models).
pub fn cached_bytes() -> usize {
    CACHED_BYTES.load(Ordering::Relaxed)
}

fn cache_budget() -> usize {
    static BUDGET: OnceLock<usize> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        let mib = match std::env::var("FASTFUSION_WINOGRAD_CACHE_MIB").ok().as_deref() {
            None | Some("") => DEFAULT_CACHE_MIB,
            Some(text) => text.trim().parse().unwrap_or_else(|_| {
                tracing::warn!(
                    value = text,
                    default = DEFAULT_CACHE_MIB,
                    "FASTFUSION_WINOGRAD_CACHE_MIB is not a whole number of MiB: the default is used"
                );
                DEFAULT_CACHE_MIB
            }),
        };
        mib.saturating_mul(1 << 20)
    })
}

/// Takes `bytes` of the process's budget, if that much is left.
fn reserve(bytes: usize) -> bool {
    reserve_in(&CACHED_BYTES, bytes, cache_budget())
}

/// Adds `bytes` to `used` if the sum stays within `budget`.
fn reserve_in(used: &AtomicUsize, bytes: usize, budget: usize) -> bool {
    used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
        now.checked_add(bytes).filter(|total| *total <= budget)
    })
    .is_ok()
}

fn slot(tile: Tile) -> usize {
    match tile {
        Tile::F2 => 0,
        Tile::F4 => 1,
    }
}

impl WeightCache {
    /// Whether this layer holds `tile`'s weights of `values` floats, or the budget has room.
    fn room(&self, tile: Tile, values: usize) -> Room {
        if self.has(tile) {
            Room::Held
        } else if cached_bytes().saturating_add(4 * values) <= cache_budget() {
            Room::Fits
        } else {
            Room::Full
        }
    }

    fn has(&self, tile: Tile) -> bool {
        self.tiles
            .lock()
            .is_ok_and(|tiles| tiles[slot(tile)].is_some())
    }

    /// `tile`'s transformed weights, made now if not yet cached; `None` (transform per call) when
    /// the budget has no room for them.
    fn get(
        &self,
        tile: Tile,
        weight: &[f32],
        c_out: usize,
        c_in: usize,
    ) -> Option<Arc<CpuStorage>> {
        // A poisoned lock (a panic while another call held it) only means this layer's cache is
        // unusable: fall back to the per-call transform.
        if let Some(cached) = &self.tiles.lock().ok()?[slot(tile)] {
            return Some(cached.clone());
        }
        let bytes = 4 * tile.points() * c_out * c_in;
        if !reserve(bytes) {
            return None;
        }
        // Made without the lock held: the transform runs on rayon, whose threads may take up
        // other work while they wait, and no such work may find this lock taken.
        let made = Arc::new(CpuStorage::F32(winograd::weights(
            tile, weight, c_out, c_in,
        )));
        let Ok(mut tiles) = self.tiles.lock() else {
            CACHED_BYTES.fetch_sub(bytes, Ordering::Relaxed);
            return Some(made);
        };
        match &tiles[slot(tile)] {
            // Another call made them meanwhile: keep one copy.
            Some(first) => {
                CACHED_BYTES.fetch_sub(bytes, Ordering::Relaxed);
                Some(first.clone())
            }
            None => {
                tiles[slot(tile)] = Some(made.clone());
                Some(made)
            }
        }
    }
}

impl Drop for WeightCache {
    fn drop(&mut self) {
        let tiles = match self.tiles.get_mut() {
            Ok(tiles) => tiles,
            Err(poisoned) => poisoned.into_inner(),
        };
        for cached in tiles.iter_mut().filter_map(Option::take) {
            let floats = match cached.as_ref() {
                CpuStorage::F32(values) => values.len(),
                _ => 0,
            };
            CACHED_BYTES.fetch_sub(4 * floats, Ordering::Relaxed);
        }
    }
}

/// A 3×3, stride-1, padding-1 convolution of (b, c_in, h, w) float32 `xs` on the CPU.
pub fn conv3x3(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    conv3x3_with(xs, weight, bias, None)
}

/// [`conv3x3`] by a given method, or the one chosen from the shapes (`None`); the weights are
/// transformed on every call (no cache).
pub fn conv3x3_with(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    method: Option<Method>,
) -> Result<Tensor> {
    run(xs, weight, bias, method, None)
}

fn run(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    method: Option<Method>,
    cache: Option<&WeightCache>,
) -> Result<Tensor> {
    let (b, c_in, h, w) = xs.dims4()?;
    let (c_out, w_in, _, _) = weight.dims4()?;
    if w_in != c_in {
        candle_core::bail!("conv3x3: input has {c_in} channels, the weight expects {w_in}");
    }
    if xs.elem_count() == 0 || weight.elem_count() == 0 {
        // The op below divides by c_in·9 and chunks by image size.
        candle_core::bail!(
            "conv3x3: empty input {:?} or weight {:?}",
            xs.dims(),
            weight.dims()
        );
    }
    let bias = match bias {
        Some(bias) => Some(bias.to_dtype(DType::F32)?.to_vec1::<f32>()?),
        None => None,
    };
    if bias.as_ref().is_some_and(|b| b.len() != c_out) {
        candle_core::bail!("conv3x3: the bias does not have {c_out} values");
    }
    // A given method (tests, benchmarks) uses the cache as given.
    let (method, cache) = match method {
        Some(method) => (method, cache),
        None => pick((b, c_in, c_out, h, w), cache),
    };
    xs.contiguous()?.apply_op2_no_bwd(
        &weight.contiguous()?,
        &Conv3x3 {
            bias,
            method,
            cache,
        },
    )
}

/// The method for a call of (b, c_in, h, w) through a layer of c_out outputs with `cache`, and
/// the cache if the call should use it.
fn pick(
    (b, c_in, c_out, h, w): (usize, usize, usize, usize, usize),
    cache: Option<&WeightCache>,
) -> (Method, Option<&WeightCache>) {
    match cache {
        Some(cache) => {
            let (method, keep) = Method::choose_cached(b, c_in, c_out, h, w, |tile| {
                cache.room(tile, tile.points() * c_in * c_out)
            });
            (method, keep.then_some(cache))
        }
        None => (Method::choose(b, c_in, c_out, h, w), None),
    }
}

/// The whole convolution in one op: the output is allocated once and each tile's product is
/// written into its place with the bias added, so no tile concatenation, image stacking or
/// separate bias pass makes further output-sized copies (at the VAE's 512² level one output is
/// 128 MiB, and every fresh allocation of that size page-faults).
struct Conv3x3<'a> {
    bias: Option<Vec<f32>>,
    method: Method,
    /// The layer's cache of Winograd weights; without one (or without room in the budget) they
    /// are transformed in the call.
    cache: Option<&'a WeightCache>,
}

impl CustomOp2 for Conv3x3<'_> {
    fn name(&self) -> &'static str {
        "conv3x3"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = xs else {
            candle_core::bail!("conv3x3 takes float32");
        };
        let (Some((start, end)), Some((w_start, _))) = (
            xs_layout.contiguous_offsets(),
            weight_layout.contiguous_offsets(),
        ) else {
            candle_core::bail!("conv3x3 takes contiguous tensors");
        };
        let [b, c_in, h, w] = *xs_layout.dims() else {
            candle_core::bail!("conv3x3 takes (b, c, h, w)");
        };
        let c_out = weight_layout.dims()[0];
        let input = &data[start..end];
        let weight_data = match weight {
            CpuStorage::F32(w) => w.get(w_start..w_start + c_out * c_in * 9),
            _ => None,
        };
        let Some(weight_data) = weight_data else {
            candle_core::bail!("conv3x3 takes a float32 (c_out, c_in, 3, 3) weight");
        };
        let out = match self.method {
            Method::Im2col => self.im2col(input, weight, w_start, (b, c_in, h, w), c_out)?,
            Method::Winograd(tile) => {
                let geometry = Geometry {
                    tile,
                    batch: b,
                    height: h,
                    width: w,
                };
                self.winograd(&geometry, input, weight_data, c_in, c_out)?
            }
        };
        Ok((CpuStorage::F32(out), Shape::from((b, c_out, h, w))))
    }
}

/// How one call is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Im2col,
    Winograd(Tile),
}

impl Method {
    pub const ALL: [Method; 3] = [
        Method::Im2col,
        Method::Winograd(Tile::F2),
        Method::Winograd(Tile::F4),
    ];

    /// The op's name in benchmark tables.
    pub fn name(self) -> &'static str {
        match self {
            Method::Im2col => "conv3x3/im2col",
            Method::Winograd(Tile::F2) => "conv3x3/wino-f2",
            Method::Winograd(Tile::F4) => "conv3x3/wino-f4",
        }
    }

    /// The method for a call's shapes: the cheapest by a cost model ([`Rates`]) fitted to `bench
    /// --mode ops` on the two kinds of CPU it has been measured on: im2col is one large product;
    /// Winograd has α² thinner ones, transforms its input and output blocks, and transforms its
    /// weights (once per layer when they are cached, [`WeightCache`], else on every call: which
    /// is what rules it out for 1280 channels on small maps). `FASTFUSION_CONV3X3=im2col|f2|f4`
    /// forces one (for benchmarks).
    pub fn choose(batch: usize, c_in: usize, c_out: usize, h: usize, w: usize) -> Method {
        forced_method().unwrap_or_else(|| Method::cheapest(Rates::here(), batch, c_in, c_out, h, w))
    }

    /// [`Method::choose`] for a layer that can keep its transformed weights, and whether it
    /// should keep them for this call's method. Where Winograd is the choice, a tile's weights
    /// are used when the layer holds them already, and kept when their transform is at least
    /// [`KEEP_SHARE`] of the call and the budget has room (`room`); the tile is then chosen
    /// without the transform's cost, paid once. Caching never turns an im2col call into a
    /// Winograd one: there the cached values would save less time per byte than anywhere
    /// Winograd wins outright (see [`WeightCache`]).
    pub fn choose_cached(
        batch: usize,
        c_in: usize,
        c_out: usize,
        h: usize,
        w: usize,
        room: impl Fn(Tile) -> Room,
    ) -> (Method, bool) {
        let chosen = Method::cheapest_cached(Rates::here(), batch, c_in, c_out, h, w, room);
        match forced_method() {
            // A forced tile still uses what is kept (or keeps it, where the rule says so).
            Some(forced) => (forced, forced == chosen.0 && chosen.1),
            None => chosen,
        }
    }

    /// [`Method::choose_cached`] by given rates.
    fn cheapest_cached(
        rates: &Rates,
        batch: usize,
        c_in: usize,
        c_out: usize,
        h: usize,
        w: usize,
        room: impl Fn(Tile) -> Room,
    ) -> (Method, bool) {
        if Method::cheapest(rates, batch, c_in, c_out, h, w) == Method::Im2col {
            return (Method::Im2col, false);
        }
        [Tile::F4, Tile::F2]
            .into_iter()
            .map(|tile| {
                let cost = Cost::of(rates, tile, batch, c_in, c_out, h, w);
                let keep = match room(tile) {
                    Room::Held => true,
                    Room::Fits => cost.weights >= KEEP_SHARE * (cost.per_call + cost.weights),
                    Room::Full => false,
                };
                let transform = if keep { 0.0 } else { cost.weights };
                (Method::Winograd(tile), keep, cost.per_call + transform)
            })
            .min_by(|a, b| a.2.total_cmp(&b.2))
            .map_or((Method::Im2col, false), |(method, keep, _)| (method, keep))
    }

    /// The cost model's choice (see [`Method::choose`]).
    fn cheapest(
        rates: &Rates,
        batch: usize,
        c_in: usize,
        c_out: usize,
        height: usize,
        width: usize,
    ) -> Method {
        let pairs = (c_in * c_out) as f64;
        let im2col_ns = 2.0 * 9.0 * (batch * height * width) as f64 * pairs / rates.im2col_gflops;
        [Tile::F4, Tile::F2]
            .into_iter()
            .map(|tile| {
                let cost = Cost::of(rates, tile, batch, c_in, c_out, height, width);
                (Method::Winograd(tile), cost.per_call + cost.weights)
            })
            .chain([(Method::Im2col, im2col_ns)])
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map_or(Method::Im2col, |(method, _)| method)
    }
}

/// The cost model's rates for one kind of CPU (2 threads, `bench --mode ops`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    /// im2col's products (GFLOP/s, i.e. FLOP per ns).
    pub im2col_gflops: f64,
    /// Winograd's α² thinner products.
    pub winograd_gflops: f64,
    /// Input and output block transforms, ns per transformed value.
    pub block_ns: f64,
    /// Weight transform (with its fresh buffer), ns per transformed value.
    pub weight_ns: f64,
}

impl Rates {
    /// A 2-core Intel Xeon with AVX-512 (gemm's AVX-512 kernels), 2026-12-01.
    pub const AVX512: Rates = Rates {
        im2col_gflops: 230.0,
        winograd_gflops: 170.0,
        block_ns: 0.5,
        weight_ns: 1.5,
    };

    /// A 2-core AMD EPYC (Zen 1: AVX2 + FMA, 256-bit operations split in two), 2026-12-02: gemm
    /// at a quarter of the speed above while the transforms, bound by memory, slow less, so
    /// Winograd wins on smaller maps (F(2×2) at 640 channels on 16² maps: 53 against im2col's 69
    /// ms).
    pub const AVX2: Rates = Rates {
        im2col_gflops: 55.0,
        winograd_gflops: 52.0,
        block_ns: 1.6,
        weight_ns: 2.3,
    };

    /// The rates for this CPU: AVX-512's where gemm can use it, else AVX2's (also for other
    /// architectures, unmeasured).
    pub fn here() -> &'static Rates {
        static HERE: OnceLock<Rates> = OnceLock::new();
        HERE.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Rates::AVX512;
            }
            Rates::AVX2
        })
    }
}

/// A Winograd call's estimated nanoseconds (see [`Method::choose`]).
struct Cost {
    /// The products and the input and output transforms.
    per_call: f64,
    /// The weight transform (once per layer when cached).
    weights: f64,
}

impl Cost {
    fn of(
        rates: &Rates,
        tile: Tile,
        batch: usize,
        c_in: usize,
        c_out: usize,
        height: usize,
        width: usize,
    ) -> Cost {
        let geometry = Geometry {
            tile,
            batch,
            height,
            width,
        };
        let pairs = (c_in * c_out) as f64;
        let tiles = (geometry.rows() * geometry.tiles_x()) as f64;
        let points = tile.points() as f64;
        Cost {
            per_call: 2.0 * points * tiles * pairs / rates.winograd_gflops
                + rates.block_ns * points * tiles * (c_in + c_out) as f64,
            weights: rates.weight_ns * points * pairs,
        }
    }
}

fn forced_method() -> Option<Method> {
    static FORCED: OnceLock<Option<Method>> = OnceLock::new();
    *FORCED.get_or_init(
        || match std::env::var("FASTFUSION_CONV3X3").ok().as_deref() {
            Some("im2col") => Some(Method::Im2col),
            Some("f2") => Some(Method::Winograd(Tile::F2)),
            Some("f4") => Some(Method::Winograd(Tile::F4)),
            None | Some("") => None,
            Some(other) => {
                tracing::warn!(
                    value = other,
                    "FASTFUSION_CONV3X3 is not one of im2col, f2, f4: ignored, the method is chosen per call"
                );
                None
            }
        },
    )
}

impl Conv3x3<'_> {
    /// Tiles of output pixels, each one product of the weight (c_out × c_in·9, as laid out)
    /// with its im2col columns.
    fn im2col(
        &self,
        input: &[f32],
        weight: &CpuStorage,
        w_start: usize,
        (b, c_in, h, w): (usize, usize, usize, usize),
        c_out: usize,
    ) -> Result<Vec<f32>> {
        let (k, pixels) = (c_in * 9, h * w);
        let tile = (TILE_FLOATS / k).max(256).min(pixels.max(1));
        let matrix = Layout::contiguous_with_offset((c_out, k), w_start);
        let mut out = vec![0f32; b * c_out * pixels];
        let images = input.chunks_exact(c_in * pixels);
        for (one, out) in images.zip(out.chunks_exact_mut(c_out * pixels)) {
            let mut first = 0;
            while first < pixels {
                let len = tile.min(pixels - first);
                let mut columns = vec![0f32; k * len];
                fastfusion_kernels::im2col_3x3(one, (c_in, h, w), first, len, &mut columns);
                let product = weight.matmul(
                    &CpuStorage::F32(columns),
                    (1, c_out, len, k),
                    &matrix,
                    &Layout::contiguous((k, len)),
                )?;
                let CpuStorage::F32(product) = product else {
                    candle_core::bail!("conv3x3: the product is not float32");
                };
                fastfusion_kernels::place_tile(&product, out, pixels, first, self.bias.as_deref());
                first += len;
            }
        }
        Ok(out)
    }

    /// Chunks of tile rows: input blocks transformed, α² products with the transformed weights
    /// (one batched gemm), output blocks written into the NCHW output with the bias.
    fn winograd(
        &self,
        geometry: &Geometry,
        input: &[f32],
        weight: &[f32],
        c_in: usize,
        c_out: usize,
    ) -> Result<Vec<f32>> {
        let points = geometry.tile.points();
        let tiles_x = geometry.tiles_x();
        let tile = geometry.tile;
        let transformed = match self
            .cache
            .and_then(|cache| cache.get(tile, weight, c_out, c_in))
        {
            Some(cached) => cached,
            None => Arc::new(CpuStorage::F32(winograd::weights(
                tile, weight, c_out, c_in,
            ))),
        };
        // Read as α² matrices (c_out × c_in) from the [c_out][α²][c_in] layout.
        let lhs = Layout::new(
            Shape::from((points, c_out, c_in)),
            vec![c_in, points * c_in, 1],
            0,
        );
        let chunk = (TILE_FLOATS / (points * tiles_x * c_in.max(c_out))).clamp(1, geometry.rows());
        let mut out = vec![0f32; geometry.batch * c_out * geometry.height * geometry.width];
        let mut first = 0;
        while first < geometry.rows() {
            let rows = chunk.min(geometry.rows() - first);
            let tiles = rows * tiles_x;
            let mut blocks = vec![0f32; c_in * points * tiles];
            winograd::input(geometry, input, c_in, (first, rows), &mut blocks);
            // Read as α² matrices (c_in × T) from the [c_in][α²][T] layout.
            let rhs = Layout::new(
                Shape::from((points, c_in, tiles)),
                vec![tiles, points * tiles, 1],
                0,
            );
            let product = transformed.matmul(
                &CpuStorage::F32(blocks),
                (points, c_out, tiles, c_in),
                &lhs,
                &rhs,
            )?;
            let CpuStorage::F32(product) = product else {
                candle_core::bail!("conv3x3: the product is not float32");
            };
            winograd::output(
                geometry,
                &product,
                c_out,
                (first, rows),
                self.bias.as_deref(),
                &mut out,
            );
            first += rows;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::Conv2dConfig;

    /// Values spread like N(0, std²) (a sum of four uniform draws of a fixed LCG), reproducible.
    fn draws(shape: impl Into<candle_core::Shape>, seed: u64, std: f32) -> Result<Tensor> {
        let shape = shape.into();
        let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let mut uniform = || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        // Four uniforms on [-0.5, 0.5) have variance 1/3.
        let values: Vec<f32> = (0..shape.elem_count())
            .map(|_| (uniform() + uniform() + uniform() + uniform()) * std * 3f32.sqrt())
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu)
    }

    #[test]
    fn every_method_equals_candles_conv2d() -> Result<()> {
        // One tile, several tiles (TILE_FLOATS / (c_in·9) < h·w, and for Winograd several
        // chunks of tile rows), odd sizes (partial blocks), a 1×1 map, no bias.
        for (b, c_in, c_out, h, w, bias) in [
            (2, 4, 6, 5, 7, true),
            (1, 3, 2, 1, 1, true),
            (1, 512, 8, 40, 30, false),
            (2, 64, 16, 66, 33, true),
        ] {
            // Fixed pseudo-random values (candle's CPU normal draws cannot be seeded), so the
            // rounding differences measured below are the same on every run.
            let xs = draws((b, c_in, h, w), 1, 1.0)?;
            let weight = draws((c_out, c_in, 3, 3), 2, 0.2)?;
            let bias = bias.then(|| draws(c_out, 3, 1.0)).transpose()?;
            let cfg = Conv2dConfig {
                padding: 1,
                ..Default::default()
            };
            let conv = Conv2d::new(weight.clone(), bias.clone(), cfg);
            let want = conv.forward(&xs)?;
            let scale: f32 = want.abs()?.flatten_all()?.max(0)?.to_scalar()?;
            for method in [
                Method::Im2col,
                Method::Winograd(Tile::F2),
                Method::Winograd(Tile::F4),
            ] {
                let got = conv3x3_with(&xs, &weight, bias.as_ref(), Some(method))?;
                assert_eq!(got.dims(), want.dims());
                let diff: f32 = (got - &want)?.abs()?.flatten_all()?.max(0)?.to_scalar()?;
                // F(4×4) loses about a decimal digit of float32 (module docs of the kernel), more
                // with more input channels: 1.4e-5 of the largest value at 512 channels on these
                // draws (with unseeded normal draws it once reached 2.2e-5). gemm's kernel, and so
                // its summation order, differs between CPUs, hence the margin.
                let tolerance = if method == Method::Winograd(Tile::F4) {
                    3e-5
                } else {
                    1e-5
                };
                assert!(
                    diff <= tolerance * scale.max(1.0),
                    "{method:?} {b}x{c_in}x{h}x{w}: differs by {diff} (largest value {scale})"
                );
            }
            assert_eq!(Conv::new(conv).forward(&xs)?.dims(), want.dims());
        }
        Ok(())
    }

    #[test]
    fn a_layer_keeps_its_transformed_weights() -> Result<()> {
        let (b, c_in, c_out, h, w) = (2, 24, 16, 19, 13);
        let xs = draws((b, c_in, h, w), 4, 1.0)?;
        let weight = draws((c_out, c_in, 3, 3), 5, 0.2)?;
        let bias = draws(c_out, 6, 1.0)?;
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let layer = Conv::new(Conv2d::new(weight.clone(), Some(bias.clone()), cfg));
        for tile in [Tile::F2, Tile::F4] {
            let method = Some(Method::Winograd(tile));
            let per_call = conv3x3_with(&xs, &weight, Some(&bias), method)?;
            assert!(!layer.cache.has(tile));
            // The first call makes and keeps them, the second uses what was kept: both give
            // the per-call transform's output to the bit.
            for _ in 0..2 {
                let cached = run(&xs, &weight, Some(&bias), method, Some(&layer.cache))?;
                assert!(layer.cache.has(tile), "{tile:?} not kept");
                let diff: f32 = (&cached - &per_call)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar()?;
                assert_eq!(diff, 0.0, "{tile:?}");
            }
        }
        // Clones share the cache.
        assert!(layer.clone().cache.has(Tile::F4));
        Ok(())
    }

    #[test]
    fn a_models_layer_keeps_weights_only_where_the_rule_says() -> Result<()> {
        // Through `Conv::forward`, the path the models take, with the machine's own rates: SD
        // 1.5's 2×640×32² level is Winograd with its transform a third or more of the call on
        // both rate sets (kept); a VAE-like 128×128² map is Winograd with the transform a few
        // percent of it (not kept). Both equal candle's conv.
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        for ((b, c, h, w), kept) in [((2, 640, 32, 32), true), ((1, 128, 128, 128), false)] {
            let xs = draws((b, c, h, w), 7, 1.0)?;
            let weight = draws((c, c, 3, 3), 8, 0.02)?;
            let candle = Conv2d::new(weight, None, cfg);
            let want = candle.forward(&xs)?;
            let layer = Conv::new(candle);
            let Method::Winograd(tile) = layer.method((b, c, h, w)) else {
                panic!("{c}×{h}² is not a Winograd shape by the cost model");
            };
            let got = layer.forward(&xs)?;
            assert_eq!(layer.cache.has(tile), kept, "{c}×{h}²");
            let scale: f32 = want.abs()?.flatten_all()?.max(0)?.to_scalar()?;
            let diff: f32 = (got - &want)?.abs()?.flatten_all()?.max(0)?.to_scalar()?;
            assert!(diff <= 3e-5 * scale.max(1.0), "{c}×{h}²: differs by {diff}");
        }
        Ok(())
    }

    #[test]
    fn the_budget_is_never_overdrawn() {
        let used = AtomicUsize::new(0);
        assert!(reserve_in(&used, 600, 1000));
        assert!(!reserve_in(&used, 401, 1000), "past the budget");
        assert!(reserve_in(&used, 400, 1000), "exactly the budget");
        assert!(!reserve_in(&used, 1, 1000));
        assert!(!reserve_in(&used, usize::MAX, usize::MAX), "overflow");
        assert_eq!(used.load(Ordering::Relaxed), 1000);
        // Budget 0 (caching off) takes nothing but empty requests.
        assert!(!reserve_in(&AtomicUsize::new(0), 4, 0));
    }

    #[test]
    fn a_cacheable_layer_picks_its_tile_without_the_transform() {
        for rates in [&Rates::AVX512, &Rates::AVX2] {
            // 640 channels on 32² maps (SD 1.5 512², level 2): F(4×4)'s per-call transform of
            // 36 matrices costs about as much as its products there; kept once, its fewer
            // products win.
            let (b, c, h, w) = (2, 640, 32, 32);
            assert_eq!(
                Method::cheapest_cached(rates, b, c, c, h, w, |_| Room::Fits),
                (Method::Winograd(Tile::F4), true)
            );
            // No room: as without a cache.
            assert_eq!(
                Method::cheapest_cached(rates, b, c, c, h, w, |_| Room::Full),
                (Method::cheapest(rates, b, c, c, h, w), false)
            );
            // Caching never turns im2col into Winograd.
            assert_eq!(
                Method::cheapest_cached(rates, 2, 1280, 1280, 8, 8, |_| Room::Held),
                (Method::Im2col, false)
            );
            // A VAE's 128 channels on a 512² map: the transform is a sliver of the call, so
            // the weights are not kept, unless the layer holds them already.
            let vae = (1, 128, 128, 512, 512);
            assert_eq!(
                Method::cheapest_cached(rates, vae.0, vae.1, vae.2, vae.3, vae.4, |_| Room::Fits),
                (Method::Winograd(Tile::F4), false)
            );
            assert_eq!(
                Method::cheapest_cached(rates, vae.0, vae.1, vae.2, vae.3, vae.4, |_| Room::Held),
                (Method::Winograd(Tile::F4), true)
            );
        }
        // Room for F(2×2)'s weights only.
        let f2_only = |tile| {
            if tile == Tile::F2 {
                Room::Fits
            } else {
                Room::Full
            }
        };
        assert_eq!(
            Method::cheapest_cached(&Rates::AVX2, 2, 640, 640, 16, 16, f2_only),
            (Method::Winograd(Tile::F2), true)
        );
        // The VAE decoder's 512 channels on 64² maps (AVX2: the transform is 17 % of the call).
        assert_eq!(
            Method::cheapest_cached(&Rates::AVX2, 1, 512, 512, 64, 64, |_| Room::Fits),
            (Method::Winograd(Tile::F4), false)
        );
    }

    #[test]
    fn the_choice_follows_the_map_and_channel_sizes() {
        for rates in [&Rates::AVX512, &Rates::AVX2] {
            // The VAE's large levels and SD's top level: Winograd F(4×4); SD's 1280 channels on
            // 8² maps: im2col (the per-call weight transform would outweigh the savings).
            assert_eq!(
                Method::cheapest(rates, 1, 128, 128, 512, 512),
                Method::Winograd(Tile::F4)
            );
            assert_eq!(
                Method::cheapest(rates, 2, 320, 320, 32, 32),
                Method::Winograd(Tile::F4)
            );
            assert_eq!(Method::cheapest(rates, 2, 1280, 1280, 8, 8), Method::Im2col);
            assert_eq!(Method::cheapest(rates, 1, 4, 4, 1, 1), Method::Im2col);
        }
        // Where gemm is slower (AVX2), Winograd takes the 16² maps too, as measured: 640
        // channels F(2×2) 53 ms against im2col 69, 1280 channels 200 against 272.
        assert_eq!(
            Method::cheapest(&Rates::AVX512, 2, 1280, 1280, 16, 16),
            Method::Im2col
        );
        assert_eq!(
            Method::cheapest(&Rates::AVX2, 2, 1280, 1280, 16, 16),
            Method::Winograd(Tile::F2)
        );
        assert_eq!(
            Method::cheapest(&Rates::AVX2, 2, 640, 640, 16, 16),
            Method::Winograd(Tile::F2)
        );
    }

    #[test]
    fn other_convolutions_take_candles_path() -> Result<()> {
        let device = Device::Cpu;
        let xs = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &device)?;
        let weight = Tensor::randn(0f32, 0.2, (4, 4, 3, 3), &device)?;
        let strided = Conv2dConfig {
            stride: 2,
            ..Default::default()
        };
        let conv = Conv2d::new(weight, None, strided);
        let want = conv.forward(&xs)?;
        let got = Conv::new(conv).forward(&xs)?;
        assert_eq!(got.dims(), &[1, 4, 3, 3]);
        let diff: f32 = (got - want)?.abs()?.flatten_all()?.max(0)?.to_scalar()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }
}
