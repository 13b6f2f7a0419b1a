"""How much quantization costs the reference models: validation perplexity per family at full
precision, bitsandbytes 8-bit and NF4, and group-wise INT-k (group 64).

    python -m reference.quant_table [--models llama-tiny ...] [--splits pretrain-validation ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quailora.quantizers import quantizer_spec
from quailora.registry import Registry
from quailora.text import blocks, perplexity, token_stream
from reference.cache import resolve_model
from reference.corpora import load_split
from reference.evaluation import unigram_perplexity
from reference.pretrain import cpu_threads
from reference.specs import DEFAULT_MODELS, get_spec

GROUP_SIZE = 64
CPU = torch.device("cpu")
Loader = Callable[[Path], torch.nn.Module]
PRECISIONS: Registry[Loader] = Registry("precision")


@dataclass(frozen=True)
class TableQuantization:
    """The table's settings (quailora.quantizers.base.QuantSettings): NF4 with double quantization and
    block 64, INT-k with group 64."""

    method: str
    bits: int
    blocksize: int = 64
    double_quant: bool = True
    group_size: int = GROUP_SIZE


def _quantized(method: str, bits: int) -> Loader:
    """The checkpoint loaded quantized by the quantizer's own backend, as a trial loads it, in float32."""
    settings = TableQuantization(method, bits)
    return lambda path: quantizer_spec(method).backend().load(path, settings, torch.float32, CPU, False)


PRECISIONS.register("fp32")(lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
PRECISIONS.register("bnb 8-bit")(_quantized("int8", 8))
PRECISIONS.register("bnb NF4")(_quantized("nf4", 4))
for _bits in (4, 3, 2):
    PRECISIONS.register(f"INT{_bits} g{GROUP_SIZE}")(_quantized("int", _bits))
COLUMNS = ("fp32", "bnb 8-bit", "bnb NF4", "INT4 g64", "INT3 g64", "INT2 g64")


def measure(model_name: str, split: str, eval_tokens: int) -> dict[str, float]:
    """Perplexity of `model_name` on the first `eval_tokens` of `split` at every precision, plus the
    unigram baseline on the same positions."""
    path = Path(resolve_model(f"reference:{model_name}"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    eval_blocks = blocks(
        token_stream(tokenizer, load_split(split)),
        tokenizer.model_max_length,
        eval_tokens // tokenizer.model_max_length,
    )
    train_stream = token_stream(tokenizer, load_split("pretrain-train"))
    row = {"unigram": unigram_perplexity(train_stream, eval_blocks, len(tokenizer))}
    for column in COLUMNS:
        start = time.perf_counter()
        row[column] = perplexity(PRECISIONS.get(column)(path), eval_blocks)
        print(
            f"{model_name:12} {split:20} {column:10} ppl {row[column]:9.3f}  "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    return row


def markdown(tables: dict[str, dict[str, dict[str, float]]], eval_tokens: int, command: str) -> str:
    lines = [
        "# Quantization cost on the reference models",
        "",
        f"Perplexity on the first {eval_tokens} tokens of a split (blocks of the model's context length); in "
        "parentheses the change against fp32. bitsandbytes NF4 uses double quantization and block 64; INT-k "
        "is the group-wise asymmetric round-to-nearest quantizer (`quailora.quantizers`, group "
        f"{GROUP_SIZE}) applied to every linear layer except the output head, as bitsandbytes does. "
        "Unigram: add-one-smoothed `pretrain-train` token frequencies on the same positions.",
        "",
        f"Made with: `{command}`  ",
        f"Python {platform.python_version()}, torch {torch.__version__}, on {platform.machine()} CPU.",
    ]
    for split, rows in tables.items():
        lines += [
            "",
            f"## `{split}`",
            "",
            "| model | unigram | " + " | ".join(COLUMNS) + " |",
            "| --- | ---: | " + " | ".join("---:" for _ in COLUMNS) + " |",
        ]
        for name, row in rows.items():
            cells = [f"{row['fp32']:.2f}"] + [
                f"{row[c]:.2f} ({100 * (row[c] / row['fp32'] - 1):+.2f}%)" for c in COLUMNS[1:]
            ]
            lines.append(f"| {name} | {row['unigram']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m reference.quant_table", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--splits", nargs="+", default=["pretrain-validation", "finetune-validation"])
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--out", type=Path, default=Path("docs/results/quantization_table.md"))
    args = parser.parse_args(argv)
    for name in args.models:
        get_spec(name)  # every name checked before the first measurement
    torch.set_num_threads(cpu_threads())
    tables = {
        split: {name: measure(name, split, args.eval_tokens) for name in args.models} for split in args.splits
    }
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m reference.quant_table", *given])
    table = markdown(tables, args.eval_tokens, command)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)


if __name__ == "__main__":
    main()
