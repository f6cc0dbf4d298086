"""The output side: the Hugging Face folder (side files, index, durable writes) and hub upload.

The safetensors shards themselves are written by the Rust core (``_core.write_plan``) from the
plan the API builds; this package writes everything around them.
"""
