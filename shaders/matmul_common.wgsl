// The tiled f32 multiply shared by `matmul.wgsl` and `matmul_quant.wgsl`.
//
// C[M, N] = A[M, K] · B (+ bias[N]) (or C += ...). The including file defines
// `load_tile_b(t, n0, k0)`, which fills `tile_b` (row-major f32, transposed f32, or dequantized
// blocks), and an entry point that calls `multiply_matrices`. Each 16x16 workgroup computes a
// 128x64 tile of C; each invocation owns an 8x4 block held in eight named vec4 accumulators, so
// every value read from workgroup memory feeds 4 or 8 multiply-adds. K advances 16 at a time
// through workgroup memory; A and B are read as vec4.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    // bit 0: add `bias`; bit 1: accumulate into `c` instead of overwriting it.
    flags: u32,
}

const FLAG_BIAS: u32 = 1u;
const FLAG_ACCUMULATE: u32 = 2u;

const TILE_M: u32 = 128u;
const TILE_N: u32 = 64u;
const TILE_K: u32 = 16u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> bias: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> c: array<vec4<f32>>;

// A's tile, [TILE_M][TILE_K / 4]: row-major with K packed in vec4.
var<workgroup> tile_a: array<vec4<f32>, 512>;
// B's tile, [TILE_K][TILE_N / 4]: row-major with N packed in vec4.
var<workgroup> tile_b: array<vec4<f32>, 256>;

struct Accumulators {
    r0: vec4<f32>,
    r1: vec4<f32>,
    r2: vec4<f32>,
    r3: vec4<f32>,
    r4: vec4<f32>,
    r5: vec4<f32>,
    r6: vec4<f32>,
    r7: vec4<f32>,
}

// Loads A's tile: 512 vec4, two per invocation; zero outside the matrix.
fn load_tile_a(t: u32, m0: u32, k0: u32) {
    let k4 = p.k / 4u;
    for (var i = 0u; i < 2u; i = i + 1u) {
        let slot = t + i * 256u;
        let row = m0 + slot / 4u;
        let kq = k0 / 4u + slot % 4u;
        var v = vec4<f32>(0.0);
        if (row < p.m && kq < k4) {
            v = a[row * k4 + kq];
        }
        tile_a[slot] = v;
    }
}

// One row of A's tile times B's tile, added to `acc`.
fn row_times_tile(acc: vec4<f32>, a_row: vec4<f32>, b0: vec4<f32>, b1: vec4<f32>, b2: vec4<f32>, b3: vec4<f32>) -> vec4<f32> {
    return fma(vec4<f32>(a_row.x), b0, fma(vec4<f32>(a_row.y), b1, fma(vec4<f32>(a_row.z), b2, fma(vec4<f32>(a_row.w), b3, acc))));
}

fn multiply_tiles(acc_in: Accumulators, tx: u32, ty: u32) -> Accumulators {
    var acc = acc_in;
    for (var kq = 0u; kq < TILE_K / 4u; kq = kq + 1u) {
        let b0 = tile_b[(kq * 4u + 0u) * 16u + tx];
        let b1 = tile_b[(kq * 4u + 1u) * 16u + tx];
        let b2 = tile_b[(kq * 4u + 2u) * 16u + tx];
        let b3 = tile_b[(kq * 4u + 3u) * 16u + tx];
        let row = ty * 8u * (TILE_K / 4u) + kq;
        acc.r0 = row_times_tile(acc.r0, tile_a[row + 0u * (TILE_K / 4u)], b0, b1, b2, b3);
        acc.r1 = row_times_tile(acc.r1, tile_a[row + 1u * (TILE_K / 4u)], b0, b1, b2, b3);
        acc.r2 = row_times_tile(acc.r2, tile_a[row + 2u * (TILE_K / 4u)], b0, b1, b2, b3);
        acc.r3 = row_times_tile(acc.r3, tile_a[row + 3u * (TILE_K / 4u)], b0, b1, b2, b3);
        acc.r4 = row_times_tile(acc.r4, tile_a[row + 4u * (TILE_K / 4u)], b0, b1, b2, b3);
        acc.r5 = row_times_tile(acc.r5, tile_a[row + 5u * (TILE_K / 4u)], b0, b1, b2, b3);
        acc.r6 = row_times_tile(acc.r6, tile_a[row + 6u * (TILE_K / 4u)], b0, b1, b2, b3);
        acc.r7 = row_times_tile(acc.r7, tile_a[row + 7u * (TILE_K / 4u)], b0, b1, b2, b3);
    }
    return acc;
}

fn store_row(row: u32, col4: u32, value: vec4<f32>) {
    let n4 = p.n / 4u;
    if (row < p.m && col4 < n4) {
        var v = value;
        if ((p.flags & FLAG_BIAS) != 0u) {
            v = v + bias[col4];
        }
        let index = row * n4 + col4;
        if ((p.flags & FLAG_ACCUMULATE) != 0u) {
            v = v + c[index];
        }
        c[index] = v;
    }
}

fn store_tile(acc: Accumulators, m0: u32, n0: u32, tx: u32, ty: u32) {
    let row = m0 + ty * 8u;
    let col4 = n0 / 4u + tx;
    store_row(row + 0u, col4, acc.r0);
    store_row(row + 1u, col4, acc.r1);
    store_row(row + 2u, col4, acc.r2);
    store_row(row + 3u, col4, acc.r3);
    store_row(row + 4u, col4, acc.r4);
    store_row(row + 5u, col4, acc.r5);
    store_row(row + 6u, col4, acc.r6);
    store_row(row + 7u, col4, acc.r7);
}

// The whole kernel: walk K a tile at a time, then store this workgroup's tile of C.
fn multiply_matrices(lid: vec3<u32>, wid: vec3<u32>) {
    let t = lid.y * 16u + lid.x;
    let m0 = wid.y * TILE_M;
    let n0 = wid.x * TILE_N;
    let zero = vec4<f32>(0.0);
    var acc = Accumulators(zero, zero, zero, zero, zero, zero, zero, zero);
    // Invocations whose eight rows all lie below the matrix only help load the tiles: a prompt
    // of a few dozen rows leaves most of a 128-row tile empty, and skipping its multiply-adds
    // (a branch uniform over each group of 16 invocations) makes the work follow M.
    let rows_here = m0 + lid.y * 8u < p.m;
    for (var k0 = 0u; k0 < p.k; k0 = k0 + TILE_K) {
        load_tile_a(t, m0, k0);
        load_tile_b(t, n0, k0);
        workgroupBarrier();
        if (rows_here) {
            acc = multiply_tiles(acc, lid.x, lid.y);
        }
        workgroupBarrier();
    }
    store_tile(acc, m0, n0, lid.x, lid.y);
}

// Stores four values of B[n][k..k+4] into `tile_b`, which is [k][n].
fn store_b_column(n_local: u32, k_local: u32, v: vec4<f32>) {
    let col4 = n_local / 4u;
    let lane = n_local % 4u;
    tile_b[(k_local + 0u) * 16u + col4][lane] = v.x;
    tile_b[(k_local + 1u) * 16u + col4][lane] = v.y;
    tile_b[(k_local + 2u) * 16u + col4][lane] = v.z;
    tile_b[(k_local + 3u) * 16u + col4][lane] = v.w;
}
