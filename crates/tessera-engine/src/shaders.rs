//! The WGSL kernels: the one place that embeds `shaders/*.wgsl`, says which entry point and
//! bindings each kernel has, and caches compiled pipelines.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

const COMMON: &str = include_str!("../../../shaders/common.wgsl");
const REDUCE: &str = include_str!("../../../shaders/reduce.wgsl");
const QUANT: &str = include_str!("../../../shaders/quant.wgsl");
const MATMUL_COMMON: &str = include_str!("../../../shaders/matmul_common.wgsl");
const MATMUL: &str = include_str!("../../../shaders/matmul.wgsl");
const MATMUL_SCALAR: &str = include_str!("../../../shaders/matmul_scalar.wgsl");
const MATMUL_QUANT: &str = include_str!("../../../shaders/matmul_quant.wgsl");
const MATVEC_QUANT: &str = include_str!("../../../shaders/matvec_quant.wgsl");
const GATHER: &str = include_str!("../../../shaders/gather.wgsl");
const NORM: &str = include_str!("../../../shaders/norm.wgsl");
const SOFTMAX: &str = include_str!("../../../shaders/softmax.wgsl");
const ROPE: &str = include_str!("../../../shaders/rope.wgsl");
const ACTIVATION: &str = include_str!("../../../shaders/activation.wgsl");
const ATTENTION: &str = include_str!("../../../shaders/attention.wgsl");
const POOLING: &str = include_str!("../../../shaders/pooling.wgsl");
const STREAM_READ: &str = include_str!("../../../shaders/stream_read.wgsl");

/// A kernel family: one `.wgsl` file, compiled as one shader module with its helpers prepended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    Matmul,
    MatmulScalar,
    MatmulQuant,
    MatvecQuant,
    Gather,
    Norm,
    Softmax,
    Rope,
    Activation,
    Attention,
    Pooling,
    StreamRead,
}

impl Family {
    pub const ALL: [Family; 12] = [
        Family::Matmul,
        Family::MatmulScalar,
        Family::MatmulQuant,
        Family::MatvecQuant,
        Family::Gather,
        Family::Norm,
        Family::Softmax,
        Family::Rope,
        Family::Activation,
        Family::Attention,
        Family::Pooling,
        Family::StreamRead,
    ];

    /// The source parts, helpers first, that make up this family's module.
    pub fn parts(self) -> &'static [&'static str] {
        match self {
            Family::Matmul => &[COMMON, MATMUL_COMMON, MATMUL],
            Family::MatmulScalar => &[COMMON, MATMUL_SCALAR],
            Family::MatmulQuant => &[COMMON, QUANT, MATMUL_COMMON, MATMUL_QUANT],
            Family::MatvecQuant => &[COMMON, REDUCE, QUANT, MATVEC_QUANT],
            Family::Gather => &[COMMON, QUANT, GATHER],
            Family::Norm => &[COMMON, REDUCE, NORM],
            Family::Softmax => &[COMMON, REDUCE, SOFTMAX],
            Family::Rope => &[COMMON, ROPE],
            Family::Activation => &[COMMON, ACTIVATION],
            Family::Attention => &[COMMON, REDUCE, ATTENTION],
            Family::Pooling => &[COMMON, REDUCE, POOLING],
            Family::StreamRead => &[COMMON, REDUCE, STREAM_READ],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::Matmul => "matmul",
            Family::MatmulScalar => "matmul_scalar",
            Family::MatmulQuant => "matmul_quant",
            Family::MatvecQuant => "matvec_quant",
            Family::Gather => "gather",
            Family::Norm => "norm",
            Family::Softmax => "softmax",
            Family::Rope => "rope",
            Family::Activation => "activation",
            Family::Attention => "attention",
            Family::Pooling => "pooling",
            Family::StreamRead => "stream_read",
        }
    }

    /// The full WGSL source of the module.
    pub fn source(self) -> String {
        self.parts().join("\n")
    }
}

/// How a kernel uses one of its storage bindings. Binding 0 is always the uniform parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    ReadWrite,
}

use Access::{Read, ReadWrite};

/// Every compute entry point the engine dispatches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    MatmulNn,
    MatmulNt,
    MatmulScalarNn,
    MatmulScalarNt,
    MatmulQ4_1,
    MatmulQ8_0,
    MatvecQ4_1,
    MatvecQ8_0,
    MatvecNormQ4_1,
    MatvecNormQ8_0,
    MatvecNormGluQ4_1,
    MatvecNormGluQ8_0,
    GatherF32,
    GatherQ8_0,
    GatherQ4_1,
    RmsNorm,
    LayerNorm,
    Softmax,
    Rope,
    RopeQkv,
    SiluMul,
    Gelu,
    Add,
    Attention,
    MeanPoolL2,
    StreamRead,
}

