"""Training: pure step functions per algorithm (sft.py, reward.py, dpo.py, grpo.py, ppo.py), the train
state (state.py), the one jit helper (jit.py), the one loop (loop.py), each algorithm's wiring (runs/)."""
