//! Model components that stay resident, or are offloaded between uses (`enable_cpu_offload`).
//!
//! A pipeline keeps each of its parts (text encoder, UNet, VAE; later SDXL's second encoder or
//! FLUX's transformer and T5) as a [`Component<C>`], generic over the part's type, and asks for it
//! with [`Component::get`] each time it runs it:
//!
//! - resident (offload off): built once at load on the device; `get` hands out that one.
//! - offloaded: the weights wait off the device, and the pipeline's one [`Offload`] slot holds at
//!   most one built part, the one in use. `get` on another part empties the slot first (the old
//!   part is freed as soon as its last user lets go), then builds the wanted one on the device.
//!   This is diffusers' `enable_model_cpu_offload`: a part moves to the device when it starts and
//!   leaves when the next one starts, so the UNet stays for the whole denoising loop;
//!   [`Offload::release`] empties the slot when a request ends. Where the weights wait depends on
//!   the device:
//!   - CUDA / Metal: in host memory, already in the run dtype; each build copies them over.
//!   - CPU: on disk. Each build reads the safetensors files again, so only the part in use takes
//!     memory (read, not memory-mapped: the workspace forbids `unsafe`; the OS's page cache keeps
//!     the re-reads cheap and is not counted in the process's resident memory).
//!
//! Every build converts the weights exactly as a resident load does (file → init → run dtype), so
//! offloading changes memory and time, never the images.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;

use super::weights::load_tensors;
use crate::device::Precision;
use crate::error::{Result, WorkerError};

/// Builds a part from its weights (e.g. `UNet::new` with the part's config).
type Build<C> = Box<dyn Fn(VarBuilder<'static>) -> candle_core::Result<C> + Send + Sync>;

/// A type-erased built part, tagged with the id of the component it belongs to.
type Held = (usize, Arc<dyn Any + Send + Sync>);

/// Where a component's weights are on disk.
#[derive(Debug, Clone)]
pub struct WeightFiles {
    /// The repo id or directory, to name the model in errors.
    pub source_name: String,
    /// The component's folder (`unet`, `vae`, `text_encoder`).
    pub dir: PathBuf,
    /// File names start with this (`diffusion_pytorch_model`, `model`).
    pub stem: &'static str,
}

impl WeightFiles {
    /// The file errors name: the usual single-file checkpoint.
    fn main_file(&self) -> PathBuf {
        self.dir.join(format!("{}.safetensors", self.stem))
    }

    /// The weights on `device`, converted as `precision` says, ready for a build.
    fn var_builder(&self, precision: Precision, device: &Device) -> Result<VarBuilder<'static>> {
        let tensors = load_tensors(
            &self.source_name,
            &self.dir,
            self.stem,
            (precision.init, precision.run),
            device,
        )?;
        Ok(VarBuilder::from_tensors(tensors, precision.run, device))
    }
}

/// The slot offloaded components of one pipeline share: the part in use, if any.
#[derive(Default)]
pub struct Offload {
    current: Mutex<Option<Held>>,
    /// Hands each component its id.
    next_id: AtomicUsize,
}

impl Offload {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Lets the part in use go (at the end of a request), as diffusers' `maybe_free_model_hooks`.
    pub fn release(&self) {
        *self.lock() = None;
    }

