//! `kvroute replay`: routing quality on a request trace or on the multimodal workload, in
//! virtual time against simulated workers. The work is kvroute-replay's; this parses flags,
//! shows progress, writes the JSON summary and the plots.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use flate2::read::MultiGzDecoder;
use indicatif::{ProgressBar, ProgressStyle};
use kvroute_dispatch::CostConfig;
use kvroute_replay::multimodal::{generate, MultimodalConfig};
use kvroute_replay::plot::{capacity_svg, policies_svg, CapacityPoint};
use kvroute_replay::{
    read_jsonl, replay_replicas, spread_simultaneous, write_jsonl, PolicyName, ReplayConfig,
    ReplaySummary, TraceRequest, Workload,
};
use kvroute_sim::WorkerModel;
use serde_json::json;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct ReplayArgs {
    #[command(subcommand)]
    source: Source,
}

#[derive(Subcommand)]
enum Source {
    /// Replay a Mooncake-format JSONL trace (timestamp, input_length, output_length, hash_ids,
    /// optionally media_ids per block).
    Trace {
        /// The JSONL file (gzip-compressed when it ends in .gz).
        file: PathBuf,
        /// Tokens per hash id in the trace (Mooncake's traces: 512).
        #[arg(long, default_value_t = 512)]
        trace_block_size: u32,
        /// Spread requests sharing a timestamp evenly over this many milliseconds after it, in
        /// their order (Mooncake's conversation trace counts time in 3,000 ms steps).
        #[arg(long)]
        spread_ms: Option<u64>,
        #[command(flatten)]
        common: Common,
    },
    /// Generate the seeded multimodal workload (multi-turn visual Q&A) and replay it.
    Multimodal {
        /// Conversations.
        #[arg(long, default_value_t = 400)]
        sessions: usize,
        /// Tokens per block of the generated trace.
        #[arg(long, default_value_t = 64)]
        trace_block_size: u32,
        /// Also write the generated trace (JSONL with media_ids) to this file.
        #[arg(long)]
        write_trace: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Args)]
struct Common {
    /// Simulated workers.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Tokens per KV block (must divide the trace block size; default: the trace block size).
    #[arg(long)]
    block_size: Option<u32>,
    /// KV pool per worker in blocks, least recently used evicted first (default: no eviction).
    #[arg(long)]
    capacity_blocks: Option<usize>,
    /// Policies to compare, comma-separated: kv-aware, round-robin, random, least-loaded,
    /// text-only (default: all; text-only only when the trace has media).
    #[arg(long, value_delimiter = ',')]
    policy: Vec<PolicyName>,
    /// Arrival speed-up (2: the trace twice as fast).
    #[arg(long, default_value_t = 1.0)]
    speedup: f64,
    /// Seed of the policies' random choices (and of the multimodal workload).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Prefill speed of a worker, uncached tokens per second.
    #[arg(long, default_value_t = 20_000.0)]
    prefill_tokens_per_second: f64,
    /// Decode speed of one request, tokens per second.
    #[arg(long, default_value_t = 100.0)]
    decode_tokens_per_second: f64,
    /// Requests a worker runs at once.
    #[arg(long, default_value_t = 64)]
    max_concurrency: usize,
    /// Routing cost: weight of the blocks a worker would prefill.
    #[arg(long, default_value_t = CostConfig::default().prefill_weight)]
    prefill_weight: f64,
    /// Routing cost: blocks-equivalent of one in-flight request.
    #[arg(long, default_value_t = CostConfig::default().decode_weight)]
    decode_weight: f64,
    /// Routing cost: softmax temperature (0: always the lowest cost, ties at random).
    #[arg(long, default_value_t = CostConfig::default().temperature)]
    temperature: f64,
    /// Router replicas taking turns on arrivals, each knowing the load of its own requests.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    replicas: u64,
    /// With --replicas: each replica sees the others' load changes this many milliseconds late
    /// (default: never, as replicas without sync).
    #[arg(long)]
    sync_delay_ms: Option<f64>,
    /// Also replay every policy at each of these capacities (blocks per worker, comma-separated)
    /// for the hit rate over capacity plot.
    #[arg(long, value_delimiter = ',')]
    capacity_sweep: Vec<usize>,
    /// Write the JSON summary here instead of stdout.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the plots (policies.svg, and capacity.svg with --capacity-sweep) into this directory.
    #[arg(long)]
    plots: Option<PathBuf>,
}

