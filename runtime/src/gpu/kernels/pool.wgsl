// Max / average pooling, NCDHW f32 (2D as D = 1, 1D as D = H = 1). One thread per output
// element.
// p = [n_out, N, C, D, H, W, OD, OH, OW, KD, KH, KW, sd, sh, sw, dd, dh, dw, pd, ph, pw,
//      kind (0 max, 1 sum, 2 average excluding padding, 3 average including padding)]
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i >= p[0]) {
        return;
    }
    let D = p[3];
    let H = p[4];
    let W = p[5];
    let OD = p[6];
    let OH = p[7];
    let OW = p[8];
    let KD = p[9];
    let KH = p[10];
    let KW = p[11];
    let kind = p[21];
    let ox = i % OW;
    let oy = (i / OW) % OH;
    let oz = (i / (OW * OH)) % OD;
    let nc = i / (OW * OH * OD);
    let base = nc * D * H * W;
    var acc = 0.0;
    if (kind == 0u) {
        acc = -3.4028235e38;
    }
    var count = 0u;
    for (var kz = 0u; kz < KD; kz++) {
        let iz = i32(oz * p[12] + kz * p[15]) - i32(p[18]);
        if (iz < 0 || iz >= i32(D)) {
            continue;
        }
        for (var ky = 0u; ky < KH; ky++) {
            let iy = i32(oy * p[13] + ky * p[16]) - i32(p[19]);
            if (iy < 0 || iy >= i32(H)) {
                continue;
            }
            let row = base + (u32(iz) * H + u32(iy)) * W;
            for (var kx = 0u; kx < KW; kx++) {
                let ix = i32(ox * p[14] + kx * p[17]) - i32(p[20]);
                if (ix < 0 || ix >= i32(W)) {
                    continue;
                }
                let v = x[row + u32(ix)];
                if (kind == 0u) {
                    acc = max(acc, v);
                } else {
                    acc += v;
                }
                count += 1u;
            }
        }
    }
    if (kind == 2u) {
        acc = acc / f32(max(count, 1u));
    } else if (kind == 3u) {
        acc = acc / f32(KD * KH * KW);
    }
    y[i] = acc;
}
