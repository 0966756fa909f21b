"""The spec's rules, by id. The spec text, the JSON Schemas, the validator and the invalid
conformance fixtures all use these ids; tests check that the four agree one-to-one."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    """One rule of the spec: its id, its RFC-2119 level and a one-line summary."""

    id: str
    level: str  # "MUST" or "SHOULD"
    summary: str
    #: True for rules whose breach means the file is damaged or hostile (not merely written
    #: against the spec): readers refuse such files, and ``attnformat validate`` exits 2 for them.
    damage: bool = False


_RULES = [
    Rule("ATTN-STORE-001", "MUST", "Every stored array names its dimensions (Zarr v3 dimension_names, Zarr v2 _ARRAY_DIMENSIONS, netCDF dimensions)."),
    Rule("ATTN-STORE-002", "MUST", "Arrays of one group agree on the size of each dimension they share (e.g. `query_label` has one entry per query)."),
    Rule("ATTN-STORE-003", "MUST", "No array uses a pickle codec, filter, compressor or object codec, at any depth: reading a file never runs code stored in it.", damage=True),
    Rule("ATTN-STORE-004", "MUST", "A file never refers to data outside itself: no external storage, virtual datasets, external or soft links, symbolic links, device files, FIFOs or sockets.", damage=True),
    Rule("ATTN-STORE-005", "MUST", "Every stored chunk decodes to exactly the size its array declares and matches its checksum where one is stored.", damage=True),
    Rule("ATTN-STORE-006", "MUST", "Declared sizes stay within the bounds of the spec (metadata size, dimensions, chunk size, compression ratio, depth, node count).", damage=True),
    Rule("ATTN-STORE-007", "MUST", "A file whose `completeness` is \"complete\" stores every chunk of every attention variable.", damage=True),
    Rule("ATTN-ROOT-001", "MUST", "The root attribute `attnformat` is the string \"attnformat\"."),
    Rule("ATTN-ROOT-002", "MUST", "The root attribute `attnformat_version` is a MAJOR.MINOR.PATCH string with major version 1."),
    Rule("ATTN-ROOT-003", "MUST", "The root attribute `producer` is a non-empty string."),
    Rule("ATTN-ROOT-004", "MUST", "The root attribute `completeness` is \"complete\" or \"incomplete\"."),
    Rule("ATTN-ROOT-005", "MUST", "The file holds at least one attention site."),
    Rule("ATTN-ROOT-006", "MUST", "`model_name`, `model_framework`, `model_adapter` and `description`, where present, are strings."),
    Rule("ATTN-ROOT-007", "SHOULD", "`model_name` and `model_framework` are present."),
    Rule("ATTN-ROOT-008", "SHOULD", "`completeness` is \"complete\": an incomplete file (a run that stopped early) is readable but gets a warning."),
    Rule("ATTN-SITE-001", "MUST", "A site's `layout` is \"dense\", \"edge\", \"topk\" or \"statistics\"."),
    Rule("ATTN-SITE-002", "MUST", "A site has `normalization`: \"softmax\", \"sparsemax\", \"sigmoid\" or \"other\"."),
    Rule("ATTN-SITE-003", "MUST", "A softmax or sparsemax site has `normalized_dim`: \"key\" or \"query\"."),
    Rule("ATTN-SITE-004", "MUST", "`causal`, where present, is the integer 0 or 1."),
    Rule("ATTN-SITE-005", "MUST", "A dense or edge site holds `weights` or `logits`, a topk site `weights`, a statistics site at least one statistic."),
    Rule("ATTN-SITE-006", "MUST", "No site lies inside another site."),
    Rule("ATTN-SITE-007", "MUST", "`attention_type`, where present, is \"self\" or \"cross\"."),
    Rule("ATTN-SITE-008", "SHOULD", "A site has `attention_type` and `causal`."),
    Rule("ATTN-SITE-009", "MUST", "`head_reduction`, where present, is \"mean\", and no attention variable of the site has `head`."),
    Rule("ATTN-DIM-001", "MUST", "`weights`, `logits` and `bias` use only the attention dimensions."),
    Rule("ATTN-DIM-002", "MUST", "Attention variables list their dimensions in the canonical order."),
    Rule("ATTN-DIM-003", "MUST", "Dense `weights`/`logits` have `query` and `key` and no `edge`; edge ones have `edge` and neither `query` nor `key`; neither has `rank`."),
    Rule("ATTN-DIM-004", "MUST", "`weights` and `logits` in one site have the same dimensions."),
    Rule("ATTN-DIM-005", "MUST", "`bias` uses a subset of the dimensions of `weights`/`logits`."),
    Rule("ATTN-COORD-001", "MUST", "A `step` dimension has an integer `step` coordinate that strictly increases."),
    Rule("ATTN-COORD-002", "MUST", "`layer` and `head` coordinates, where present, are integers without repeats."),
    Rule("ATTN-COORD-003", "MUST", "Label coordinates (`query_label`, `key_label`, `node_label`) are strings on (labelled dim) or (sample, labelled dim)."),
    Rule("ATTN-COORD-004", "MUST", "Masks (`query_mask`, `key_mask`) are boolean on (query|key) or (sample, query|key)."),
    Rule("ATTN-COORD-005", "MUST", "Positions are integers and groups are strings or integers, on (query|key) or (sample, query|key)."),
    Rule("ATTN-COORD-006", "MUST", "Token coordinates (`query_token`, `key_token`) are strings and generation steps (`query_generation_step`, `key_generation_step`) integers >= -1, on (query|key) or (sample, query|key)."),
    Rule("ATTN-VAR-001", "MUST", "`weights`, `logits` and `bias` are floating point."),
    Rule("ATTN-VAR-002", "MUST", "Every other data variable of a site has a `role` attribute from the spec's list."),
    Rule("ATTN-VAR-003", "MUST", "A `pairwise` variable ends in (query, key); an `image` variable has (sample?, image_row, image_col, channel?)."),
    Rule("ATTN-VAR-004", "SHOULD", "A `pairwise` variable has `units`."),
    Rule("ATTN-VAL-001", "MUST", "Softmax and sparsemax weights lie in [0, 1] (NaN marks a map that was not captured)."),
    Rule("ATTN-VAL-002", "MUST", "Softmax weights sum to 1 over `normalized_dim`, within the tolerance, for every captured, unmasked row."),
    Rule("ATTN-VAL-003", "MUST", "Causal dense self-attention puts zero weight on keys after the query."),
    Rule("ATTN-VAL-004", "MUST", "Softmax weights are zero on keys whose `key_mask` is false."),
    Rule("ATTN-VAL-005", "SHOULD", "Where `logits` and softmax `weights` are both stored, softmax(logits) equals `weights`."),
    Rule("ATTN-EDGE-001", "MUST", "An edge site has integer `source` and `target` coordinates on (edge,)."),
    Rule("ATTN-EDGE-002", "MUST", "An edge site's `edge_node_dim` names a dimension of the site (\"node\" or \"time\") that the attention variables do not use."),
    Rule("ATTN-EDGE-003", "MUST", "`source` and `target` are 0-based indices below the size of `edge_node_dim`."),
    Rule("ATTN-TOPK-001", "MUST", "A topk site holds `weights` and integer `key_index` with the same dims ending in (query, rank) and float `omitted_weight` on those dims without rank; `top_k` is the size of rank and `key_count` a positive integer."),
    Rule("ATTN-TOPK-002", "MUST", "`key_index` lies in [0, key_count) where weights are present, is -1 where they are NaN, and repeats no key within a row."),
    Rule("ATTN-TOPK-003", "MUST", "Kept weights do not increase along rank, and NaN comes only after the last kept weight of a row."),
    Rule("ATTN-TOPK-004", "MUST", "`omitted_weight` lies in [0, 1], equals 1 - sum(kept weights) and is at most (key_count - kept) * the smallest kept weight, within the row-sum tolerance."),
    Rule("ATTN-STAT-001", "MUST", "A statistics site holds only statistics (`entropy`, `max_weight`, `sink_weight`, `local_weight` floats, `top_key` integer) on (..., query), and a positive integer `key_count`."),
    Rule("ATTN-STAT-002", "MUST", "Statistics lie in their ranges: entropy in [0, ln key_count], weights in [0, 1], sink_weight <= max_weight, max_weight >= 1/key_count, top_key in [-1, key_count)."),
    Rule("ATTN-STAT-003", "MUST", "A statistics site with `local_weight` has `local_window`, a non-negative integer."),
    Rule("ATTN-IMG-001", "MUST", "`patch_grid`, where present, is two positive integers [rows, cols]."),
    Rule("ATTN-IMG-002", "MUST", "Patch coordinates are integers, -1 for tokens that are no patch, else inside `patch_grid` (which must be present)."),
    Rule("ATTN-LOSSY-001", "MUST", "`lossy_method` is \"bitround\" with integer `lossy_keepbits` (1-52) or \"quantize\" with positive `lossy_absolute_error`."),
]

RULES: dict[str, Rule] = {rule.id: rule for rule in _RULES}


#: Ids of the rules whose breach means damage or hostility (``Rule.damage``).
DAMAGE_RULES: frozenset[str] = frozenset(r.id for r in _RULES if r.damage)


def rule(rule_id: str) -> Rule:
    """Look up a rule by id.

    Examples
    --------
    >>> rule("ATTN-SITE-001").level
    'MUST'
    >>> rule("ATTN-STORE-005").damage, rule("ATTN-SITE-001").damage
    (True, False)
    """
    return RULES[rule_id]
