//! Compiles src/shim.cpp against the headers of the libtorch that torch-sys links (the
//! venv's torch: `<lib>/../include`), with the same C++ ABI flags as torch-sys, and gives
//! this crate's tests RUNPATH and libtorch_cuda (so that they see CUDA where there is one).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=src/shim.cpp");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!("torch-sys did not say where libtorch is (DEP_TCH_LIBTORCH_LIB unset)");
    };
    let include = PathBuf::from(&lib).join("../include");
    // torch-sys's own default; PyPI's torch 2.11 is built with the C++11 ABI.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .define("GLOG_USE_GLOG_EXPORT", None)
        .file("src/shim.cpp")
        .compile("weaver_prof_shim");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if PathBuf::from(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg-tests=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg-tests=-ltorch_cuda");
        println!("cargo:rustc-link-arg-tests=-Wl,--as-needed");
    }
}
