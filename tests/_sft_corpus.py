"""A synthetic, deterministic speed-edit corpus in upstream's JSONL layout, for the SFT tests.

"faster": the target is the source with every other unit dropped; "slower": every unit repeated.
Codes are small so a tiny model (vocab 512, audio ids from 324) can hold them.
"""

import json

import numpy as np

AUDIO_ID_BASE = 324  # model id of <audio_0> in the tiny test vocabulary (after the byte region)
TINY_LLM = ["llm.vocab_size=512", "llm.hidden_size=64", "llm.intermediate_size=128", "llm.num_heads=4",
            "llm.num_groups=2", "llm.num_layers=2", f"data.audio_id_base={AUDIO_ID_BASE}", "data.audio_codes=188",
            "data.text_tokenizer=words"]


def speed_edit(src, kind):
    src = list(src)
    return src[::2] if kind == "faster" else [c for c in src for _ in range(2)]


def make_records(n, seed, codes=16, lengths=(4, 9)):
    rng = np.random.RandomState(seed)
    records = []
    for i in range(n):
        src = rng.randint(0, codes, rng.randint(*lengths)).tolist()
        kind = ("faster", "slower")[i % 2]
        records.append({"source_audio": "unused.wav", "source_text": "hello world", "target_text": "hello world",
                        "source_vq02vq06": [65536 + c for c in src],
                        "target_vq02vq06": [65536 + c for c in speed_edit(src, kind)],
                        "task_type": "edit", "edit_type": "speed", "edit_info": kind})
    return records


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)
