// Embedding lookup: out[t, :] = table[ids[t], :], from an f32 table [vocab, dim] (`gather_f32`) or
// a Q4_1 or Q8_0 one (`gather_quant`, `FORMAT`).
// One invocation per output element. An id outside the table yields a zero row (the host checks
// ids before they get here; this only keeps reads in bounds).

override FORMAT: u32;

struct Params {
    tokens: u32,
    dim: u32,
    vocab: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> table: array<f32>;
@group(0) @binding(3) var<storage, read> table_q: array<u32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

struct Element {
    valid: bool,
    token: u32,
    id: u32,
    column: u32,
}

fn element(lid: u32, wid: vec3<u32>, nwg: vec3<u32>) -> Element {
    let index = linear_workgroup(wid, nwg) * 256u + lid;
    var e = Element(false, 0u, 0u, 0u);
    if (index < p.tokens * p.dim) {
        e.valid = true;
        e.token = index / p.dim;
        e.column = index % p.dim;
        e.id = ids[e.token];
    }
    return e;
}

@compute @workgroup_size(256)
fn gather_f32(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = element(lid, wid, nwg);
    if (e.valid) {
        var v = 0.0;
        if (e.id < p.vocab) {
            v = table[e.id * p.dim + e.column];
        }
        out[e.token * p.dim + e.column] = v;
    }
}

@compute @workgroup_size(256)
fn gather_quant(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = element(lid, wid, nwg);
    if (e.valid) {
        var v = 0.0;
        if (e.id < p.vocab) {
            let block = e.id * (p.dim / 32u) + e.column / 32u;
            let i = e.column % 32u;
            if (FORMAT == FORMAT_Q4_1) {
                let base = block * Q4_1_WORDS;
                let dm = unpack2x16float(table_q[base]);
                let byte = (table_q[base + 1u + (i % 16u) / 4u] >> (8u * (i % 4u))) & 0xffu;
                let q = select(byte & 0xfu, byte >> 4u, i >= 16u);
                v = dm.x * f32(q) + dm.y;
            } else {
                let base = block * Q8_0_WORDS;
                v = bitcast<f32>(table_q[base]) * signed_bytes(table_q[base + 1u + i / 4u])[i % 4u];
            }
        }
        out[e.token * p.dim + e.column] = v;
    }
}
