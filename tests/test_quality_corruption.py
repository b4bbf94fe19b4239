"""The quality gate measured, and its scores independent of the process's threads.

On the demo run, the instructions of 20% of the pairs are swapped with those of other
pairs; the score stage (the demo's own channel encoders as the composed scorer) and
export's rules (round trip + image shortcuts) must flag the swapped instructions at least
3x as often as the intact ones."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch

from megapairs.cli import main
from megapairs.config import FilterConfig
from megapairs.dataset.gate import failed_rule
from megapairs.runs import RunDir, concat_tables, read_table, write_table
from megapairs.schemas import ANNOTATIONS_DIR, SCORES_DIR, SCORES_SCHEMA

SWAPPED_SHARE = 0.2
GATE = FilterConfig(max_rank=2, drop_shortcuts="image")  # the README's worked example


@pytest.fixture(scope="module")
def demo_copy(demo_run: RunDir, tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    """The demo run as built, before any test changes it."""
    copy = tmp_path_factory.mktemp("copy") / "run"
    shutil.copytree(demo_run.root, copy)
    return RunDir(copy)


def scores(run: RunDir) -> pa.Table:
    return concat_tables(run.files(SCORES_DIR, "score"), SCORES_SCHEMA)


def test_scores_do_not_depend_on_the_threads_of_the_process(demo_copy: RunDir) -> None:
    """A Ray actor has one CPU, a local run several: the tables must be the same."""
    other = demo_copy.root.parent / "other"
    shutil.copytree(demo_copy.root, other)
    threads = torch.get_num_threads()
    try:
        for count, root in ((2, demo_copy.root), (1, other)):
            torch.set_num_threads(count)
            assert main(["score", "--run", str(root), "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert scores(demo_copy).equals(scores(RunDir(other)))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    root = tmp_path_factory.mktemp("corruption") / "run"
    assert main(["demo", "--run", str(root), "--images", "300", "--quiet"]) == 0
    return RunDir(root)


def swap_instructions(run: RunDir, share: float, seed: int) -> set[str]:
    """Give `share` of the annotated pairs the instructions of other chosen pairs (a
    permutation without fixed points among them); the ids of the pairs changed."""
    parts = run.done_parts("annotate")
    tables = {part: read_table(run.part_path(ANNOTATIONS_DIR, part)) for part in parts}
    rows = [(part, i) for part in parts for i in range(tables[part].num_rows)]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(rows), size=round(share * len(rows)), replace=False)
    donors = np.roll(chosen, 1)  # each chosen pair takes the next one's instructions
    before = {part: tables[part]["instructions"].to_pylist() for part in parts}
    after = {part: list(values) for part, values in before.items()}
    swapped = set()
    for taker, donor in zip(chosen, donors, strict=True):
        (part, i), (donor_part, j) = rows[taker], rows[donor]
        after[part][i] = before[donor_part][j]
        swapped.add(tables[part]["pair_id"][i].as_py())
    for part, table in tables.items():
        column = pa.array(after[part], pa.list_(pa.string()))
        index = table.schema.get_field_index("instructions")
        write_table(
            run.part_path(ANNOTATIONS_DIR, part), table.set_column(index, "instructions", column)
        )
    return swapped


def test_the_gate_flags_swapped_instructions_far_more_often_than_intact_ones(
    demo_run: RunDir, capsys: pytest.CaptureFixture[str]
) -> None:
    swapped = swap_instructions(demo_run, SWAPPED_SHARE, seed=0)
    assert main(["score", "--run", str(demo_run.root), "--quiet"]) == 0
    rows = concat_tables(demo_run.files(SCORES_DIR, "score"), SCORES_SCHEMA).to_pylist()
    is_swapped = np.array([row["pair_id"] in swapped for row in rows])
    flagged = np.array([failed_rule(row, GATE) is not None for row in rows])
    swapped_rate, intact_rate = flagged[is_swapped].mean(), flagged[~is_swapped].mean()
    precision = (flagged & is_swapped).sum() / flagged.sum()
    recall = (flagged & is_swapped).sum() / is_swapped.sum()
    with capsys.disabled():
        print(
            f"\ncorruption test: {is_swapped.sum()} swapped of {len(rows)} instructions; "
            f"gate max_rank={GATE.max_rank} + image shortcuts flags swapped "
            f"{swapped_rate:.1%}, intact {intact_rate:.1%} "
            f"({swapped_rate / intact_rate:.1f}x); precision {precision:.2f}, recall {recall:.2f}"
        )
    assert swapped_rate >= 3 * intact_rate
