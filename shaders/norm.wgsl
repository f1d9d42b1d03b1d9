// Row normalisation, one workgroup per row of x [rows, dim].
// `rms_norm`:   y = x / sqrt(mean(x^2) + eps) * weight
// `layer_norm`: y = (x - mean) / sqrt(var + eps) * weight + bias   (two passes, for accuracy)

struct Params {
    rows: u32,
    dim: u32,
    eps: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(256)
fn rms_norm(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = linear_workgroup(wid, nwg);
    if (row >= p.rows) {
        return;
    }
    let base = row * p.dim;
    var squares = 0.0;
    for (var i = lid; i < p.dim; i = i + 256u) {
        let v = x[base + i];
        squares = fma(v, v, squares);
    }
    let scale = inverseSqrt(reduce_sum(lid, squares) / f32(p.dim) + p.eps);
    for (var i = lid; i < p.dim; i = i + 256u) {
        y[base + i] = x[base + i] * scale * weight[i];
    }
}

@compute @workgroup_size(256)
fn layer_norm(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = linear_workgroup(wid, nwg);
    if (row >= p.rows) {
        return;
    }
    let base = row * p.dim;
    var sum = 0.0;
    for (var i = lid; i < p.dim; i = i + 256u) {
        sum = sum + x[base + i];
    }
    let mean = reduce_sum(lid, sum) / f32(p.dim);
    var squares = 0.0;
    for (var i = lid; i < p.dim; i = i + 256u) {
        let d = x[base + i] - mean;
        squares = fma(d, d, squares);
    }
    let scale = inverseSqrt(reduce_sum(lid, squares) / f32(p.dim) + p.eps);
    for (var i = lid; i < p.dim; i = i + 256u) {
        y[base + i] = fma((x[base + i] - mean) * scale, weight[i], bias[i]);
    }
}
