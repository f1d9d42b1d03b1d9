// f32 matrix multiply, vec4 path: needs K and N to be multiples of 4 (`matmul_scalar.wgsl` covers
// the rest). B is [K, N], or [N, K] (a linear layer's weight) when `TRANSPOSED_B` is set.

override TRANSPOSED_B: bool;

@group(0) @binding(2) var<storage, read> b: array<vec4<f32>>;

fn load_tile_b(t: u32, n0: u32, k0: u32) {
    // 256 vec4, one per invocation.
    if (TRANSPOSED_B) {
        // [TILE_N][TILE_K / 4] from B's rows, stored transposed.
        let n_local = t / 4u;
        let kq = k0 / 4u + t % 4u;
        var v = vec4<f32>(0.0);
        if (n0 + n_local < p.n && kq < p.k / 4u) {
            v = b[(n0 + n_local) * (p.k / 4u) + kq];
        }
        store_b_column(n_local, (t % 4u) * 4u, v);
    } else {
        // [TILE_K][TILE_N / 4] straight from B's rows.
        let row = k0 + t / 16u;
        let col4 = n0 / 4u + t % 16u;
        var v = vec4<f32>(0.0);
        if (row < p.k && col4 < p.n / 4u) {
            v = b[row * (p.n / 4u) + col4];
        }
        tile_b[t] = v;
    }
}

@compute @workgroup_size(16, 16)
fn matmul(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    multiply_matrices(lid, wid);
}
