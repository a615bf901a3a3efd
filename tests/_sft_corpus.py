"""A synthetic, deterministic edit corpus in upstream's JSONL layout, for the SFT tests.

Emotion edits over a tiny codebook: the source is 4-8 distinct codes from [0, 16); the target is the
same units moved into the band the instruction names: "happy" -> code + 16, "sad" -> code + 32.
Following the instruction means answering in the right band, with the source's length, then <|EOT|>;
getting every unit right also needs copying the source (an induction circuit), which a tiny model
learns only partly in a CPU-sized run.
"""

import json

import numpy as np

AUDIO_ID_BASE = 324  # model id of <audio_0> in the tiny test vocabulary (after the byte region)
TINY_LLM = ["llm.vocab_size=512", "llm.hidden_size=64", "llm.intermediate_size=128", "llm.num_heads=4",
            "llm.num_groups=2", "llm.num_layers=2", f"data.audio_id_base={AUDIO_ID_BASE}", "data.audio_codes=188",
            "data.text_tokenizer=words"]
BANDS = {"happy": 16, "sad": 32}
CODES = 16


def edit(src, kind):
    return [c + BANDS[kind] for c in src]


def make_records(n, seed, lengths=(4, 9)):
    rng = np.random.RandomState(seed)
    records = []
    for i in range(n):
        src = rng.permutation(CODES)[:rng.randint(*lengths)].tolist()
        kind = ("happy", "sad")[i % 2]
        records.append({"source_audio": "unused.wav", "source_text": "hello world", "target_text": "hello world",
                        "source_vq02vq06": [65536 + c for c in src],
                        "target_vq02vq06": [65536 + c for c in edit(src, kind)],
                        "task_type": "edit", "edit_type": "emotion", "edit_info": kind})
    return records


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)
