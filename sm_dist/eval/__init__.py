"""Evaluation: backspace-aware generation (search, greedy, sampling), scored by exact match (`sm-dist eval`)."""

from sm_dist.eval.arith_eval import (
    ExampleResult,
    count_bkspc_fixes,
    evaluate,
    format_table,
    score_example,
    summarize,
)

__all__ = ["ExampleResult", "count_bkspc_fixes", "evaluate", "format_table", "score_example", "summarize"]
