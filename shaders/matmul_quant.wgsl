// Quantized linear layer for several rows at once (prefill, batches): C[M, N] = A[M, K] · W[N, K]^T,
// W in Q4_1 or Q8_0 blocks (see `quant.wgsl`). Each K step of 32 is exactly one block per
// weight row; the block is dequantized into workgroup memory and multiplied as in f32.

@group(0) @binding(2) var<storage, read> w: array<u32>;

fn store_dequantized(n_local: u32, k_local: u32, v: vec4<f32>) {
    let col4 = n_local / 4u;
    let lane = n_local % 4u;
    tile_b[(k_local + 0u) * 16u + col4][lane] = v.x;
    tile_b[(k_local + 1u) * 16u + col4][lane] = v.y;
    tile_b[(k_local + 2u) * 16u + col4][lane] = v.z;
    tile_b[(k_local + 3u) * 16u + col4][lane] = v.w;
}

@compute @workgroup_size(16, 16)
fn matmul_q4_1(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let t = lid.y * 16u + lid.x;
    let m0 = wid.y * TILE_M;
    let n0 = wid.x * TILE_N;
    let blocks_per_row = p.k / 32u;
    var acc = Accumulators(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    for (var k0 = 0u; k0 < p.k; k0 = k0 + TILE_K) {
        load_tile_a(t, m0, k0);
        // 64 rows x 4 nibble words: one word (eight weights) per invocation.
        let n_local = t / 4u;
        let j = t % 4u;
        let row = n0 + n_local;
        var low = vec4<f32>(0.0);
        var high = vec4<f32>(0.0);
        if (row < p.n) {
            let base = (row * blocks_per_row + k0 / 32u) * Q4_1_WORDS;
            let dm = unpack2x16float(w[base]);
            let q = w[base + 1u + j];
            low = fma(nibbles_low(q), vec4<f32>(dm.x), vec4<f32>(dm.y));
            high = fma(nibbles_high(q), vec4<f32>(dm.x), vec4<f32>(dm.y));
        }
        store_dequantized(n_local, j * 4u, low);
        store_dequantized(n_local, 16u + j * 4u, high);
        workgroupBarrier();
        acc = multiply_tiles(acc, lid.x, lid.y);
        workgroupBarrier();
    }
    store_tile(acc, m0, n0, lid.x, lid.y);
}

@compute @workgroup_size(16, 16)
fn matmul_q8_0(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let t = lid.y * 16u + lid.x;
    let m0 = wid.y * TILE_M;
    let n0 = wid.x * TILE_N;
    let blocks_per_row = p.k / 32u;
    var acc = Accumulators(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    for (var k0 = 0u; k0 < p.k; k0 = k0 + TILE_K) {
        load_tile_a(t, m0, k0);
        // 64 rows x 8 byte words: two words (eight weights) per invocation.
        for (var i = 0u; i < 2u; i = i + 1u) {
            let slot = t + i * 256u;
            let n_local = slot / 8u;
            let j = slot % 8u;
            let row = n0 + n_local;
            var v = vec4<f32>(0.0);
            if (row < p.n) {
                let base = (row * blocks_per_row + k0 / 32u) * Q8_0_WORDS;
                v = signed_bytes(w[base + 1u + j]) * bitcast<f32>(w[base]);
            }
            store_dequantized(n_local, j * 4u, v);
        }
        workgroupBarrier();
        acc = multiply_tiles(acc, lid.x, lid.y);
        workgroupBarrier();
    }
    store_tile(acc, m0, n0, lid.x, lid.y);
}
