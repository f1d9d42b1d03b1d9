// Rotary position embedding, GGUF llama layout: adjacent pairs (x[2i], x[2i+1]) of each head are
// rotated by pos * base^(-2i / head_dim).
// `rope`:     in place on x [tokens, heads, head_dim]; positions [tokens].
// `rope_qkv`: splits a fused projection qkv [tokens, (heads + 2 kv_heads) * head_dim] (each
//             token's q heads, then its k heads, then its v heads): q is rotated into
//             q [tokens, heads, head_dim]; k rotated and v copied into the KV caches
//             [capacity, kv_heads, head_dim] at rows past..past + tokens. One kernel for what
//             would otherwise be two rotations and two copies per block.

struct Params {
    tokens: u32,
    heads: u32,
    head_dim: u32,
    // log2 of the frequency base (10000 for the original llama, 100000 for SmolLM2).
    log2_base: f32,
    // `rope_qkv` only.
    kv_heads: u32,
    past: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> positions: array<u32>;
@group(0) @binding(2) var<storage, read_write> x: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read> qkv: array<vec2<f32>>;
@group(0) @binding(4) var<storage, read_write> q: array<vec2<f32>>;
@group(0) @binding(5) var<storage, read_write> k_cache: array<vec2<f32>>;
@group(0) @binding(6) var<storage, read_write> v_cache: array<vec2<f32>>;

// Pair `i` of a head, rotated for position `pos`.
fn rotate(v: vec2<f32>, pos: u32, i: u32) -> vec2<f32> {
    let inv_freq = exp2(-f32(2u * i) / f32(p.head_dim) * p.log2_base);
    let angle = f32(pos) * inv_freq;
    let c = cos(angle);
    let s = sin(angle);
    return vec2<f32>(v.x * c - v.y * s, v.x * s + v.y * c);
}

@compute @workgroup_size(256)
fn rope(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let pairs = p.head_dim / 2u;
    let index = linear_workgroup(wid, nwg) * 256u + lid;
    if (index >= p.tokens * p.heads * pairs) {
        return;
    }
    let token = index / (p.heads * pairs);
    x[index] = rotate(x[index], positions[token], index % pairs);
}

@compute @workgroup_size(256)
fn rope_qkv(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let pairs = p.head_dim / 2u;
    let row_pairs = (p.heads + 2u * p.kv_heads) * pairs;
    let index = linear_workgroup(wid, nwg) * 256u + lid;
    if (index >= p.tokens * row_pairs) {
        return;
    }
    let token = index / row_pairs;
    // The pair's place in its token's row, and where each part starts in it.
    let within = index % row_pairs;
    let k_start = p.heads * pairs;
    let v_start = k_start + p.kv_heads * pairs;
    let cache_row = (p.past + token) * p.kv_heads * pairs;
    let v = qkv[index];
    if (within >= v_start) {
        v_cache[cache_row + within - v_start] = v;
        return;
    }
    let rotated = rotate(v, positions[token], within % pairs);
    if (within < k_start) {
        q[token * k_start + within] = rotated;
    } else {
        k_cache[cache_row + within - k_start] = rotated;
    }
}
