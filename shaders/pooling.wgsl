// Sentence embeddings: the mean of each sequence's unmasked token rows, L2-normalised.
// x [batch, seq, dim], mask [batch, seq] of u32 (0 = padding) -> out [batch, dim]; one workgroup
// per sequence. A sequence with no tokens gives a zero vector.

struct Params {
    batch: u32,
    seq: u32,
    dim: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> mask: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn mean_pool_l2(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let b = linear_workgroup(wid, nwg);
    if (b >= p.batch) {
        return;
    }
    var count = 0u;
    for (var s = 0u; s < p.seq; s = s + 1u) {
        count = count + select(0u, 1u, mask[b * p.seq + s] != 0u);
    }
    let inv_count = 1.0 / f32(max(count, 1u));
    var squares = 0.0;
    for (var i = lid; i < p.dim; i = i + 256u) {
        var sum = 0.0;
        for (var s = 0u; s < p.seq; s = s + 1u) {
            if (mask[b * p.seq + s] != 0u) {
                sum = sum + x[(b * p.seq + s) * p.dim + i];
            }
        }
        let mean = sum * inv_count;
        out[b * p.dim + i] = mean;
        squares = fma(mean, mean, squares);
    }
    let norm = sqrt(reduce_sum(lid, squares));
    let inv_norm = select(0.0, 1.0 / norm, norm > 0.0);
    for (var i = lid; i < p.dim; i = i + 256u) {
        out[b * p.dim + i] = out[b * p.dim + i] * inv_norm;
    }
}
