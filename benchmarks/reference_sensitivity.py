"""How a tiny-model recipe changes quantization sensitivity: pretrain a variant spec, then perplexity at
fp32, bitsandbytes 8-bit and NF4, and group-wise INT3 on 16 k tokens of two validation splits.

Used to choose the `tiny` recipe (docs/reference.md). One JSON line per run, e.g.

    python benchmarks/reference_sensitivity.py h64l4 \
        '{"hidden_size": 64, "intermediate_size": 256, "num_layers": 4, "learning_rate": 2e-3, "steps": 2000}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from quailora.text import blocks, perplexity, token_stream
from reference.corpora import load_split
from reference.pretrain import pretrain
from reference.quant_table import PRECISIONS
from reference.specs import get_spec
from reference.tokenizer import load_tokenizer

COLUMNS = ("fp32", "bnb 8-bit", "bnb NF4", "INT3 g64")
SPLITS = ("pretrain-validation", "finetune-validation")
EVAL_TOKENS = 16384


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a label for the JSON line")
    parser.add_argument("overrides", help="JSON object of ModelSpec fields to change")
    parser.add_argument("--base", default="llama-tiny", help="the spec the overrides apply to")
    args = parser.parse_args(argv)
    spec = dataclasses.replace(get_spec(args.base), **json.loads(args.overrides))
    tokenizer = load_tokenizer(spec.vocab_size)
    with tempfile.TemporaryDirectory() as out:
        trained = pretrain(
            spec,
            tokenizer,
            load_split("pretrain-train"),
            load_split("pretrain-validation"),
            Path(out),
            progress=False,
        )
        row = {
            "name": args.name,
            "overrides": json.loads(args.overrides),
            "train_seconds": trained["train_seconds"],
        }
        for split in SPLITS:
            eval_blocks = blocks(
                token_stream(tokenizer, load_split(split)), spec.seq_len, EVAL_TOKENS // spec.seq_len
            )
            ppl = {col: perplexity(PRECISIONS.get(col)(Path(out)), eval_blocks) for col in COLUMNS}
            row[split] = {col: round(v, 3) for col, v in ppl.items()}
            row[f"{split} NF4 %"] = round(100 * (ppl["bnb NF4"] / ppl["fp32"] - 1), 2)
            row[f"{split} INT3 %"] = round(100 * (ppl["INT3 g64"] / ppl["fp32"] - 1), 2)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
