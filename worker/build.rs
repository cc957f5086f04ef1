//! Tests of this crate run against the venv's libtorch without LD_LIBRARY_PATH, and its
//! examples (model_bench, pipeline_bench) link libtorch_cuda so that they see CUDA (the
//! linker would drop it: nothing references it directly).

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        if std::path::Path::new(&dir).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg-examples=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg-examples=-ltorch_cuda");
            println!("cargo:rustc-link-arg-examples=-Wl,--as-needed");
        }
    }
}
