//! Tests of this crate run against the venv's libtorch without LD_LIBRARY_PATH, and the
//! nccl backend learns where that torch (and the pip NCCL beside it) lives.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        // comm::nccl looks for the pip NCCL next to this torch (site-packages/nvidia/nccl).
        println!("cargo:rustc-env=WEAVER_TORCH_LIB_DIR={dir}");
        // The GPU conformance run (tests/comm_nccl.rs) needs CUDA tensors: link
        // libtorch_cuda, which the linker would otherwise drop (DESIGN.md, "Build and run").
        if std::path::Path::new(&dir).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg-tests=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg-tests=-ltorch_cuda");
            println!("cargo:rustc-link-arg-tests=-Wl,--as-needed");
        }
    }
}
