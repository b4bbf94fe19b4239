"""Arrow schemas and folder names of the tables a run holds.

Ids are int64 and deterministic: `part_index * PART_STRIDE + position`, where
position is the record's place in its input part, so an id names the same
record in every run over the same input, whatever was rejected around it.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

PART_STRIDE = 1_000_000

CORPUS_DIR = "corpus"
REJECTS_DIR = "rejects"
IMAGES_DIR = "images"
DECODED_DIR = "decoded"
EMBEDDINGS_DIR = "embeddings"
NEIGHBOURS_DIR = "neighbours"
PAIRS_DIR = "pairs"
ANNOTATIONS_DIR = "annotations"
ANNOTATION_FAILURES_DIR = "annotation_failures"
ANNOTATION_CACHE_DIR = "annotation_cache"
DATASET_DIR = "dataset"
SCORES_DIR = "scores"
SCORE_FAILURES_DIR = "score_failures"
JUDGE_CACHE_DIR = "judge_cache"
FLAGS_DIR = "flags"  # curation flags (megapairs explore): one JSON file per event

CORPUS_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("key", pa.string()),  # the record's name in its source (relative path, tar key)
        ("uri", pa.string()),  # where the image came from, readable by a person
        ("path", pa.string()),  # local file to reopen the image from; null when stored
        ("sha256", pa.string()),  # of the file bytes
        ("pixel_sha256", pa.string()),  # of the decoded RGB pixels and size (dedupe key)
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("source_format", pa.string()),  # JPEG, PNG, WEBP, ...
        ("source_mode", pa.string()),  # mode before conversion to RGB
        ("caption", pa.string()),  # null when missing or empty
        ("has_caption", pa.bool_()),
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("key", pa.string()),
        ("uri", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),  # a short code: corrupt, truncated, duplicate, ...
        ("detail", pa.string()),  # a sentence a person can act on
        ("duplicate_of", pa.int64()),  # kept id, for duplicates
    ]
)

IMAGES_SCHEMA = pa.schema([("id", pa.int64()), ("image", pa.binary())])

# Every input record after decoding (ingest's first step), before duplicates are known:
# the corpus columns of valid records, or the reason a record is unusable.
DECODED_SCHEMA = pa.schema(
    [
        *CORPUS_SCHEMA,
        ("reason", pa.string()),  # null for a valid record
        ("detail", pa.string()),
    ]
)

NEIGHBOURS_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("neighbour_ids", pa.list_(pa.int64())),
        ("scores", pa.list_(pa.float32())),
    ]
)

PAIRS_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),  # "<query id>-<target id>"
        ("query_id", pa.int64()),
        ("target_id", pa.int64()),
        ("rank", pa.int32()),  # the target's place among its query's targets
        ("channels", pa.list_(pa.string())),  # channels that found the target in window
        ("channel_scores", pa.list_(pa.float32())),  # aligned with channels
        ("hard_negative_ids", pa.list_(pa.int64())),
        ("hard_negative_topped_up", pa.int32()),  # how many came from outside the window
    ]
)


# Provenance of an annotation or a failure: which backend, models, prompts and seed made it.
PROVENANCE_FIELDS = [
    ("backend", pa.string()),  # openai | hf | template
    ("describer_model", pa.string()),
    ("instructor_model", pa.string()),
    ("prompt_version", pa.string()),  # prompt set name + hash of its files
    ("seed", pa.int64()),
]

ANNOTATIONS_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("query_id", pa.int64()),
        ("target_id", pa.int64()),
        ("description", pa.string()),
        ("instructions", pa.list_(pa.string())),  # checked, deduplicated, >= min_instructions
        ("dropped_instructions", pa.list_(pa.string())),  # "reason: text" of each one refused
        ("word_num", pa.int32()),  # the describer's word budget for this pair
        ("demonstration_ids", pa.list_(pa.string())),  # demonstrations shown to the instructor
        ("repaired", pa.bool_()),  # the instructor's first answer failed and a repair succeeded
        *PROVENANCE_FIELDS,
    ]
)

ANNOTATION_FAILURES_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("query_id", pa.int64()),
        ("target_id", pa.int64()),
        ("step", pa.string()),  # load_images | describe | instruct | repair
        ("reason", pa.string()),  # a short code: timeout, server_error, unparseable, ...
        ("detail", pa.string()),  # a sentence a person can act on
        ("raw_output", pa.string()),  # the model's last answer (or response body), if any
        ("attempts", pa.int32()),  # HTTP attempts of the failing request
        ("transient", pa.bool_()),  # server-side: a re-run retries it
        *PROVENANCE_FIELDS,
    ]
)

# The score stage: one row per (annotated pair, instruction), in the annotations' order.
# Ranks are 1-based among the target and `negatives` (ties count against the target:
# rank = 1 + how many negatives score >= the target); margin = target score - best
# negative score.
SCORES_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("query_id", pa.int64()),
        ("target_id", pa.int64()),
        ("instruction_index", pa.int32()),  # position in the annotation's instructions
        ("instruction", pa.string()),
        ("scorer", pa.string()),  # e.g. channels:image_semantic+caption, mmret-clip:<model>
        ("negatives", pa.list_(pa.int64())),  # the pair's hard negatives, then random ones
        ("target_score", pa.float64()),  # composed score of (query image + instruction, target)
        ("rank", pa.int32()),  # the target's rank by composed score (round trip)
        ("margin", pa.float64()),
        ("text_only_rank", pa.int32()),  # the target's rank with the instruction alone
        ("image_only_rank", pa.int32()),  # the target's rank with the query image alone
        ("text_shortcut", pa.bool_()),  # the instruction alone ranks the target first
        ("image_shortcut", pa.bool_()),  # the image alone ranks it first, the instruction not
        ("false_negative_ids", pa.list_(pa.int64())),  # hard negatives scoring >= the target
        ("judge_verdict", pa.string()),  # yes | no; null without a judge or when it failed
        ("judge_reason", pa.string()),
        ("judge_model", pa.string()),
    ]
)

# Instructions the score stage could not score (e.g. an image without an embedding).
SCORE_FAILURES_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("query_id", pa.int64()),
        ("target_id", pa.int64()),
        ("instruction_index", pa.int32()),
        ("instruction", pa.string()),
        ("scorer", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


# The released MegaPairs schema (q_img, q_text, t_img, hns) first, then our columns.
DATASET_SCHEMA = pa.schema(
    [
        ("q_img", pa.string()),  # query image path, relative to the dataset's image root
        ("q_text", pa.list_(pa.string())),  # instructions; a trainer samples one per step
        ("t_img", pa.string()),  # target image path
        ("hns", pa.list_(pa.string())),  # hard negatives: the query image first, then mined
        ("pair_id", pa.string()),
        ("query_id", pa.int64()),
        ("target_id", pa.int64()),
        ("hard_negative_ids", pa.list_(pa.int64())),  # the mined ones, aligned with hns[1:]
        ("channels", pa.list_(pa.string())),
        ("channel_scores", pa.list_(pa.float32())),
        ("q_caption", pa.string()),
        ("t_caption", pa.string()),
        ("description", pa.string()),
        *PROVENANCE_FIELDS,
    ]
)

# Columns export appends after DATASET_SCHEMA's when the score stage has scored the part (a
# part without scores keeps DATASET_SCHEMA exactly). The instruction_* / *_shortcuts /
# judge_* lists are aligned with q_text (the instructions export.filter kept); an
# instruction without a score row has nulls there.
DATASET_SCORE_FIELDS = [
    ("scorer", pa.string()),  # the score stage's scorer (null: no instruction was scored)
    ("instruction_target_scores", pa.list_(pa.float64())),  # composed score of the target
    ("instruction_ranks", pa.list_(pa.int32())),  # the target's rank, 1 = first (round trip)
    ("instruction_margins", pa.list_(pa.float64())),  # target score - best negative score
    ("instruction_text_only_ranks", pa.list_(pa.int32())),  # rank with the instruction alone
    ("instruction_image_only_ranks", pa.list_(pa.int32())),  # rank with the query image alone
    ("text_shortcuts", pa.list_(pa.bool_())),  # the instruction alone ranks the target first
    ("image_shortcuts", pa.list_(pa.bool_())),  # the query image alone ranks it first
    ("judge_verdicts", pa.list_(pa.string())),  # yes | no | null (no judge, or it failed)
    ("judge_reasons", pa.list_(pa.string())),
    ("judge_model", pa.string()),  # the judge of the first judged instruction
    # the mined hard negatives that scored >= the target under a kept instruction; with
    # export.filter.drop_false_negatives they are no longer in hard_negative_ids / hns
    ("false_negative_ids", pa.list_(pa.int64())),
    # below-window neighbours export added in their place (the end of hard_negative_ids)
    ("topped_up_negative_ids", pa.list_(pa.int64())),
    # "rule: instruction" of each instruction export.filter removed (rules: gate.RULES)
    ("gate_dropped_instructions", pa.list_(pa.string())),
]
SCORED_DATASET_SCHEMA = pa.schema([*DATASET_SCHEMA, *DATASET_SCORE_FIELDS])


def record_id(part: int, position: int) -> int:
    """The id of the record at `position` of input part `part`."""
    if not 0 <= position < PART_STRIDE:
        raise ValueError(f"a part holds at most {PART_STRIDE} records, got position {position}")
    return part * PART_STRIDE + position


def rejects_table(
    ids: Sequence[int] | pa.Array, stage: str, reasons: str | Sequence[str], details: Sequence[str]
) -> pa.Table:
    """REJECTS_SCHEMA rows for records known by id (key and uri left null; `with_sources`
    fills them); `reasons` is one code for all rows or one per row."""
    count = len(ids)
    reason_list = [reasons] * count if isinstance(reasons, str) else list(reasons)
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "key": pa.nulls(count, pa.string()),
            "uri": pa.nulls(count, pa.string()),
            "stage": pa.array([stage] * count, pa.string()),
            "reason": pa.array(reason_list, pa.string()),
            "detail": pa.array(list(details), pa.string()),
            "duplicate_of": pa.nulls(count, pa.int64()),
        },
        schema=REJECTS_SCHEMA,
    )


def with_sources(rejects: pa.Table, corpus: pa.Table) -> pa.Table:
    """Rejects with each record's missing key and uri taken from `corpus` (id, key, uri),
    in the same order."""
    position = pc.index_in(rejects["id"], value_set=corpus["id"])
    for name in ("key", "uri"):
        column = pc.coalesce(rejects[name], pc.take(corpus[name], position))
        rejects = rejects.set_column(rejects.schema.get_field_index(name), name, column)
    return rejects
