// f32 matrix multiply, vec4 path: needs K and N to be multiples of 4 (`matmul_scalar.wgsl` covers
// the rest). `matmul_nn`: B is [K, N]. `matmul_nt`: B is [N, K] (a linear layer's weight).

@group(0) @binding(2) var<storage, read> b: array<vec4<f32>>;

@compute @workgroup_size(16, 16)
fn matmul_nn(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let t = lid.y * 16u + lid.x;
    let m0 = wid.y * TILE_M;
    let n0 = wid.x * TILE_N;
    let n4 = p.n / 4u;
    var acc = Accumulators(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    for (var k0 = 0u; k0 < p.k; k0 = k0 + TILE_K) {
        load_tile_a(t, m0, k0);
        for (var i = 0u; i < 2u; i = i + 1u) {
            let slot = t + i * 256u;
            let row = k0 + slot / 16u;
            let col4 = n0 / 4u + slot % 16u;
            var v = vec4<f32>(0.0);
            if (row < p.k && col4 < n4) {
                v = b[row * n4 + col4];
            }
            tile_b[slot] = v;
        }
        workgroupBarrier();
        acc = multiply_tiles(acc, lid.x, lid.y);
        workgroupBarrier();
    }
    store_tile(acc, m0, n0, lid.x, lid.y);
}

@compute @workgroup_size(16, 16)
fn matmul_nt(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let t = lid.y * 16u + lid.x;
    let m0 = wid.y * TILE_M;
    let n0 = wid.x * TILE_N;
    let k4 = p.k / 4u;
    var acc = Accumulators(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    for (var k0 = 0u; k0 < p.k; k0 = k0 + TILE_K) {
        load_tile_a(t, m0, k0);
        // B's tile arrives as [TILE_N][TILE_K / 4] and is stored transposed.
        for (var i = 0u; i < 2u; i = i + 1u) {
            let slot = t + i * 256u;
            let n_local = slot / 8u;
            let kq = slot % 8u;
            let row = n0 + n_local;
            var v = vec4<f32>(0.0);
            if (row < p.n && k0 / 4u + kq < k4) {
                v = b[row * k4 + k0 / 4u + kq];
            }
            let col4 = n_local / 4u;
            let lane = n_local % 4u;
            tile_b[(kq * 4u + 0u) * 16u + col4][lane] = v.x;
            tile_b[(kq * 4u + 1u) * 16u + col4][lane] = v.y;
            tile_b[(kq * 4u + 2u) * 16u + col4][lane] = v.z;
            tile_b[(kq * 4u + 3u) * 16u + col4][lane] = v.w;
        }
        workgroupBarrier();
        acc = multiply_tiles(acc, lid.x, lid.y);
        workgroupBarrier();
    }
    store_tile(acc, m0, n0, lid.x, lid.y);
}
