//! Checks the committed C header against the exports and the C ABI contract (DESIGN §3).
//!
//! `make check-header` separately regenerates the header with the pinned cbindgen and fails
//! when the committed file differs; this test needs no cbindgen and checks what the header
//! promises to C callers.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

fn read(rel: &str) -> String {
    fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel))
        .unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// Function prototypes in the header, whitespace-normalised, without the trailing `;`.
fn prototypes(header: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in header.lines() {
        let t = line.trim();
        if current.is_empty() && !(t.starts_with("mr_result ") || t.starts_with("const char *mr_"))
        {
            continue;
        }
        current.push(' ');
        current.push_str(t);
        if t.ends_with(';') {
            let normal = current.split_whitespace().collect::<Vec<_>>().join(" ");
            out.push(normal.trim_end_matches(';').replace("( ", "(").to_string());
            current.clear();
        }
    }
    out
}

fn function_name(prototype: &str) -> &str {
    let before_paren = &prototype[..prototype.find('(').expect("(")];
    before_paren.rsplit([' ', '*']).next().expect("name")
}

/// The contract: DESIGN §3 plus the compatible non-blocking extensions.
const CONTRACT: &[&str] = &[
    "const char *mr_result_string(mr_result r)",
    "const char *mr_last_error(void)",
    "const char *mr_version(void)",
    "mr_result mr_get_unique_id(mr_unique_id *id)",
    "mr_result mr_comm_init_rank(mr_comm **comm, int nranks, const mr_unique_id *id, int rank)",
    "mr_result mr_comm_init_env(mr_comm **comm)",
    "mr_result mr_comm_rank(const mr_comm *comm, int *rank)",
    "mr_result mr_comm_size(const mr_comm *comm, int *size)",
    "mr_result mr_comm_local_rank(const mr_comm *comm, int *local_rank)",
    "mr_result mr_comm_local_size(const mr_comm *comm, int *local_size)",
    "mr_result mr_comm_host_count(const mr_comm *comm, int *hosts)",
    "mr_result mr_comm_destroy(mr_comm *comm)",
    "mr_result mr_comm_abort(mr_comm *comm)",
    "mr_result mr_allreduce(mr_comm *comm, void *buf, size_t count, mr_dtype t, mr_op op)",
    "mr_result mr_broadcast(mr_comm *comm, void *buf, size_t count, mr_dtype t, int root)",
    "mr_result mr_allgather(mr_comm *comm, const void *send, void *recv, size_t count, mr_dtype t)",
    "mr_result mr_reduce_scatter(mr_comm *comm, const void *send, void *recv, size_t recv_count, mr_dtype t, mr_op op)",
    "mr_result mr_barrier(mr_comm *comm)",
    "mr_result mr_iallreduce(mr_comm *comm, void *buf, size_t count, mr_dtype t, mr_op op, mr_request **req)",
    "mr_result mr_ibroadcast(mr_comm *comm, void *buf, size_t count, mr_dtype t, int root, mr_request **req)",
    "mr_result mr_iallgather(mr_comm *comm, const void *send, void *recv, size_t count, mr_dtype t, mr_request **req)",
    "mr_result mr_ireduce_scatter(mr_comm *comm, const void *send, void *recv, size_t recv_count, mr_dtype t, mr_op op, mr_request **req)",
    "mr_result mr_ibarrier(mr_comm *comm, mr_request **req)",
    "mr_result mr_wait(mr_request *req)",
    "mr_result mr_test(mr_request *req, int *done)",
    "mr_result mr_allreduce_compressed(mr_comm *comm, void *buf, size_t count, mr_dtype t, mr_op op, mr_compress z)",
    "mr_result mr_iallreduce_compressed(mr_comm *comm, void *buf, size_t count, mr_dtype t, mr_op op, mr_compress z, mr_request **req)",
    "mr_result mr_send(mr_comm *comm, const void *buf, size_t count, mr_dtype t, int peer, int tag)",
    "mr_result mr_recv(mr_comm *comm, void *buf, size_t count, mr_dtype t, int peer, int tag)",
    "mr_result mr_isend(mr_comm *comm, const void *buf, size_t count, mr_dtype t, int peer, int tag, mr_request **req)",
    "mr_result mr_irecv(mr_comm *comm, void *buf, size_t count, mr_dtype t, int peer, int tag, mr_request **req)",
    "mr_result mr_group_start(void)",
    "mr_result mr_group_end(void)",
    "mr_result mr_reduce(mr_comm *comm, const void *send, void *recv, size_t count, mr_dtype t, mr_op op, int root)",
    "mr_result mr_gather(mr_comm *comm, const void *send, void *recv, size_t count, mr_dtype t, int root)",
    "mr_result mr_scatter(mr_comm *comm, const void *send, void *recv, size_t count, mr_dtype t, int root)",
    "mr_result mr_alltoall(mr_comm *comm, const void *send, void *recv, size_t count, mr_dtype t)",
    "mr_result mr_alltoallv(mr_comm *comm, const void *send, const size_t *send_counts, const size_t *send_displs, void *recv, const size_t *recv_counts, const size_t *recv_displs, mr_dtype t)",
    "mr_result mr_ireduce(mr_comm *comm, const void *send, void *recv, size_t count, mr_dtype t, mr_op op, int root, mr_request **req)",
    "mr_result mr_igather(mr_comm *comm, const void *send, void *recv, size_t count, mr_dtype t, int root, mr_request **req)",
    "mr_result mr_iscatter(mr_comm *comm, const void *send, void *recv, size_t count, mr_dtype t, int root, mr_request **req)",
    "mr_result mr_ialltoall(mr_comm *comm, const void *send, void *recv, size_t count, mr_dtype t, mr_request **req)",
    "mr_result mr_ialltoallv(mr_comm *comm, const void *send, const size_t *send_counts, const size_t *send_displs, void *recv, const size_t *recv_counts, const size_t *recv_displs, mr_dtype t, mr_request **req)",
];

