"""A new datamodule: problems from a plain-text file in a format `data=reasoning` cannot read.

The file holds one block per problem, blocks separated by a blank line, one field per line:

    Problem: Ava has 7 apples. Ava buys 5 more. How many apples does Ava have now?
    Solution: 7 + 5 = 12. The answer is \\boxed{12}.
    Answer: 12

Subclassing `RawTextDataModule` leaves one method to write, `build_splits`; the base class batches the rows as
raw text, shuffles them with a seeded, resumable order, shards them under DDP and fits them to
`context.max_prompt_tokens`. Its config is `conf/data/blocks.yaml` beside this file; from the repository root:

    PYTHONPATH=experiments/extending opsd-train hydra.searchpath=[file://experiments/extending/conf] \
        data=blocks data.path=experiments/extending/problems.txt
"""

from __future__ import annotations

from pathlib import Path

from opsd_lightning.data import RawTextDataModule

LABELS = {"Problem": "problem", "Solution": "solution", "Answer": "answer"}


def read_blocks(path: str | Path) -> list[dict[str, str]]:
    """The file's rows, one per block: `{"problem", "solution", "answer"}` (answer optional)."""
    rows = []
    for number, block in enumerate(Path(path).read_text().strip().split("\n\n"), start=1):
        fields = (line.partition(":") for line in block.strip().splitlines())
        row = {LABELS[label]: value.strip() for label, _, value in fields if label in LABELS}
        if not (row.get("problem") and row.get("solution")):
            raise ValueError(f"{path}: block {number} needs a 'Problem:' and a 'Solution:' line")
        rows.append(row)
    return rows


class TextBlocksDataModule(RawTextDataModule):
    """The blocks of `path`: the first `held_out` ones validate (`benchmark=heldout`), the others train.

    `batch_size`, `eval_batch_size`, `num_workers` and `seed` are the base class's; named here, so that
    `data._target_=...` keeps them from `conf/data/arith.yaml` (and leaves that config's other options out).
    """

    def __init__(
        self,
        path: str,
        held_out: int = 4,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed)
        self.path, self.held_out = path, held_out

    def build_splits(self) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        rows = read_blocks(self.path)
        if not 0 <= self.held_out < len(rows):
            raise ValueError(
                f"data.held_out={self.held_out} leaves no training rows of {len(rows)} in {self.path}"
            )
        return rows[self.held_out :], rows[: self.held_out]
