// Scaled dot-product attention, one workgroup per (batch, query, head), over keys in chunks of 256
// with a running (online) softmax, so any context length fits in fixed workgroup memory.
//
// Layouts (row-major, head_dim a multiple of 4, at most 256):
//   q, out: [batch, queries, heads, head_dim]
//   k, v:   [batch, capacity, kv_heads, head_dim]   (a KV cache: rows past `kv_len` are ignored)
//   mask:   [batch, capacity] of u32, 0 = padding   (read only with FLAG_MASK)
// Grouped-query attention: query head h reads kv head h / (heads / kv_heads).
// With FLAG_CAUSAL, query t sits at position `past + t` and sees keys 0..=past + t.

struct Params {
    batch: u32,
    queries: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    capacity: u32,
    kv_len: u32,
    past: u32,
    scale: f32,
    flags: u32,
    _pad0: u32,
    _pad1: u32,
}

const FLAG_CAUSAL: u32 = 1u;
const FLAG_MASK: u32 = 2u;
const CHUNK: u32 = 256u;
// The lowest finite f32: masked scores, and the running maximum before any key.
const NEG_INF: f32 = -0x1.fffffep+127f;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> mask: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<vec4<f32>>;

var<workgroup> q_row: array<vec4<f32>, 64>;
var<workgroup> probs: array<f32, 256>;
var<workgroup> partial: array<vec4<f32>, 256>;

@compute @workgroup_size(256)
fn attention(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let item = linear_workgroup(wid, nwg);
    if (item >= p.batch * p.queries * p.heads) {
        return;
    }
    let h = item % p.heads;
    let t = (item / p.heads) % p.queries;
    let b = item / (p.heads * p.queries);
    let kv_h = h / (p.heads / p.kv_heads);
    let d4 = p.head_dim / 4u;
    let q_base = item * d4;
    // The row stride of k and v, in vec4, and where this (batch, kv head) starts.
    let kv_stride = p.kv_heads * d4;
    let kv_base = b * p.capacity * kv_stride + kv_h * d4;

    var limit = p.kv_len;
    if ((p.flags & FLAG_CAUSAL) != 0u) {
        limit = min(limit, p.past + t + 1u);
    }

    if (lid < d4) {
        q_row[lid] = q[q_base + lid];
    }
    workgroupBarrier();

    // Output accumulation: invocation lid owns dims quad `lid % d4` for keys `lid / d4 (mod groups)`.
    let groups = CHUNK / d4;
    let quad = lid % d4;
    let group = lid / d4;
    var acc = vec4<f32>(0.0);
    var running_max = NEG_INF;
    var running_sum = 0.0;

    for (var j0 = 0u; j0 < limit; j0 = j0 + CHUNK) {
        let j = j0 + lid;
        var score = NEG_INF;
        var visible = j < limit;
        if (visible && (p.flags & FLAG_MASK) != 0u) {
            visible = mask[b * p.capacity + j] != 0u;
        }
        if (visible) {
            var dot_qk = 0.0;
            let row = kv_base + j * kv_stride;
            for (var i = 0u; i < d4; i = i + 1u) {
                dot_qk = dot_qk + dot(q_row[i], k[row + i]);
            }
            score = dot_qk * p.scale;
        }
        let new_max = max(running_max, reduce_max(lid, score));
        var prob = 0.0;
        if (visible) {
            prob = exp(score - new_max);
        }
        probs[lid] = prob;
        let chunk_sum = reduce_sum(lid, prob);
        // Rescale what was accumulated under the old maximum (nothing yet when it was -inf).
        var correction = 0.0;
        if (running_max > NEG_INF) {
            correction = exp(running_max - new_max);
        }
        running_sum = running_sum * correction + chunk_sum;
        running_max = new_max;
        acc = acc * correction;
        if (group < groups) {
            let end = min(CHUNK, limit - j0);
            for (var i = group; i < end; i = i + groups) {
                let pr = probs[i];
                if (pr != 0.0) {
                    acc = fma(vec4<f32>(pr), v[kv_base + (j0 + i) * kv_stride + quad], acc);
                }
            }
        }
        workgroupBarrier();
    }

    partial[lid] = acc;
    workgroupBarrier();
    if (lid < d4) {
        var total = vec4<f32>(0.0);
        for (var g = 0u; g < groups; g = g + 1u) {
            total = total + partial[g * d4 + lid];
        }
        var inv = 0.0;
        if (running_sum > 0.0) {
            inv = 1.0 / running_sum;
        }
        out[q_base + lid] = total * inv;
    }
}
