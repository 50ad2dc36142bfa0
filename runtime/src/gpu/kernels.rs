//! The WGSL kernels (one file each, beside this module) and how they are dispatched.

/// A compute kernel: WGSL source with entry point `main`, binding 0 = `u32` parameters,
/// bindings `1..=inputs` read-only storage, binding `inputs + 1` the output.
#[derive(Debug)]
pub(crate) struct Kernel {
    pub name: &'static str,
    pub source: &'static str,
    pub inputs: usize,
}

macro_rules! kernel {
    ($id:ident, $file:literal, $inputs:expr) => {
        pub(crate) const $id: Kernel = Kernel {
            name: concat!("fedge.", $file),
            source: include_str!(concat!("kernels/", $file, ".wgsl")),
            inputs: $inputs,
        };
    };
}

kernel!(UNARY, "unary", 1);
kernel!(BINARY, "binary", 2);
kernel!(IBINARY, "ibinary", 2);
kernel!(COPY, "copy", 1);
kernel!(MATMUL, "matmul", 2);
kernel!(PACK_I8, "pack_i8", 1);
kernel!(QMATMUL, "qmatmul", 2);
kernel!(IM2COL_I8, "im2col_i8", 1);
kernel!(QUANT, "quant", 1);
kernel!(REDUCE, "reduce", 1);
kernel!(LUT, "lut", 1);
kernel!(CAST, "cast", 1);
kernel!(RESAMPLE, "resample", 1);
kernel!(CONV, "conv", 3);
kernel!(POOL, "pool", 1);
kernel!(SOFTMAX, "softmax", 1);

/// Every kernel, for compile checks.
#[cfg(test)]
pub(crate) const ALL: &[&Kernel] = &[
    &UNARY, &BINARY, &IBINARY, &COPY, &MATMUL, &PACK_I8, &QMATMUL, &IM2COL_I8, &QUANT, &REDUCE,
    &LUT, &CAST, &RESAMPLE, &CONV, &POOL, &SOFTMAX,
];

/// Threads per workgroup of the one-dimensional kernels.
pub(crate) const WG: u64 = 64;
/// Most workgroups per dispatch dimension (WebGPU's guaranteed limit).
pub(crate) const MAX_GROUPS: u64 = 65_535;

/// Workgroup counts for `threads` threads of a one-dimensional kernel (spilling into y).
pub(crate) fn groups_1d(threads: u64) -> Option<(u32, u32, u32)> {
    let groups = threads.div_ceil(WG).max(1);
    let x = groups.min(MAX_GROUPS);
    let y = groups.div_ceil(x);
    (y <= MAX_GROUPS).then_some((x as u32, y as u32, 1))
}

/// Unary op codes of `unary.wgsl`, by tract element-wise op name.
pub(crate) fn unary_code(name: &str) -> Option<u32> {
    Some(match name {
        "Abs" => 0,
        "Neg" => 1,
        "Sqrt" => 2,
        "Rsqrt" => 3,
        "Recip" => 4,
        "Exp" => 5,
        "Ln" => 6,
        "Sigmoid" => 7,
        "Tanh" => 8,
        "Erf" => 9,
        "HardSwish" => 10,
        "LeakyRelu" => 11,
        "Silu" => 12,
        "Square" => 13,
        "Floor" => 14,
        "Ceil" => 15,
        "RoundHalfToEven" => 16,
        "Sin" => 17,
        "Cos" => 18,
        "Sign" => 19,
        "GeluExact" => 20,
        "GeluApproximate" => 21,
        _ => return None,
    })
}

/// Binary op codes of `binary.wgsl`, by tract binary op name.
pub(crate) fn binary_code(name: &str) -> Option<u32> {
    Some(match name {
        "Add" => 0,
        "Sub" => 1,
        "Mul" => 2,
        "Div" => 3,
        "Max" => 4,
        "Min" => 5,
        "Pow" => 6,
        "SubF" => 7,
        _ => return None,
    })
}
