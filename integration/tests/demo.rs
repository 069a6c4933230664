//! The README's first command, end to end: the live demo runs, splits, mirrors and redirects.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::process::Command;

#[test]
fn the_demo_runs_the_example_mesh() {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/mesh");
    let out = Command::new(trellis_integration::binary("trellis-demo"))
        .arg(examples)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let share = |pod: &str| -> usize {
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(pod))
            .unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    // 80/20 over 200 requests, within a generous margin.
    assert!((140..=180).contains(&share("catalog-v1-0")), "{stdout}");
    assert!(
        stdout.contains("mirror copies received by audit-0: 200"),
        "{stdout}"
    );
    assert!(stdout.contains("x-mesh-route: catalog-canary"), "{stdout}");
    assert!(
        stdout.contains("trellis-client-id: spiffe://cluster.local/ns/shop/sa/web"),
        "{stdout}"
    );
    assert!(
        stdout.contains("301 Moved Permanently Location: http://catalog/v1/items"),
        "{stdout}"
    );
    assert!(stdout.contains("answered by catalog-v2-0"), "{stdout}");
}
