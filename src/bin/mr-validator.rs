//! `mr-validator`: registry of relays, job assignment, verification by sampling, benchmark
//! bots and scores. Runs in the foreground and logs to stderr (`MR_LOG`, default `info`).
//!
//! `mr-validator --listen ADDR:PORT [--scores FILE] [--key-file FILE] [--config validator.config.json]
//!  [--chain FILE]`
//! `mr-validator status --validator ADDR:PORT` prints the relay table.

use clap::{Parser, Subcommand};
use mapreduce::validator::identity::Identity;
use mapreduce::validator::server::{Validator, ValidatorConfig};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "mr-validator", version, about = "mapreduce validator")]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to listen on (overrides the config file's `listen`; port 0 picks one).
    #[arg(long)]
    listen: Option<String>,
    /// Scores file (JSON, rewritten atomically, reloaded on start). Relay ids are their
    /// public keys, so it pins them too.
    #[arg(long)]
    scores: Option<PathBuf>,
    /// The validator's identity key (created with mode 0600 on first start). Default: the
    /// scores file's path with `.key` appended; without either, a fresh key per run.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// validator.config.json.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The subnet's chain file (written by the subnet validator every epoch): only relays
    /// whose hotkeys serve their address on the subnet are assigned, and the subnet's hotkeys
    /// are admitted as clients besides `clients` in the config. Re-read when it changes.
    #[arg(long)]
    chain: Option<PathBuf>,
    /// Print the relay table of the validator at ADDR and exit.
    #[arg(long, value_name = "ADDR")]
    status: Option<String>,
    /// With `--status`: print the table as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the relay table of a running validator.
    Status {
        #[arg(long)]
        validator: String,
        /// Print the table as JSON (every field of every relay).
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let _ = env_logger::Builder::from_env(env_logger::Env::new().filter_or("MR_LOG", "info"))
        .try_init();
    let args = Args::parse();
    let result = match (&args.command, &args.status) {
        (Some(Command::Status { validator, json }), _) => status(validator, *json),
        (None, Some(validator)) => status(validator, args.json),
        (None, None) => serve(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn status(addr: &str, json: bool) -> mapreduce::Result<()> {
    let (rows, flagged) = mapreduce::validator::client::status_full(addr, Duration::from_secs(10))?;
    if json {
        let all = serde_json::json!({"relays": rows, "flagged_clients": flagged});
        println!("{}", serde_json::to_string_pretty(&all).expect("json"));
        return Ok(());
    }
    println!(
        "{:<64} {:<22} {:>3} {:>6} {:>10} {:>12} {:>12} {:>5} {:>8} {:>6} {:>10} {:>7}",
        "relay (public key)",
        "address",
        "up",
        "proven",
        "bench MB/s",
        "capacity",
        "benched",
        "avail",
        "verified",
        "failed",
        "score",
        "weight"
    );
    let mut excluded = Vec::new();
    for r in &rows {
        let s = &r.score;
        println!(
            "{:<64} {:<22} {:>3} {:>6} {:>10.1} {:>12} {:>12} {:>5.2} {:>8} {:>6} {:>10.3} {:>7.4}{}",
            s.id,
            s.addr,
            if r.available { "yes" } else { "no" },
            if s.addr_verified { "yes" } else { "no" },
            s.throughput_mbps,
            s.capacity,
            s.bench_capacity,
            s.availability,
            s.verified_ops,
            s.failed_ops,
            s.score,
            s.weight,
            if s.excluded { "  EXCLUDED" } else { "" }
        );
        if s.excluded {
            excluded.push(s);
        }
    }
    for s in excluded {
        println!(
            "\nrelay {} excluded (since unix time {}); evidence:",
            s.id, s.excluded_at
        );
        for e in &s.evidence {
            println!("  {e}");
        }
    }
    for c in flagged {
        println!(
            "\nclient {} flagged: {} reports did not check out against the relays' signatures; last: {}",
            c.client, c.reports, c.last_evidence
        );
    }
    Ok(())
}

fn serve(args: Args) -> mapreduce::Result<()> {
    let config = match &args.config {
        Some(p) => ValidatorConfig::load(p)?,
        None => ValidatorConfig::default(),
    };
    let listen = args
        .listen
        .clone()
        .or_else(|| config.listen.clone())
        .ok_or_else(|| {
            mapreduce::Error::invalid("pass --listen ADDR:PORT or set listen in the config")
        })?;
    let listen = mapreduce::config::resolve(&listen)?;
    let key_file = args.key_file.clone().or_else(|| {
        args.scores.as_ref().map(|s| {
            let mut p = s.as_os_str().to_owned();
            p.push(".key");
            PathBuf::from(p)
        })
    });
    let identity = match &key_file {
        Some(p) => Identity::load_or_create(p, "validator")?,
        None => {
            log::warn!("no --key-file or --scores: the validator's key changes every run");
            Identity::generate()
        }
    };
    let v = Validator::bind(listen, config, args.scores.clone(), identity)?;
    if let Some(chain) = &args.chain {
        v.state.use_chain_file(chain.clone());
    }
    log::info!("listening on {}", v.local_addr()?);
    v.run()
}
