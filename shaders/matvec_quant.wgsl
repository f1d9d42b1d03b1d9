// Quantized matrix-vector product for one row of activations (the decode step):
// y[N] = W[N, K] · x[K] (+ bias) (or y += ...), W in Q4_1 or Q8_0 blocks (`FORMAT`, see `quant.wgsl`).
//
// Memory-bound: each workgroup of 256 takes 128 weight rows. Neighbouring invocations read
// neighbouring words of a block, so reads are contiguous; partial sums are added in workgroup
// memory.

struct Params {
    n: u32,
    k: u32,
    // bit 0: add `bias`; bit 1: accumulate into `y`.
    flags: u32,
    _pad: u32,
}

override FORMAT: u32;

const FLAG_BIAS: u32 = 1u;
const FLAG_ACCUMULATE: u32 = 2u;
// 32 groups of 8 invocations; each group owns 4 consecutive rows, each invocation a share of
// their blocks, so every x value loaded serves 4 rows. Small groups keep the reduction short
// (3 steps), which matters most on CPU-backed adapters (lavapipe) and for short rows.
const LANES_PER_GROUP: u32 = 8u;
const ROWS_PER_GROUP: u32 = 4u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

var<workgroup> partial: array<vec4<f32>, 256>;

// Rows past the end are computed on the last row (cheaper than branching) and not written.
fn clamped_row(row: u32) -> u32 {
    return min(row, p.n - 1u);
}

// Adds up the group's 32 partial sums of its 4 rows and writes them.
fn finish_rows(lid: u32, first_row: u32, sums: vec4<f32>) {
    partial[lid] = sums;
    workgroupBarrier();
    let lane = lid % LANES_PER_GROUP;
    for (var stride = LANES_PER_GROUP / 2u; stride > 0u; stride = stride / 2u) {
        if (lane < stride) {
            partial[lid] = partial[lid] + partial[lid + stride];
        }
        workgroupBarrier();
    }
    if (lane < ROWS_PER_GROUP && first_row + lane < p.n) {
        let row = first_row + lane;
        var v = partial[lid - lane][lane];
        if ((p.flags & FLAG_BIAS) != 0u) {
            v = v + bias[row];
        }
        if ((p.flags & FLAG_ACCUMULATE) != 0u) {
            v = v + y[row];
        }
        y[row] = v;
    }
}

// This invocation's share of row `row` for the block at `block`: one word of the block against
// the matching x values (Q4_1: x_low for the low nibbles, x_high for the high ones, and their
// sum for the minimum; Q8_0: x_low).
fn row_share(row: u32, block: u32, blocks: u32, j: u32, x_low: vec4<f32>, x_high: vec4<f32>, sum_x: f32) -> f32 {
    if (FORMAT == FORMAT_Q4_1) {
        let base = (clamped_row(row) * blocks + block) * Q4_1_WORDS;
        let dm = unpack2x16float(w[base]);
        let q = w[base + 1u + j];
        return dm.x * (dot(nibbles_low(q), x_low) + dot(nibbles_high(q), x_high)) + dm.y * sum_x;
    }
    let base = (clamped_row(row) * blocks + block) * Q8_0_WORDS;
    return bitcast<f32>(w[base]) * dot(signed_bytes(w[base + 1u + j]), x_low);
}

@compute @workgroup_size(256)
fn matvec_quant(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let first_row = (linear_workgroup(wid, nwg) * (256u / LANES_PER_GROUP) + lid / LANES_PER_GROUP) * ROWS_PER_GROUP;
    let lane = lid % LANES_PER_GROUP;
    // Q4_1: four invocations per block, one nibble word each.
    // Q8_0: eight invocations per block, one word of four bytes each.
    let words = select(8u, 4u, FORMAT == FORMAT_Q4_1);
    let j = lane % words;
    let blocks = p.k / 32u;
    var sums = vec4<f32>(0.0);
    if (first_row < p.n) {
        for (var block = lane / words; block < blocks; block = block + LANES_PER_GROUP / words) {
            // Q4_1 word j holds weights 4j.. and 16+4j..; Q8_0 word j holds weights 4j...
            let x_low = x[block * 8u + j % 8u];
            var x_high = vec4<f32>(0.0);
            if (FORMAT == FORMAT_Q4_1) {
                x_high = x[block * 8u + 4u + j];
            }
            let sum_x = dot(x_low + x_high, vec4<f32>(1.0));
            sums.x = sums.x + row_share(first_row, block, blocks, j, x_low, x_high, sum_x);
            sums.y = sums.y + row_share(first_row + 1u, block, blocks, j, x_low, x_high, sum_x);
            sums.z = sums.z + row_share(first_row + 2u, block, blocks, j, x_low, x_high, sum_x);
            sums.w = sums.w + row_share(first_row + 3u, block, blocks, j, x_low, x_high, sum_x);
        }
    }
    finish_rows(lid, first_row, sums);
}