pub fn run(args: ReplayArgs) -> Result<()> {
    let Loaded {
        trace,
        trace_block_size,
        common,
        source,
    } = args.source.load()?;
    let block_size = common.block_size.unwrap_or(trace_block_size);
    let workload = Workload::from_trace(&trace, trace_block_size, block_size)?;
    let plan = common.plan(&workload)?;
    let (results, sweep) = replay_all(&workload, &common, &plan)?;

    let ideal = workload.ideal();
    let report = json!({
        "source": source,
        "requests": workload.len(),
        "trace_block_size": trace_block_size,
        "block_size": block_size,
        "worker_model": plan.model,
        "cost": plan.cost,
        "seed": common.seed,
        "ideal": {
            "hit_rate": ideal.hit_rate(),
            "token_hit_rate": ideal.token_hit_rate(),
            "prompt_blocks": ideal.prompt_blocks,
            "reused_blocks": ideal.reused_blocks,
        },
        "results": results,
        "capacity_sweep": sweep.iter().map(|p| json!({
            "policy": p.policy, "capacity_blocks": p.capacity_blocks, "hit_rate": p.hit_rate,
        })).collect::<Vec<_>>(),
    });
    let text = serde_json::to_string_pretty(&report)?;
    match &common.json {
        Some(path) => std::fs::write(path, text + "\n")
            .with_context(|| format!("writing {}", path.display()))?,
        None => println!("{text}"),
    }
    if let Some(dir) = &common.plots {
        let title = format!(
            "{} requests, {} workers, {}-token blocks, capacity {}",
            workload.len(),
            common.workers,
            block_size,
            common
                .capacity_blocks
                .map_or("unbounded".to_owned(), |c| format!("{c} blocks/worker"))
        );
        write_plots(
            dir,
            &title,
            common.workers,
            &results,
            &sweep,
            ideal.hit_rate(),
        )?;
    }
    Ok(())
}

/// A trace read or generated, with what the report says of where it came from.
struct Loaded {
    trace: Vec<TraceRequest>,
    trace_block_size: u32,
    common: Common,
    source: serde_json::Value,
}

impl Source {
    fn load(self) -> Result<Loaded> {
        match self {
            Source::Trace {
                file,
                trace_block_size,
                spread_ms,
                common,
            } => {
                let opened =
                    File::open(&file).with_context(|| format!("opening {}", file.display()))?;
                let mut trace = if file.extension().is_some_and(|e| e == "gz") {
                    read_jsonl(BufReader::new(MultiGzDecoder::new(opened)))
                } else {
                    read_jsonl(BufReader::new(opened))
                }
                .with_context(|| format!("reading {}", file.display()))?;
                let source = match spread_ms {
                    Some(window) => {
                        spread_simultaneous(&mut trace, window);
                        json!({ "trace": file.display().to_string(), "spread_ms": window })
                    }
                    None => json!({ "trace": file.display().to_string() }),
                };
                Ok(Loaded {
                    trace,
                    trace_block_size,
                    common,
                    source,
                })
            }
            Source::Multimodal {
                sessions,
                trace_block_size,
                write_trace,
                common,
            } => {
                let config = MultimodalConfig::default()
                    .with_sessions(sessions)
                    .with_seed(common.seed)
                    .with_block_size(trace_block_size);
                let trace = generate(&config);
                if let Some(path) = &write_trace {
                    write_trace_file(&trace, path)?;
                }
                Ok(Loaded {
                    trace,
                    trace_block_size,
                    common,
                    source: json!({ "multimodal": config }),
                })
            }
        }
    }
}

