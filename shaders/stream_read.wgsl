// The adapter's read bandwidth, for the benchmark: every invocation streams vec4s with a
// grid-sized stride and each workgroup writes one sum, so nothing can be optimised away.

struct Params {
    len: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> data: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> sums: array<f32>;

@compute @workgroup_size(256)
fn stream_read(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let group = linear_workgroup(wid, nwg);
    let stride = nwg.x * nwg.y * 256u;
    var acc = vec4<f32>(0.0);
    for (var i = group * 256u + lid; i < p.len; i = i + stride) {
        acc = acc + data[i];
    }
    let total = reduce_sum(lid, dot(acc, vec4<f32>(1.0)));
    if (lid == 0u) {
        sums[group] = total;
    }
}
