//! The Kubernetes manifest (`launch/scripts/k8s.yaml`) against the Kubernetes API schema,
//! offline: the venv's `kubernetes-validate` (PyPI; it bundles the OpenAPI schemas of each
//! Kubernetes release) in strict mode, where a field the API does not have is an error.

use std::process::Command;

/// The Kubernetes release the manifest is checked against.
const KUBERNETES: &str = "1.33.0";

fn python() -> String {
    std::env::var("WEAVER_PYTHON").unwrap_or_else(|_| {
        panic!(
            "WEAVER_PYTHON is not set: run the tests through scripts/test.sh (or source \
             scripts/env.sh), which installs kubernetes-validate into the venv"
        )
    })
}

/// Runs the validator on `path`: (success, what it printed).
fn validate(path: &std::path::Path) -> (bool, String) {
    let out = Command::new(python())
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--kubernetes-version",
        ])
        .arg(KUBERNETES)
        .arg(path)
        .output()
        .expect("cannot run the venv's python");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("No module named kubernetes_validate"),
        "kubernetes-validate is not in the venv: source scripts/env.sh (WEAVER_VENV_EXTRAS) \
         to install it\n{text}"
    );
    (out.status.success(), text)
}

#[test]
fn the_kubernetes_manifest_matches_the_api_schema() {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/k8s.yaml");
    let (ok, text) = validate(&manifest);
    assert!(ok, "{}: {text}", manifest.display());
    // Every resource was checked (an empty or unparsed file would pass vacuously).
    for resource in [
        "service/weaver-coordinator",
        "job/weaver-coordinator",
        "job/weaver-workers",
    ] {
        assert!(
            text.contains(&format!("passed for resource {resource} ")),
            "{resource} not checked: {text}"
        );
    }

    // The check has teeth: the same manifest with one misspelled field is refused.
    let original = std::fs::read_to_string(&manifest).unwrap();
    assert!(original.contains("restartPolicy:"));
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("k8s.yaml");
    std::fs::write(
        &bad,
        original.replacen("restartPolicy:", "restartPolcy:", 1),
    )
    .unwrap();
    let (ok, text) = validate(&bad);
    assert!(!ok, "a misspelled field passed: {text}");
    assert!(text.contains("restartPolcy"), "{text}");
}