/// What the flags ask to replay.
struct Plan {
    policies: Vec<PolicyName>,
    cost: CostConfig,
    model: WorkerModel,
    config: ReplayConfig,
}

impl Common {
    fn plan(&self, workload: &Workload) -> Result<Plan> {
        let policies = if self.policy.is_empty() {
            PolicyName::ALL
                .into_iter()
                .filter(|p| workload.has_media() || *p != PolicyName::TextOnly)
                .collect()
        } else {
            self.policy.clone()
        };
        let cost = CostConfig::default()
            .with_prefill_weight(self.prefill_weight)
            .with_decode_weight(self.decode_weight)
            .with_temperature(self.temperature);
        let model = WorkerModel::default()
            .with_capacity_blocks(self.capacity_blocks)
            .with_speeds(
                self.prefill_tokens_per_second,
                self.decode_tokens_per_second,
            )
            .with_max_concurrency(self.max_concurrency);
        let sync_delay_us = match self.sync_delay_ms {
            Some(ms) if ms.is_finite() && ms >= 0.0 => Some((ms * 1000.0).round() as u64),
            Some(ms) => anyhow::bail!("--sync-delay-ms {ms} is not a delay"),
            None => None,
        };
        let config = ReplayConfig::default()
            .with_workers(self.workers)
            .with_model(model)
            .with_speedup(self.speedup)
            .with_sync_delay_us(sync_delay_us);
        Ok(Plan {
            policies,
            cost,
            model,
            config,
        })
    }
}

/// Every policy of the plan, then every policy at each capacity of the sweep, with a progress
/// bar over all of them.
fn replay_all(
    workload: &Workload,
    common: &Common,
    plan: &Plan,
) -> Result<(Vec<ReplaySummary>, Vec<CapacityPoint>)> {
    let runs = plan.policies.len() * (1 + common.capacity_sweep.len());
    let bar = ProgressBar::new((runs * workload.len()) as u64).with_style(
        ProgressStyle::with_template("{msg:>14} [{bar:40}] {pos}/{len} requests, {eta} left")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let run_one = |policy: PolicyName, config: &ReplayConfig| -> Result<ReplaySummary> {
        bar.set_message(policy.as_str());
        let start = bar.position();
        let mut routers: Vec<_> = (0..common.replicas)
            .map(|i| policy.build(plan.cost, common.seed.wrapping_add(i)))
            .collect();
        let report = replay_replicas(workload, config, &mut routers, &mut |done, _| {
            bar.set_position(start + done as u64);
        })?;
        Ok(report.summary)
    };
    let mut results = Vec::with_capacity(plan.policies.len());
    for &policy in &plan.policies {
        results.push(run_one(policy, &plan.config)?);
    }
    let mut sweep = Vec::new();
    for &capacity in &common.capacity_sweep {
        let at = plan
            .config
            .with_model(plan.model.with_capacity_blocks(Some(capacity)));
        for &policy in &plan.policies {
            let summary = run_one(policy, &at)?;
            sweep.push(CapacityPoint {
                policy: summary.policy,
                capacity_blocks: capacity,
                hit_rate: summary.hit_rate,
            });
        }
    }
    bar.finish_and_clear();
    Ok((results, sweep))
}

/// policies.svg, and capacity.svg when there was a sweep, into `dir`.
fn write_plots(
    dir: &Path,
    title: &str,
    workers: usize,
    results: &[ReplaySummary],
    sweep: &[CapacityPoint],
    ideal_hit_rate: f64,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_file(&dir.join("policies.svg"), &policies_svg(results, title)?)?;
    if !sweep.is_empty() {
        let title = format!("hit rate over KV capacity ({workers} workers)");
        write_file(
            &dir.join("capacity.svg"),
            &capacity_svg(sweep, ideal_hit_rate, &title)?,
        )?;
    }
    Ok(())
}

fn write_trace_file(trace: &[TraceRequest], path: &Path) -> Result<()> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    write_jsonl(trace, BufWriter::new(file)).with_context(|| format!("writing {}", path.display()))
}

fn write_file(path: &Path, contents: &str) -> Result<()> {
    let mut file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
