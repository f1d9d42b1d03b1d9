// Helpers prepended to every kernel family.

// Kernels are dispatched on a 2D grid when one dimension would exceed the adapter's
// per-dimension workgroup limit; this gives each workgroup its linear index.
fn linear_workgroup(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}
