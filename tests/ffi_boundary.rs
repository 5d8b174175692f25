//! Enforces the C boundary mechanically: every `extern "C"` function in `src/ffi.rs` is
//! exported under its own name and consists of nothing but one `ffi_boundary!` invocation
//! (the panic boundary) naming that same function, and no other file exports symbols.

use std::fs;
use std::path::{Path, PathBuf};

/// One `extern "C" fn` found in the source.
#[derive(Debug)]
struct ExternFn {
    name: String,
    /// The attributes and qualifiers written before `fn`, e.g. `#[no_mangle] pub unsafe`.
    preamble: String,
    /// Text between the body's outer braces.
    body: String,
    line: usize,
}

/// Strip `//` comments (including doc comments) so that commented-out code and prose do not
/// count; string literals in this file never contain `//`.
fn strip_line_comments(src: &str) -> String {
    src.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Index just past the brace matching the `{` at `open`.
fn matching_brace(src: &str, open: usize) -> usize {
    let mut depth = 0usize;
    for (i, c) in src[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return open + i + 1;
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced braces after byte {open}");
}

fn extern_fns(src: &str) -> Vec<ExternFn> {
    let src = strip_line_comments(src);
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = src[from..].find("extern \"C\" fn ") {
        let at = from + at;
        let name_start = at + "extern \"C\" fn ".len();
        let name_len = src[name_start..]
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .expect("function name");
        let name = src[name_start..name_start + name_len].to_string();
        // The preamble: from the end of the previous item (a `}` or `;`) to `extern`.
        let item_start = src[..at].rfind(['}', ';']).map_or(0, |i| i + 1);
        let preamble = src[item_start..at]
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let open = name_start + src[name_start..].find('{').expect("function body");
        let close = matching_brace(&src, open);
        found.push(ExternFn {
            name,
            preamble,
            body: src[open + 1..close - 1].trim().to_string(),
            line: src[..at].lines().count() + 1,
        });
        from = close;
    }
    found
}

fn ffi_source() -> String {
    fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ffi.rs"))
        .expect("read src/ffi.rs")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_export_is_wrapped_in_the_panic_boundary() {
    let fns = extern_fns(&ffi_source());
    assert!(
        fns.len() >= 20,
        "found only {} extern \"C\" functions in src/ffi.rs",
        fns.len()
    );
    let mut problems = Vec::new();
    for f in &fns {
        let expected_start = format!("ffi_boundary!(\"{}\",", f.name);
        if !f.body.starts_with(&expected_start) {
            problems.push(format!(
                "line {}: {} does not start with `{expected_start} {{ ... }})`",
                f.line, f.name
            ));
            continue;
        }
        // Nothing may follow the invocation: it is the function's value.
        let after_open = f.body.find('{').expect("macro body");
        let end = matching_brace(&f.body, after_open);
        let rest = f.body[end..].trim();
        if rest != ")" {
            problems.push(format!(
                "line {}: {} has code after its ffi_boundary! block: {rest:?}",
                f.line, f.name
            ));
        }
        if !f.preamble.contains("#[no_mangle]") {
            problems.push(format!("line {}: {} is not #[no_mangle]", f.line, f.name));
        }
        if !f.name.starts_with("mr_") {
            problems.push(format!(
                "line {}: export {} is not in the mr_ namespace",
                f.line, f.name
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "C boundary violations:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_scanner_rejects_an_export_without_the_boundary() {
    let src = r#"
        #[no_mangle]
        pub extern "C" fn mr_good() -> mr_result {
            ffi_boundary!("mr_good", { Ok(()) })
        }
        #[no_mangle]
        pub unsafe extern "C" fn mr_bare(x: *mut u8) -> mr_result {
            unsafe { *x = 1 };
            mr_result::MR_OK
        }
    "#;
    let fns = extern_fns(src);
    assert_eq!(fns.len(), 2);
    assert!(fns[0].body.starts_with("ffi_boundary!(\"mr_good\","));
    assert!(fns[0].preamble.contains("#[no_mangle]"));
    assert_eq!(fns[1].name, "mr_bare");
    assert!(!fns[1].body.starts_with("ffi_boundary!"));
}

#[test]
fn only_src_ffi_exports_symbols() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let offenders: Vec<_> = files
        .iter()
        .filter(|p| !p.ends_with("ffi.rs"))
        .filter(|p| {
            let src = strip_line_comments(&fs::read_to_string(p).expect("read source"));
            src.contains("no_mangle") || src.contains("export_name")
        })
        .collect();
    assert!(
        offenders.is_empty(),
        "C exports belong in src/ffi.rs behind ffi_boundary!, found in: {offenders:?}"
    );
}
