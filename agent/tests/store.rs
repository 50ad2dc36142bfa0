//! The model store on its own: versions kept, rollback, and what the agent serves at start when
//! the disk was damaged.

mod common;

use common::*;
use fedge_agent::store::ModelStore;
use fedge_proto::chunk::sha256;
use fedge_proto::msg::{Bundle, Reason};
use fedge_runtime::Tensor;

const N: u64 = 16;

struct Fixture {
    x: Tensor,
    tin: Vec<u8>,
}

impl Fixture {
    fn new() -> Self {
        let x = Tensor::new(
            &[1, N as usize],
            &(0..N).map(|i| i as f32 - 8.0).collect::<Vec<_>>(),
        )
        .expect("tensor");
        let tin = npz(&[("x", &x)]);
        Self { x, tin }
    }

    /// Installs version `v` of `y = op(x)`.
    fn install(
        &self,
        store: &ModelStore,
        op: &str,
        v: u64,
        f: fn(f32) -> f32,
    ) -> Result<(), fedge_agent::store::Failure> {
        let y: Vec<f32> = self.x.as_f32().expect("f32").into_iter().map(f).collect();
        let tout = npz(&[("y", &Tensor::new(&[1, N as usize], &y).expect("tensor"))]);
        let model = tiny_model(op, N);
        let b = Bundle {
            name: "tiny",
            version: v,
            created_unix_s: 0,
            model: &model,
            test_input: &self.tin,
            test_output: &tout,
            tolerance: 0.0,
        };
        store
            .install(&b, &sha256(&model))
            .map(|s| assert_eq!(s.info.version, v))
    }
}

fn served_version(store: &ModelStore) -> Option<u64> {
    store.load_active().0.map(|s| s.info.version)
}

#[test]
fn keeps_n_versions_and_rolls_back_to_the_previous_one() {
    let dir = TempDir::new("store-keep");
    let store = ModelStore::open(&dir.0, 2, 1).expect("open");
    let fx = Fixture::new();
    fx.install(&store, "Relu", 1, |v| v.max(0.0)).expect("v1");
    fx.install(&store, "Neg", 2, |v| -v).expect("v2");
    fx.install(&store, "Abs", 3, f32::abs).expect("v3");
    let healthy = store.healthy();
    assert_eq!(healthy.len(), 2, "{healthy:?}");
    assert_eq!(
        std::fs::read_dir(dir.0.join("versions"))
            .expect("dir")
            .count(),
        2,
        "older versions pruned"
    );
    assert_eq!(served_version(&store), Some(3));

    // A self-test failure leaves everything as it was.
    let f = fx
        .install(&store, "Relu", 4, |v| -v)
        .expect_err("wrong expected output");
    assert_eq!(f.reason, Reason::SelfTestFailed);
    assert_eq!(store.healthy(), healthy);

    let s = store.rollback().expect("rollback");
    assert_eq!(s.info.version, 2);
    assert_eq!(served_version(&store), Some(2));
    assert_eq!(
        store.rollback().expect_err("nothing older").reason,
        Reason::LoadFailed
    );
}

#[test]
fn a_corrupt_active_model_is_never_served_the_previous_version_is() {
    let dir = TempDir::new("store-corrupt");
    let store = ModelStore::open(&dir.0, 3, 1).expect("open");
    let fx = Fixture::new();
    fx.install(&store, "Relu", 1, |v| v.max(0.0)).expect("v1");
    fx.install(&store, "Neg", 2, |v| -v).expect("v2");
    let active = dir
        .0
        .join("versions")
        .join(&store.healthy()[0])
        .join("model.onnx");
    let mut bytes = std::fs::read(&active).expect("model");
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(&active, &bytes).expect("corrupt");

    let (served, failures) = store.load_active();
    let served = served.expect("falls back");
    assert_eq!(served.info.version, 1);
    assert_eq!(
        failures.iter().map(|f| f.reason).collect::<Vec<_>>(),
        [Reason::HashMismatch]
    );
    let y = served.model.run(std::slice::from_ref(&fx.x)).expect("run");
    assert_eq!(y[0].as_f32().expect("f32")[0], 0.0, "v1 is relu");
    assert_eq!(
        store.healthy().len(),
        1,
        "the corrupt version left the pointer"
    );
    assert_eq!(served_version(&store), Some(1));
}

#[test]
fn an_unreadable_pointer_falls_back_to_self_tested_versions() {
    let dir = TempDir::new("store-pointer");
    let store = ModelStore::open(&dir.0, 3, 1).expect("open");
    let fx = Fixture::new();
    fx.install(&store, "Relu", 1, |v| v.max(0.0)).expect("v1");
    fx.install(&store, "Neg", 2, |v| -v).expect("v2");
    std::fs::write(dir.0.join("active"), b"{\"healthy\": [").expect("tear");
    // A half-written version left by a crash is removed when the store opens.
    std::fs::create_dir_all(dir.0.join("versions/.tmp-1-0-tiny-3")).expect("staging");
    let store = ModelStore::open(&dir.0, 3, 1).expect("reopen");
    assert!(!dir.0.join("versions/.tmp-1-0-tiny-3").exists());
    let (served, failures) = store.load_active();
    assert_eq!(served.map(|s| s.info.version), Some(2));
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].reason, Reason::Storage);
    assert_eq!(served_version(&store), Some(2), "pointer rewritten");
}
