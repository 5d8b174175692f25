//! A relay's memory stays bounded by peers × chunk × window, whatever the tensor size.

mod relay_util;

use mapreduce::ReduceOp;
use relay_util::{relay_config, run_job, RelayProc, TOKEN};

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn relay_memory_is_bounded_independently_of_the_tensor() {
    let relay = RelayProc::start(TOKEN);
    let mut cfg = relay_config(std::slice::from_ref(&relay), TOKEN);
    cfg.chunk_bytes = 1 << 20;
    cfg.relay_chunk_bytes = 1 << 20;
    // A 1 GiB all-reduce from 4 peers: the relay receives 4 GiB and sends 4 GiB.
    let count = 256 << 20;
    run_job(4, cfg, move |comm| {
        let mut v = vec![comm.rank() as f32 + 1.0; count];
        comm.allreduce(&mut v, ReduceOp::Sum).unwrap();
        assert!(v.iter().all(|&x| x == 10.0));
        comm.destroy().unwrap();
    });
    let hwm = vm_hwm_kib(relay.child.id());
    assert!(hwm < 128 << 10, "relay peak RSS {hwm} KiB");
    eprintln!("relay peak RSS: {} MiB", hwm >> 10);
}
