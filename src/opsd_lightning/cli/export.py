"""`opsd-export <adapter folder> <output folder>`: merge LoRA adapters into their base model and save a plain
Hugging Face checkpoint (loadable with `AutoModelForCausalLM.from_pretrained`, servable by any engine)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from opsd_lightning.models import LoadedModel, load_pretrained, save_pretrained


def merge_adapters(adapter: str | Path, base: str | None = None, dtype: str = "bfloat16") -> LoadedModel:
    """The base model (`base`, else the adapter's `base_model_name_or_path`) with the adapters merged in."""
    from peft import PeftModel

    adapter = Path(adapter)
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{adapter} is not a PEFT adapter folder: it has no adapter_config.json")
    base = base or json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config_file} names no base model; pass --base <hub id or folder>")
    loaded = load_pretrained(base, dtype=dtype)
    merged = PeftModel.from_pretrained(loaded.model, str(adapter)).merge_and_unload()
    return LoadedModel(model=merged, tokenizer=loaded.tokenizer)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="opsd-export", description=__doc__.splitlines()[0])
    parser.add_argument("adapter", type=Path, help="a PEFT adapter folder (e.g. checkpoints/adapter-last)")
    parser.add_argument("out", type=Path, help="where to write the merged model and tokenizer")
    parser.add_argument("--base", default=None, help="base model; default: the adapter config's")
    parser.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 or float16")
    args = parser.parse_args(argv)
    folder = save_pretrained(merge_adapters(args.adapter, args.base, args.dtype), args.out)
    print(f"Merged model written to {folder}")


if __name__ == "__main__":
    main()