#[test]
fn header_declares_exactly_the_contract() {
    let header = read("include/mapreduce.h");
    let declared: BTreeSet<String> = prototypes(&header).into_iter().collect();
    let contract: BTreeSet<String> = CONTRACT.iter().map(|s| s.to_string()).collect();
    let missing: Vec<_> = contract.difference(&declared).collect();
    let extra: Vec<_> = declared.difference(&contract).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "header and contract differ\n  missing or changed: {missing:#?}\n  not in the contract: {extra:#?}"
    );
}

#[test]
fn every_export_in_src_ffi_is_declared() {
    let header = read("include/mapreduce.h");
    let declared: BTreeSet<String> = prototypes(&header)
        .iter()
        .map(|p| function_name(p).to_string())
        .collect();
    let source = read("src/ffi.rs");
    let exported: BTreeSet<String> = source
        .split("extern \"C\" fn ")
        .skip(1)
        .map(|rest| rest[..rest.find('(').expect("(")].to_string())
        .filter(|name| name.starts_with("mr_"))
        .collect();
    assert_eq!(exported, declared, "run `make header`");
}

#[test]
fn header_has_guards_cxx_linkage_and_docs() {
    let header = read("include/mapreduce.h");
    assert!(
        header.contains("#ifndef MAPREDUCE_H\n#define MAPREDUCE_H"),
        "include guard"
    );
    assert!(
        header.trim_end().ends_with("#endif  /* MAPREDUCE_H */"),
        "include guard end"
    );
    assert!(
        header.contains("#ifdef __cplusplus\nextern \"C\" {"),
        "C++ linkage"
    );
    // Every prototype is preceded by a doc comment.
    let lines: Vec<&str> = header.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with("mr_result mr_") || line.starts_with("const char *mr_") {
            assert_eq!(lines[i - 1].trim(), "*/", "no doc comment before {line}");
        }
    }
}

#[test]
fn header_enums_have_the_contract_values() {
    let header = read("include/mapreduce.h");
    let expect = [
        "MR_OK = 0",
        "MR_ERR_INVALID_ARGUMENT = 1",
        "MR_ERR_SYSTEM = 2",
        "MR_ERR_TIMEOUT = 3",
        "MR_ERR_REMOTE = 4",
        "MR_ERR_AUTH = 5",
        "MR_ERR_ABORTED = 6",
        "MR_ERR_VERIFY = 7",
        "MR_ERR_INTERNAL = 8",
        "MR_FLOAT32 = 0",
        "MR_FLOAT64 = 1",
        "MR_FLOAT16 = 2",
        "MR_BFLOAT16 = 3",
        "MR_INT8 = 4",
        "MR_UINT8 = 5",
        "MR_INT32 = 6",
        "MR_INT64 = 7",
        "MR_SUM = 0",
        "MR_AVG = 1",
        "MR_MAX = 2",
        "MR_MIN = 3",
        "MR_PROD = 4",
    ];
    for e in expect {
        assert!(
            header.contains(&format!("  {e},\n")),
            "header lacks enumerator {e}"
        );
    }
    for t in [
        "} mr_result;",
        "} mr_dtype;",
        "} mr_op;",
        "typedef struct mr_comm mr_comm;",
        "typedef struct mr_request mr_request;",
    ] {
        assert!(header.contains(t), "header lacks `{t}`");
    }
    assert!(
        header.contains("typedef struct {\n  char internal[256];\n} mr_unique_id;"),
        "mr_unique_id layout"
    );
}

#[test]
fn prototype_parser_reads_multi_line_declarations() {
    let text = "/** doc */\nmr_result mr_x(mr_comm *comm,\n                 size_t count);\nconst char *mr_y(void);\n";
    assert_eq!(
        prototypes(text),
        vec![
            "mr_result mr_x(mr_comm *comm, size_t count)".to_string(),
            "const char *mr_y(void)".to_string()
        ]
    );
    assert_eq!(function_name("const char *mr_y(void)"), "mr_y");
}