    /// True while no part is held (nothing of this pipeline on the device).
    pub fn is_empty(&self) -> bool {
        self.lock().is_none()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Held>> {
        // A panic while holding the slot leaves at worst a stale part in it, which is still valid.
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for Offload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let held = self.lock().as_ref().map(|(id, _)| *id);
        f.debug_struct("Offload").field("held", &held).finish()
    }
}

/// One part of a pipeline (see the module doc).
pub struct Component<C> {
    /// For logs and errors: the folder name, e.g. `unet`.
    name: String,
    state: State<C>,
}

enum State<C> {
    Resident(Arc<C>),
    Offloaded {
        id: usize,
        slot: Arc<Offload>,
        parked: Parked,
        build: Build<C>,
        files: WeightFiles,
        precision: Precision,
        device: Device,
    },
}

/// Where an offloaded part's weights wait.
enum Parked {
    /// On the host, in the run dtype (GPU devices).
    Host(HashMap<String, Tensor>),
    /// In the files (the CPU device).
    Disk,
}

impl<C: Send + Sync + 'static> Component<C> {
    /// Loads the part in `files`: built on `device` now when `offload` is `None`, else parked.
    /// An offloaded part is still built once here and dropped, so that bad weights fail at
    /// start-up rather than at the first request.
    pub fn load(
        files: WeightFiles,
        precision: Precision,
        device: &Device,
        offload: Option<&Arc<Offload>>,
        build: impl Fn(VarBuilder<'static>) -> candle_core::Result<C> + Send + Sync + 'static,
    ) -> Result<Self> {
        // The CPU gains nothing from a host copy: its weights wait in their files.
        let park_in_host = !device.is_cpu();
        Self::load_parked(files, precision, device, offload, build, park_in_host)
    }

    /// [`Self::load`] with the choice of where offloaded weights wait made by the caller.
    fn load_parked(
        files: WeightFiles,
        precision: Precision,
        device: &Device,
        offload: Option<&Arc<Offload>>,
        build: impl Fn(VarBuilder<'static>) -> candle_core::Result<C> + Send + Sync + 'static,
        park_in_host: bool,
    ) -> Result<Self> {
        let name = files
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| files.stem.to_string());
        let build: Build<C> = Box::new(build);
        let Some(slot) = offload else {
            let part = build_from(&build, &files, files.var_builder(precision, device)?)?;
            return Ok(Self {
                name,
                state: State::Resident(Arc::new(part)),
            });
        };
        let parked = if park_in_host {
            // Already in the run dtype, so that each build is only a copy to the device.
            Parked::Host(load_tensors(
                &files.source_name,
                &files.dir,
                files.stem,
                (precision.init, precision.run),
                &Device::Cpu,
            )?)
        } else {
            Parked::Disk
        };
        let component = Self {
            name,
            state: State::Offloaded {
                id: slot.next_id.fetch_add(1, Ordering::Relaxed),
                slot: slot.clone(),
                parked,
                build,
                files,
                precision,
                device: device.clone(),
            },
        };
        drop(component.build_offloaded()?);
        Ok(component)
    }

    /// The built part, building it (and letting the previous part go) when offloaded.
    pub fn get(&self) -> Result<Arc<C>> {
        let (id, slot) = match &self.state {
            State::Resident(part) => return Ok(part.clone()),
            State::Offloaded { id, slot, .. } => (*id, slot),
        };
        let mut current = slot.lock();
        if let Some((held, part)) = current.as_ref() {
            if *held == id {
                if let Ok(part) = part.clone().downcast::<C>() {
                    return Ok(part);
                }
            }
        }
        // Free the previous part before building this one: not holding both is the point.
        *current = None;
        let part = Arc::new(self.build_offloaded()?);
        tracing::debug!(component = %self.name, "offloaded component built for use");
        *current = Some((id, part.clone()));
        Ok(part)
    }

    /// Builds an offloaded part on its device from its parked weights.
    fn build_offloaded(&self) -> Result<C> {
        match &self.state {
            State::Resident(_) => Err(WorkerError::Internal(format!(
                "{} is resident, not offloaded",
                self.name
            ))),
            State::Offloaded {
                parked,
                build,
                files,
                precision,
                device,
                ..
            } => {
                let vb = match parked {
                    Parked::Host(tensors) => {
                        // Cloning the map clones tensor handles, not data; the builder copies
                        // each tensor to the device as the part asks for it.
                        VarBuilder::from_tensors(tensors.clone(), precision.run, device)
                    }
                    Parked::Disk => files.var_builder(*precision, device)?,
                };
                build_from(build, files, vb)
            }
        }
    }
}

fn build_from<C>(build: &Build<C>, files: &WeightFiles, vb: VarBuilder<'static>) -> Result<C> {
    build(vb).map_err(|e| WorkerError::model_load(&files.source_name, files.main_file(), e))
}

impl<C> fmt::Debug for Component<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let residency = match &self.state {
            State::Resident(_) => "resident",
            State::Offloaded {
                parked: Parked::Host(_),
                ..
            } => "offloaded to host memory",
            State::Offloaded {
                parked: Parked::Disk,
                ..
            } => "offloaded to disk",
        };
        f.debug_struct("Component")
            .field("name", &self.name)
            .field("residency", &residency)
            .finish()
    }
}

