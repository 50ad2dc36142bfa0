// Resampling of one axis of an f32 tensor by a precomputed plan (tract's AxisPlan for Resize:
// nearest, linear, cubic): each output index reads `window` input taps with weights, in tap
// order, or the extrapolation value. Resize over several axes is one dispatch per axis.
// One thread per output element.
// p = [n_out, len_in, len_out, inner, window, extrapolation bits,
//      then per output index: window indices, window weights (f32 bits), extrapolated flag]
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i >= p[0]) {
        return;
    }
    let len_in = p[1];
    let len_out = p[2];
    let inner = p[3];
    let window = p[4];
    let j = i % inner;
    let o = (i / inner) % len_out;
    let outer = i / (inner * len_out);
    let entry = 6u + o * (2u * window + 1u);
    if (p[entry + 2u * window] != 0u) {
        y[i] = bitcast<f32>(p[5]);
        return;
    }
    let base = outer * len_in * inner + j;
    var acc = 0.0;
    for (var k = 0u; k < window; k++) {
        let w = bitcast<f32>(p[entry + window + k]);
        if (w != 0.0) {
            acc += w * x[base + p[entry + k] * inner];
        }
    }
    y[i] = acc;
}
