//! `kvroute hash`: block and sequence hashes of a token sequence, for finding out why a router
//! and an engine disagree about a prefix.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use kvroute_blockhash::{BlockHasher, BlockMedia, NoMedia};
use kvroute_protocol::{BlockExtraInfo, MediaId, MediaSpan};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::PathBuf;

#[derive(Args)]
#[command(after_help = "\
INPUT is a JSON object (from FILE, or stdin when FILE is absent or '-'):
  {\"tokens\": [151644, 8948, ...],            token ids as the engine sees them
   \"block_size\": 16,                        or --block-size
   \"lora_name\": \"adapter\",                  optional
   \"cache_namespace\": \"tenant-a\",           optional
   \"is_eagle\": false,                       optional
   \"media\": [{\"start\": 5, \"len\": 64, \"id\": 1234}],  request-level media spans, or
   \"block_mm_infos\": [null, {\"mm_objects\": [{\"mm_hash\": 1234, \"offsets\": [[0, 16]]}]}]}
                                            Dynamo's per-block form (as in its KV events)

Compare the printed hashes with the engine's KV events: the first block whose sequence hash
differs is where the two disagree (its tokens or its media ids).")]
pub struct HashArgs {
    /// JSON input file ('-' or absent: stdin).
    file: Option<PathBuf>,
    /// Tokens per block (overrides the input's block_size).
    #[arg(long)]
    block_size: Option<u32>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    format: Format,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// One JSON object with every block.
    Json,
    /// A table for people.
    Text,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HashInput {
    tokens: Vec<u32>,
    block_size: Option<u32>,
    #[serde(default)]
    lora_name: Option<String>,
    #[serde(default)]
    cache_namespace: Option<String>,
    #[serde(default)]
    is_eagle: Option<bool>,
    #[serde(default)]
    media: Option<Vec<MediaSpan>>,
    #[serde(default)]
    block_mm_infos: Option<Vec<Option<BlockExtraInfo>>>,
}

#[derive(Serialize)]
struct HashOutput {
    block_size: u32,
    seed: u64,
    eagle: bool,
    token_count: usize,
    blocks: Vec<BlockOutput>,
}

#[derive(Serialize)]
struct BlockOutput {
    index: usize,
    /// Half-open token range hashed by this block.
    tokens: [usize; 2],
    media: Vec<MediaId>,
    block_hash: u64,
    sequence_hash: u64,
}

pub fn run(args: HashArgs) -> Result<()> {
    let input = read_input(args.file.as_ref())?;
    let output = match (&input.media, &input.block_mm_infos) {
        (Some(_), Some(_)) => bail!("give either \"media\" or \"block_mm_infos\", not both"),
        (Some(spans), None) => hash(&input, args.block_size, spans.as_slice())?,
        (None, Some(infos)) => hash(&input, args.block_size, infos.as_slice())?,
        (None, None) => hash(&input, args.block_size, &NoMedia)?,
    };
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&output)?),
        Format::Text => print_table(&output),
    }
    Ok(())
}

fn read_input(file: Option<&PathBuf>) -> Result<HashInput> {
    let mut text = String::new();
    match file {
        Some(path) if path.as_os_str() != "-" => {
            text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
        }
        _ => {
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading stdin")?;
        }
    }
    serde_json::from_str(&text).context("parsing the hash input JSON")
}

fn hash<M: BlockMedia + ?Sized>(
    input: &HashInput,
    block_size: Option<u32>,
    media: &M,
) -> Result<HashOutput> {
    let Some(block_size) = block_size.or(input.block_size) else {
        bail!("no block size: pass --block-size or put \"block_size\" in the input");
    };
    let hasher = BlockHasher::builder(block_size)
        .lora_name(input.lora_name.as_deref().unwrap_or_default())
        .cache_namespace(input.cache_namespace.as_deref().unwrap_or_default())
        .eagle(input.is_eagle.unwrap_or(false))
        .build()?;
    let stride = block_size as usize;
    let blocks = hasher
        .hash_sequence(&input.tokens, media)
        .into_iter()
        .enumerate()
        .map(|(index, hashed)| {
            let start = index * stride;
            let mut ids = Vec::new();
            media.block_media(index, start..start + stride, &mut ids);
            ids.sort_unstable();
            BlockOutput {
                index,
                tokens: [start, start + hasher.window_len()],
                media: ids,
                block_hash: hashed.block.get(),
                sequence_hash: hashed.sequence.get(),
            }
        })
        .collect();
    Ok(HashOutput {
        block_size,
        seed: hasher.seed(),
        eagle: hasher.is_eagle(),
        token_count: input.tokens.len(),
        blocks,
    })
}

fn print_table(output: &HashOutput) {
    println!(
        "block size {}, seed {}, {} tokens, {} full blocks{}",
        output.block_size,
        output.seed,
        output.token_count,
        output.blocks.len(),
        if output.eagle { " (eagle)" } else { "" }
    );
    println!(
        "{:>6}  {:>15}  {:>20}  {:>20}  media",
        "block", "tokens", "block hash", "sequence hash"
    );
    for block in &output.blocks {
        let media: Vec<String> = block.media.iter().map(ToString::to_string).collect();
        println!(
            "{:>6}  {:>15}  {:>20}  {:>20}  {}",
            block.index,
            format!("{}..{}", block.tokens[0], block.tokens[1]),
            block.block_hash,
            block.sequence_hash,
            media.join(",")
        );
    }
}
