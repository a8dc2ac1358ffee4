//! Files the repository keeps in two places, compared. Not packaged: the copies outside
//! `middleware/` are not in the crate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Every file under `dir`, by its path relative to `dir`, with its bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut found = BTreeMap::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(current) = pending.pop() {
        let entries = std::fs::read_dir(&current)
            .unwrap_or_else(|error| panic!("cannot read {}: {error}", current.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let bytes = std::fs::read(&path).expect("read a file");
                let relative = path.strip_prefix(dir).expect("under dir").to_owned();
                found.insert(relative, bytes);
            }
        }
    }
    found
}

/// The crate applies `middleware/migrations` (it must be inside the package to build from
/// crates.io); operators read `migrations/` at the root. The two must be the same files.
#[test]
fn the_operators_migrations_are_the_crates_byte_for_byte() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let crate_copy = files(&manifest.join("migrations"));
    let operators_copy = files(&manifest.join("../migrations"));
    assert!(!crate_copy.is_empty(), "the crate has no migrations");
    let names = |files: &BTreeMap<PathBuf, Vec<u8>>| files.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&crate_copy),
        names(&operators_copy),
        "middleware/migrations and migrations/ hold different files: copy the crate's over"
    );
    for (name, bytes) in &crate_copy {
        assert!(
            operators_copy[name] == *bytes,
            "migrations/{} differs from middleware/migrations/{}: copy the crate's over",
            name.display(),
            name.display()
        );
    }
}

/// The repository README shows the crate README's axum example, which is compiled as a doctest
/// (`ReadmeDoctests` in lib.rs): the copy must be the compiled one.
#[test]
fn the_repository_readmes_axum_example_is_the_compiled_one() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rust_block = |file: &str| {
        let text = std::fs::read_to_string(manifest.join(file)).expect("read a README");
        let start = text.find("```rust\n").expect("a ```rust block") + "```rust\n".len();
        let length = text[start..].find("```").expect("its end");
        text[start..start + length].to_owned()
    };
    assert_eq!(
        rust_block("../README.md"),
        rust_block("README.md"),
        "README.md's axum example must be middleware/README.md's, which is compiled"
    );
}