impl Kernel {
    pub const ALL: [Kernel; 26] = [
        Kernel::MatmulNn,
        Kernel::MatmulNt,
        Kernel::MatmulScalarNn,
        Kernel::MatmulScalarNt,
        Kernel::MatmulQ4_1,
        Kernel::MatmulQ8_0,
        Kernel::MatvecQ4_1,
        Kernel::MatvecQ8_0,
        Kernel::MatvecNormQ4_1,
        Kernel::MatvecNormQ8_0,
        Kernel::MatvecNormGluQ4_1,
        Kernel::MatvecNormGluQ8_0,
        Kernel::GatherF32,
        Kernel::GatherQ8_0,
        Kernel::GatherQ4_1,
        Kernel::RmsNorm,
        Kernel::LayerNorm,
        Kernel::Softmax,
        Kernel::Rope,
        Kernel::RopeQkv,
        Kernel::SiluMul,
        Kernel::Gelu,
        Kernel::Add,
        Kernel::Attention,
        Kernel::MeanPoolL2,
        Kernel::StreamRead,
    ];

    pub fn family(self) -> Family {
        match self {
            Kernel::MatmulNn | Kernel::MatmulNt => Family::Matmul,
            Kernel::MatmulScalarNn | Kernel::MatmulScalarNt => Family::MatmulScalar,
            Kernel::MatmulQ4_1 | Kernel::MatmulQ8_0 => Family::MatmulQuant,
            Kernel::MatvecQ4_1
            | Kernel::MatvecQ8_0
            | Kernel::MatvecNormQ4_1
            | Kernel::MatvecNormQ8_0
            | Kernel::MatvecNormGluQ4_1
            | Kernel::MatvecNormGluQ8_0 => Family::MatvecQuant,
            Kernel::GatherF32 | Kernel::GatherQ8_0 | Kernel::GatherQ4_1 => Family::Gather,
            Kernel::RmsNorm | Kernel::LayerNorm => Family::Norm,
            Kernel::Softmax => Family::Softmax,
            Kernel::Rope | Kernel::RopeQkv => Family::Rope,
            Kernel::SiluMul | Kernel::Gelu | Kernel::Add => Family::Activation,
            Kernel::Attention => Family::Attention,
            Kernel::MeanPoolL2 => Family::Pooling,
            Kernel::StreamRead => Family::StreamRead,
        }
    }

