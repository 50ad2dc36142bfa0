// Strided copy of 4-byte elements (transpose, concat, slice, broadcast).
// p = [n, src offset, dst offset, shape[6], src strides[6], dst strides[6]].
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i >= p[0]) {
        return;
    }
    var rest = i;
    var is = p[1];
    var id = p[2];
    for (var d = 5i; d >= 0; d--) {
        let k = u32(d);
        let size = p[3u + k];
        let coord = rest % size;
        rest = rest / size;
        is += coord * p[9u + k];
        id += coord * p[15u + k];
    }
    dst[id] = src[is];
}
