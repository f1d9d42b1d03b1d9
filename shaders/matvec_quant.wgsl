// Quantized matrix-vector products for a few rows of activations (the decode step, short
// prompts), W in Q4_1 or Q8_0 blocks (`FORMAT`, see `quant.wgsl`); workgroup z is the row of x
// and y:
// `matvec_quant`:          y[N] = W[N, K] · x[K] (+ bias) (or y += ...)
// `matvec_quant_norm`:     the same with x RMS-normalised first: x / rms(x) * norm (or y += ...)
// `matvec_quant_norm_glu`: y = silu(W_gate · x') * (W_up · x') with x' = x / rms(x) * norm
//
// Memory-bound: each workgroup of 256 takes 128 weight rows. Neighbouring invocations read
// neighbouring words of a block, so reads are contiguous; partial sums are added in workgroup
// memory. The fused forms let a decode step run a transformer block in six kernels: the
// normalisation costs each workgroup one extra pass over x (a few KiB, in cache), which is far
// cheaper than a dispatch of its own.

struct Params {
    n: u32,
    k: u32,
    // bit 0: add `bias`; bit 1: accumulate into `y`.
    flags: u32,
    // The normalisation's epsilon (the `_norm` entry points).
    eps: f32,
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
@group(0) @binding(5) var<storage, read> norm: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> w_up: array<u32>;

var<workgroup> partial: array<vec4<f32>, 256>;

// Where this invocation works: its group's first row, its lane in the group, the word of each
// block it reads (Q4_1: four invocations per block, one nibble word each; Q8_0: eight
// invocations per block, one word of four bytes each) and the first block it reads.
// `x_base` and `y_base` are where the workgroup's row of x (in vec4s) and of y start.
struct Lane {
    first_row: u32,
    lane: u32,
    j: u32,
    first_block: u32,
    block_step: u32,
    x_base: u32,
    y_base: u32,
}

fn lane_of(lid: u32, wid: vec3<u32>, nwg: vec3<u32>) -> Lane {
    let first_row = (linear_workgroup(wid, nwg) * (256u / LANES_PER_GROUP) + lid / LANES_PER_GROUP) * ROWS_PER_GROUP;
    let lane = lid % LANES_PER_GROUP;
    let words = select(8u, 4u, FORMAT == FORMAT_Q4_1);
    return Lane(first_row, lane, lane % words, lane / words, LANES_PER_GROUP / words, wid.z * (p.k / 4u), wid.z * p.n);
}

// The x values an invocation's word of `block` multiplies (Q4_1 word j holds weights 4j.. and
// 16+4j..; Q8_0 word j holds weights 4j..), and their sum for Q4_1's minimum.
struct XShare {
    low: vec4<f32>,
    high: vec4<f32>,
    sum: f32,
}

fn x_share(at: Lane, block: u32, normed: bool) -> XShare {
    let j = at.j;
    let low_index = block * 8u + j % 8u;
    var low = x[at.x_base + low_index];
    var high = vec4<f32>(0.0);
    if (FORMAT == FORMAT_Q4_1) {
        high = x[at.x_base + block * 8u + 4u + j];
    }
    if (normed) {
        low = low * norm[low_index];
        if (FORMAT == FORMAT_Q4_1) {
            high = high * norm[block * 8u + 4u + j];
        }
    }
    return XShare(low, high, dot(low + high, vec4<f32>(1.0)));
}

// One word of a block against its x values: `head` is the block's first word (scales), `q` the
// invocation's word of weights.
fn word_dot(head: u32, q: u32, xs: XShare) -> f32 {
    if (FORMAT == FORMAT_Q4_1) {
        let dm = unpack2x16float(head);
        return dm.x * (dot(nibbles_low(q), xs.low) + dot(nibbles_high(q), xs.high)) + dm.y * xs.sum;
    }
    return bitcast<f32>(head) * dot(signed_bytes(q), xs.low);
}

// The words of `row`'s `block` in a weight array start here. Rows past the end are computed on
// the last row (cheaper than branching) and not written.
fn block_base(row: u32, block: u32, blocks: u32) -> u32 {
    let words = select(Q8_0_WORDS, Q4_1_WORDS, FORMAT == FORMAT_Q4_1);
    return (min(row, p.n - 1u) * blocks + block) * words;
}

fn share_w(row: u32, block: u32, blocks: u32, j: u32, xs: XShare) -> f32 {
    let base = block_base(row, block, blocks);
    return word_dot(w[base], w[base + 1u + j], xs);
}

fn share_up(row: u32, block: u32, blocks: u32, j: u32, xs: XShare) -> f32 {
    let base = block_base(row, block, blocks);
    return word_dot(w_up[base], w_up[base + 1u + j], xs);
}

// This invocation's partial sums of W's 4 rows of its group.
fn rows_of_w(at: Lane, normed: bool) -> vec4<f32> {
    var sums = vec4<f32>(0.0);
    let blocks = p.k / 32u;
    if (at.first_row < p.n) {
        for (var block = at.first_block; block < blocks; block = block + at.block_step) {
            let xs = x_share(at, block, normed);
            sums.x = sums.x + share_w(at.first_row, block, blocks, at.j, xs);
            sums.y = sums.y + share_w(at.first_row + 1u, block, blocks, at.j, xs);
            sums.z = sums.z + share_w(at.first_row + 2u, block, blocks, at.j, xs);
            sums.w = sums.w + share_w(at.first_row + 3u, block, blocks, at.j, xs);
        }
    }
    return sums;
}

// Adds up the group's 8 partial sums of its 4 rows. Lanes 0..4 get their row's total.
fn group_total(lid: u32, sums: vec4<f32>) -> f32 {
    partial[lid] = sums;
    workgroupBarrier();
    let lane = lid % LANES_PER_GROUP;
    for (var stride = LANES_PER_GROUP / 2u; stride > 0u; stride = stride / 2u) {
        if (lane < stride) {
            partial[lid] = partial[lid] + partial[lid + stride];
        }
        workgroupBarrier();
    }
    return partial[lid - lane][lane % ROWS_PER_GROUP];
}

// Writes a row's total (lanes 0..4 of each group), with the bias and accumulation flags.
fn write_row(at: Lane, total: f32) {
    let row = at.first_row + at.lane;
    if (at.lane < ROWS_PER_GROUP && row < p.n) {
        var v = total;
        if ((p.flags & FLAG_BIAS) != 0u) {
            v = v + bias[row];
        }
        if ((p.flags & FLAG_ACCUMULATE) != 0u) {
            v = v + y[at.y_base + row];
        }
        y[at.y_base + row] = v;
    }
}

// 1 / sqrt(mean(x^2) + eps) over the workgroup's row of x, computed by the whole workgroup.
fn inverse_rms(lid: u32, wid: vec3<u32>) -> f32 {
    let base = wid.z * (p.k / 4u);
    var squares = 0.0;
    for (var i = lid; i < p.k / 4u; i = i + 256u) {
        let v = x[base + i];
        squares = squares + dot(v, v);
    }
    return inverseSqrt(reduce_sum(lid, squares) / f32(p.k) + p.eps);
}

@compute @workgroup_size(256)
fn matvec_quant(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let at = lane_of(lid, wid, nwg);
    write_row(at, group_total(lid, rows_of_w(at, false)));
}

@compute @workgroup_size(256)
fn matvec_quant_norm(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let scale = inverse_rms(lid, wid);
    let at = lane_of(lid, wid, nwg);
    // The scale is common to the whole row, so it is applied once, to the total.
    write_row(at, group_total(lid, rows_of_w(at, true)) * scale);
}

@compute @workgroup_size(256)
fn matvec_quant_norm_glu(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let scale = inverse_rms(lid, wid);
    let at = lane_of(lid, wid, nwg);
    var gate = vec4<f32>(0.0);
    var up = vec4<f32>(0.0);
    let blocks = p.k / 32u;
    if (at.first_row < p.n) {
        for (var block = at.first_block; block < blocks; block = block + at.block_step) {
            let xs = x_share(at, block, true);
            // Written out: CPU-backed adapters handle dynamic vector indexing poorly.
            gate.x = gate.x + share_w(at.first_row, block, blocks, at.j, xs);
            gate.y = gate.y + share_w(at.first_row + 1u, block, blocks, at.j, xs);
            gate.z = gate.z + share_w(at.first_row + 2u, block, blocks, at.j, xs);
            gate.w = gate.w + share_w(at.first_row + 3u, block, blocks, at.j, xs);
            up.x = up.x + share_up(at.first_row, block, blocks, at.j, xs);
            up.y = up.y + share_up(at.first_row + 1u, block, blocks, at.j, xs);
            up.z = up.z + share_up(at.first_row + 2u, block, blocks, at.j, xs);
            up.w = up.w + share_up(at.first_row + 3u, block, blocks, at.j, xs);
        }
    }
    let g = group_total(lid, gate) * scale;
    workgroupBarrier();
    let u = group_total(lid, up) * scale;
    write_row(at, g / (1.0 + exp(-g)) * u);
}
