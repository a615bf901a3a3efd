"""Training: pure step functions per algorithm (sft.py), the train state (state.py), the shared loop (loop.py)."""
