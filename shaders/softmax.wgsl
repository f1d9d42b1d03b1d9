// Numerically stable softmax over each row of x [rows, dim], in place; one workgroup per row.

struct Params {
    rows: u32,
    dim: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(256)
fn softmax(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = linear_workgroup(wid, nwg);
    if (row >= p.rows) {
        return;
    }
    let base = row * p.dim;
    var largest = -0x1.fffffep+127f;
    for (var i = lid; i < p.dim; i = i + 256u) {
        largest = max(largest, x[base + i]);
    }
    let row_max = reduce_max(lid, largest);
    var sum = 0.0;
    for (var i = lid; i < p.dim; i = i + 256u) {
        let e = exp(x[base + i] - row_max);
        x[base + i] = e;
        sum = sum + e;
    }
    let inv = 1.0 / reduce_sum(lid, sum);
    for (var i = lid; i < p.dim; i = i + 256u) {
        x[base + i] = x[base + i] * inv;
    }
}
