"""Transforms between reading and writing: LoRA merging, value heads, optimizer state.

They work on catalogue entries (boxes of source bytes), never on tensor values, except where a
merge must compute (LoRA, in the Rust core). They import formats and the layers below them, never
output, runs, the API or the CLI.
"""
