"""Synthetic long-range recall data (docs/results.md, "Long-range recall"): sequences of
segments closed by a separator, each stating one fact `key -> value`, and queries that ask
for a fact stated many segments earlier. Deterministic by seed; written through the normal
`.bin/.idx` pipeline (`IndexedDatasetBuilder`), so the trainer reads it unchanged with the
byte-level `CharLevelTokenizer` (vocabulary 512; every id below is < 512).

Token layout of one sequence (ids in `RecallSpec`):

    HEADER x a | fact | fact | query | fact | ...        (a = init_tokens, the sinks)
    fact  = KEY_k  VALUE_v  SEP                        (states k -> v; SEP closes the segment)
    query = QUERY  KEY_k  VALUE_v  SEP                 (asks k; the model predicts VALUE_v
                                                        at the KEY_k position)

Why the properties hold (the tests check the first three on generated data):
  * full attention can answer every query: the fact `KEY_k VALUE_v` is in the sequence and
    its key is unique among the facts a query can see (a key is restated only after
    `reuse_gap` other facts, and the query asks for the latest statement);
  * the value of a queried fact is drawn uniformly, independently of every other token, so a
    predictor that sees only the header (constant) and tokens that do not include the fact's
    `KEY_k VALUE_v` pair gets 1 / num_values accuracy at best. An L-layer model whose keys are
    the a initial tokens + the last w tokens (StreamingLLM(w), or SepLLM(w) on data without
    separators) reaches back at most L * (w - 1) tokens through its layers, so queries whose
    fact lies further back are at chance for it;
  * SepLLM(w) keeps every earlier SEP; the SEP closing a fact sits right after the value, so
    the fact is inside that SEP's local window: a SepLLM model can answer a far query only
    through the hidden states of separators (the only kept keys beyond the window), i.e. by
    writing each segment's fact into its SEP;
  * the ablation (`separators=False`) closes segments with CLOSE, a token that is not a
    separator, at the same positions: the same sequences, no separators to read.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from megatron.data.indexed_dataset import IndexedDatasetBuilder

PAD, HEADER, SEP, QUERY, CLOSE = 0, 1, 2, 3, 4
VALUE0, KEY0 = 16, 32  # values VALUE0 .. VALUE0 + num_values - 1, keys from KEY0
VOCAB_LIMIT = 512  # CharLevelTokenizer's vocabulary


@dataclass(frozen=True)
class RecallSpec:
    init_tokens: int = 4  # header length: >= the sinks a of StreamingLLM / SepLLM
    num_keys: int = 128
    num_values: int = 16  # chance accuracy = 1 / num_values
    query_prob: float = 1 / 3  # per segment, when some fact is still unasked
    reuse_gap: int = 96  # a key is restated only after this many other facts
    max_query_distance: int | None = None  # in segments; None: any earlier fact
    separators: bool = True  # False: the ablation, segments closed by CLOSE

    def __post_init__(self) -> None:
        if self.init_tokens < 1:
            raise ValueError(f"RecallSpec.init_tokens must be >= 1, got {self.init_tokens}")
        if self.num_values < 2 or VALUE0 + self.num_values > KEY0:
            raise ValueError(f"RecallSpec.num_values must be in [2, {KEY0 - VALUE0}]")
        if self.num_keys < 2 or KEY0 + self.num_keys > VOCAB_LIMIT:
            raise ValueError(f"RecallSpec.num_keys must be in [2, {VOCAB_LIMIT - KEY0}]")
        if not 0 < self.reuse_gap < self.num_keys:
            raise ValueError(
                f"RecallSpec.reuse_gap must be in [1, num_keys={self.num_keys}), got "
                f"{self.reuse_gap} (a new fact needs a key outside the last reuse_gap facts)"
            )
        if not 0.0 < self.query_prob < 1.0:
            raise ValueError(f"RecallSpec.query_prob must be in (0, 1), got {self.query_prob}")

    @property
    def closer(self) -> int:
        return SEP if self.separators else CLOSE


@dataclass(frozen=True)
class Query:
    answer_pos: int  # position of the query's KEY token: its next-token target is the value
    value: int  # the value token id (target at answer_pos + 1)
    key: int
    fact_pos: int  # position of the fact's KEY token
    fact_sep_pos: int  # position of the token closing the fact's segment
    distance_segments: int  # query segment index - fact segment index


@dataclass
class RecallSequence:
    tokens: np.ndarray  # int64 [length]
    queries: list[Query] = field(default_factory=list)
    segment_ends: list[int] = field(default_factory=list)  # position of each segment's closer


def generate(spec: RecallSpec, length: int, rng: np.random.Generator) -> RecallSequence:
    """One sequence of exactly `length` tokens (the tail after the last whole segment is PAD)."""
    if length < spec.init_tokens + 4:
        raise ValueError(f"length {length} leaves no room for a segment after the header")
    toks = [HEADER] * spec.init_tokens
    seq = RecallSequence(np.empty(0, np.int64))
    recent: deque[int] = deque(maxlen=spec.reuse_gap)  # keys of the last reuse_gap facts
    # key -> (segment index, key position, closer position, value) of its unasked latest fact
    open_facts: dict[int, tuple[int, int, int, int]] = {}
    while True:
        seg = len(seq.segment_ends)
        askable = [
            k
            for k, f in open_facts.items()
            if spec.max_query_distance is None or seg - f[0] <= spec.max_query_distance
        ]
        if askable and rng.random() < spec.query_prob:
            if len(toks) + 4 > length:
                break
            key = askable[int(rng.integers(len(askable)))]
            f_seg, f_pos, f_sep, value = open_facts.pop(key)
            pos = len(toks) + 1
            toks += [QUERY, KEY0 + key, VALUE0 + value, spec.closer]
            seq.queries.append(Query(pos, VALUE0 + value, KEY0 + key, f_pos, f_sep, seg - f_seg))
        else:
            if len(toks) + 3 > length:
                break
            free = np.setdiff1d(np.arange(spec.num_keys), np.fromiter(recent, int, len(recent)))
            key = int(free[rng.integers(len(free))])
            value = int(rng.integers(spec.num_values))
            recent.append(key)
            open_facts[key] = (seg, len(toks), len(toks) + 2, value)  # replaces an older one
            toks += [KEY0 + key, VALUE0 + value, spec.closer]
        seq.segment_ends.append(len(toks) - 1)
    seq.tokens = np.array(toks + [PAD] * (length - len(toks)), dtype=np.int64)
    return seq


def generate_many(spec: RecallSpec, n: int, length: int, seed: int) -> list[RecallSequence]:
    """n sequences from one seed (the same seed gives the same sequences)."""
    rng = np.random.default_rng(seed)
    return [generate(spec, length, rng) for _ in range(n)]


def write_dataset(prefix: str, spec: RecallSpec, n: int, length: int, seed: int) -> int:
    """`prefix`.bin/.idx with n documents of exactly `length` tokens each; returns the number
    of queries. With documents of seq_length tokens, every training sample (seq_length + 1
    tokens) is one whole sequence plus the next one's first HEADER token."""
    if os.path.exists(prefix + ".bin") or os.path.exists(prefix + ".idx"):
        raise FileExistsError(f"{prefix}.bin/.idx exist already; remove them or pick a new prefix")
    builder = IndexedDatasetBuilder(prefix, np.uint16)
    queries = 0
    try:
        for seq in generate_many(spec, n, length, seed):
            builder.add_document(seq.tokens)
            queries += len(seq.queries)
        builder.finalize()
    except BaseException:
        builder.abort()
        raise
    return queries


def render(tokens: np.ndarray) -> str:
    """Human-readable form: `# # # # k17=v3. ?k5=v9. ...` (docs, debugging)."""
    out = []
    for t in (int(x) for x in tokens):
        if t >= KEY0:
            out.append(f" k{t - KEY0}")
        elif t >= VALUE0:
            out.append(f"=v{t - VALUE0}")
        else:
            out.append({PAD: " _", HEADER: "#", SEP: ".", QUERY: " ?", CLOSE: "|"}.get(t, f"<{t}>"))
    return "".join(out).strip()
