// Softmax / log-softmax over one axis, f32. One thread per row.
// p = [rows (outer * inner), axis length, inner, log]
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 64u;
    if (r >= p[0]) {
        return;
    }
    let L = p[1];
    let inner = p[2];
    let base = (r / inner) * L * inner + r % inner;
    var mx = -3.4028235e38;
    for (var k = 0u; k < L; k++) {
        mx = max(mx, x[base + k * inner]);
    }
    var sum = 0.0;
    for (var k = 0u; k < L; k++) {
        sum += exp(x[base + k * inner] - mx);
    }
    if (p[3] != 0u) {
        let ls = log(sum);
        for (var k = 0u; k < L; k++) {
            y[base + k * inner] = x[base + k * inner] - mx - ls;
        }
    } else {
        for (var k = 0u; k < L; k++) {
            y[base + k * inner] = exp(x[base + k * inner] - mx) / sum;
        }
    }
}