#[cfg(test)]
// A failed setup step should fail the test: that is what unwrap does here.
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Weak;

    use candle_core::DType;

    use super::*;

    /// A one-tensor part, enough to watch builds, residency and dtype conversions.
    struct Part(Tensor);

    /// A component folder with `w = [1.0001, -2.0]` in float32.
    fn folder() -> (tempfile::TempDir, WeightFiles) {
        let dir = tempfile::tempdir().unwrap();
        let w = Tensor::new(&[1.0001f32, -2.0], &Device::Cpu).unwrap();
        let map = HashMap::from([("w".to_owned(), w)]);
        candle_core::safetensors::save(&map, dir.path().join("model.safetensors")).unwrap();
        let files = WeightFiles {
            source_name: "repo".into(),
            dir: dir.path().to_path_buf(),
            stem: "model",
        };
        (dir, files)
    }

    const F32: Precision = Precision {
        init: DType::F32,
        run: DType::F32,
    };

    /// Loads a `Part` reading tensor `name`, counting builds in `builds`.
    fn load(
        files: &WeightFiles,
        precision: Precision,
        offload: Option<&Arc<Offload>>,
        builds: &Arc<AtomicUsize>,
        name: &'static str,
    ) -> Result<Component<Part>> {
        let builds = builds.clone();
        Component::load(files.clone(), precision, &Device::Cpu, offload, move |vb| {
            builds.fetch_add(1, Ordering::SeqCst);
            Ok(Part(vb.get(2, name)?))
        })
    }

    fn values(part: &Part) -> Vec<f32> {
        part.0.to_dtype(DType::F32).unwrap().to_vec1().unwrap()
    }

    #[test]
    fn resident_builds_once_and_hands_out_the_same_part() {
        let (_dir, files) = folder();
        let builds = Arc::new(AtomicUsize::new(0));
        let c = load(&files, F32, None, &builds, "w").unwrap();
        let (a, b) = (c.get().unwrap(), c.get().unwrap());
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(builds.load(Ordering::SeqCst), 1);
        assert_eq!(values(&a), vec![1.0001, -2.0]);
    }

    #[test]
    fn offloaded_parts_take_turns_in_the_slot() {
        let (_dir, files) = folder();
        let builds = Arc::new(AtomicUsize::new(0));
        let slot = Offload::new();
        let first = load(&files, F32, Some(&slot), &builds, "w").unwrap();
        let second = load(&files, F32, Some(&slot), &builds, "w").unwrap();
        // Each was built once at load to check its weights, and nothing is held after.
        assert_eq!(builds.load(Ordering::SeqCst), 2);
        assert!(slot.is_empty());

        let a: Weak<Part> = Arc::downgrade(&first.get().unwrap());
        assert!(a.upgrade().is_some(), "the part in use stays in the slot");
        first.get().unwrap();
        assert_eq!(
            builds.load(Ordering::SeqCst),
            3,
            "repeated use does not rebuild"
        );

        let b = Arc::downgrade(&second.get().unwrap());
        assert!(a.upgrade().is_none(), "using another part frees the first");
        assert_eq!(builds.load(Ordering::SeqCst), 4);

        slot.release();
        assert!(slot.is_empty());
        assert!(b.upgrade().is_none(), "release frees the last part");
    }

    #[test]
    fn offloaded_weights_equal_resident_ones_through_init_and_run_dtypes() {
        let (_dir, files) = folder();
        let builds = Arc::new(AtomicUsize::new(0));
        let precision = Precision {
            init: DType::F16,
            run: DType::F32,
        };
        let resident = load(&files, precision, None, &builds, "w").unwrap();
        let offloaded = load(&files, precision, Some(&Offload::new()), &builds, "w").unwrap();
        let (r, o) = (resident.get().unwrap(), offloaded.get().unwrap());
        assert_eq!(r.0.dtype(), DType::F32);
        assert_eq!(o.0.dtype(), DType::F32);
        // Rounded through float16 on the way in: 1.0001 is not a float16 value.
        assert_eq!(values(&r), vec![1.0, -2.0]);
        assert_eq!(values(&o), values(&r));
    }

    #[test]
    fn host_parked_parts_are_built_from_memory_not_the_files() {
        // What a GPU device does, exercised on the CPU (the copy "to the device" is then a no-op).
        let (dir, files) = folder();
        let builds = Arc::new(AtomicUsize::new(0));
        let counted = builds.clone();
        let precision = Precision {
            init: DType::F16,
            run: DType::F32,
        };
        let slot = Offload::new();
        let build = move |vb: VarBuilder<'static>| {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok(Part(vb.get(2, "w")?))
        };
        let c = Component::load_parked(files, precision, &Device::Cpu, Some(&slot), build, true)
            .unwrap();
        assert!(format!("{c:?}").contains("offloaded to host memory"));
        // The files are gone: a build now can only come from the host copy.
        drop(dir);
        let part = c.get().unwrap();
        assert_eq!(values(&part), vec![1.0, -2.0]);
        assert_eq!(builds.load(Ordering::SeqCst), 2);
        slot.release();
        assert!(slot.is_empty());
    }

    #[test]
    fn bad_weights_fail_at_load_even_when_offloaded() {
        let (_dir, files) = folder();
        let builds = Arc::new(AtomicUsize::new(0));
        for offload in [None, Some(Offload::new())] {
            match load(&files, F32, offload.as_ref(), &builds, "missing") {
                Err(WorkerError::ModelLoad { file, message, .. }) => {
                    assert_eq!(file, files.dir.join("model.safetensors"));
                    assert!(message.contains("missing"), "{message}");
                }
                other => panic!("expected ModelLoad, got {:?}", other.map(|_| ())),
            }
        }
    }
}
