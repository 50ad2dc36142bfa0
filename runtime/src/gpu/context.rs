//! One wgpu device per process: adapter, device, queue, the pipeline cache and the counters
//! that prove nothing is compiled per run.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::GpuError;

/// A bind-group layout and the pipeline layout made of it.
pub(crate) type Layout = Arc<(wgpu::BindGroupLayout, wgpu::PipelineLayout)>;

/// How many bindings a kernel reads (besides its parameters) and writes.
pub(crate) type Arity = usize;

/// The GPU context: built once, shared by every model prepared on the GPU backend.
pub(crate) struct Ctx {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    layouts: Mutex<HashMap<Arity, Arc<(wgpu::BindGroupLayout, wgpu::PipelineLayout)>>>,
    pipelines: Mutex<HashMap<&'static str, Arc<wgpu::ComputePipeline>>>,
    pub counters: Counters,
    /// Set by the device-lost callback; every later call fails with [`GpuError::DeviceLost`].
    lost: Arc<Mutex<Option<String>>>,
    lost_flag: Arc<AtomicBool>,
}

/// Resource creation counts since the context was built.
#[derive(Debug, Default)]
pub struct Counters {
    pub pipelines: AtomicUsize,
    pub bind_group_layouts: AtomicUsize,
    pub bind_groups: AtomicUsize,
    pub buffers: AtomicUsize,
    pub submissions: AtomicUsize,
    pub readbacks: AtomicUsize,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GpuCounters {
    pub pipelines: usize,
    pub bind_group_layouts: usize,
    pub bind_groups: usize,
    pub buffers: usize,
    pub submissions: usize,
    pub readbacks: usize,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .finish_non_exhaustive()
    }
}

/// Whether an adapter is a software rasteriser (lavapipe, llvmpipe, WARP, SwiftShader).
pub(crate) fn is_software(info: &wgpu::AdapterInfo) -> bool {
    info.device_type == wgpu::DeviceType::Cpu
}

impl Ctx {
    /// Finds an adapter and opens a device; `Err` says why none is usable.
    pub(crate) fn new() -> Result<Ctx, GpuError> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            force_fallback_adapter: false,
            compatible_surface: None,
            apply_limit_buckets: false,
        }))
        .map_err(|e| GpuError::NoAdapter(e.to_string()))?;
        let info = adapter.get_info();
        let alimits = adapter.limits();
        // Ask for the adapter's storage limits (real models have buffers past the 128 MiB default).
        let limits = wgpu::Limits {
            max_storage_buffer_binding_size: alimits.max_storage_buffer_binding_size,
            max_buffer_size: alimits.max_buffer_size,
            max_storage_buffers_per_shader_stage: alimits
                .max_storage_buffers_per_shader_stage
                .min(16),
            max_compute_workgroup_storage_size: alimits.max_compute_workgroup_storage_size,
            ..wgpu::Limits::downlevel_defaults()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("fedge"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| GpuError::NoAdapter(format!("{} ({:?}): {e}", info.name, info.backend)))?;
        let lost = Arc::new(Mutex::new(None));
        let lost_flag = Arc::new(AtomicBool::new(false));
        {
            let lost = lost.clone();
            let flag = lost_flag.clone();
            device.set_device_lost_callback(move |reason, msg| {
                tracing::error!(?reason, %msg, "GPU device lost");
                if let Ok(mut l) = lost.lock() {
                    *l = Some(format!("{reason:?}: {msg}"));
                }
                flag.store(true, Ordering::SeqCst);
            });
        }
        // Errors outside a scope must not panic (wgpu's default handler does).
        device.on_uncaptured_error(Arc::new(|e: wgpu::Error| {
            tracing::error!(error = %e, "uncaptured GPU error");
        }));
        tracing::info!(adapter = %info.name, backend = ?info.backend, kind = ?info.device_type, "GPU device opened");
        Ok(Ctx {
            device,
            queue,
            info,
            limits,
            layouts: Mutex::new(HashMap::new()),
            pipelines: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            lost,
            lost_flag,
        })
    }

    pub(crate) fn counters(&self) -> GpuCounters {
        let c = &self.counters;
        let g = |a: &AtomicUsize| a.load(Ordering::Relaxed);
        GpuCounters {
            pipelines: g(&c.pipelines),
            bind_group_layouts: g(&c.bind_group_layouts),
            bind_groups: g(&c.bind_groups),
            buffers: g(&c.buffers),
            submissions: g(&c.submissions),
            readbacks: g(&c.readbacks),
        }
    }

    /// `Err(DeviceLost)` once the device is gone.
    pub(crate) fn alive(&self) -> Result<(), GpuError> {
        if self.lost_flag.load(Ordering::SeqCst) {
            let why = self
                .lost
                .lock()
                .ok()
                .and_then(|l| l.clone())
                .unwrap_or_else(|| "unknown".into());
            return Err(GpuError::DeviceLost(why));
        }
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn destroy(&self) {
        self.device.destroy();
    }

    /// The layout for `inputs` read-only storage bindings after the parameters and one output.
    fn layout(&self, inputs: Arity) -> Arc<(wgpu::BindGroupLayout, wgpu::PipelineLayout)> {
        let mut layouts = self.layouts.lock().unwrap_or_else(|p| p.into_inner());
        layouts
            .entry(inputs)
            .or_insert_with(|| {
                let entry = |binding: u32, read_only: bool| wgpu::BindGroupLayoutEntry {
                    binding,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage { read_only },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                };
                let mut entries = vec![entry(0, true)];
                entries.extend((0..inputs).map(|k| entry(1 + k as u32, true)));
                entries.push(entry(1 + inputs as u32, false));
                let label = format!("fedge.layout.{inputs}in");
                let bgl = self
                    .device
                    .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                        label: Some(&label),
                        entries: &entries,
                    });
                let pl = self
                    .device
                    .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                        label: Some(&label),
                        bind_group_layouts: &[Some(&bgl)],
                        immediate_size: 0,
                    });
                self.counters
                    .bind_group_layouts
                    .fetch_add(1, Ordering::Relaxed);
                Arc::new((bgl, pl))
            })
            .clone()
    }

    /// The compiled pipeline for `kernel` (compiled on first use, then cached for the process).
    pub(crate) fn pipeline(
        &self,
        kernel: &super::kernels::Kernel,
    ) -> Result<(Arc<wgpu::ComputePipeline>, Layout), GpuError> {
        let layout = self.layout(kernel.inputs);
        let mut pipelines = self.pipelines.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = pipelines.get(kernel.name) {
            return Ok((p.clone(), layout));
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(kernel.name),
                source: wgpu::ShaderSource::Wgsl(kernel.source.into()),
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(kernel.name),
                layout: Some(&layout.1),
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Kernel {
                kernel: kernel.name,
                detail: e.to_string(),
            });
        }
        self.counters.pipelines.fetch_add(1, Ordering::Relaxed);
        let p = Arc::new(pipeline);
        pipelines.insert(kernel.name, p.clone());
        Ok((p, layout))
    }
}
