// Quantized linear layer for several rows at once (prefill, batches): C[M, N] = A[M, K] · W[N, K]^T,
// W in Q4_1 or Q8_0 blocks (`FORMAT`, see `quant.wgsl`). Each K step of 16 is half a block per
// weight row; it is dequantized into workgroup memory and multiplied as in f32.

override FORMAT: u32;

@group(0) @binding(2) var<storage, read> w: array<u32>;

// Each K step of 16 is half a block: 64 rows x 4 words, one word (four weights) per invocation.
fn load_tile_b(t: u32, n0: u32, k0: u32) {
    let block = k0 / 32u;
    let high_half = (k0 % 32u) != 0u;
    let blocks_per_row = p.k / 32u;
    let n_local = t / 4u;
    let j = t % 4u;
    var v = vec4<f32>(0.0);
    if (n0 + n_local < p.n) {
        let row_block = (n0 + n_local) * blocks_per_row + block;
        if (FORMAT == FORMAT_Q4_1) {
            // Weights 0..16 are the low nibbles of words 1..5, weights 16..32 the high ones.
            let base = row_block * Q4_1_WORDS;
            let dm = unpack2x16float(w[base]);
            let q = w[base + 1u + j];
            v = fma(select(nibbles_low(q), nibbles_high(q), high_half), vec4<f32>(dm.x), vec4<f32>(dm.y));
        } else {
            // Weights 0..16 are words 1..5, weights 16..32 words 5..9.
            let base = row_block * Q8_0_WORDS;
            v = signed_bytes(w[base + 1u + select(0u, 4u, high_half) + j]) * bitcast<f32>(w[base]);
        }
    }
    store_b_column(n_local, j * 4u, v);
}

@compute @workgroup_size(16, 16)
fn matmul_quant(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    multiply_matrices(lid, wid);
}
