// Rotary position embedding, GGUF llama layout: adjacent pairs (x[2i], x[2i+1]) of each head are
// rotated by pos * base^(-2i / head_dim). In place on x [tokens, heads, head_dim]; positions [tokens].

struct Params {
    tokens: u32,
    heads: u32,
    head_dim: u32,
    // log2 of the frequency base (10000 for the original llama, 100000 for SmolLM2).
    log2_base: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> positions: array<u32>;
@group(0) @binding(2) var<storage, read_write> x: array<vec2<f32>>;

@compute @workgroup_size(256)
fn rope(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let pairs = p.head_dim / 2u;
    let index = linear_workgroup(wid, nwg) * 256u + lid;
    if (index >= p.tokens * p.heads * pairs) {
        return;
    }
    let token = index / (p.heads * pairs);
    let i = index % pairs;
    let inv_freq = exp2(-f32(2u * i) / f32(p.head_dim) * p.log2_base);
    let angle = f32(positions[token]) * inv_freq;
    let c = cos(angle);
    let s = sin(angle);
    let v = x[index];
    x[index] = vec2<f32>(v.x * c - v.y * s, v.x * s + v.y * c);
}