    pub fn entry_point(self) -> &'static str {
        match self {
            Kernel::MatmulNn | Kernel::MatmulNt => "matmul",
            Kernel::MatmulScalarNn => "matmul_scalar_nn",
            Kernel::MatmulScalarNt => "matmul_scalar_nt",
            Kernel::MatmulQ4_1 | Kernel::MatmulQ8_0 => "matmul_quant",
            Kernel::MatvecQ4_1 | Kernel::MatvecQ8_0 => "matvec_quant",
            Kernel::MatvecNormQ4_1 | Kernel::MatvecNormQ8_0 => "matvec_quant_norm",
            Kernel::MatvecNormGluQ4_1 | Kernel::MatvecNormGluQ8_0 => "matvec_quant_norm_glu",
            Kernel::GatherF32 => "gather_f32",
            Kernel::GatherQ8_0 | Kernel::GatherQ4_1 => "gather_quant",
            Kernel::RmsNorm => "rms_norm",
            Kernel::LayerNorm => "layer_norm",
            Kernel::Softmax => "softmax",
            Kernel::Rope => "rope",
            Kernel::RopeQkv => "rope_qkv",
            Kernel::SiluMul => "silu_mul",
            Kernel::Gelu => "gelu",
            Kernel::Add => "add",
            Kernel::Attention => "attention",
            Kernel::MeanPoolL2 => "mean_pool_l2",
            Kernel::StreamRead => "stream_read",
        }
    }

    /// Values for the entry point's pipeline-overridable constants: the variants of one entry
    /// point (B's layout, the block format) are compiled as separate pipelines.
    pub fn constants(self) -> &'static [(&'static str, f64)] {
        // `FORMAT_Q4_1` and `FORMAT_Q8_0` in `quant.wgsl`.
        const Q4_1: &[(&str, f64)] = &[("FORMAT", 0.0)];
        const Q8_0: &[(&str, f64)] = &[("FORMAT", 1.0)];
        match self {
            Kernel::MatmulNn => &[("TRANSPOSED_B", 0.0)],
            Kernel::MatmulNt => &[("TRANSPOSED_B", 1.0)],
            Kernel::MatmulQ4_1 | Kernel::MatvecQ4_1 | Kernel::MatvecNormQ4_1 | Kernel::MatvecNormGluQ4_1 | Kernel::GatherQ4_1 => Q4_1,
            Kernel::MatmulQ8_0 | Kernel::MatvecQ8_0 | Kernel::MatvecNormQ8_0 | Kernel::MatvecNormGluQ8_0 | Kernel::GatherQ8_0 => Q8_0,
            _ => &[],
        }
    }

    /// The storage bindings, in the order ops pass their tensors.
    pub fn bindings(self) -> &'static [(u32, Access)] {
        match self {
            Kernel::MatmulNn
            | Kernel::MatmulNt
            | Kernel::MatmulScalarNn
            | Kernel::MatmulScalarNt
            | Kernel::MatmulQ4_1
            | Kernel::MatmulQ8_0
            | Kernel::LayerNorm => &[(1, Read), (2, Read), (3, Read), (4, ReadWrite)],
            // x, w, bias, norm weight, y: the matvec kernels share helpers, and with them every
            // binding the helpers touch (an unused one gets any read-only buffer).
            Kernel::MatvecQ4_1 | Kernel::MatvecQ8_0 | Kernel::MatvecNormQ4_1 | Kernel::MatvecNormQ8_0 => {
                &[(1, Read), (2, Read), (3, Read), (5, Read), (4, ReadWrite)]
            }
            // x, gate, up, bias, norm weight, y.
            Kernel::MatvecNormGluQ4_1 | Kernel::MatvecNormGluQ8_0 => &[(1, Read), (2, Read), (6, Read), (3, Read), (5, Read), (4, ReadWrite)],
            Kernel::RmsNorm => &[(1, Read), (2, Read), (4, ReadWrite)],
            Kernel::GatherF32 => &[(1, Read), (2, Read), (4, ReadWrite)],
            Kernel::GatherQ8_0 | Kernel::GatherQ4_1 => &[(1, Read), (3, Read), (4, ReadWrite)],
            Kernel::Softmax => &[(1, ReadWrite)],
            Kernel::Rope => &[(1, Read), (2, ReadWrite)],
            Kernel::RopeQkv => &[(1, Read), (3, Read), (4, ReadWrite), (5, ReadWrite), (6, ReadWrite)],
            Kernel::SiluMul | Kernel::Add => &[(1, Read), (2, Read), (3, ReadWrite)],
            Kernel::Gelu => &[(1, Read), (3, ReadWrite)],
            Kernel::Attention => &[(1, Read), (2, Read), (3, Read), (4, Read), (5, ReadWrite)],
            Kernel::MeanPoolL2 => &[(1, Read), (2, Read), (3, ReadWrite)],
            Kernel::StreamRead => &[(1, Read), (2, ReadWrite)],
        }
    }
}

/// A compiled kernel: its pipeline and the layout its bind groups follow.
#[derive(Debug)]
pub(crate) struct Compiled {
    pub(crate) pipeline: wgpu::ComputePipeline,
    pub(crate) layout: wgpu::BindGroupLayout,
}

/// Compiles each family's module and each kernel's pipeline once, on first use.
pub(crate) struct PipelineCache {
    device: wgpu::Device,
    modules: Mutex<HashMap<Family, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<Kernel, Arc<Compiled>>>,
}

impl PipelineCache {
    pub(crate) fn new(device: wgpu::Device) -> PipelineCache {
        PipelineCache { device, modules: Mutex::default(), pipelines: Mutex::default() }
    }

    pub(crate) fn get(&self, kernel: Kernel) -> Arc<Compiled> {
        let mut pipelines = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        pipelines.entry(kernel).or_insert_with(|| Arc::new(self.compile(kernel))).clone()
    }

    fn compile(&self, kernel: Kernel) -> Compiled {
        let module = {
            let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            let family = kernel.family();
            modules
                .entry(family)
                .or_insert_with(|| {
                    self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some(family.name()),
                        source: wgpu::ShaderSource::Wgsl(Cow::Owned(family.source())),
                    })
                })
                .clone()
        };
        let mut entries = vec![buffer_entry(0, wgpu::BufferBindingType::Uniform)];
        entries.extend(kernel.bindings().iter().map(|&(binding, access)| {
            buffer_entry(binding, wgpu::BufferBindingType::Storage { read_only: access == Read })
        }));
        let layout = self.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(kernel.entry_point()),
            entries: &entries,
        });
        let pipeline_layout = self.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(kernel.entry_point()),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(kernel.entry_point()),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some(kernel.entry_point()),
            // Every kernel writes its workgroup memory before reading it.
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: kernel.constants(),
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        Compiled { pipeline, layout }
    }
}

fn buffer_entry(binding: u32, ty: wgpu::BufferBindingType) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer { ty, has_dynamic_offset: false, min_binding_size: None },
        count: None,
    }
}
