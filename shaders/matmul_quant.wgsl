// Quantized linear layer for several rows at once (prefill, batches): C[M, N] = A[M, K] · W[N, K]^T,
// W in Q4_1 or Q8_0 blocks (`FORMAT`, see `quant.wgsl`). Each K step of 32 is exactly one block
// per weight row; the block is dequantized into workgroup memory and multiplied as in f32.

override FORMAT: u32;

@group(0) @binding(2) var<storage, read> w: array<u32>;

fn load_tile_b(t: u32, n0: u32, k0: u32) {
    let block = k0 / 32u;
    let blocks_per_row = p.k / 32u;
    if (FORMAT == FORMAT_Q4_1) {
        // 64 rows x 4 nibble words: one word (eight weights) per invocation.
        let n_local = t / 4u;
        let j = t % 4u;
        var low = vec4<f32>(0.0);
        var high = vec4<f32>(0.0);
        if (n0 + n_local < p.n) {
            let base = ((n0 + n_local) * blocks_per_row + block) * Q4_1_WORDS;
            let dm = unpack2x16float(w[base]);
            let q = w[base + 1u + j];
            low = fma(nibbles_low(q), vec4<f32>(dm.x), vec4<f32>(dm.y));
            high = fma(nibbles_high(q), vec4<f32>(dm.x), vec4<f32>(dm.y));
        }
        store_b_column(n_local, j * 4u, low);
        store_b_column(n_local, 16u + j * 4u, high);
    } else {
        // 64 rows x 8 byte words: two words (eight weights) per invocation.
        for (var i = 0u; i < 2u; i = i + 1u) {
            let slot = t + i * 256u;
            let n_local = slot / 8u;
            let j = slot % 8u;
            var v = vec4<f32>(0.0);
            if (n0 + n_local < p.n) {
                let base = ((n0 + n_local) * blocks_per_row + block) * Q8_0_WORDS;
                v = signed_bytes(w[base + 1u + j]) * bitcast<f32>(w[base]);
            }
            store_b_column(n_local, j * 4u, v);
        }
    }
}

@compute @workgroup_size(16, 16)
fn matmul_quant(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    multiply_matrices(lid, wid);
}
