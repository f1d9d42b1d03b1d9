// Element-wise kernels, one invocation per element.
// `silu_mul`: out = silu(a) * b (llama's gated MLP).  `gelu`: out = gelu(a), exact (erf) form.
// `add`: out = a + b (the residual stream).

struct Params {
    len: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn element_index(lid: u32, wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return linear_workgroup(wid, nwg) * 256u + lid;
}

// erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7, under f32 rounding here).
fn erf(v: f32) -> f32 {
    let z = abs(v);
    let t = 1.0 / fma(0.3275911, z, 1.0);
    let poly = t * fma(t, fma(t, fma(t, fma(t, 1.061405429, -1.453152027), 1.421413741), -0.284496736), 0.254829592);
    return sign(v) * (1.0 - poly * exp(-z * z));
}

@compute @workgroup_size(256)
fn silu_mul(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = element_index(lid, wid, nwg);
    if (i < p.len) {
        let g = a[i];
        out[i] = g / (1.0 + exp(-g)) * b[i];
    }
}

@compute @workgroup_size(256)
fn gelu(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = element_index(lid, wid, nwg);
    if (i < p.len) {
        let v = a[i];
        out[i] = 0.5 * v * (1.0 + erf(v * 0.70710678118654752));
    }
}

@compute @workgroup_size(256)
fn add(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = element_index(lid, wid, nwg);
    if (i < p.len) {
        out[i] = a[i] + b[i];
    }
}
