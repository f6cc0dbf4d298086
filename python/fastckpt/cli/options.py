"""The command line's arguments and options, shared by its commands (typer ``Annotated`` types)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core


class Command(typer.core.TyperCommand):
    """Usage lines in the usual form, ``fastckpt convert [OPTIONS] SRC DST`` (typer writes
    required arguments as ``{SRC}``)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:  # typer's own click Context
        pieces = super().collect_usage_pieces(ctx)
        return [p[1:-1] if p[:1] == "{" and p[-1:] == "}" else p for p in pieces]


SrcArg = Annotated[
    Path,
    typer.Argument(
        metavar="SRC",
        help="Checkpoint (DCP dir, veRL rank files, .pt state dict, safetensors) or a run dir.",
        show_default=False,
    ),
]
DstArg = Annotated[
    Path,
    typer.Argument(
        metavar="DST", help="Output folder (created; must not exist).", show_default=False
    ),
]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", min=1, help="Copy threads (default: CPU count).")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON to stdout.")]
StepOpt = Annotated[
    str | None,
    typer.Option(help="For a run directory: latest (default), best, or a step number."),
]
StepsOpt = Annotated[
    str | None,
    typer.Option(
        "--step",
        help="For a run directory: latest (default), best, a step number, or several steps "
        "(all, or 100,200,300: DST/step_N/ each).",
    ),
]
RayOpt = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="ADDRESS",
        help="Write the shards on a Ray cluster (auto: RAY_ADDRESS or the running one); its "
        "nodes must share the filesystem. pip install 'fastckpt[ray]'.",
    ),
]
RoleOpt = Annotated[
    str | None, typer.Option(help="For a run directory: actor|policy (default) or critic.")
]
MetricOpt = Annotated[
    str | None, typer.Option(help="training_info.json metric ranking --step best.")
]
PruneMetricOpt = Annotated[
    str | None,
    typer.Option(help="training_info.json metric ranking the steps (default: the run's only one)."),
]
DirectionOpt = Annotated[
    bool | None,
    typer.Option(
        "--higher-is-better/--lower-is-better",
        help="Which way the metric ranks; default: lower is better for a loss, perplexity or "
        "error metric, higher otherwise.",
        show_default=False,
    ),
]
PrivateOpt = Annotated[bool, typer.Option("--private", help="Create the Hub repo private.")]
RevisionOpt = Annotated[str | None, typer.Option(help="Hub branch to commit to.")]
CommitMsgOpt = Annotated[str | None, typer.Option(help="Hub commit message.")]
RunArg = Annotated[Path, typer.Argument(metavar="RUN", help="Training run directory.")]
DtypeOpt = Annotated[str, typer.Option(help="keep | bf16 | fp16 | fp32 (floating tensors only).")]
ShardSizeOpt = Annotated[
    str, typer.Option(help="Largest shard, decimal units (5GB, 500MB) or bytes.")
]
ConfigFromOpt = Annotated[
    Path | None,
    typer.Option(help="Folder to copy config/tokenizer files from (e.g. the base model)."),
]
IncludeOpt = Annotated[
    list[str] | None,
    typer.Option(metavar="REGEX", help="Regex adding tensors by name (repeatable)."),
]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option(metavar="REGEX", help="Regex removing tensors by name (repeatable)."),
]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace DST if it exists.")]
FsyncOpt = Annotated[
    bool, typer.Option("--fsync/--no-fsync", help="Make the output durable (default on).")
]
DropHeadOpt = Annotated[
    bool,
    typer.Option(help="Leave out a value head (score.*, v_head.*): export the policy."),
]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        help="Megatron and torchtitan: architecture whose HF names to write (llama, mistral, "
        "qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe, deepseek_v3); default: from the config, "
        "else from args."
    ),
]
LoraOpt = Annotated[
    str | None,
    typer.Option(
        help="PEFT LoRA tensors: merge (W + alpha/r*B@A), adapter (adapter_model.safetensors "
        "+ adapter_config.json) or strip (base weights only). Required when there are any."
    ),
]
LoraAlphaOpt = Annotated[
    float | None,
    typer.Option(help="LoRA alpha, when no lora_train_meta.json/adapter_config.json has it."),
]
RsloraOpt = Annotated[
    bool | None,
    typer.Option(
        "--lora-rslora/--no-lora-rslora",
        help="Adapters trained with rsLoRA (scale alpha/sqrt(r)); default: from "
        "adapter_config.json, else off.",
        show_default=False,
    ),
]
OptimizerOpt = Annotated[
    bool,
    typer.Option(help="Also write optimizer.safetensors (state.<fqn>.<name>) + optimizer.json."),
]
PushOpt = Annotated[
    str | None, typer.Option(help="Upload DST to this Hub repo (pip install 'fastckpt[hub]').")
]
