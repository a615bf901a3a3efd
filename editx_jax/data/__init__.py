"""Training data: upstream JSONL records -> token ids (jsonl.py) -> Grain pipelines (dataset.py)."""
