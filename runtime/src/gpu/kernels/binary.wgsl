// c = a op b with numpy broadcasting, f32. One thread per output element.
// p = [n, op, shape[6], a strides[6], b strides[6]] (leading dims padded with size 1).
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i >= p[0]) {
        return;
    }
    var rest = i;
    var ia = 0u;
    var ib = 0u;
    for (var d = 5i; d >= 0; d--) {
        let k = u32(d);
        let size = p[2u + k];
        let coord = rest % size;
        rest = rest / size;
        ia += coord * p[8u + k];
        ib += coord * p[14u + k];
    }
    let x = a[ia];
    let y = b[ib];
    var r = 0.0;
    switch p[1] {
        case 0u: { r = x + y; }
        case 1u: { r = x - y; }
        case 2u: { r = x * y; }
        case 3u: { r = x / y; }
        case 4u: { r = max(x, y); }
        case 5u: { r = min(x, y); }
        case 6u: { r = pow(x, y); }
        case 7u: { r = y - x; }
        default: {}
    }
    c[i] = r;
}
