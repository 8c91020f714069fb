"""Ready-made SK_SKB programs, returned as assembler programs.

Parsers (:mod:`~sockmap.programs.parsers`) return the length of the next message (>0),
0 for "need more", <0 for an error. Verdicts (:mod:`~sockmap.programs.verdicts`)
return SK_PASS/SK_DROP, after choosing a redirect target for SK_PASS to mean
"redirect". Each runs unchanged on both engines.
"""

from __future__ import annotations

from sockmap.programs._parts import (
    VerdictMode,
    message_length,
    strparser_view,
    verdict_message_start,
)
from sockmap.programs.bounded import bounded_redirect
from sockmap.programs.msg import msg_verdict, redirect_to_peer
from sockmap.programs.outcomes import OUTCOMES, count_programs, instrument
from sockmap.programs.parsers import (
    PRESETS,
    LengthField,
    fixed_size,
    length_prefixed,
    preset,
    whole_segment,
)
from sockmap.programs.sockops import add_established, add_established_map
from sockmap.programs.verdicts import (
    FNV_BASIS,
    drop,
    field_route,
    fnv1a,
    hash_route,
    pair,
    pass_,
    redirect_key,
    redirect_peer,
    round_robin,
)

__all__ = [
    "FNV_BASIS",
    "OUTCOMES",
    "PRESETS",
    "LengthField",
    "VerdictMode",
    "add_established",
    "add_established_map",
    "bounded_redirect",
    "count_programs",
    "drop",
    "field_route",
    "fixed_size",
    "fnv1a",
    "hash_route",
    "instrument",
    "length_prefixed",
    "message_length",
    "msg_verdict",
    "pair",
    "pass_",
    "preset",
    "redirect_key",
    "redirect_peer",
    "redirect_to_peer",
    "round_robin",
    "strparser_view",
    "verdict_message_start",
    "whole_segment",
]
