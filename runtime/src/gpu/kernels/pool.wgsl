// Max / average pooling, NCHW f32 (1D as H = 1). One thread per output element.
// p = [n_out, N, C, H, W, OH, OW, KH, KW, sh, sw, dh, dw, ph, pw, kind (0 max, 1 sum,
//      2 average excluding padding, 3 average including padding)]
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i >= p[0]) {
        return;
    }
    let H = p[3];
    let W = p[4];
    let OH = p[5];
    let OW = p[6];
    let KH = p[7];
    let KW = p[8];
    let kind = p[15];
    let ox = i % OW;
    let oy = (i / OW) % OH;
    let nc = i / (OW * OH);
    let base = nc * H * W;
    var acc = 0.0;
    if (kind == 0u) {
        acc = -3.4028235e38;
    }
    var count = 0u;
    for (var ky = 0u; ky < KH; ky++) {
        let iy = i32(oy * p[9] + ky * p[11]) - i32(p[13]);
        if (iy < 0 || iy >= i32(H)) {
            continue;
        }
        for (var kx = 0u; kx < KW; kx++) {
            let ix = i32(ox * p[10] + kx * p[12]) - i32(p[14]);
            if (ix < 0 || ix >= i32(W)) {
                continue;
            }
            let v = x[base + u32(iy) * W + u32(ix)];
            if (kind == 0u) {
                acc = max(acc, v);
            } else {
                acc += v;
            }
            count += 1u;
        }
    }
    if (kind == 2u) {
        acc = acc / f32(max(count, 1u));
    } else if (kind == 3u) {
        acc = acc / f32(KH * KW);
    }
    y[i] = acc;
}
