//! Links the `weaver` binary so that it finds libtorch without LD_LIBRARY_PATH, and so that
//! libtorch_cuda is loaded (the linker would drop it: nothing references it directly, and
//! without it libtorch sees no CUDA device).

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    // The binary, tests and benches find the venv's libtorch through RUNPATH; an
    // LD_LIBRARY_PATH (e.g. another machine's torch) still takes precedence.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    if std::path::Path::new(&dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg-bins=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg-bins=-ltorch_cuda");
        println!("cargo:rustc-link-arg-bins=-Wl,--as-needed");
    }
}
