// f32 matrix multiply for shapes the vec4 path cannot read (K or N not a multiple of 4).
// 16x16 tiles, one output per invocation. Same parameters and flags as `matmul_common.wgsl`.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    flags: u32,
}

const FLAG_BIAS: u32 = 1u;
const FLAG_ACCUMULATE: u32 = 2u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;

var<workgroup> tile_a: array<array<f32, 16>, 16>;
var<workgroup> tile_b: array<array<f32, 16>, 16>;

fn store(row: u32, col: u32, sum: f32) {
    if (row < p.m && col < p.n) {
        var v = sum;
        if ((p.flags & FLAG_BIAS) != 0u) {
            v = v + bias[col];
        }
        if ((p.flags & FLAG_ACCUMULATE) != 0u) {
            v = v + c[row * p.n + col];
        }
        c[row * p.n + col] = v;
    }
}

fn multiply(lid: vec3<u32>) -> f32 {
    var sum = 0.0;
    for (var kk = 0u; kk < 16u; kk = kk + 1u) {
        sum = fma(tile_a[lid.y][kk], tile_b[kk][lid.x], sum);
    }
    return sum;
}

fn load_a(lid: vec3<u32>, row: u32, k0: u32) {
    var v = 0.0;
    if (row < p.m && k0 + lid.x < p.k) {
        v = a[row * p.k + k0 + lid.x];
    }
    tile_a[lid.y][lid.x] = v;
}

@compute @workgroup_size(16, 16)
fn matmul_scalar_nn(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let row = wid.y * 16u + lid.y;
    let col = wid.x * 16u + lid.x;
    var sum = 0.0;
    for (var k0 = 0u; k0 < p.k; k0 = k0 + 16u) {
        load_a(lid, row, k0);
        var v = 0.0;
        if (k0 + lid.y < p.k && col < p.n) {
            v = b[(k0 + lid.y) * p.n + col];
        }
        tile_b[lid.y][lid.x] = v;
        workgroupBarrier();
        sum = sum + multiply(lid);
        workgroupBarrier();
    }
    store(row, col, sum);
}

@compute @workgroup_size(16, 16)
fn matmul_scalar_nt(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let row = wid.y * 16u + lid.y;
    let col = wid.x * 16u + lid.x;
    // The invocation at (x, y) loads B[n = tile column y][k = x], stored as tile_b[k][n].
    let b_row = wid.x * 16u + lid.y;
    var sum = 0.0;
    for (var k0 = 0u; k0 < p.k; k0 = k0 + 16u) {
        load_a(lid, row, k0);
        var v = 0.0;
        if (k0 + lid.x < p.k && b_row < p.n) {
            v = b[b_row * p.k + k0 + lid.x];
        }
        tile_b[lid.x][lid.y] = v;
        workgroupBarrier();
        sum = sum + multiply(lid);
        workgroupBarrier();
    }
    store(row, col, sum);
}
