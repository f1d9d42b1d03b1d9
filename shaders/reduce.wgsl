// Workgroup-wide reductions over 256 invocations, in workgroup memory (no subgroup operations,
// which WebGPU through wgpu does not expose). Call from uniform control flow only.

const REDUCE_SIZE: u32 = 256u;
var<workgroup> reduce_scratch: array<f32, 256>;

fn reduce_sum(lid: u32, value: f32) -> f32 {
    reduce_scratch[lid] = value;
    workgroupBarrier();
    for (var stride = REDUCE_SIZE / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            reduce_scratch[lid] = reduce_scratch[lid] + reduce_scratch[lid + stride];
        }
        workgroupBarrier();
    }
    let total = reduce_scratch[0];
    workgroupBarrier();
    return total;
}

fn reduce_max(lid: u32, value: f32) -> f32 {
    reduce_scratch[lid] = value;
    workgroupBarrier();
    for (var stride = REDUCE_SIZE / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            reduce_scratch[lid] = max(reduce_scratch[lid], reduce_scratch[lid + stride]);
        }
        workgroupBarrier();
    }
    let total = reduce_scratch[0];
    workgroupBarrier();
    return total;
}
