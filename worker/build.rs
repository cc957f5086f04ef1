//! Compiles the C++ shim (csrc/shim.cpp: fused AdamW, `_foreach_norm`, gradients as bucket
//! views, seeded backward) against the libtorch that torch-sys links; lets this crate's
//! tests run against the venv's libtorch without LD_LIBRARY_PATH; and links libtorch_cuda
//! into its examples (model_bench, pipeline_bench) so that they see CUDA (the linker would
//! drop it: nothing references it directly).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!("torch-sys did not say where libtorch is (DEP_TCH_LIBTORCH_LIB); build through scripts/env.sh");
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg-examples=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg-examples=-ltorch_cuda");
        println!("cargo:rustc-link-arg-examples=-Wl,--as-needed");
    }
    // torch-sys reports libtorch's lib folder; the headers are its sibling `include` (the
    // layout of both the PyPI wheel and the libtorch archives).
    let include = PathBuf::from(&lib).join("..").join("include");
    // PyPI's torch 2.11 is built with the C++11 ABI (as torch-sys assumes by default).
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .file("csrc/shim.cpp")
        .compile("weaver_shim");
}
