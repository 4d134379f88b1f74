//! Replays every file of `fuzz/corpus/<target>/` through its target, as CI does on every run
//! (no cargo-fuzz needed). A panic in any target fails this test and names the file.

use std::path::Path;

#[test]
fn every_corpus_file_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus");
    for (name, run) in pgpay_fuzz_targets::TARGETS {
        let dir = root.join(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.expect("a directory entry").path())
            .collect();
        files.sort();
        assert!(
            files.len() >= 5,
            "{}: a corpus of {} files is too small to mean anything",
            dir.display(),
            files.len()
        );
        for file in &files {
            let data = std::fs::read(file).expect("a corpus file");
            if std::panic::catch_unwind(|| run(&data)).is_err() {
                panic!("{name}: {} makes the target fail", file.display());
            }
        }
        println!("{name}: {} files", files.len());
    }
}
