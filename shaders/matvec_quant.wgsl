// Quantized matrix-vector product for one row of activations (the decode step):
// y[N] = W[N, K] · x[K] (+ bias) (or y += ...), W in Q4_1 or Q8_0 blocks (see `quant.wgsl`).
//
// Memory-bound: each workgroup of 256 takes 8 weight rows, 32 invocations per row. Neighbouring
// invocations read neighbouring words of a block, so reads are contiguous; the 32 partial sums of
// a row are then added in workgroup memory.

struct Params {
    n: u32,
    k: u32,
    // bit 0: add `bias`; bit 1: accumulate into `y`.
    flags: u32,
    _pad: u32,
}

const FLAG_BIAS: u32 = 1u;
const FLAG_ACCUMULATE: u32 = 2u;
const ROWS_PER_WORKGROUP: u32 = 8u;
const LANES_PER_ROW: u32 = 32u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

var<workgroup> partial: array<f32, 256>;

fn finish_row(lid: u32, row: u32, sum: f32) {
    partial[lid] = sum;
    workgroupBarrier();
    let lane = lid % LANES_PER_ROW;
    for (var stride = LANES_PER_ROW / 2u; stride > 0u; stride = stride / 2u) {
        if (lane < stride) {
            partial[lid] = partial[lid] + partial[lid + stride];
        }
        workgroupBarrier();
    }
    if (lane == 0u && row < p.n) {
        var v = partial[lid];
        if ((p.flags & FLAG_BIAS) != 0u) {
            v = v + bias[row];
        }
        if ((p.flags & FLAG_ACCUMULATE) != 0u) {
            v = v + y[row];
        }
        y[row] = v;
    }
}

@compute @workgroup_size(256)
fn matvec_q4_1(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let row = linear_workgroup(wid, nwg) * ROWS_PER_WORKGROUP + lid / LANES_PER_ROW;
    let lane = lid % LANES_PER_ROW;
    let j = lane % 4u;
    let blocks = p.k / 32u;
    var sum = 0.0;
    if (row < p.n) {
        // Eight blocks in flight per row, four words each.
        for (var block = lane / 4u; block < blocks; block = block + 8u) {
            let base = (row * blocks + block) * Q4_1_WORDS;
            let dm = unpack2x16float(w[base]);
            let q = w[base + 1u + j];
            let x_low = x[block * 8u + j];
            let x_high = x[block * 8u + 4u + j];
            let dot_q = dot(nibbles_low(q), x_low) + dot(nibbles_high(q), x_high);
            let sum_x = dot(x_low + x_high, vec4<f32>(1.0));
            sum = sum + dm.x * dot_q + dm.y * sum_x;
        }
    }
    finish_row(lid, row, sum);
}

@compute @workgroup_size(256)
fn matvec_q8_0(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let row = linear_workgroup(wid, nwg) * ROWS_PER_WORKGROUP + lid / LANES_PER_ROW;
    let lane = lid % LANES_PER_ROW;
    let j = lane % 8u;
    let blocks = p.k / 32u;
    var sum = 0.0;
    if (row < p.n) {
        // Four blocks in flight per row, eight words each.
        for (var block = lane / 8u; block < blocks; block = block + 4u) {
            let base = (row * blocks + block) * Q8_0_WORDS;
            let q = signed_bytes(w[base + 1u + j]);
            sum = sum + bitcast<f32>(w[base]) * dot(q, x[block * 8u + j]);
        }
    }
    finish_row(lid, row, sum);
}
