// Direct 2D convolution (1D as H = 1), NCHW data, OIHW kernel, groups, strides, dilations,
// explicit padding, optional bias. One thread per output element.
// p = [n_out, N, C, H, W, CO, OH, OW, KH, KW, sh, sw, dh, dw, ph, pw, groups, has_bias]
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i >= p[0]) {
        return;
    }
    let C = p[2];
    let H = p[3];
    let W = p[4];
    let CO = p[5];
    let OH = p[6];
    let OW = p[7];
    let KH = p[8];
    let KW = p[9];
    let groups = p[16];
    let ox = i % OW;
    let oy = (i / OW) % OH;
    let co = (i / (OW * OH)) % CO;
    let n = i / (OW * OH * CO);
    let cig = C / groups;
    let cog = CO / groups;
    let g = co / cog;
    var acc = 0.0;
    if (p[17] != 0u) {
        acc = bias[co];
    }
    for (var ci = 0u; ci < cig; ci++) {
        let xc = ((n * C) + g * cig + ci) * H;
        let wc = (co * cig + ci) * KH;
        for (var ky = 0u; ky < KH; ky++) {
            let iy = i32(oy * p[10] + ky * p[12]) - i32(p[14]);
            if (iy < 0 || iy >= i32(H)) {
                continue;
            }
            let xrow = (xc + u32(iy)) * W;
            let wrow = (wc + ky) * KW;
            for (var kx = 0u; kx < KW; kx++) {
                let ix = i32(ox * p[11] + kx * p[13]) - i32(p[15]);
                if (ix < 0 || ix >= i32(W)) {
                    continue;
                }
                acc += x[xrow + u32(ix)] * w[wrow + kx];
            }
        }
    }
    y[i] = acc;
}
