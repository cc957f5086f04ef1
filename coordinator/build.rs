//! Compiles `proto/weaver.proto` with the vendored protoc (no system protoc needed), and
//! lets this crate's tests find the venv's libtorch without LD_LIBRARY_PATH (the config
//! types come from weaver-models, which links it).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-changed=proto/weaver.proto");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/weaver.proto"],
        &["proto"],
    )?;
    Ok(())
}
